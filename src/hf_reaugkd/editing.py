"""Changing a saved student's knowledge without retraining: inspect its knowledge base, add rows, remove rows.

Where the keys and soft labels of new rows come from:
- **with the teacher** (`teacher=PATH`): the teacher and the projection head saved with the student
  (`teacher_projection.safetensors`) key and label the rows exactly as in training:
  `normalize(W_t · h_t(x))` and `softmax(teacher_logits / T)`. Use it when the teacher is at hand: the new rows are
  then indistinguishable from the ones distilled.
- **without a teacher**: the rows' gold labels, smoothed (`1 − ε` on the gold class, `ε` spread over the others;
  per label `1 − ε` / `ε` for multi-label; the number itself for regression), keyed by the student's own query
  centred: `normalize(q(x) − μ_q)`, where `μ_q` is the mean query on the training domain (`config.query_mean`). Use
  it to fix a deployment from labelled examples alone (a new sub-topic, corrected mistakes). Keyed by the raw query,
  a row would not be a memory but a hub: the student's queries share a common direction (the mean of unit queries has
  norm 0.72 on the drift benchmark's rotten_tomatoes student), so a raw query is closer to any other query than any
  teacher key is, and 100 rows keyed that way were the nearest neighbour of every original test query
  (benchmarks/drift.py). Centring, the standard cure for hubs in nearest-neighbour search (Suzuki et al., EMNLP
  2013), keeps what is specific to the text: its own text and texts like it find the row, the others do not.

Each edit rewrites the saved model folder atomically (config shapes, weights and index together), so it loads in a
fresh process and can be pushed as it is; a failed edit leaves the folder as it was. A folder with an exported ONNX
graph (`hf-reaugkd export`) is exported again in the same rewrite, with the settings recorded in the graph: the
graph holds the knowledge base, so the old one would serve the old rows. Edits of one folder run one at a time
(`caching.folder_lock`, across processes and threads): each reads the folder as the previous one left it.
"""

import dataclasses
import functools
import logging
import shutil
from pathlib import Path

import torch
from datasets import ClassLabel, Dataset, Features, Value
from transformers import AutoTokenizer

from .caching import atomic_path, folder_lock
from .data import (
    LABEL_COLUMN,
    check_filled,
    label_name,
    read_data_file,
    row_location,
    texts_of,
    tokenize,
)
from .errors import InputError
from .evaluation import (
    gated_mixture,
    mixed_metrics,
    predict,
    query_mean,
    select_retrieval_gate,
    select_retrieval_settings,
    student_queries,
)
from .knowledge_base import KnowledgeBase, value_predictions
from .modeling_reaugkd import ReAugKDForSequenceClassification
from .onnx_pipeline import DEFAULT_MAX_KNN_K, ONNX_DIR
from .pipeline_reaugkd import max_input_length
from .reporting import expected_notices
from .saving import TEACHER_PROJECTION
from .settings_reaugkd import MULTI_LABEL, REGRESSION, SINGLE_LABEL, problem_type_of
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
QUERY_MEAN_ROWS = 2000  # stored texts that measure an old checkpoint's query mean: ample for a mean of kb_dim numbers


def one_edit_at_a_time(edit):
    """Run `edit(model_dir, ...)` holding `model_dir`'s edit lock, from loading the folder to swapping in the new one:
    an edit that loaded the folder before another swapped its own in would write the other's rows away."""

    @functools.wraps(edit)
    def locked(model_dir, *args, **kwargs):
        with folder_lock(model_dir):
            return edit(model_dir, *args, **kwargs)

    return locked


def load_student(model_dir: str | Path) -> tuple[ReAugKDForSequenceClassification, object]:
    """The saved student (with its knowledge base) and its tokenizer, in eval mode."""
    model = ReAugKDForSequenceClassification.from_pretrained(model_dir).eval()
    return model, load_tokenizer(model_dir)


def load_tokenizer(model_dir: str | Path):
    """The saved tokenizer. It is no remote code, but without `trust_remote_code=False` `AutoTokenizer` would stop
    to ask in a terminal whether to run the config's (and, not loading that code, it reports the config's model type
    as unknown: an expected notice)."""
    with expected_notices():
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)


