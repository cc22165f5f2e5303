"""Changing a saved student's knowledge without retraining: inspect its knowledge base, add rows, remove rows.

Where the keys and soft labels of new rows come from:
- **with the teacher** (`teacher=PATH`): the teacher and the projection head saved with the student
  (`teacher_projection.safetensors`) key and label the rows exactly as in training:
  `normalize(W_t · h_t(x))` and `softmax(teacher_logits / T)`. Use it when the teacher is at hand: the new rows are
  then indistinguishable from the ones distilled.
- **without a teacher**: the rows' gold labels, smoothed (`1 − ε` on the gold class, `ε` spread over the others),
  keyed by the student's own query `normalize(W_s · h_s(x))`. Use it to fix a deployment from labelled examples
  alone (a new sub-topic, corrected mistakes); the student's query lands near its own key, so these rows are found.

Each edit rewrites the saved model folder atomically (config shapes, weights and index together), so it loads in a
fresh process and can be pushed as it is; a failed edit leaves the folder as it was. A folder with an exported ONNX
graph (`hf-reaugkd export`) is exported again in the same rewrite, with the settings recorded in the graph: the
graph holds the knowledge base, so the old one would serve the old rows.
"""

import dataclasses
import logging
import shutil
from pathlib import Path

import torch
from datasets import ClassLabel, Dataset, Features, Value
from transformers import AutoTokenizer

from .caching import atomic_path
from .data import (
    LABEL_COLUMN,
    check_filled,
    label_name,
    padded_batches,
    read_data_file,
    row_location,
    texts_of,
    tokenize,
)
from .errors import InputError
from .evaluation import (
    classification_metrics,
    gated_mixture,
    mixed_metrics,
    predict,
    select_retrieval_gate,
    select_retrieval_settings,
)
from .knowledge_base import KnowledgeBase
from .modeling_reaugkd import ReAugKDForSequenceClassification
from .onnx_pipeline import DEFAULT_MAX_KNN_K, ONNX_DIR
from .pipeline_reaugkd import max_input_length
from .saving import TEACHER_PROJECTION
from .teacher import (
    load_projection,
    load_teacher,
    needs_finetuning,
    project,
    projection_settings,
    teacher_batches,
)

logger = logging.getLogger(__name__)

GOLD_LABEL_SMOOTHING = 0.1  # soft enough that one gold row does not outvote a teacher's confident neighbours


def load_student(model_dir: str | Path) -> tuple[ReAugKDForSequenceClassification, object]:
    """The saved student (with its knowledge base) and its tokenizer, in eval mode."""
    model = ReAugKDForSequenceClassification.from_pretrained(model_dir).eval()
    return model, load_tokenizer(model_dir)


def load_tokenizer(model_dir: str | Path):
    """The saved tokenizer. It is no remote code, but without `trust_remote_code=False` `AutoTokenizer` would stop
    to ask in a terminal whether to run the config's."""
    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)


def knowledge_base_info(model_dir: str | Path) -> dict:
    """Size, key dimension, index, and how many rows the teacher labels each class (argmax of the soft labels)."""
    model, _ = load_student(model_dir)
    kb = model.knowledge_base
    counts = torch.bincount(kb.values.argmax(dim=1), minlength=kb.num_labels).tolist()
    projection = Path(model_dir) / TEACHER_PROJECTION
    return {
        "size": kb.size,
        "dim": kb.dim,
        "index_type": kb.index_type,
        "rows_per_label": {model.config.id2label[i]: count for i, count in enumerate(counts)},
        "teacher_projection": projection_settings(projection) if projection.is_file() else None,
    }


@torch.no_grad()
def add_rows(
    model_dir: str | Path,
    rows: str | Path | Dataset,
    text_column: str = "text",
    label_column: str | None = "label",
    teacher: str | Path | None = None,
    batch_size: int = 64,
    text_pair_column: str | None = None,
    dedupe: bool = False,
) -> list[int]:
    """Append `rows` to the saved student's knowledge base; return their new row ids.

    `rows` is a CSV/JSON(L) file or a `datasets.Dataset` (a 🤗 dataset split, `Dataset.from_dict`; `add_texts` takes
    Python lists). For a pair task give `text_pair_column`, as in training. `dedupe` skips the rows the knowledge base
    already holds, or that repeat an earlier one: the same stored text (a pair's two texts on two lines) and, for gold
    labels, the same label (`_new_rows`). Adding the same rows twice then changes nothing; a known text with a new
    label is added. Nothing is written when no row is left to add.
    """
    if teacher is None and not label_column:
        raise InputError("Without a teacher, rows are labelled by their gold labels: give their label column.")
    model, tokenizer = load_student(model_dir)
    columns = (text_column, text_pair_column)
    rows, _ = _checked_rows(model, rows, columns, label_column if teacher is None else None)
    knowledge_base = model.knowledge_base
    if dedupe:
        rows = _new_rows(model, rows, columns, label_column if teacher is None else None)
        if len(rows) == 0:
            logger.info("every row is already in the knowledge base of %s: nothing added", model_dir)
            return []
    if teacher is not None:
        keys, values = _teacher_rows(model, Path(model_dir), teacher, rows, columns, batch_size)
    else:
        keys, values = _gold_rows(model, tokenizer, rows, columns, label_column, batch_size)
    old_size = knowledge_base.size
    texts = texts_of(rows, *columns) if knowledge_base.has_texts else None  # stored as in training
    _rewrite(model_dir, model, knowledge_base.add(keys, values, texts))
    return list(range(old_size, old_size + len(keys)))


