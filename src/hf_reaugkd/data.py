"""The task's data: loading and checking the labelled splits before any long work, the column names every stage
shares, tokenization, and the one loop that turns a tokenized dataset into padded batches."""

import codecs
import csv
import dataclasses
import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value, concatenate_datasets, load_dataset
from transformers import PreTrainedTokenizerBase

from .caching import fingerprint, hash_files
from .errors import InputError
from .settings_reaugkd import MAX_TEXT_CHARS, MULTI_LABEL, PROBLEM_TYPES, REGRESSION, SINGLE_LABEL

logger = logging.getLogger(__name__)

LABEL_COLUMN = "labels"  # class ids (0/1 per label, or numbers), the name Trainer and the models expect
TEACHER_LOGITS = "teacher_logits"  # (C,) the teacher's logits
TEACHER_KEYS = "teacher_keys"  # (d,) the example's knowledge-base key: normalize(W_t · h_t)
TEACHER_NEIGHBORS = "teacher_neighbor_ids"  # (n,) the key's nearest *other* knowledge-base rows
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
UNLABELED = -100  # the label of unlabelled rows: cross-entropy's ignore_index, so CE skips them
CHECK_BATCH_SIZE = 10_000  # rows read at once while checking texts and labels: memory stays flat for any N
# Numeric labels are classes when they are few integers (ratings 1-5, GLUE's 0/1), and regression targets otherwise
# (STS-B's 0.0-5.0 similarities): more distinct integers than this are a scale, not classes.
MAX_INTEGER_CLASSES = 20


@dataclass
class TaskData:
    """Splits with a `labels` column, the label names in id order, the task type, and where they came from.

    `labels` holds class ids (single-label), one 0/1 float per label name (multi-label), or the number to predict
    (regression, whose one "label name" is the label column's).

    `fingerprint` hashes the labelled data's *content* (the files' bytes, the columns and subsets used), so cached
    stages built from other data are never reused. `unlabeled` holds extra in-domain texts (label `UNLABELED`) that
    the teacher labels for the knowledge base and the student's transfer set; `unlabeled_fingerprint` hashes their
    content. The teacher's fine-tuning never sees them, so its stage is keyed by `fingerprint` alone.
    """

    splits: DatasetDict
    label_names: list[str]
    text_column: str
    text_pair_column: str | None
    source: str
    fingerprint: str
    problem_type: str = SINGLE_LABEL
    unlabeled: Dataset | None = None
    unlabeled_fingerprint: str | None = None

    @property
    def text_columns(self) -> list[str]:
        return [self.text_column] + ([self.text_pair_column] if self.text_pair_column else [])

    @property
    def content_fingerprint(self) -> str:
        """The labelled data's fingerprint, with the unlabelled texts' when there are any (stages over all rows)."""
        if self.unlabeled is None:
            return self.fingerprint  # unchanged: caches made without unlabelled data stay valid
        return fingerprint(self.fingerprint, self.unlabeled_fingerprint)

    def transfer_set(self) -> Dataset:
        """The student's distillation transfer set and the knowledge base's rows, in this order: the labelled train
        rows, then the unlabelled ones (label `UNLABELED`). Without unlabelled texts: the train split as it is."""
        train = self.splits["train"]
        if self.unlabeled is None:
            return train
        columns = [*self.text_columns, LABEL_COLUMN]
        features = Features({**{c: train.features[c] for c in self.text_columns}, LABEL_COLUMN: Value("int64")})
        parts = [part.select_columns(columns) for part in (train, self.unlabeled)]
        # a ClassLabel `labels` (Hub data) cannot hold -100, and text types may differ: one schema for both parts
        parts = [part if part.features == features else part.cast(features) for part in parts]
        return concatenate_datasets(parts)


