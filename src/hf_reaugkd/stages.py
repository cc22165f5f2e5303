"""The stages of ReAugKD distillation (METHOD.md steps 1–5), each usable on its own from Python.

Stages that take long write their result into `<work_dir>/<stage>-<fingerprint>/` and are skipped when that
directory already exists: the fingerprint hashes every input that changes the result, so a rerun with the same
inputs reuses the work and a changed input starts the stage afresh. Results are written to a temporary
directory and renamed into place, so an interrupted stage never looks finished.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase, Trainer

from .data import LABEL_COLUMN, TaskData
from .knowledge_base import KnowledgeBase
from .losses import supervised_contrastive_loss
from .modeling_reaugkd import mean_pool
from .trainer import TEACHER_LOGITS, ReAugKDTrainer
from .training_args import ReAugKDTrainingArguments

TEACHER_EMBEDDINGS = "teacher_embeddings"


def fingerprint(*inputs) -> str:
    """A short stable hash of JSON-able inputs (paths, hyperparameters, dataset fingerprints)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextmanager
def stage_output(path: Path):
    """Yield a temporary directory that becomes `path` only if the block finishes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        yield tmp
        replace_directory(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_directory(new: Path, target: Path) -> None:
    """Move `new` to `target`, replacing an existing `target` only once `new` is complete."""
    backup = target.with_name(f".{target.name}.old")
    shutil.rmtree(backup, ignore_errors=True)
    if target.exists():
        os.replace(target, backup)
    os.replace(new, target)
    shutil.rmtree(backup, ignore_errors=True)


def tokenize_function(
    tokenizer: PreTrainedTokenizerBase, text_column: str, text_pair_column: str | None, max_seq_length: int
) -> Callable[[dict], dict]:
    def tokenize(batch: dict) -> dict:
        pairs = batch[text_pair_column] if text_pair_column else None
        return tokenizer(batch[text_column], pairs, truncation=True, max_length=max_seq_length)

    return tokenize


# 1. Teacher fine-tuning ------------------------------------------------------------------------------------


def finetune_teacher(
    teacher_name_or_path: str,
    data: TaskData,
    training_args: ReAugKDTrainingArguments,
    work_dir: Path,
    max_seq_length: int,
    num_train_epochs: float,
    learning_rate: float,
) -> Path:
    """Fine-tune `teacher_name_or_path` with cross-entropy on the train split; return the saved teacher's path."""
    key = fingerprint(
        teacher_name_or_path, data.splits["train"]._fingerprint, data.label_names, max_seq_length,
        num_train_epochs, learning_rate, training_args.per_device_train_batch_size, training_args.seed,
    )  # fmt: skip
    path = work_dir / f"teacher-{key}"
    if path.exists():
        return path
    tokenizer = AutoTokenizer.from_pretrained(teacher_name_or_path)
    teacher = AutoModelForSequenceClassification.from_pretrained(
        teacher_name_or_path,
        num_labels=len(data.label_names),
        id2label=dict(enumerate(data.label_names)),
        label2id={name: i for i, name in enumerate(data.label_names)},
    )
    tokenize = tokenize_function(tokenizer, data.text_column, data.text_pair_column, max_seq_length)
    train = data.splits["train"].map(tokenize, batched=True, desc="Tokenizing for the teacher")
    args = dataclasses.replace(
        training_args,
        output_dir=str(work_dir / "teacher-checkpoints"),
        num_train_epochs=num_train_epochs,
        learning_rate=learning_rate,
        save_strategy="no",
        push_to_hub=False,
    )
    trainer = Trainer(model=teacher, args=args, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    if trainer.is_world_process_zero():
        with stage_output(path) as tmp:
            trainer.save_model(str(tmp))
    trainer.accelerator.wait_for_everyone()
    return path


# Teacher outputs, computed once and cached by datasets.map --------------------------------------------------


@torch.no_grad()
def add_teacher_outputs(
    dataset: Dataset,
    teacher_path: str | Path,
    text_column: str,
    text_pair_column: str | None,
    max_seq_length: int,
    cache_dir: Path,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> Dataset:
    """Add `teacher_logits` `(C,)` and mean-pooled `teacher_embeddings` `(H,)` columns (cached on disk)."""
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_path).to(device).eval()
    tokenize = tokenize_function(tokenizer, text_column, text_pair_column, max_seq_length)

    def run_teacher(batch: dict) -> dict:
        inputs = tokenizer.pad(tokenize(batch), return_tensors="pt").to(device)
        outputs = teacher(**inputs, output_hidden_states=True)
        embeddings = mean_pool(outputs.hidden_states[-1], inputs["attention_mask"])  # (B, H)
        return {
            TEACHER_LOGITS: outputs.logits.float().cpu().numpy(),
            TEACHER_EMBEDDINGS: embeddings.float().cpu().numpy(),
        }

    key = fingerprint(dataset._fingerprint, str(teacher_path), max_seq_length, text_column, text_pair_column)
    cache_dir.mkdir(parents=True, exist_ok=True)
    return dataset.map(
        run_teacher,
        batched=True,
        batch_size=batch_size,
        cache_file_name=str(cache_dir / f"teacher-outputs-{key}.arrow"),
        new_fingerprint=key,
        desc="Teacher outputs",
    ).with_format("torch", columns=[TEACHER_LOGITS, TEACHER_EMBEDDINGS, LABEL_COLUMN], output_all_columns=True)


# 2. Teacher projection head ---------------------------------------------------------------------------------


def train_teacher_projection(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    kb_dim: int,
    temperature: float = 0.1,
    num_epochs: int = 10,
    learning_rate: float = 1e-3,
    batch_size: int = 256,
    seed: int = 42,
) -> nn.Linear:
    """Train a linear head `H → kb_dim` on frozen teacher embeddings `(N, H)` with the supervised contrastive
    loss, so that same-label examples cluster in the knowledge-base space. Takes seconds: the teacher is not
    run again."""
    generator = torch.Generator().manual_seed(seed)
    projection = nn.Linear(embeddings.shape[1], kb_dim)
    with torch.no_grad():
        nn.init.normal_(projection.weight, std=embeddings.shape[1] ** -0.5, generator=generator)
        projection.bias.zero_()
    optimizer = torch.optim.AdamW(projection.parameters(), lr=learning_rate)
    progress = tqdm(range(num_epochs), desc="Teacher projection head")
    for _ in progress:
        order = torch.randperm(len(embeddings), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            keys = nn.functional.normalize(projection(embeddings[batch]), dim=-1)  # (b, kb_dim)
            loss = supervised_contrastive_loss(keys, labels[batch], temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.4f}")
    return projection.eval()


# 3. Knowledge base ------------------------------------------------------------------------------------------


@torch.no_grad()
def build_knowledge_base(
    teacher_embeddings: torch.Tensor,
    teacher_logits: torch.Tensor,
    projection: nn.Linear,
    temperature: float = 1.0,
    index_type: str = "torch",
    **index_params: int,
) -> KnowledgeBase:
    """Keys `normalize(W_t · h_t)` `(N, kb_dim)` and values `softmax(teacher_logits / T)` `(N, C)`."""
    keys = projection(teacher_embeddings.float())  # (N, kb_dim); normalised by build
    soft_labels = torch.softmax(teacher_logits.float() / temperature, dim=-1)  # (N, C)
    return KnowledgeBase.build(keys, soft_labels, index_type, **index_params)


def save_projection(projection: nn.Linear, path: Path) -> None:
    save_file({"weight": projection.weight.detach().contiguous(), "bias": projection.bias.detach()}, str(path))


def load_projection(path: Path) -> nn.Linear:
    state = load_file(str(path))
    projection = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    projection.load_state_dict(state)
    return projection.eval()


# 4. Student distillation ------------------------------------------------------------------------------------


def distill_student(
    student,
    train_dataset: Dataset,
    training_args: ReAugKDTrainingArguments,
    tokenizer: PreTrainedTokenizerBase,
    resume_from_checkpoint: str | bool | None = None,
):
    """Train the student with `ReAugKDTrainer` on a dataset carrying `teacher_logits` and `teacher_keys`."""
    trainer = ReAugKDTrainer(
        model=student, args=training_args, train_dataset=train_dataset, processing_class=tokenizer
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer.model


# 5. Retrieval settings on validation, and evaluation ------------------------------------------------------


@torch.no_grad()
def student_predictions(model, dataset: Dataset, tokenizer, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain student's probabilities `(N, C)` and KB queries `(N, d)` over a tokenized dataset."""
    model.eval()
    columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in dataset.column_names]
    probs, queries = [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc="Student predictions", leave=False):
        rows = dataset[start : start + batch_size]
        inputs = tokenizer.pad({c: rows[c] for c in columns}, return_tensors="pt").to(model.device)
        outputs = model(**inputs, retrieval_weight=0.0)
        probs.append(outputs.student_logits.float().softmax(-1).cpu())
        queries.append(outputs.query_embedding.float().cpu())
    return torch.cat(probs), torch.cat(queries)


def retrieved_distributions(
    knowledge_base: KnowledgeBase, queries: torch.Tensor, ks: list[int], temperature: float
) -> dict[int, torch.Tensor]:
    """For each k, the retrieved label distribution `(N, C)` (one search with the largest k serves all)."""
    scores, ids = knowledge_base.search(queries, max(ks))  # (N, K), (N, K)
    values = knowledge_base.values.cpu()
    result = {}
    for k in ks:
        weights = torch.softmax(scores[:, :k].cpu() / temperature, dim=-1)  # (N, k)
        result[k] = (weights.unsqueeze(-1) * values[ids[:, :k].cpu().clamp_min(0)]).sum(dim=1)  # (N, C)
    return result


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


def select_retrieval_settings(
    student_probs: torch.Tensor,
    retrieved: dict[int, torch.Tensor],
    labels: torch.Tensor,
    betas: list[float],
) -> dict:
    """Grid over k and β on validation. Ties go to the smaller β (closer to the plain student), then smaller k.
    Returns the best `knn_k`, `retrieval_weight`, their accuracy and the whole grid."""
    grid = []
    for k, retrieved_probs in retrieved.items():
        for beta in betas:
            accuracy = classification_metrics(beta * retrieved_probs + (1 - beta) * student_probs, labels)["accuracy"]
            grid.append({"knn_k": k, "retrieval_weight": beta, "accuracy": accuracy})
    best = max(grid, key=lambda row: (row["accuracy"], -row["retrieval_weight"], -row["knn_k"]))
    return {**best, "grid": grid}


def time_per_example(run: Callable[[], object], num_examples: int, repeats: int = 3) -> float:
    """Median wall-clock milliseconds per example of `run()` (after one warm-up call). CUDA work is waited for,
    so asynchronous kernels are counted in the call that launched them."""
    run()
    times = []
    for _ in range(repeats):
        _synchronize()
        start = time.perf_counter()
        run()
        _synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times)) / num_examples


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