def add_texts(
    model_dir: str | Path,
    texts: list[str],
    labels: list[str] | None = None,
    teacher: str | Path | None = None,
    text_pairs: list[str] | None = None,
    dedupe: bool = False,
) -> list[int]:
    """`add_rows` from Python: `texts` (and `text_pairs`) with their gold `labels`, or labelled by `teacher`."""
    columns = {"text": list(texts)}
    if text_pairs is not None:
        columns["text_pair"] = list(text_pairs)
    if labels is not None:
        columns["label"] = [str(label) for label in labels]
    if len({len(column) for column in columns.values()}) > 1:
        raise InputError(f"texts, text_pairs and labels differ in length: { {k: len(v) for k, v in columns.items()} }")
    pair_column = "text_pair" if text_pairs is not None else None
    return add_rows(
        model_dir,
        Dataset.from_dict(columns),
        label_column="label" if labels is not None else None,
        teacher=teacher,
        text_pair_column=pair_column,
        dedupe=dedupe,
    )


def _new_rows(model, rows: Dataset, columns: tuple[str, str | None], label_column: str | None) -> Dataset:
    """`rows` without those the knowledge base already holds, nor repeats of an earlier row: the same text and, for
    gold labels, the same label (the argmax of a stored row's soft label). A text given another label is a correction
    and is added; `kb remove` takes the old row out."""
    knowledge_base = model.knowledge_base
    if not knowledge_base.has_texts:
        raise InputError(
            "--dedupe compares texts, and this knowledge base stores none (distil with --store_kb_texts to keep them)."
        )
    stored_labels = [model.config.id2label[i] for i in knowledge_base.values.argmax(dim=1).tolist()]
    with_labels = label_column is not None
    labels = [label_name(label) for label in rows[label_column]] if with_labels else [None] * len(rows)
    seen = {
        (text, label if with_labels else None) for text, label in zip(knowledge_base.texts, stored_labels, strict=True)
    }
    keep = []
    for row, entry in enumerate(zip(texts_of(rows, *columns), labels, strict=True)):
        if entry not in seen:
            seen.add(entry)
            keep.append(row)
    if len(keep) < len(rows):
        logger.info("skipped %d rows already in the knowledge base", len(rows) - len(keep))
    return rows.select(keep)