def load_task_data(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    data_files: dict[str, str] | None = None,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    problem_type: str | None = None,
    label_separator: str | None = None,
) -> TaskData:
    """Load train/validation(/test) splits from the Hub or CSV/JSON files, and check them.

    The task type (`problem_type`) is given or read from the labels: several comma-separated `label_column`s (0/1
    each) or a `label_separator` ("music;politics") make a multi-label task; numeric labels that are not a few
    integers (`MAX_INTEGER_CLASSES`) a regression; anything else single-label classification.

    Raises an InputError naming the split (and file), the column and what was found when: a split is
    missing, a column is missing, a text or label is empty, a regression label is not a number, a 0/1 label column
    holds something else, or validation/test hold labels that train does not.
    """
    if data_files:
        content = {split: hash_files([path]) for split, path in sorted(data_files.items())}
        raw = DatasetDict({split: read_data_file(split, path, content[split]) for split, path in data_files.items()})
        describe = {split: f"{split} file {path}" for split, path in data_files.items()}
        paths = dict(data_files)
        source = ", ".join(data_files.values())
    else:
        try:
            raw = load_dataset(dataset_name, dataset_config_name)
        except Exception as err:  # unknown name or config, no network, ...: the user's to fix
            raise InputError(f"Could not load --dataset_name {dataset_name!r} ({dataset_config_name}): {err}") from err
        describe = {split: f"split {split!r} of {dataset_name}" for split in raw}
        paths = {}
        source = dataset_name
        content = {split: raw[split]._fingerprint for split in sorted(raw)}  # datasets hashes the Hub revision
    for required in ("train", "validation"):
        if required not in raw:
            raise InputError(
                f"A {required} split is needed (validation chooses k and β; test is never used for that); "
                f"found splits {sorted(raw)}."
            )
    splits = DatasetDict({name: raw[name] for name in ("train", "validation", "test") if name in raw})
    text_columns = [text_column] + ([text_pair_column] if text_pair_column else [])
    label_columns = [column.strip() for column in label_column.split(",")]
    for name, split in splits.items():
        for column in [*text_columns, *label_columns]:
            if column not in split.column_names:
                raise InputError(
                    f"Column {column!r} not found in the {describe[name]}; its columns are {split.column_names}. "
                    f"Set --text_column_name / --text_pair_column_name / --label_column_name."
                )
        check_filled(split, text_columns, describe[name], path=paths.get(name))
        for column in label_columns:
            check_filled(split, [column], describe[name], column, paths.get(name))
    problem_type = _problem_type(splits["train"], label_columns, problem_type, label_separator, describe["train"])
    if problem_type != SINGLE_LABEL:  # checked before sampling, so that errors name the file's lines
        label_names, encode = _label_encoder(splits, label_columns, problem_type, label_separator, describe, paths)
    # sampled after the checks, so that their errors name the file's lines
    if max_train_samples is not None:
        splits["train"] = splits["train"].shuffle(seed=0).select(range(min(max_train_samples, len(splits["train"]))))
    if max_eval_samples is not None:
        for name in ("validation", "test"):
            if name in splits:
                splits[name] = splits[name].select(range(min(max_eval_samples, len(splits[name]))))

    for name, split in splits.items():
        if len(split) == 0:
            raise InputError(f"The {describe[name]} has no rows.")
    if problem_type == SINGLE_LABEL:
        label_names, encode = _class_encoder(splits, raw["train"], label_column, describe, paths)
    # The original columns go: Trainer would pass a column named "label" to the model as well.
    drop = [column for column in label_columns if column != LABEL_COLUMN]
    features = {
        SINGLE_LABEL: Value("int64"), MULTI_LABEL: Sequence(Value("float32")), REGRESSION: Value("float32")
    }[problem_type]  # fmt: skip
    splits = DatasetDict(
        {
            name: split.map(
                encode,
                batched=True,
                remove_columns=drop,
                features=Features(
                    {**{c: t for c, t in split.features.items() if c not in drop}, LABEL_COLUMN: features}
                ),
                desc="Encoding labels",
            )
            for name, split in splits.items()
        }
    ).select_columns([*text_columns, LABEL_COLUMN])  # other columns would reach the model's forward
    data_fingerprint = fingerprint(
        content, text_column, text_pair_column, label_column, max_train_samples, max_eval_samples,
        *([problem_type, label_separator] if problem_type != SINGLE_LABEL else []),
    )  # fmt: skip
    return TaskData(splits, label_names, text_column, text_pair_column, source, data_fingerprint, problem_type)


