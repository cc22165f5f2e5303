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

import logging
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer

from .caching import atomic_path
from .data import check_filled, label_name, padded_batches, read_data_file, row_location, texts_of, tokenize
from .errors import InputError
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
    data_file: str | Path,
    text_column: str = "text",
    label_column: str | None = "label",
    teacher: str | Path | None = None,
    batch_size: int = 64,
    text_pair_column: str | None = None,
) -> list[int]:
    """Append the rows of a CSV/JSON file to the saved student's knowledge base; return their new row ids.
    For a pair task give `text_pair_column`, as in training."""
    model, tokenizer = load_student(model_dir)
    rows = read_data_file("rows", str(data_file))
    columns = (text_column, text_pair_column)
    checked = [column for column in columns if column]
    if teacher is None:
        if not label_column or label_column not in rows.column_names:
            raise InputError(
                f"Without --teacher, rows are labelled by their gold labels: column {label_column!r} not found in "
                f"{data_file} (columns {rows.column_names})."
            )
        checked.append(label_column)
    for column in checked:
        if column not in rows.column_names:
            raise InputError(f"Column {column!r} not found in {data_file}; its columns are {rows.column_names}.")
    check_filled(rows, checked, f"rows file {data_file}", label_column if teacher is None else None, str(data_file))
    if teacher is not None:
        keys, values = _teacher_rows(model, Path(model_dir), teacher, rows, columns, batch_size)
    else:
        keys, values = _gold_rows(model, tokenizer, rows, columns, label_column, data_file, batch_size)
    old_size = model.knowledge_base.size
    texts = texts_of(rows, *columns) if model.knowledge_base.has_texts else None  # stored as in training
    _rewrite(model_dir, model, model.knowledge_base.add(keys, values, texts))
    return list(range(old_size, old_size + len(keys)))


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


def _gold_rows(
    model, tokenizer, rows, columns: tuple[str, str | None], label_column: str | None, data_file, batch_size: int
):
    """Keys from the student's own queries, soft labels from the gold labels, smoothed."""
    label2id = {label: i for i, label in model.config.id2label.items()}
    labels = [label_name(label) for label in rows[label_column]]
    unknown = sorted(set(labels) - set(label2id))
    if unknown:
        first = next(row for row, label in enumerate(labels) if label not in label2id)
        raise InputError(
            f"{data_file} has labels {unknown[:10]} that the model does not know (first at "
            f"{row_location(str(data_file), first)}); its labels are {sorted(label2id)}."
        )
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