def knowledge_base_info(model_dir: str | Path) -> dict:
    """Size, key dimension, index, the task type, and how many rows the teacher labels each class (the argmax of the
    soft labels; for multi-label, the labels at or above the threshold) or, for regression, the values' range."""
    model, _ = load_student(model_dir)
    kb = model.knowledge_base
    projection = Path(model_dir) / TEACHER_PROJECTION
    info = {"size": kb.size, "dim": kb.dim, "index_type": kb.index_type, "problem_type": kb.problem_type}
    if kb.problem_type == REGRESSION:
        values = kb.values[:, 0].float()  # (N,)
        info["values"] = {"min": values.min().item(), "mean": values.mean().item(), "max": values.max().item()}
    else:
        if kb.problem_type == MULTI_LABEL:
            counts = (kb.values >= model.config.multi_label_threshold).sum(dim=0).tolist()
        else:
            counts = torch.bincount(kb.values.argmax(dim=1), minlength=kb.num_labels).tolist()
        info["rows_per_label"] = {model.config.id2label[i]: count for i, count in enumerate(counts)}
    info["teacher_projection"] = projection_settings(projection) if projection.is_file() else None
    return info


@one_edit_at_a_time
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
    label_separator: str | None = None,
) -> list[int]:
    """Append `rows` to the saved student's knowledge base; return their new row ids.

    `rows` is a CSV/JSON(L) file or a `datasets.Dataset` (a 🤗 dataset split, `Dataset.from_dict`; `add_texts` takes
    Python lists). For a pair task give `text_pair_column`, as in training. Gold labels are the model's label names,
    numbers for regression, and for multi-label a list of names or one string joined by `label_separator`. `dedupe`
    skips the rows the knowledge base already holds, or that repeat an earlier one: the same stored text (a pair's
    two texts on two lines) and, for gold labels, the same label (`_new_rows`). Adding the same rows twice then
    changes nothing; a known text with a new label is added. Nothing is written when no row is left to add.
    """
    if teacher is None and not label_column:
        raise InputError("Without a teacher, rows are labelled by their gold labels: give their label column.")
    model, tokenizer = load_student(model_dir)
    columns = (text_column, text_pair_column)
    gold = label_column if teacher is None else None
    rows, _, targets = _checked_rows(model, rows, columns, gold, label_separator)
    knowledge_base = model.knowledge_base
    if dedupe:
        rows, targets = _new_rows(model, rows, columns, targets)
        if len(rows) == 0:
            logger.info("every row is already in the knowledge base of %s: nothing added", model_dir)
            return []
    if teacher is not None:
        keys, values = _teacher_rows(model, Path(model_dir), teacher, rows, columns, batch_size)
    else:
        keys, values = _gold_rows(model, tokenizer, rows, columns, targets, batch_size)
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
    """`add_rows` from Python: `texts` (and `text_pairs`) with their gold `labels` (names, numbers for regression,
    lists of names for multi-label), or labelled by `teacher`."""
    columns = {"text": list(texts)}
    if text_pairs is not None:
        columns["text_pair"] = list(text_pairs)
    if labels is not None and any(isinstance(label, list | tuple) for label in labels):  # multi-label sets
        columns["label"] = [
            [str(x) for x in label] if isinstance(label, list | tuple) else [str(label)] for label in labels
        ]
    elif labels is not None:
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


def _new_rows(
    model, rows: Dataset, columns: tuple[str, str | None], targets: torch.Tensor | None
) -> tuple[Dataset, torch.Tensor | None]:
    """`rows` (and their gold `targets`) without those the knowledge base already holds, nor repeats of an earlier
    row: the same text and, for gold labels, the same label (`_label_of`: a stored row's argmax class, its labels at
    the threshold, or its number). A text given another label is a correction and is added; `kb remove` takes the old
    row out."""
    knowledge_base = model.knowledge_base
    if not knowledge_base.has_texts:
        raise InputError(
            "--dedupe compares texts, and this knowledge base stores none (distil with --store_kb_texts to keep them)."
        )
    problem_type, threshold = problem_type_of(model.config), model.config.multi_label_threshold
    with_labels = targets is not None
    stored_labels = _label_of(knowledge_base.values, problem_type, threshold, is_value=True)
    labels = _label_of(targets, problem_type, threshold) if with_labels else [None] * len(rows)
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
    return rows.select(keep), None if targets is None else targets[keep]


def _label_of(values: torch.Tensor, problem_type: str, threshold: float, is_value: bool = False) -> list:
    """A comparable label per row, of knowledge-base values `(N, C)` (`is_value`) or gold targets: the class id, the
    set of labels (at or above `threshold`), or the number (in fp32, as stored)."""
    if problem_type == REGRESSION:
        return values.reshape(-1).float().tolist()
    if problem_type == MULTI_LABEL:
        return [tuple(row.nonzero().flatten().tolist()) for row in values >= (threshold if is_value else 0.5)]
    return (values.argmax(dim=1) if is_value else values).tolist()