def _class_encoder(splits: DatasetDict, raw_train: Dataset, label_column: str, describe: dict, paths: dict):
    """Single-label classes: their names in id order (ClassLabel names, else the sorted names found in train) and
    the batch function that maps a split's labels to ids, after checking every split."""
    label_feature = splits["train"].features[label_column]
    if isinstance(label_feature, ClassLabel):
        for name, split in splits.items():
            unlabelled = [
                start + i for start, batch in _iter_column(split, label_column) for i, x in enumerate(batch) if x < 0
            ]
            if unlabelled:  # GLUE's test splits: label -1
                raise InputError(
                    f"The {describe[name]} has {len(unlabelled)} unlabelled rows (label -1), e.g. row {unlabelled[0]}; "
                    "evaluation needs labels: leave that split out or use a labelled one."
                )
        label_names = list(label_feature.names)
        to_name = label_feature.int2str
    else:
        label_names = sorted(
            {str(label).strip() for _, batch in _iter_column(splits["train"], label_column) for label in batch}
        )
        _check_label_kinds(raw_train, label_column, describe["train"], paths.get("train"))
        to_name = label_name
    if len(label_names) < 2:
        raise InputError(
            f"The {describe['train']} has a single label {label_names}: a classifier needs at least 2 classes "
            f"in column {label_column!r}."
        )
    label_ids = {name: i for i, name in enumerate(label_names)}
    for name, split in splits.items():
        seen = {to_name(label) for _, batch in _iter_column(split, label_column) for label in batch}
        unseen = sorted(seen - set(label_ids))
        if unseen:
            raise InputError(
                f"The {describe[name]} has labels never seen in training: {unseen[:10]}; training labels are "
                f"{label_names}."
            )

    def encode(batch):
        return {LABEL_COLUMN: [label_ids[to_name(label)] for label in batch[label_column]]}

    return label_names, encode


def _problem_type(
    train: Dataset, label_columns: list[str], given: str | None, separator: str | None, description: str
) -> str:
    """The task type: as given, else multi-label for several label columns or a separator, regression for numeric
    labels that are not a few integers, single-label otherwise."""
    if given is not None and given not in PROBLEM_TYPES:
        raise InputError(f"--problem_type must be one of {list(PROBLEM_TYPES)}, got {given!r}.")
    multi = len(label_columns) > 1 or separator is not None
    if multi and given not in (None, MULTI_LABEL):
        raise InputError(
            f"Several label columns or a --label_separator make a multi-label task, but --problem_type is {given!r}."
        )
    if multi:
        return MULTI_LABEL
    if given == MULTI_LABEL:
        raise InputError(
            "A multi-label task gives its labels as one column joined by --label_separator (e.g. ';') or as several "
            "0/1 columns (--label_column_name music,politics,sports)."
        )
    if given is not None:
        if given == REGRESSION and isinstance(train.features[label_columns[0]], ClassLabel):
            raise InputError(
                f"The {description} holds class labels (ClassLabel) in {label_columns[0]!r}: not numbers."
            )
        return given
    if isinstance(train.features[label_columns[0]], ClassLabel):
        return SINGLE_LABEL
    values = set()
    for _, batch in _iter_column(train, label_columns[0]):
        for label in batch:
            number = _number(label_name(label))
            if number is None:
                return SINGLE_LABEL
            values.add(number)
    if all(value.is_integer() for value in values) and len(values) <= MAX_INTEGER_CLASSES:
        return SINGLE_LABEL
    logger.info(
        "Numeric labels that are not a few integers (%d distinct values): a regression task (force another kind "
        "with --problem_type)",
        len(values),
    )
    return REGRESSION


