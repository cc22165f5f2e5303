"""Loading and checking the labelled text data, before any long work starts."""

from dataclasses import dataclass

from datasets import ClassLabel, DatasetDict, load_dataset

LABEL_COLUMN = "labels"  # integer class ids, the name Trainer and the models expect


@dataclass
class TaskData:
    """Splits with an integer `labels` column, the label names in id order, and where they came from."""

    splits: DatasetDict
    label_names: list[str]
    text_column: str
    text_pair_column: str | None
    source: str


def load_task_data(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    data_files: dict[str, str] | None = None,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    raw: DatasetDict | None = None,
) -> TaskData:
    """Load train/validation(/test) splits from the Hub, CSV/JSON files or a given `raw` DatasetDict, and check them.

    Raises a ValueError naming the split (and file), the column and what was found when: a split is
    missing, a column is missing, a text is empty, or validation/test hold labels that train does not.
    """
    if raw is not None:
        describe = {split: f"split {split!r}" for split in raw}
        source = dataset_name or "in-memory dataset"
    elif data_files:
        extension = next(iter(data_files.values())).rsplit(".", 1)[-1]
        extension = {"jsonl": "json", "tsv": "csv"}.get(extension, extension)
        try:
            raw = load_dataset(extension, data_files=data_files)
        except Exception as err:
            raise ValueError(f"Could not read the data files {data_files}: {err}") from err
        describe = {split: f"{split} file {path}" for split, path in data_files.items()}
        source = ", ".join(data_files.values())
    else:
        raw = load_dataset(dataset_name, dataset_config_name)
        describe = {split: f"split {split!r} of {dataset_name}" for split in raw}
        source = dataset_name
    for required in ("train", "validation"):
        if required not in raw:
            raise ValueError(
                f"A {required} split is needed (validation chooses k and β; test is never used for that); "
                f"found splits {sorted(raw)}."
            )
    splits = DatasetDict({name: raw[name] for name in ("train", "validation", "test") if name in raw})
    if max_train_samples is not None:
        splits["train"] = splits["train"].shuffle(seed=0).select(range(min(max_train_samples, len(splits["train"]))))
    if max_eval_samples is not None:
        for name in ("validation", "test"):
            if name in splits:
                splits[name] = splits[name].select(range(min(max_eval_samples, len(splits[name]))))

    text_columns = [text_column] + ([text_pair_column] if text_pair_column else [])
    for name, split in splits.items():
        for column in [*text_columns, label_column]:
            if column not in split.column_names:
                raise ValueError(
                    f"Column {column!r} not found in the {describe[name]}; its columns are {split.column_names}. "
                    f"Set --text_column_name / --text_pair_column_name / --label_column_name."
                )
        for column in text_columns:
            for row, text in enumerate(split[column]):
                if text is None or not str(text).strip():
                    raise ValueError(f"Empty text in column {column!r}, row {row} of the {describe[name]}.")

    label_feature = splits["train"].features[label_column]
    if isinstance(label_feature, ClassLabel):
        label_names = list(label_feature.names)
        to_name = label_feature.int2str
    else:
        label_names = sorted({str(label) for label in splits["train"][label_column]})
        to_name = str
    label_ids = {name: i for i, name in enumerate(label_names)}
    for name, split in splits.items():
        unseen = sorted({str(to_name(label)) for label in split[label_column]} - set(label_ids))
        if unseen:
            raise ValueError(
                f"The {describe[name]} has labels never seen in training: {unseen[:10]}; training labels are "
                f"{label_names}."
            )

    def encode(batch):
        return {LABEL_COLUMN: [label_ids[str(to_name(label))] for label in batch[label_column]]}

    # The original column goes: Trainer would pass a column named "label" to the model as well.
    drop = [label_column] if label_column != LABEL_COLUMN else []
    splits = splits.map(encode, batched=True, remove_columns=drop, desc="Encoding labels")
    return TaskData(splits, label_names, text_column, text_pair_column, source)


def check_teacher_labels(teacher_id2label: dict[int, str], label_names: list[str], teacher: str) -> bool:
    """True when the teacher is already a classifier for exactly these labels (so fine-tuning is skipped).

    A teacher with task-specific label names that differ from the data's raises: its head predicts other
    classes. A generic head (`LABEL_0`, ...) or none means the teacher still needs fine-tuning.
    """
    names = [teacher_id2label[i] for i in sorted(teacher_id2label)] if teacher_id2label else []
    if names == label_names:
        return True
    if names and not all(name.startswith("LABEL_") for name in names):
        raise ValueError(
            f"The teacher {teacher} is a classifier for the labels {names}, but the data has {label_names}. "
            "Pass a teacher fine-tuned on this task, or an encoder checkpoint to fine-tune."
        )
    return False