@one_edit_at_a_time
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
    label_separator: str | None = None,
) -> dict:
    """Choose k and β again on fresh labelled `rows` and write them to the saved student's config (its ONNX graph,
    if any, is exported again): after edits the best retrieval weight changes, growing with the share of rows the
    student never learned. The same grid and per-query gate as the pipeline's choice on validation (`evaluation`).

    Rows whose text the knowledge base holds are left out (a query that finds itself flatters retrieval); without
    stored texts, the rows must not be in it. Returns the selection metric (`evaluation.SELECTION_METRICS`: accuracy
    for classification) on the rows with the settings before and after. The per-query gate is single-label only.
    """
    model, tokenizer = load_student(model_dir)
    columns = (text_column, text_pair_column)
    rows, source, targets = _checked_rows(model, rows, columns, label_column, label_separator)
    knowledge_base = model.knowledge_base
    if knowledge_base.has_texts:
        stored = set(knowledge_base.texts)
        fresh = [row for row, text in enumerate(texts_of(rows, *columns)) if text not in stored]
        if len(fresh) < len(rows):
            logger.warning("left out %d rows that are in the knowledge base itself", len(rows) - len(fresh))
        rows, targets = rows.select(fresh), targets[fresh]
    else:
        logger.warning("this knowledge base stores no texts: the rows must not be in it, or retrieval is flattered")
    if len(rows) == 0:
        raise InputError(f"No row of the {source} is outside the knowledge base: retuning needs fresh labelled rows.")
    if problem_type_of(model.config) == SINGLE_LABEL and len(set(targets.tolist())) == 1:
        label = model.config.id2label[targets[0].item()]
        logger.warning(
            "All %d rows of the %s are labelled %r: k and β chosen on them reward any lean towards %r, and the rest of "
            "the domain pays for it (13 points of bbc_news in the drift benchmark). Add labelled rows of the other "
            "labels, such as the original validation split, to the file.",
            len(rows), source, label, label,
        )  # fmt: skip
    encoded = tokenize(rows, tokenizer, *columns, max_input_length(model.config, tokenizer), "Tokenizing")
    encoded = encoded.remove_columns([c for c in (LABEL_COLUMN,) if c in encoded.column_names])
    encoded = encoded.add_column(LABEL_COLUMN, targets.tolist())
    config = model.config
    scored = sorted({*knn_ks, config.knn_k})  # the grid, and the k in use (to score the setting before)
    predictions = predict(model, encoded, tokenizer, scored, config.retrieval_temperature, batch_size)
    if config.retrieval_gate is not None:
        before = predictions.metrics(gated_mixture(predictions, config.knn_k, config.retrieval_gate))
    else:
        before = mixed_metrics(predictions, config.knn_k, config.retrieval_weight)
    grid = dataclasses.replace(predictions, retrieved={k: predictions.retrieved[k] for k in knn_ks})
    selection = select_retrieval_settings(grid, betas)
    metric = selection["metric"]
    gate = select_retrieval_gate(grid, selection) if fit_gate and predictions.problem_type == SINGLE_LABEL else None
    result = {
        "rows": len(rows),
        "before": {"knn_k": config.knn_k, "retrieval_weight": config.retrieval_weight,
                   "retrieval_gate": config.retrieval_gate is not None,
                   metric: before[metric]},
        "after": {key: value for key, value in selection.items() if key != "grid"},
    }  # fmt: skip
    config.knn_k, config.retrieval_weight = selection["knn_k"], selection["retrieval_weight"]
    config.retrieval_gate = gate["parameters"] if gate and gate["used"] else None
    if gate is not None:
        result["gate"] = {key: value for key, value in gate.items() if key != "parameters"}
    _rewrite(model_dir, model, knowledge_base)
    return result