def _label_encoder(
    splits: DatasetDict, label_columns: list[str], problem_type: str, separator: str | None, describe, paths
):
    """Multi-label and regression labels: the label names and the batch function that encodes a split's labels,
    after checking every cell of every split (errors name the file's line)."""
    if problem_type == REGRESSION:
        (column,) = label_columns
        for name, split in splits.items():
            for start, batch in _iter_column(split, column):
                for offset, label in enumerate(batch):
                    if _number(label_name(label)) is None or not math.isfinite(_number(label_name(label))):
                        raise InputError(
                            f"Regression labels are numbers: {row_location(paths.get(name), start + offset)} of the "
                            f"{describe[name]} has {label!r} in column {column!r}."
                        )

        def encode_numbers(batch):
            return {LABEL_COLUMN: [float(label_name(label)) for label in batch[column]]}

        return [column], encode_numbers
    if len(label_columns) > 1:
        for name, split in splits.items():
            for column in label_columns:
                for start, batch in _iter_column(split, column):
                    for offset, value in enumerate(batch):
                        if label_name(value).lower() not in ("0", "1", "0.0", "1.0", "true", "false"):
                            raise InputError(
                                f"Multi-label columns hold 0 or 1: {row_location(paths.get(name), start + offset)} "
                                f"of the {describe[name]} has {value!r} in column {column!r}."
                            )

        def encode_columns(batch):
            rows = zip(*(batch[column] for column in label_columns), strict=True)
            return {
                LABEL_COLUMN: [[float(label_name(v).lower() in ("1", "1.0", "true")) for v in row] for row in rows]
            }

        return label_columns, encode_columns
    (column,) = label_columns

    def split_labels(label) -> list[str]:
        return [part.strip() for part in str(label).split(separator) if part.strip()]

    label_names = sorted(
        {part for _, batch in _iter_column(splits["train"], column) for x in batch for part in split_labels(x)}
    )
    if len(label_names) < 2:
        raise InputError(f"The {describe['train']} has a single label {label_names}: multi-label needs at least 2.")
    known = set(label_names)
    for name, split in splits.items():
        for start, batch in _iter_column(split, column):
            for offset, label in enumerate(batch):
                unknown = sorted(set(split_labels(label)) - known)
                if unknown:
                    raise InputError(
                        f"{row_location(paths.get(name), start + offset)} of the {describe[name]} has labels "
                        f"{unknown} never seen in training; training labels are {label_names}."
                    )
    ids = {label: i for i, label in enumerate(label_names)}

    def encode_joined(batch):
        encoded = []
        for label in batch[column]:
            row = [0.0] * len(label_names)
            for part in split_labels(label):
                row[ids[part]] = 1.0
            encoded.append(row)
        return {LABEL_COLUMN: encoded}

    return label_names, encode_joined


def load_hub_split(name: str, config_name: str | None, split: str, flag: str = "--dataset_name") -> Dataset:
    """One split of a 🤗 dataset; an unknown name, config or split (or no network) is the user's to fix (`flag`
    names the option that gave it)."""
    try:
        return load_dataset(name, config_name, split=split)
    except Exception as err:  # noqa: BLE001 (datasets raises many kinds; all mean the same to the user)
        config = f" (configuration {config_name!r})" if config_name else ""
        raise InputError(f"Could not load split {split!r} of {flag} {name!r}{config}: {err}") from err


def check_filled(
    split: Dataset, columns: list[str], description: str, label_column: str | None = None, path: str | None = None
) -> None:
    """Refuse a text column that is not text, a missing or blank text (or label), and a text over `MAX_TEXT_CHARS`
    characters (before it is tokenized whole or stored in a knowledge base) with the column and the file's line
    (`path`) or the row, streaming `CHECK_BATCH_SIZE` rows at once."""
    for column in columns:
        dtype = getattr(split.features[column], "dtype", None)
        if column != label_column and dtype not in ("string", "large_string"):
            raise InputError(
                f"Column {column!r} of the {description} holds {dtype or type(split.features[column]).__name__} "
                "values, not text: is the text column name right?"
            )
        for start, batch in _iter_column(split, column):
            for offset, value in enumerate(batch):
                if value is None or not str(value).strip():
                    kind = "label" if column == label_column else "text"
                    where = row_location(path, start + offset)
                    raise InputError(f"Empty {kind} in column {column!r}, {where} of the {description}.")
                if column != label_column and len(value) > MAX_TEXT_CHARS:
                    raise InputError(
                        f"The text in column {column!r}, {row_location(path, start + offset)} of the {description}, "
                        f"is {len(value):,} characters long; texts are limited to {MAX_TEXT_CHARS:,} (the model reads "
                        "its first few hundred tokens): shorten it or leave it out."
                    )