@torch.no_grad()
def retune(
    model_dir: str | Path,
    rows: str | Path | Dataset,
    knn_ks: list[int],
    betas: list[float],
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: str | None = None,
    fit_gate: bool = True,
    batch_size: int = 64,
) -> dict:
    """Choose k and β again on fresh labelled `rows` and write them to the saved student's config (its ONNX graph,
    if any, is exported again): after edits the best retrieval weight changes, growing with the share of rows the
    student never learned. The same grid and per-query gate as the pipeline's choice on validation (`evaluation`).

    Rows whose text the knowledge base holds are left out (a query that finds itself flatters retrieval); without
    stored texts, the rows must not be in it. Returns the accuracy on the rows with the settings before and after.
    """
    model, tokenizer = load_student(model_dir)
    columns = (text_column, text_pair_column)
    rows, source = _checked_rows(model, rows, columns, label_column)
    knowledge_base = model.knowledge_base
    if knowledge_base.has_texts:
        stored = set(knowledge_base.texts)
        fresh = [row for row, text in enumerate(texts_of(rows, *columns)) if text not in stored]
        if len(fresh) < len(rows):
            logger.warning("left out %d rows that are in the knowledge base itself", len(rows) - len(fresh))
        rows = rows.select(fresh)
    else:
        logger.warning("this knowledge base stores no texts: the rows must not be in it, or retrieval is flattered")
    if len(rows) == 0:
        raise InputError(f"No row of the {source} is outside the knowledge base: retuning needs fresh labelled rows.")
    label2id = {label: i for i, label in model.config.id2label.items()}
    rows = rows.map(lambda batch: {LABEL_COLUMN: [label2id[label_name(x)] for x in batch[label_column]]}, batched=True)
    encoded = tokenize(rows, tokenizer, *columns, max_input_length(model.config, tokenizer), "Tokenizing")
    config = model.config
    scored = sorted({*knn_ks, config.knn_k})  # the grid, and the k in use (to score the setting before)
    predictions = predict(model, encoded, tokenizer, scored, config.retrieval_temperature, batch_size)
    if config.retrieval_gate is not None:
        before = classification_metrics(
            gated_mixture(predictions, config.knn_k, config.retrieval_gate), predictions.labels
        )
    else:
        before = mixed_metrics(predictions, config.knn_k, config.retrieval_weight)
    grid = dataclasses.replace(predictions, retrieved={k: predictions.retrieved[k] for k in knn_ks})
    selection = select_retrieval_settings(grid, betas)
    gate = select_retrieval_gate(grid, selection) if fit_gate else None
    result = {
        "rows": len(rows),
        "before": {"knn_k": config.knn_k, "retrieval_weight": config.retrieval_weight,
                   "retrieval_gate": config.retrieval_gate is not None,
                   "accuracy": before["accuracy"]},
        "after": {key: value for key, value in selection.items() if key != "grid"},
    }  # fmt: skip
    config.knn_k, config.retrieval_weight = selection["knn_k"], selection["retrieval_weight"]
    config.retrieval_gate = gate["parameters"] if gate and gate["used"] else None
    if gate is not None:
        result["gate"] = {key: value for key, value in gate.items() if key != "parameters"}
    _rewrite(model_dir, model, knowledge_base)
    return result


def remove_rows(model_dir: str | Path, ids: list[int] | None = None, where_label: str | None = None) -> list[int]:
    """Remove rows by id, or every row the teacher labels `where_label`; return the removed ids."""
    model, _ = load_student(model_dir)
    kb = model.knowledge_base
    if (ids is None) == (where_label is None):
        raise InputError("Give either ids or where_label.")
    if where_label is not None:
        label2id = {label: i for i, label in model.config.id2label.items()}
        if where_label not in label2id:
            raise InputError(f"Unknown label {where_label!r}; the model's labels are {sorted(label2id)}.")
        ids = (kb.values.argmax(dim=1) == label2id[where_label]).nonzero().flatten().tolist()
    _rewrite(model_dir, model, kb.remove(ids))
    return sorted(set(ids))


def _teacher_rows(model, model_dir: Path, teacher: str | Path, rows, columns: tuple[str, str | None], batch_size: int):
    """Keys and soft labels made by the teacher and its projection head, as in training."""
    projection_file = model_dir / TEACHER_PROJECTION
    if not projection_file.is_file():
        raise InputError(
            f"{model_dir} has no {TEACHER_PROJECTION}: the teacher's projection head was not saved with this model, "
            "so the teacher cannot key new rows as in training. Add rows without --teacher (gold labels) instead."
        )
    metadata = projection_settings(projection_file)
    projection = load_projection(projection_file)
    if projection.out_features != model.knowledge_base.dim:
        raise InputError(
            f"The projection head {projection_file} maps to {projection.out_features} dimensions; the knowledge base's "
            f"keys have {model.knowledge_base.dim}: it is not the head this knowledge base was made with."
        )
    if needs_finetuning(str(teacher), [model.config.id2label[i] for i in range(model.config.num_labels)]):
        raise InputError(
            f"{teacher} is not a classifier for this model's labels; pass the fine-tuned teacher the knowledge base "
            f"was made with (recorded: {metadata.get('teacher_model')!r}, fine-tuned from "
            f"{metadata.get('teacher_fine_tuned_from') or 'itself'}; under the run's --stages_dir as teacher-<hash>)."
        )
    teacher_model, teacher_tokenizer = load_teacher(teacher)
    teacher_model.eval()
    if teacher_model.config.hidden_size != projection.in_features:
        raise InputError(
            f"{teacher} has hidden size {teacher_model.config.hidden_size}; the saved projection head expects "
            f"{projection.in_features}: not the teacher this knowledge base was made with."
        )
    encoded = tokenize(rows, teacher_tokenizer, *columns, metadata["max_seq_length"], "Tokenizing")
    logits, embeddings = zip(*teacher_batches(teacher_model, teacher_tokenizer, encoded, batch_size), strict=True)
    keys = project(projection, torch.cat(embeddings).numpy())  # (n, d)
    values = torch.softmax(torch.cat(logits) / metadata["distillation_temperature"], dim=-1)  # (n, C)
    return keys, values