@one_edit_at_a_time
def remove_rows(
    model_dir: str | Path,
    ids: list[int] | None = None,
    where_label: str | None = None,
    texts_with_labels: list[tuple[str, str]] | None = None,
) -> list[int]:
    """Remove rows by id, every row the teacher labels `where_label` (its argmax class; for multi-label, a label at
    or above the threshold), or by content: for each `(text, label)` of `texts_with_labels`, the last row that stores
    that text with that label (ids shift when any row is removed, so an id remembered before another edit can name
    another row; content cannot). Returns the removed ids; a `(text, label)` that no row holds is skipped."""
    model, _ = load_student(model_dir)
    kb = model.knowledge_base
    if sum(given is not None for given in (ids, where_label, texts_with_labels)) != 1:
        raise InputError("Give one of ids, where_label or texts_with_labels.")
    if texts_with_labels is not None:
        ids = _rows_holding(model, texts_with_labels)
    elif where_label is not None:
        if kb.problem_type == REGRESSION:
            raise InputError("A regression knowledge base holds numbers, not labels: remove its rows by --ids.")
        label2id = {label: i for i, label in model.config.id2label.items()}
        if where_label not in label2id:
            raise InputError(f"Unknown label {where_label!r}; the model's labels are {sorted(label2id)}.")
        if kb.problem_type == MULTI_LABEL:
            labelled = kb.values[:, label2id[where_label]] >= model.config.multi_label_threshold  # (N,)
        else:
            labelled = kb.values.argmax(dim=1) == label2id[where_label]  # (N,)
        ids = labelled.nonzero().flatten().tolist()
    if ids:
        _rewrite(model_dir, model, kb.remove(ids))
    return sorted(set(ids))


def _rows_holding(model, texts_with_labels: list[tuple[str, str]]) -> list[int]:
    """For each `(text, label)`, the last row not taken yet whose stored text is `text` and whose teacher label (the
    argmax of its soft label) is `label`."""
    knowledge_base = model.knowledge_base
    if not knowledge_base.has_texts:
        raise InputError("Rows are found by their texts, and this knowledge base stores none (--store_kb_texts).")
    if problem_type_of(model.config) != SINGLE_LABEL:
        raise InputError("Rows are found by text and label in a single-label model; remove the others by --ids.")
    label2id = {label: i for i, label in model.config.id2label.items()}
    stored = list(zip(knowledge_base.texts, knowledge_base.values.argmax(dim=1).tolist(), strict=True))  # single-label
    taken = []
    for text, label in texts_with_labels:
        wanted = (text, label2id.get(label))
        row = next((i for i in reversed(range(len(stored))) if stored[i] == wanted and i not in taken), None)
        if row is not None:
            taken.append(row)
    return taken


@one_edit_at_a_time
def export(
    model_dir: str | Path, quantize: str = "none", opset: int | None = None, max_knn_k: int = DEFAULT_MAX_KNN_K
):
    """`hf-reaugkd export`: write `model_dir`'s ONNX graph(s) (`onnx_export.export_onnx`), under the folder's edit lock
    (a graph written while an edit swaps the folder would land beside the other knowledge base). Returns the paths."""
    from .onnx_export import export_onnx

    model, tokenizer = load_student(model_dir)
    return export_onnx(model, tokenizer, model_dir, quantize, opset, max_knn_k)


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
    label_names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if needs_finetuning(str(teacher), label_names, problem_type_of(model.config)):
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
    values = value_predictions(
        torch.cat(logits), problem_type_of(model.config), metadata["distillation_temperature"]
    )  # (n, C)
    return keys, values


def _checked_rows(
    model,
    rows: str | Path | Dataset,
    columns: tuple[str, str | None],
    label_column: str | None,
    label_separator: str | None = None,
) -> tuple[Dataset, str, torch.Tensor | None]:
    """The rows of a CSV/JSON(L) file or a `datasets.Dataset`, how errors name them, and with `label_column` their
    gold targets (`_gold_targets`), checked as `distill` checks its data: the columns are there, no text (or gold
    label) is blank, and every gold label is one the model knows. Errors name the file's line, or the row. A 🤗
    dataset's `ClassLabel` column holds class ids: they become the class names, which is what the model's labels
    are."""
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
    targets = _gold_targets(model, rows, label_column, source, path, label_separator) if label_column else None
    return rows, source, targets