def load_unlabeled_texts(
    data: TaskData,
    unlabeled_file: str | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
) -> TaskData:
    """`data` with in-domain texts without labels from a CSV/JSON(L) file or a `datasets` split, checked like the
    labelled data (the same text columns, no blank text; errors name the file or split and the row).

    Any other column (a label, an id) is ignored: only the teacher labels these rows. Returns `data` unchanged when
    neither source is given.
    """
    if not unlabeled_file and not dataset_name:
        return data
    if unlabeled_file:
        content = hash_files([unlabeled_file])
        raw = read_data_file("unlabeled", unlabeled_file, content)
        description = f"unlabeled file {unlabeled_file}"
    else:
        raw = load_hub_split(dataset_name, dataset_config_name, split, "--unlabeled_dataset_name")
        description = f"split {split!r} of {dataset_name}"
        content = raw._fingerprint  # datasets hashes the Hub revision
    if len(raw) == 0:
        raise InputError(f"The {description} has no rows.")
    for column in data.text_columns:
        if column not in raw.column_names:
            raise InputError(
                f"Column {column!r} not found in the {description}; its columns are {raw.column_names}. Unlabelled "
                "texts use the labelled data's --text_column_name / --text_pair_column_name."
            )
    check_filled(raw, data.text_columns, description, path=unlabeled_file)
    unlabeled = raw.select_columns(data.text_columns).map(
        lambda batch: {LABEL_COLUMN: [UNLABELED] * len(batch[data.text_column])},
        batched=True,
        desc="Marking unlabelled rows",
    )
    logger.info("unlabelled texts: %d rows from the %s", len(unlabeled), description)
    return dataclasses.replace(
        data, unlabeled=unlabeled, unlabeled_fingerprint=fingerprint(content, data.text_columns)
    )


def _iter_column(split: Dataset, column: str) -> Iterator[tuple[int, list]]:
    """`(first row, values)` of one column, `CHECK_BATCH_SIZE` rows at a time."""
    for start in range(0, len(split), CHECK_BATCH_SIZE):
        yield start, split[start : start + CHECK_BATCH_SIZE][column]


def read_data_file(split: str, path: str, content: str | None = None) -> Dataset:
    """One split from a CSV/JSON(L) file, with errors that name the file and, where known, the line. `content` is
    the file's SHA-256 when the caller has it already (else it is computed)."""
    extension = path.rsplit(".", 1)[-1].lower()
    extension = {"jsonl": "json", "tsv": "csv"}.get(extension, extension)
    _check_utf8(path)
    # CSV cells are read as written: "N/A" or "None" in a text is text, and an empty label stays empty (and is
    # rejected) instead of becoming the class "None".
    options = {"na_filter": False} if extension == "csv" else {}
    # datasets keys its cache by path, size and mtime, so an edited file with the same size and mtime would load
    # stale rows: the cache folder is named by the content instead, and reused, not rebuilt. Under torchrun every
    # rank then reads what rank 0 cached (a forced rebuild per rank deleted files the other ranks were using).
    cache_dir = Path(datasets.config.HF_DATASETS_CACHE) / "hf_reaugkd" / (content or hash_files([path]))[:32]
    with open(path, "rb") as f:  # datasets' own message for this is "Instruction 'train' corresponds to no data"
        filled = sum(1 for _ in itertools.islice((line for line in f if line.strip()), 2))
    if filled < (2 if extension == "csv" else 1):
        raise InputError(f"The {split} file {path} has no rows (a header only?).")
    try:
        dataset = load_dataset(extension, data_files={split: path}, cache_dir=str(cache_dir), **options)
    except Exception as err:
        cause = err
        while cause.__cause__ is not None or cause.__context__ is not None:  # the parser's own message
            cause = cause.__cause__ or cause.__context__
        raise InputError(f"Could not read the {split} file {path}: {type(cause).__name__}: {cause}") from err
    if len(dataset[split]) == 0:
        raise InputError(f"The {split} file {path} has no rows (a header only?).")
    if any(column.startswith("__index_level_") for column in dataset[split].column_names):
        raise InputError(
            f"Rows of the {split} file {path} have more fields than its header (the parser took the first field as "
            "an index): a comma inside a text? Quote such texts."
        )
    return dataset[split]