def _checked_rows(
    model, rows: str | Path | Dataset, columns: tuple[str, str | None], label_column: str | None
) -> tuple[Dataset, str]:
    """The rows of a CSV/JSON(L) file or a `datasets.Dataset` and how errors name them, checked as `distill` checks its data: the columns are
    there, no text (or gold label, with `label_column`) is blank, and every gold label is one of the model's. Errors
    name the file's line, or the row. A 🤗 dataset's `ClassLabel` column holds class ids: they become the class
    names, which is what the model's labels are."""
    path = str(rows) if isinstance(rows, str | Path) else None
    source = f"rows file {path}" if path else "data"
    rows = read_data_file("rows", path) if path else rows
    checked = [column for column in (*columns, label_column) if column]
    for column in checked:
        if column not in rows.column_names:
            raise InputError(f"Column {column!r} not found in the {source}; its columns are {rows.column_names}.")
    feature = rows.features[label_column] if label_column else None
    if isinstance(feature, ClassLabel):
        names = Features({**rows.features, label_column: Value("string")})
        rows = rows.map(
            lambda batch: {label_column: feature.int2str(batch[label_column])}, batched=True, features=names
        )
    check_filled(rows, checked, source, label_column, path)
    if label_column:
        _check_labels(model, rows, label_column, source, path)
    return rows, source


def _check_labels(model, rows: Dataset, label_column: str, source: str, path: str | None) -> None:
    """Refuse gold labels the model does not know, naming the first one's line (or row)."""
    label2id = {label: i for i, label in model.config.id2label.items()}
    labels = [label_name(label) for label in rows[label_column]]
    unknown = sorted(set(labels) - set(label2id))
    if unknown:
        first = next(row for row, label in enumerate(labels) if label not in label2id)
        raise InputError(
            f"The {source} has labels {unknown[:10]} that the model does not know (first at "
            f"{row_location(path, first)}); its labels are {sorted(label2id)}."
        )


def _gold_rows(model, tokenizer, rows: Dataset, columns: tuple[str, str | None], label_column: str, batch_size: int):
    """Keys from the student's own queries, soft labels from the gold labels, smoothed."""
    label2id = {label: i for i, label in model.config.id2label.items()}
    labels = [label_name(label) for label in rows[label_column]]
    encoded = tokenize(rows, tokenizer, *columns, max_input_length(model.config, tokenizer), "Tokenizing")
    batches = padded_batches(encoded, tokenizer, batch_size)
    queries = [model(**inputs, retrieval_weight=0.0).query_embedding for inputs in batches]  # (b, d) each
    num_labels = model.config.num_labels
    values = torch.full((len(labels), num_labels), GOLD_LABEL_SMOOTHING / max(num_labels - 1, 1))
    values[torch.arange(len(labels)), torch.tensor([label2id[label] for label in labels])] = 1 - GOLD_LABEL_SMOOTHING
    return torch.cat(queries), values


def _rewrite(model_dir: str | Path, model: ReAugKDForSequenceClassification, knowledge_base: KnowledgeBase) -> None:
    """Save the model with its new knowledge base over `model_dir`, atomically, keeping the folder's other files and
    exporting its ONNX graph again, if it has one."""
    model.set_knowledge_base(knowledge_base)
    model_dir = Path(model_dir)
    with atomic_path(model_dir, directory=True) as tmp:
        for entry in model_dir.iterdir():  # a Hub clone's .git, ...: everything but what is rewritten
            if entry.name == ONNX_DIR:
                continue
            if entry.is_dir():
                shutil.copytree(entry, tmp / entry.name, symlinks=True)
            else:
                shutil.copy2(entry, tmp / entry.name)
        model.save_pretrained(tmp)
        _export_again(model, model_dir, tmp)


def _export_again(model: ReAugKDForSequenceClassification, model_dir: Path, tmp: Path) -> None:
    """Export the edited model as `model_dir`'s graph was exported; without the exporter, leave no stale graph and
    say so."""
    if not (model_dir / ONNX_DIR).exists():
        return
    try:
        from .onnx_export import export_onnx, exported_settings

        settings = exported_settings(model_dir) or {}
    except InputError as err:
        logger.warning(
            "Removed %s/%s: it held the knowledge base before this edit, and it cannot be exported again here (%s). "
            "Run `hf-reaugkd export %s` where hf-reaugkd[export] is installed.",
            model_dir, ONNX_DIR, err, model_dir,
        )  # fmt: skip
        return
    tokenizer = load_tokenizer(tmp)
    export_onnx(
        model,
        tokenizer,
        tmp,
        settings.get("quantize", "none"),
        settings.get("opset"),
        settings.get("max_knn_k", DEFAULT_MAX_KNN_K),
    )
