"""Choosing k and β on validation, and the metrics reported for validation and test.

Every number comes from the code that ships: predictions stream through the student's own `forward`, neighbours
through its knowledge base's `search`, and the retrieved distributions and the β-mixture through the model file's
`neighbor_label_distribution` and `mix_probabilities`. Only validation and test are scored: the knowledge base holds
the training set, so retrieval on a training example would find the example itself.

On request (`evaluate_student_keyed_kb`) the same is measured for a baseline that needs no teacher space: the
knowledge base's rows keyed by the trained student's own queries (a kNN-augmented classifier), retrieved through
the same code with the same student queries.
"""

import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .data import LABEL_COLUMN, padded_batches
from .distributed import on_every_rank, shard
from .knowledge_base import KnowledgeBase
from .modeling_reaugkd import (
    ReAugKDForSequenceClassification,
    mix_probabilities,
    mix_retrieval,
    neighbor_label_distribution,
    retrieval_gate_features,
    value_predictions,
)
from .settings_reaugkd import (
    GATE_SENTINEL,
    MAX_GATE_PARAMETER,
    MULTI_LABEL,
    REGRESSION,
    RETRIEVAL_GATE_FEATURES,
    SINGLE_LABEL,
    problem_type_of,
)

logger = logging.getLogger(__name__)

# The retrieval gate's logistic regression: an L2 penalty (on standardised features) small next to its log-loss
# (~0.5–0.7 per row) but enough to keep the weights finite when a feature separates the rows perfectly, and the fewest
# disagreement rows worth fitting to.
GATE_L2 = 1e-3
GATE_MIN_ROWS = 10
# What k and β are chosen by, per task type, and whether higher is better. Regression is chosen by squared error: the
# mixture is a weighted mean of two predictions, and correlation would not see the offset or scale that mixing in the
# neighbours' values can add; Pearson and Spearman are reported beside it (GLUE's STS-B metrics).
SELECTION_METRICS = {SINGLE_LABEL: ("accuracy", True), MULTI_LABEL: ("micro_f1", True), REGRESSION: ("mse", False)}


@dataclass
class Predictions:
    """One split's plain-student predictions in the knowledge base's value space `(N, C)` (`value_predictions`:
    probabilities, or numbers for regression), retrieved values `{k: (N, C)}`, labels (`(N,)`, or `(N, C)` 0/1 for
    multi-label), the student's normalised queries `(N, d)` (kept to search another knowledge base without another
    forward), the similarity of each query's nearest knowledge-base entry `(N,)` (-inf where retrieval found nothing;
    a feature of the retrieval gate), the task type and the multi-label decision threshold."""

    student_probs: torch.Tensor
    retrieved: dict[int, torch.Tensor]
    labels: torch.Tensor
    queries: torch.Tensor | None = None
    top_similarity: torch.Tensor | None = None
    problem_type: str = SINGLE_LABEL
    threshold: float = 0.5

    def metrics(self, values: torch.Tensor) -> dict[str, float]:
        """`task_metrics` of predicted values `(N, C)` against these labels."""
        return task_metrics(values, self.labels, self.problem_type, self.threshold)

    def mixed(self, knn_k: int, retrieval_weight: float) -> torch.Tensor:
        """The student mixed with its retrieved values at k and β `(N, C)`: the model's own `mix_probabilities`."""
        return mix_probabilities(self.student_probs, self.retrieved[knn_k], retrieval_weight, self.top_similarity)

    def subset(self, rows: torch.Tensor) -> "Predictions":
        """The predictions of `rows` only."""
        return dataclasses.replace(
            self,
            student_probs=self.student_probs[rows],
            retrieved={k: probs[rows] for k, probs in self.retrieved.items()},
            labels=self.labels[rows],
            queries=None if self.queries is None else self.queries[rows],
            top_similarity=None if self.top_similarity is None else self.top_similarity[rows],
        )


