"""Choosing k and β on validation, and the metrics reported for validation and test.

Every number comes from the code that ships: predictions stream through the student's own `forward`, neighbours
through its knowledge base's `search`, and the retrieved distributions and the β-mixture through the model file's
`neighbor_label_distribution` and `mix_probabilities`. Only validation and test are scored: the knowledge base holds
the training set, so retrieval on a training example would find the example itself.
"""

import logging
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .data import LABEL_COLUMN, padded_batches
from .knowledge_base import KnowledgeBase
from .modeling_reaugkd import ReAugKDForSequenceClassification, mix_probabilities, neighbor_label_distribution

logger = logging.getLogger(__name__)


@dataclass
class Predictions:
    """One split's plain-student probabilities `(N, C)`, retrieved distributions `{k: (N, C)}` and labels `(N,)`."""

    student_probs: torch.Tensor
    retrieved: dict[int, torch.Tensor]
    labels: torch.Tensor


def retrieved_distributions(
    knowledge_base: KnowledgeBase, queries: torch.Tensor, knn_ks: list[int], retrieval_temperature: float
) -> dict[int, torch.Tensor]:
    """For each k, the retrieved label distribution `(B, C)` of normalised queries `(B, d)`; one search with the
    largest k serves every k (the neighbours come best first)."""
    scores, ids = knowledge_base.search(queries, max(knn_ks))  # (B, K), (B, K)
    return {
        k: neighbor_label_distribution(scores[:, :k], ids[:, :k], knowledge_base.values, retrieval_temperature)[0]
        for k in knn_ks
    }


@torch.no_grad()
def predict(
    model: ReAugKDForSequenceClassification,
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    knn_ks: list[int],
    retrieval_temperature: float,
    batch_size: int = 64,
) -> Predictions:
    """Stream a tokenized split with `labels` through the student (β = 0) and its knowledge base, batch by batch."""
    model.eval()
    knowledge_base = model.knowledge_base
    student_probs, retrieved = [], {k: [] for k in knn_ks}
    batches = padded_batches(dataset, tokenizer, batch_size, model.device)
    for inputs in tqdm(batches, total=-(-len(dataset) // batch_size), desc="Student predictions", leave=False):
        outputs = model(**inputs, retrieval_weight=0.0)
        student_probs.append(outputs.student_logits.float().softmax(-1).cpu())  # (B, C)
        by_k = retrieved_distributions(knowledge_base, outputs.query_embedding, knn_ks, retrieval_temperature)
        for k, probs in by_k.items():
            retrieved[k].append(probs.cpu())
    return Predictions(
        torch.cat(student_probs),
        {k: torch.cat(chunks) for k, chunks in retrieved.items()},
        torch.as_tensor(dataset[LABEL_COLUMN]),
    )


def knn_accuracy(
    knowledge_base: KnowledgeBase,
    queries: torch.Tensor,
    labels: torch.Tensor,
    knn_ks: list[int],
    retrieval_temperature: float,
    batch_size: int = 1024,
) -> dict[int, float]:
    """Accuracy of retrieval alone (β = 1) for each k: how good a query `(N, d)` is, e.g. the student's against the
    teacher's own projected one."""
    by_k = {k: [] for k in knn_ks}
    for chunk in queries.split(batch_size):
        for k, probs in retrieved_distributions(knowledge_base, chunk, knn_ks, retrieval_temperature).items():
            by_k[k].append(probs)
    return {k: classification_metrics(torch.cat(chunks), labels)["accuracy"] for k, chunks in by_k.items()}


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


def select_retrieval_settings(validation: Predictions, betas: list[float]) -> dict:
    """Grid over k and β on validation. Ties go to the smaller β (closer to the plain student), then smaller k.
    Returns the best `knn_k`, `retrieval_weight`, their accuracy and the whole grid."""
    grid = []
    for k, retrieved_probs in validation.retrieved.items():
        for beta in betas:
            mixed = mix_probabilities(validation.student_probs, retrieved_probs, beta)
            accuracy = classification_metrics(mixed, validation.labels)["accuracy"]
            grid.append({"knn_k": k, "retrieval_weight": beta, "accuracy": accuracy})
    best = max(grid, key=lambda row: (row["accuracy"], -row["retrieval_weight"], -row["knn_k"]))
    return {**best, "grid": grid}


def split_metrics(predictions: Predictions, teacher_logits: np.ndarray, knn_k: int, retrieval_weight: float) -> dict:
    """Accuracy and macro-F1 of the teacher, the plain student (β = 0) and the student with the chosen retrieval."""
    mixed = mix_probabilities(predictions.student_probs, predictions.retrieved[knn_k], retrieval_weight)
    teacher_probs = torch.from_numpy(np.array(teacher_logits)).softmax(-1)
    return {
        "teacher": classification_metrics(teacher_probs, predictions.labels),
        "student": classification_metrics(predictions.student_probs, predictions.labels),
        "student_retrieval": classification_metrics(mixed, predictions.labels),
    }


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
) -> dict:
    """k and β chosen on validation; the kNN accuracy (β = 1) of the student's queries and of the teacher's own
    projected ones; and the metrics of teacher, student and student + retrieval on each of `splits` (validation and
    test: never train, whose examples are in the knowledge base themselves)."""
    predictions = {
        name: predict(student, split, tokenizer, knn_ks, retrieval_temperature, batch_size)
        for name, split in splits.items()
    }
    validation = predictions["validation"]
    selection = select_retrieval_settings(validation, betas)
    k, beta = selection["knn_k"], selection["retrieval_weight"]
    logger.info("Chosen on validation: k=%d, β=%.2f", k, beta)
    student_knn = {
        k: classification_metrics(p, validation.labels)["accuracy"] for k, p in validation.retrieved.items()
    }
    teacher_knn = knn_accuracy(
        student.knowledge_base, teacher_validation_keys, validation.labels, knn_ks, retrieval_temperature
    )
    return {
        "selection": {key: value for key, value in selection.items() if key != "grid"},
        "validation_grid": selection["grid"],
        "validation_knn_accuracy": {"student_query": student_knn, "teacher_query": teacher_knn},
        "splits": {name: split_metrics(p, teacher_logits[name], k, beta) for name, p in predictions.items()},
    }