def _check_utf8(path: str) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                bad_line = line + chunk[: err.start].count(b"\n")
                raise InputError(
                    f"{path} is not UTF-8: byte {offset + err.start} (line {bad_line}) is {chunk[err.start : err.start + 1]!r}. "
                    "Re-save the file as UTF-8."
                ) from None
            line += chunk.count(b"\n")
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8: it ends inside a multi-byte character (line {line}).") from None


def row_location(path: str | None, row: int) -> str:
    """Where row `row` (0-based, as `datasets` counts) is for the person who wrote the file: its line in a CSV or
    JSON-lines `path` (counting the header, blank lines and the newlines inside quoted cells), else "row N"."""
    line = _file_line(path, row) if path else None
    return f"line {line}" if line is not None else f"row {row}"


def _file_line(path: str, row: int) -> int | None:
    extension = path.rsplit(".", 1)[-1].lower()
    with open(path, newline="", encoding="utf-8") as f:
        if extension in ("csv", "tsv"):  # read as `read_data_file` does: the header first, blank lines skipped
            record, start = -1, 1
            reader = csv.reader(f)
            for fields in reader:
                if fields:
                    if record == row:
                        return start
                    record += 1
                start = reader.line_num + 1
            return None
        record = 0
        for number, line in enumerate(f, 1):
            if line.strip():
                if record == 0 and not line.lstrip().startswith("{"):
                    return None  # a JSON array: rows are not lines
                if record == row:
                    return number
                record += 1
    return None


def label_name(label) -> str:
    """Labels are names: `" positive "` and `"positive"` are one class (whitespace around a label is stripped)."""
    return str(label).strip()


def _check_label_kinds(split: Dataset, label_column: str, description: str, path: str | None) -> None:
    """Refuse a label column that mixes numbers and names (`1` and `positive`): almost always a data error."""
    first = {}
    stripped = 0
    for start, batch in _iter_column(split, label_column):
        for offset, label in enumerate(batch):
            name = label_name(label)
            stripped += name != str(label)
            first.setdefault(_is_number(name), (start + offset, name))
    if len(first) == 2:
        (number_row, number), (name_row, name) = first[True], first[False]
        raise InputError(
            f"The {description} mixes numeric and named labels in column {label_column!r}: "
            f"{row_location(path, number_row)} is {number!r}, {row_location(path, name_row)} is {name!r}. Use one "
            "kind of label."
        )
    if stripped:
        logger.warning("%d labels in the %s had whitespace around them; it was stripped.", stripped, description)


def _is_number(text: str) -> bool:
    return _number(text) is not None


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def texts_of(split: Dataset, text_column: str, text_pair_column: str | None) -> list[str]:
    """The examples' texts as one string each (a pair's two texts on two lines), as the knowledge base stores them."""
    texts = split[text_column]
    if text_pair_column:
        texts = [f"{text}\n{pair}" for text, pair in zip(texts, split[text_pair_column], strict=True)]
    return texts


def tokenize(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    text_column: str,
    text_pair_column: str | None,
    max_seq_length: int,
    desc: str,
) -> Dataset:
    """Add the tokenizer's columns (truncated to `max_seq_length`, not padded: batches are padded when drawn)."""

    def encode(batch: dict) -> dict:
        pairs = batch[text_pair_column] if text_pair_column else None
        return tokenizer(batch[text_column], pairs, truncation=True, max_length=max_seq_length)

    return dataset.map(encode, batched=True, desc=desc)


def padded_batches(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, batch_size: int, device: str | torch.device = "cpu"
) -> Iterator[dict[str, torch.Tensor]]:
    """Model inputs of a tokenized dataset, `batch_size` rows at a time, padded per batch and on `device`.

    The one batching loop of the package (teacher outputs, evaluation): only one batch is in memory at a time.
    """
    columns = [column for column in MODEL_INPUTS if column in dataset.column_names]
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        yield tokenizer.pad({column: rows[column] for column in columns}, return_tensors="pt").to(device)