def retrieved_distributions(
    knowledge_base: KnowledgeBase, queries: torch.Tensor, knn_ks: list[int], retrieval_temperature: float
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """For each k, the retrieved label distribution `(B, C)` of normalised queries `(B, d)`, and the similarity of
    each query's nearest entry `(B,)`; one search with the largest k serves every k (neighbours come best first)."""
    scores, ids = knowledge_base.search(queries, max(knn_ks))  # (B, K), (B, K)
    by_k = {
        k: neighbor_label_distribution(scores[:, :k], ids[:, :k], knowledge_base.values, retrieval_temperature)[0]
        for k in knn_ks
    }
    return by_k, scores[:, 0]


@torch.no_grad()
def predict(
    model: ReAugKDForSequenceClassification,
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    knn_ks: list[int],
    retrieval_temperature: float,
    batch_size: int = 64,
) -> Predictions:
    """Stream a tokenized split with `labels` through the student (β = 0), batch by batch, then its queries through
    the knowledge base in chunks. Under `torchrun` / `accelerate launch` each process does its `distributed.shard` of
    the rows (the batches one process would run) and every process gets all of them."""
    model.eval()
    problem_type = problem_type_of(model.config)
    rows = shard(len(dataset), batch_size)

    def predict_shard() -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor], torch.Tensor]:
        if not rows:  # more processes than batches
            nothing = torch.empty(0, model.config.num_labels)
            return nothing, torch.empty(0, model.config.kb_dim), dict.fromkeys(knn_ks, nothing), torch.empty(0)
        student_probs, queries = [], []
        batches = padded_batches(dataset.select(rows), tokenizer, batch_size, model.device)
        for inputs in tqdm(batches, total=-(-len(rows) // batch_size), desc="Student predictions", leave=False):
            outputs = model(**inputs, retrieval_weight=0.0)
            student_probs.append(value_predictions(outputs.student_logits, problem_type).cpu())  # (B, C)
            queries.append(outputs.query_embedding.float().cpu())  # (B, d)
        queries = torch.cat(queries)  # (n, d)
        retrieved, top = retrieved_in_chunks(model.knowledge_base, queries, knn_ks, retrieval_temperature)
        return torch.cat(student_probs), queries, retrieved, top

    shards = on_every_rank(predict_shard)
    return Predictions(
        torch.cat([part[0] for part in shards]),
        {k: torch.cat([part[2][k] for part in shards]) for k in knn_ks},
        torch.as_tensor(dataset[LABEL_COLUMN]),
        torch.cat([part[1] for part in shards]),
        torch.cat([part[3] for part in shards]),
        problem_type,
        model.config.multi_label_threshold,
    )


def retrieved_in_chunks(
    knowledge_base: KnowledgeBase,
    queries: torch.Tensor,
    knn_ks: list[int],
    retrieval_temperature: float,
    batch_size: int = 1024,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """`retrieved_distributions` of many queries `(N, d)`, `batch_size` queries at a time, on the CPU:
    `({k: (N, C)}, top similarity (N,))`."""
    by_k, top = {k: [] for k in knn_ks}, []
    for chunk in queries.split(batch_size):
        retrieved, top_similarity = retrieved_distributions(knowledge_base, chunk, knn_ks, retrieval_temperature)
        for k, probs in retrieved.items():
            by_k[k].append(probs.cpu())
        top.append(top_similarity.cpu())
    return {k: torch.cat(chunks) for k, chunks in by_k.items()}, torch.cat(top)


def knn_accuracy(
    knowledge_base: KnowledgeBase,
    queries: torch.Tensor,
    labels: torch.Tensor,
    knn_ks: list[int],
    retrieval_temperature: float,
    batch_size: int = 1024,
    threshold: float = 0.5,
) -> dict[int, float]:
    """The selection metric (`SELECTION_METRICS`: accuracy for classification) of retrieval alone (β = 1) for each k:
    how good a query `(N, d)` is, e.g. the student's against the teacher's own projected one."""
    retrieved, _ = retrieved_in_chunks(knowledge_base, queries, knn_ks, retrieval_temperature, batch_size)
    metric = SELECTION_METRICS[knowledge_base.problem_type][0]
    return {
        k: task_metrics(values, labels, knowledge_base.problem_type, threshold)[metric]
        for k, values in retrieved.items()
    }


@torch.no_grad()
def student_queries(
    model: ReAugKDForSequenceClassification,
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int = 64,
    desc: str = "Student queries",
) -> Iterator[torch.Tensor]:
    """The student's normalised queries `(B, d)` of a tokenized dataset, batch by batch, in its row order, on the CPU."""
    model.eval()
    batches = padded_batches(dataset, tokenizer, batch_size, model.device)
    for inputs in tqdm(batches, total=-(-len(dataset) // batch_size), desc=desc, leave=False):
        yield model(**inputs, retrieval_weight=0.0).query_embedding.float().cpu()  # (B, d)


def query_mean(
    model: ReAugKDForSequenceClassification,
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int = 64,
) -> list[float]:
    """The mean of the student's queries over a tokenized dataset (`config.query_mean`), streamed: memory `O(d)`, each
    process its `distributed.shard` of the rows."""
    rows = shard(len(dataset), batch_size)

    def sum_shard() -> tuple[torch.Tensor, int]:
        total = torch.zeros(model.config.kb_dim, dtype=torch.float64)
        for queries in student_queries(model, dataset.select(rows), tokenizer, batch_size, "Query mean"):
            total += queries.double().sum(0)  # (d,)
        return total, len(rows)

    shards = on_every_rank(sum_shard)
    count = sum(rows for _, rows in shards)
    if count == 0:
        raise ValueError("The mean query needs at least one row.")
    return (sum(total for total, _ in shards) / count).tolist()


@torch.no_grad()
def student_keyed_knowledge_base(
    model: ReAugKDForSequenceClassification,
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int = 64,
) -> KnowledgeBase:
    """The model's knowledge base re-keyed by the student's own normalised queries of the same rows `(N, d)` (the
    tokenized knowledge-base texts, in its row order); the values stay the teacher's soft labels, and the index type
    and settings are the same. Streams one student pass; holds a second `N × (d + C)` knowledge base in memory."""
    teacher_keyed = model.knowledge_base
    if len(dataset) != teacher_keyed.size:
        raise ValueError(f"Expected the knowledge base's {teacher_keyed.size} rows, got a dataset of {len(dataset)}.")
    keys = torch.empty(len(dataset), teacher_keyed.dim)  # (N, d): filled in place, no second copy of the batches
    start = 0
    for queries in student_queries(model, dataset, tokenizer, batch_size, "Student keys"):
        keys[start : start + len(queries)] = queries
        start += len(queries)
    values = teacher_keyed.values.cpu()  # (N, C)
    return KnowledgeBase.build(
        keys, values, teacher_keyed.index_type, teacher_keyed.problem_type, **teacher_keyed.index_params
    )


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 (over the classes present in labels or predictions), without `evaluate`."""
    predictions = probs.argmax(-1).numpy()
    labels = np.asarray(labels)
    f1s = []
    for c in np.union1d(labels, predictions):
        tp = np.sum((predictions == c) & (labels == c))
        fp = np.sum((predictions == c) & (labels != c))
        fn = np.sum((predictions != c) & (labels == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(np.mean(predictions == labels)), "macro_f1": float(np.mean(f1s))}


def multi_label_metrics(probs: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict[str, float]:
    """Micro-F1 (over every row × label decision), macro-F1 (over the labels present in labels or predictions) and
    exact match (every label of a row right) of per-label probabilities `(N, C)` cut at `threshold`, against 0/1
    labels `(N, C)`."""
    predicted, gold = (probs >= threshold).numpy(), np.asarray(labels) > 0.5
    tp = (predicted & gold).sum(0)  # (C,)
    fp, fn = (predicted & ~gold).sum(0), (~predicted & gold).sum(0)  # (C,)
    present = (tp + fp + fn) > 0
    per_label = np.where(present, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)  # (C,)
    micro = 2 * tp.sum() / max(2 * tp.sum() + fp.sum() + fn.sum(), 1)
    return {
        "micro_f1": float(micro if present.any() else 1.0),
        "macro_f1": float(per_label[present].mean() if present.any() else 1.0),
        "exact_match": float(np.mean((predicted == gold).all(1))),
    }


def regression_metrics(values: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Pearson and Spearman correlation (GLUE's STS-B metrics; 0 for a constant prediction) and the mean squared
    error of predictions `(N, 1)` against numbers `(N,)`."""
    predicted, gold = values.reshape(-1).double().numpy(), np.asarray(labels, dtype=np.float64).reshape(-1)
    return {
        "pearson": _pearson(predicted, gold),
        "spearman": _pearson(_average_ranks(predicted), _average_ranks(gold)),
        "mse": float(np.mean((predicted - gold) ** 2)),
    }


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    scale = np.sqrt((x**2).sum() * (y**2).sum())
    return float((x * y).sum() / scale) if scale > 0 else 0.0


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties sharing their mean rank (Spearman's convention)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts
    return (starts + (counts - 1) / 2)[inverse]


def task_metrics(
    values: torch.Tensor, labels: torch.Tensor, problem_type: str = SINGLE_LABEL, threshold: float = 0.5
) -> dict[str, float]:
    """The metrics of a task type's predictions `(N, C)` in the value space (`value_predictions`): accuracy and
    macro-F1; micro/macro-F1 and exact match at `threshold`; or Pearson, Spearman and MSE."""
    if problem_type == REGRESSION:
        return regression_metrics(values, labels)
    if problem_type == MULTI_LABEL:
        return multi_label_metrics(values, labels, threshold)
    return classification_metrics(values, labels)


def select_retrieval_settings(validation: Predictions, betas: list[float]) -> dict:
    """Grid over k and β on validation, by the task type's `SELECTION_METRICS` (accuracy for single-label). Ties go
    to the smaller β (closer to the plain student), then smaller k. Returns the best `knn_k`, `retrieval_weight`,
    the `metric`'s name and score (under that name), and the whole grid."""
    metric, higher_is_better = SELECTION_METRICS[validation.problem_type]
    sign = 1 if higher_is_better else -1
    grid = []
    for k in validation.retrieved:
        for beta in betas:
            score = validation.metrics(validation.mixed(k, beta))[metric]
            grid.append({"knn_k": k, "retrieval_weight": beta, metric: score})
    best = max(grid, key=lambda row: (sign * row[metric], -row["retrieval_weight"], -row["knn_k"]))
    return {**best, "metric": metric, "grid": grid}


def gated_mixture(predictions: Predictions, knn_k: int, gate: list[float] | torch.Tensor) -> torch.Tensor:
    """The student mixed with its retrieved labels at the per-query β(x) of `gate` `(N, C)`: the model's own
    `mix_retrieval`, as `forward` applies it."""
    retrieved = predictions.retrieved[knn_k]  # (N, C)
    return mix_retrieval(predictions.student_probs, retrieved, predictions.top_similarity, GATE_SENTINEL, gate)


def fit_retrieval_gate(predictions: Predictions, knn_k: int, retrieval_weight: float) -> list[float]:
    """Gate parameters `[w_1, ..., w_F, b]` for β(x) = σ(w · features + b): a logistic regression, on the rows where
    the retrieved vote and the student disagree, of "the retrieved vote is the right one" (rows where neither is
    right say nothing). Where they agree β does not change the prediction, so β(x) is fitted to what matters for
    accuracy: how likely retrieval is to be right where it and the student part ways. (Fitting β to the likelihood
    of the mixture instead drives it to 0 whenever the retrieved distributions are confident and sometimes wrong.)
    Features are standardised for the fit, L2-penalised, and folded back into raw weights. With fewer than
    `GATE_MIN_ROWS` such rows, the gate is the fixed β (w = 0, b = logit β)."""
    retrieved = predictions.retrieved[knn_k]  # (N, C)
    features = retrieval_gate_features(predictions.top_similarity, retrieved, predictions.student_probs)  # (N, F)
    retrieved_class, student_class = retrieved.argmax(-1), predictions.student_probs.argmax(-1)  # (N,), (N,)
    found = predictions.top_similarity > float("-inf")
    retrieval_right, student_right = retrieved_class == predictions.labels, student_class == predictions.labels
    informative = found & (retrieved_class != student_class) & (retrieval_right | student_right)  # (N,)
    constant = min(max(retrieval_weight, 0.02), 0.98)
    if informative.sum() < GATE_MIN_ROWS:
        return [0.0] * len(RETRIEVAL_GATE_FEATURES) + [round(math.log(constant / (1 - constant)), 6)]
    x, target = features[informative], retrieval_right[informative].float()  # (n, F), (n,)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)  # (F,)
    x = (x - mean) / std
    parameters = torch.zeros(x.shape[1] + 1, requires_grad=True)
    optimizer = torch.optim.LBFGS([parameters], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x @ parameters[:-1] + parameters[-1]  # (n,)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, target) + GATE_L2 * parameters.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    weights, bias = parameters[:-1].detach() / std, parameters[-1].detach()  # back to raw features
    bias = bias - (weights * mean).sum()
    parameters = torch.cat([weights, bias.view(1)]).clamp(-MAX_GATE_PARAMETER, MAX_GATE_PARAMETER)  # σ saturated
    return [round(value, 6) for value in parameters.tolist()]


def select_retrieval_gate(validation: Predictions, selection: dict) -> dict:
    """Whether a per-query β(x) beats the chosen fixed β on validation, judged without scoring the gate on the rows it
    was fitted to: fitted on each half of validation, scored on the other (cross-fitting), against the fixed β's
    accuracy on the whole split (chosen there, so if anything flattered). Returns the gate fitted on all of
    validation, both accuracies and `used`."""
    knn_k, retrieval_weight = selection["knn_k"], selection["retrieval_weight"]
    permutation = torch.randperm(len(validation.labels), generator=torch.Generator().manual_seed(0))
    halves = permutation.tensor_split(2)  # two parts even for one row (`chunk` would give one)
    correct = 0
    for fit_rows, score_rows in ((halves[0], halves[1]), (halves[1], halves[0])):
        gate = fit_retrieval_gate(validation.subset(fit_rows), knn_k, retrieval_weight)
        held_out = validation.subset(score_rows)
        correct += (gated_mixture(held_out, knn_k, gate).argmax(-1) == held_out.labels).sum().item()
    crossfit_accuracy = correct / len(validation.labels)
    return {
        "parameters": fit_retrieval_gate(validation, knn_k, retrieval_weight),
        "features": list(RETRIEVAL_GATE_FEATURES),
        "knn_k": knn_k,
        "validation_accuracy_crossfit": crossfit_accuracy,
        "validation_accuracy_fixed": selection["accuracy"],
        "used": crossfit_accuracy > selection["accuracy"],
    }


def mixed_metrics(predictions: Predictions, knn_k: int, retrieval_weight: float) -> dict[str, float]:
    """The metrics of the student mixed with its retrieved values at the given k and β."""
    return predictions.metrics(predictions.mixed(knn_k, retrieval_weight))


def split_metrics(
    predictions: Predictions,
    teacher_logits: np.ndarray,
    knn_k: int,
    retrieval_weight: float,
    gate: list[float] | None = None,
) -> dict:
    """The metrics (`task_metrics`) of the teacher, the plain student (β = 0), the student with the chosen retrieval,
    and with `gate` the student mixed at the per-query β(x) (`student_retrieval_gated`)."""
    teacher_values = value_predictions(torch.from_numpy(np.array(teacher_logits)), predictions.problem_type)
    metrics = {
        "teacher": predictions.metrics(teacher_values),
        "student": predictions.metrics(predictions.student_probs),
        "student_retrieval": mixed_metrics(predictions, knn_k, retrieval_weight),
    }
    if gate is not None:
        metrics["student_retrieval_gated"] = predictions.metrics(gated_mixture(predictions, knn_k, gate))
    return metrics


def evaluate_student(
    student: ReAugKDForSequenceClassification,
    tokenizer: PreTrainedTokenizerBase,
    splits: dict[str, Dataset],
    teacher_logits: dict[str, np.ndarray],
    teacher_validation_keys: torch.Tensor,
    knn_ks: list[int],
    betas: list[float],
    retrieval_temperature: float,
    batch_size: int = 64,
    knowledge_base_texts: Dataset | None = None,
    fit_gate: bool = False,
) -> dict:
    """k and β chosen on validation (`SELECTION_METRICS`); the kNN score (β = 1, `validation_knn_<metric>`) of the
    student's queries and of the teacher's own projected ones; and the metrics of teacher, student and student + retrieval on each of `splits` (validation and
    test: never train, whose examples are in the knowledge base themselves).

    With `knowledge_base_texts` (the knowledge base's rows tokenized for the student, in its order) the student-keyed
    baseline is measured too: `student_retrieval_student_keys` per split with its own k and β chosen on validation
    (`selection_student_keys`, `validation_grid_student_keys`) and its kNN accuracy (`student_query_student_keys`).

    With `fit_gate`, a per-query β(x) is fitted at the chosen k (`gate`: its parameters, cross-fitted validation
    accuracy against the fixed β's, and whether it is `used`) and measured on each split (`student_retrieval_gated`)."""
    predictions = {
        name: predict(student, split, tokenizer, knn_ks, retrieval_temperature, batch_size)
        for name, split in splits.items()
    }
    validation = predictions["validation"]
    selection = select_retrieval_settings(validation, betas)
    k, beta = selection["knn_k"], selection["retrieval_weight"]
    logger.info("Chosen on validation: k=%d, β=%.2f", k, beta)
    gate = select_retrieval_gate(validation, selection) if fit_gate else None
    if gate is not None:
        logger.info(
            "Retrieval gate: cross-fitted validation accuracy %.4f vs %.4f with the fixed β: %s",
            gate["validation_accuracy_crossfit"],
            gate["validation_accuracy_fixed"],
            "used" if gate["used"] else "not used",
        )
    metric = selection["metric"]
    knn_key = f"validation_knn_{metric}"  # validation_knn_accuracy for classification
    student_knn = {k: validation.metrics(p)[metric] for k, p in validation.retrieved.items()}
    teacher_knn = knn_accuracy(
        student.knowledge_base,
        teacher_validation_keys,
        validation.labels,
        knn_ks,
        retrieval_temperature,
        threshold=validation.threshold,
    )
    metrics = {
        "selection": {key: value for key, value in selection.items() if key != "grid"},
        "validation_grid": selection["grid"],
        knn_key: {"student_query": student_knn, "teacher_query": teacher_knn},
        "splits": {
            name: split_metrics(p, teacher_logits[name], k, beta, gate and gate["parameters"])
            for name, p in predictions.items()
        },
    }
    if gate is not None:
        metrics["gate"] = gate
    if knowledge_base_texts is not None:
        student_keyed = student_keyed_knowledge_base(student, knowledge_base_texts, tokenizer, batch_size)
        own = {}
        for name, p in predictions.items():
            retrieved, top_similarity = retrieved_in_chunks(student_keyed, p.queries, knn_ks, retrieval_temperature)
            own[name] = dataclasses.replace(p, retrieved=retrieved, top_similarity=top_similarity)
        chosen = select_retrieval_settings(own["validation"], betas)
        logger.info(
            "Student-keyed knowledge base, chosen on validation: k=%d, β=%.2f",
            chosen["knn_k"],
            chosen["retrieval_weight"],
        )
        metrics["selection_student_keys"] = {key: value for key, value in chosen.items() if key != "grid"}
        metrics["validation_grid_student_keys"] = chosen["grid"]
        metrics[knn_key]["student_query_student_keys"] = {
            k: own["validation"].metrics(values)[metric] for k, values in own["validation"].retrieved.items()
        }
        for name, p in own.items():
            metrics["splits"][name]["student_retrieval_student_keys"] = mixed_metrics(
                p, chosen["knn_k"], chosen["retrieval_weight"]
            )
    return metrics