def _gold_targets(
    model, rows: Dataset, label_column: str, source: str, path: str | None, separator: str | None
) -> torch.Tensor:
    """The gold labels as the model's training targets: class ids `(N,)`, 0/1 per label `(N, C)` (from lists of
    names, or names joined by `separator`), or numbers `(N,)`. A label the model does not know, or a regression label
    that is not a finite number, is refused with its line (or row)."""
    problem_type = problem_type_of(model.config)
    label2id = {label: i for i, label in model.config.id2label.items()}
    cells = rows[label_column]
    if problem_type == REGRESSION:
        numbers = []
        for row, cell in enumerate(cells):
            try:
                numbers.append(float(label_name(cell)))
            except ValueError:
                numbers.append(float("nan"))
            if not torch.isfinite(torch.tensor(numbers[-1])):
                raise InputError(
                    f"This model predicts numbers: {row_location(path, row)} of the {source} has {cell!r} in column "
                    f"{label_column!r}."
                )
        return torch.tensor(numbers)
    if problem_type == MULTI_LABEL:
        label_sets = [
            [label_name(x) for x in cell] if isinstance(cell, list) else _split_labels(label_name(cell), separator)
            for cell in cells
        ]
    else:
        label_sets = [[label_name(cell)] for cell in cells]
    for row, labels in enumerate(label_sets):
        unknown = sorted(set(labels) - set(label2id))
        if unknown:
            hint = (
                ""
                if separator or problem_type != MULTI_LABEL
                else " (labels joined in one cell need --label_separator)"
            )
            raise InputError(
                f"The {source} has labels {unknown[:10]} that the model does not know (first at "
                f"{row_location(path, row)}); its labels are {sorted(label2id)}{hint}."
            )
    if problem_type == SINGLE_LABEL:
        return torch.tensor([label2id[labels[0]] for labels in label_sets], dtype=torch.long)
    targets = torch.zeros(len(label_sets), len(label2id))
    for row, labels in enumerate(label_sets):
        targets[row, [label2id[label] for label in labels]] = 1.0
    return targets


def _split_labels(cell: str, separator: str | None) -> list[str]:
    return [part.strip() for part in cell.split(separator) if part.strip()] if separator else [cell]


def _gold_rows(
    model, tokenizer, rows: Dataset, columns: tuple[str, str | None], targets: torch.Tensor, batch_size: int
):
    """Keys from the student's own queries, centred (see the module docstring), values from the gold
    `targets` (`_gold_targets`): a smoothed class distribution, smoothed per-label probabilities, or the number."""
    center = torch.tensor(_query_mean(model, tokenizer, batch_size))  # (d,): first, so a model without one fails fast
    encoded = tokenize(rows, tokenizer, *columns, max_input_length(model.config, tokenizer), "Tokenizing")
    queries = torch.cat(list(student_queries(model, encoded, tokenizer, batch_size, "Gold keys")))  # (n, d)
    keys = torch.nn.functional.normalize(queries - center, dim=-1)  # (n, d): what is specific to each text
    problem_type, num_labels = problem_type_of(model.config), model.config.num_labels
    if problem_type == REGRESSION:
        values = targets.float().reshape(-1, 1)  # (n, 1)
    elif problem_type == MULTI_LABEL:
        values = targets * (1 - 2 * GOLD_LABEL_SMOOTHING) + GOLD_LABEL_SMOOTHING  # (n, C): 1 − ε or ε per label
    else:
        values = torch.full((len(targets), num_labels), GOLD_LABEL_SMOOTHING / max(num_labels - 1, 1))
        values[torch.arange(len(targets)), targets] = 1 - GOLD_LABEL_SMOOTHING
    return keys, values


@one_edit_at_a_time
def record_query_mean(model_dir: str | Path, batch_size: int = 64) -> list[float]:
    """Measure and save the query mean of a checkpoint distilled before the pipeline recorded it (from its stored
    texts, as a gold edit would on its first add), so that later gold edits do not spend the pass."""
    model, tokenizer = load_student(model_dir)
    if model.config.query_mean is None:
        _query_mean(model, tokenizer, batch_size)
        _rewrite(model_dir, model, model.knowledge_base)
    return model.config.query_mean


def _query_mean(model, tokenizer, batch_size: int) -> list[float]:
    """The config's `query_mean`; for a checkpoint distilled before it was recorded, the mean over up to
    `QUERY_MEAN_ROWS` of the knowledge base's stored texts (evenly spaced; a pair's two lines read as one text), set
    on the config so the edit saves it."""
    if model.config.query_mean is not None:
        return model.config.query_mean
    knowledge_base = model.knowledge_base
    if not knowledge_base.has_texts:
        raise InputError(
            "Gold rows are keyed by the student's queries minus their mean on the training domain, and this model "
            "records no query_mean (distilled by an earlier hf-reaugkd) and stores no texts to measure it on: add "
            "the rows with --teacher, or distil again."
        )
    step = max(1, knowledge_base.size // QUERY_MEAN_ROWS)
    sample = Dataset.from_dict({"text": knowledge_base.texts[::step][:QUERY_MEAN_ROWS]})
    encoded = tokenize(sample, tokenizer, "text", None, max_input_length(model.config, tokenizer), "Tokenizing")
    model.config.query_mean = query_mean(model, encoded, tokenizer, batch_size)
    logger.info("measured the query mean on %d stored texts; it is saved with this edit", len(sample))
    return model.config.query_mean


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
