"""Distil a fine-tuned text classifier into a small retrieval-augmented student with ReAugKD.

    accelerate launch examples/distill.py \
        --teacher_model_name_or_path my-finetuned-teacher \
        --student_model_name_or_path sentence-transformers/all-MiniLM-L6-v2 --student_num_layers 3 \
        --train_file train.csv --validation_file validation.csv --test_file test.csv \
        --output_dir outputs/my-student --num_train_epochs 3 --per_device_train_batch_size 32

With no flags (or `--demo`) it runs the offline demo. Arguments are those of `ModelArguments`, `TeacherArguments`,
`DataTrainingArguments` (hf_reaugkd.arguments) and `ReAugKDTrainingArguments` (all `TrainingArguments` flags, plus
the loss weights and temperatures), as flags or one JSON file.
"""

import sys

from hf_reaugkd.cli import main

if __name__ == "__main__":
    main(["distill", *sys.argv[1:]])  # as `hf-reaugkd distill`: a user error prints its message, not a traceback
