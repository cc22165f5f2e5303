"""The teacher's side of ReAugKD (docs/method.md §1–3): fine-tuning, its outputs over every split, the projection
head into the knowledge-base space, and the knowledge base itself.

Each step is a cached stage under `work_dir` (see `caching`): its folder name carries a fingerprint of the teacher's
*weights*, the data's *content* and every setting that changes the result. Everything that touches all examples
streams: teacher outputs are written batch by batch into memory-mapped `.npy` files, the projection head reads
random batches from them, and the knowledge base is filled chunk by chunk, so memory grows with N only by the
knowledge base itself (`N × (kb_dim + C) × 4` bytes).
"""

import hashlib
import json
import logging
import math
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    EarlyStoppingCallback,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from .arguments import ModelArguments, TeacherArguments
from .caching import atomic_path, fingerprint, model_fingerprint
from .data import TEACHER_KEYS, TEACHER_LOGITS, TEACHER_NEIGHBORS, TaskData, padded_batches, tokenize
from .distributed import fill_stage, on_every_rank, shard, stage_exists
from .errors import InputError
from .evaluation import SELECTION_METRICS, task_metrics
from .knowledge_base import KnowledgeBase, value_predictions
from .losses import pair_weights, supervised_contrastive_loss
from .losses.supervised_contrastive import REGRESSION_BANDWIDTH
from .modeling_reaugkd import mean_pool
from .reporting import expected_notices
from .settings_reaugkd import REGRESSION, SINGLE_LABEL

logger = logging.getLogger(__name__)

CHUNK_ROWS = 65_536  # rows projected / written at once when a step runs over every example
# A new classification head on a pretrained encoder needs some optimiser steps, however few the rows. MiniLM-L6 on
# 400 bbc_news rows (batch 32, benchmarks/teacher_budget.py) reached 73% validation accuracy after 26 steps (2 epochs)
# and 95% after 65 (5 epochs); 50 lies between the two. Fine-tuning for fewer steps than this logs a warning.
TEACHER_MIN_STEPS = 50
# `--teacher_num_train_epochs auto`: enough epochs for about this many optimizer steps, within [3, 20], each followed by
# an evaluation on validation; the best epoch is kept, and training stops after 3 epochs without a better one. A new
# head on a pretrained encoder needs on the order of a thousand steps whatever the data's size: 400 bbc_news rows (13
# steps an epoch) kept improving to 20 epochs, 4,000 rotten_tomatoes rows (125 steps) peaked at 10 epochs
# (benchmarks/teacher_budget.py), and GLUE-sized data gets the usual 3 epochs.
AUTO_BUDGET_STEPS = 1000
AUTO_BUDGET_EPOCHS = (3, 20)
AUTO_BUDGET_PATIENCE = 3
TEACHER_BUDGET_FILE = "teacher_budget.json"  # in the fine-tuned teacher's folder: the epoch kept and its score


class StackedRows:
    """Several arrays `(N_i, D)` read as one `(Σ N_i, D)` array, without copying them: memory-mapped teacher outputs
    stay on disk. Rows come back as a new array for a slice or an index array, like NumPy's fancy indexing."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(part) for part in parts])  # (P + 1,)
        self.shape = (int(self.offsets[-1]), *parts[0].shape[1:])
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice | np.ndarray) -> np.ndarray:
        rows = np.asarray(range(len(self))[rows] if isinstance(rows, slice) else rows)  # (R,)
        part_of = np.searchsorted(self.offsets, rows, side="right") - 1  # (R,)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        for part in np.unique(part_of):
            mine = part_of == part
            out[mine] = self.parts[part][rows[mine] - self.offsets[part]]
        return out


@dataclass
class TeacherOutputs:
    """One split's teacher outputs, memory-mapped: `logits` `(N, C)` and mean-pooled `embeddings` `(N, H)`;
    `fingerprint` identifies the teacher and data they came from (later stages build their own on it)."""

    logits: np.ndarray | StackedRows
    embeddings: np.ndarray | StackedRows
    fingerprint: str


def transfer_outputs(outputs: dict[str, TeacherOutputs]) -> TeacherOutputs:
    """The teacher outputs of the transfer set (`TaskData.transfer_set`): the train rows, then the unlabelled ones."""
    if "unlabeled" not in outputs:
        return outputs["train"]
    parts = [outputs["train"], outputs["unlabeled"]]
    return TeacherOutputs(
        logits=StackedRows([part.logits for part in parts]),
        embeddings=StackedRows([part.embeddings for part in parts]),
        fingerprint=outputs["train"].fingerprint,  # one stage made both
    )


# 1. Teacher fine-tuning ------------------------------------------------------------------------------------


def needs_finetuning(teacher: str, label_names: list[str], problem_type: str = SINGLE_LABEL) -> bool:
    """False when the teacher already classifies exactly these labels (it is used as is).

    A teacher with task-specific label names that differ from the data's raises: its head predicts other
    classes. A generic head (`LABEL_0`, ...) or none means the teacher still needs fine-tuning. A trained head must
    also fit the task type: one output is a regression head, several under `problem_type` multi-label are per-label
    sigmoids (transformers' `config.problem_type`).
    """
    config = AutoConfig.from_pretrained(teacher)
    names = [config.id2label[i] for i in sorted(config.id2label)] if config.id2label else []
    is_classifier = any(arch.endswith("ForSequenceClassification") for arch in config.architectures or [])
    if is_classifier and names and not all(name.startswith("LABEL_") for name in names):
        head = config.problem_type or (REGRESSION if len(names) == 1 else SINGLE_LABEL)
        if head != problem_type:
            raise InputError(
                f"The teacher {teacher} has a {head} head ({len(names)} outputs), but the data is a {problem_type} "
                "task. Pass a teacher trained for this task type, an encoder checkpoint to fine-tune, or "
                "--problem_type if the task type was read wrongly from the labels."
            )
    if names == label_names:
        return not is_classifier  # an encoder saved with the task's labels still needs a trained head
    if sorted(names) == sorted(label_names) and is_classifier:
        raise InputError(
            f"The teacher {teacher} classifies the data's labels but in another order ({names}; the data's ids follow "
            f"{label_names}). Save the teacher with its labels in that order, or pass its encoder to fine-tune."
        )
    if names and not all(name.startswith("LABEL_") for name in names):
        raise InputError(
            f"The teacher {teacher} is a classifier for the labels {names}, but the data has {label_names}. "
            "Pass a teacher fine-tuned on this task, or an encoder checkpoint to fine-tune."
        )
    return True


def load_teacher(name: str | Path, **model_kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The teacher classifier and its tokenizer, ready for batches: a decoder LLM's tokenizer often has no padding
    token (Llama's), so its end-of-sequence token pads, and the model's config learns which id that is (its
    classification head finds each row's last token by it)."""
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InputError(
                f"The tokenizer of {name} has neither a padding nor an end-of-sequence token to pad with."
            )
        tokenizer.pad_token = tokenizer.eos_token
    teacher = AutoModelForSequenceClassification.from_pretrained(name, **model_kwargs)
    if teacher.config.pad_token_id is None:
        teacher.config.pad_token_id = tokenizer.pad_token_id
    return teacher, tokenizer


def pools_last_token(config) -> bool:
    """Whether a teacher's sentence embedding is its last token's state, not the mean of its tokens: decoder LLMs
    (Llama, Qwen2, ...) read causally, so only the last token has seen the whole text, and their classification head
    reads that token too. Encoders (architectures with a masked-LM head, and any type transformers does not know as a
    causal LM, e.g. a remote-code encoder) see the whole text at every token."""
    model_type = config.model_type
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def last_token_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The state of each row's last attended token `(B, T, H)` → `(B, H)`, with left or right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # (T,)
    last = (positions * attention_mask).argmax(dim=1)  # (B,): the rightmost attended position
    return hidden_states[torch.arange(len(hidden_states), device=hidden_states.device), last]  # (B, H)


def finetune_teacher(
    teacher_args: TeacherArguments,
    data: TaskData,
    student_args: TrainingArguments,
    max_seq_length: int,
    work_dir: Path,
) -> Path:
    """Fine-tune the teacher on the train split with its task type's loss (cross-entropy, binary cross-entropy per
    label, or squared error: transformers' `problem_type`); return the saved teacher's folder."""
    name = teacher_args.teacher_model_name_or_path
    # what changes the trained weights besides the teacher's own flags: seed, precision, and the global batch
    precision = {
        "bf16": student_args.bf16,
        "fp16": student_args.fp16,
        "seed": student_args.seed,
        "world_size": student_args.world_size,
    }
    key = fingerprint(
        model_fingerprint(name), data.fingerprint, data.label_names, max_seq_length, asdict(teacher_args), precision
    )
    path = work_dir / f"teacher-{key}"
    if path.exists():
        logger.info("teacher: reused %s (same teacher, data and settings)", path)
        return path
    with expected_notices():  # the new classification head is reported missing: it is what fine-tuning trains
        teacher, tokenizer = load_teacher(
            name,
            num_labels=len(data.label_names),
            id2label=dict(enumerate(data.label_names)),
            label2id={label: i for i, label in enumerate(data.label_names)},
            problem_type=data.problem_type,
            ignore_mismatched_sizes=True,  # a generic head of another size (LABEL_0..2 on a 2-label task) is replaced
        )
    logger.info("teacher: fine-tuning %s with a new %d-output %s head", name, len(data.label_names), data.problem_type)
    train = tokenize(
        data.splits["train"],
        tokenizer,
        data.text_column,
        data.text_pair_column,
        max_seq_length,
        "Tokenizing train for the teacher",
    )
    checkpoints = work_dir / f".teacher-checkpoints-{key}"
    budget, validation = {}, None
    if teacher_args.auto_budget:
        validation = tokenize(
            data.splits["validation"],
            tokenizer,
            data.text_column,
            data.text_pair_column,
            max_seq_length,
            "Tokenizing validation for the teacher",
        )
        batch = teacher_args.teacher_per_device_train_batch_size * teacher_args.teacher_gradient_accumulation_steps
        steps_per_epoch = math.ceil(len(train) / (batch * max(student_args.world_size, 1)))
        low, high = AUTO_BUDGET_EPOCHS
        metric, higher_is_better = SELECTION_METRICS[data.problem_type]  # as the student's k and β are chosen
        budget = {
            "num_train_epochs": min(max(math.ceil(AUTO_BUDGET_STEPS / steps_per_epoch), low), high),
            "eval_strategy": "epoch",
            "save_strategy": "epoch",
            "save_only_model": True,
            "save_total_limit": 1,
            "load_best_model_at_end": True,
            "metric_for_best_model": metric,
            "greater_is_better": higher_is_better,
            "per_device_eval_batch_size": student_args.per_device_eval_batch_size,
        }
    with expected_notices():  # the special-token alignment notice
        trainer = Trainer(
            model=teacher,
            args=teacher_args.training_arguments(student_args, output_dir=str(checkpoints), **budget),
            train_dataset=train,
            eval_dataset=validation,
            processing_class=tokenizer,
            compute_metrics=_metrics_of(data.problem_type) if budget else None,
            callbacks=[EarlyStoppingCallback(AUTO_BUDGET_PATIENCE)] if budget else None,
        )
    trainer.train()
    trainer.accelerator.wait_for_everyone()  # every rank has loaded the best epoch before its checkpoint is removed
    if trainer.is_world_process_zero():
        if trainer.state.global_step < TEACHER_MIN_STEPS:
            logger.warning(
                "teacher: fine-tuned for only %d optimizer steps (%d labelled rows). On 400 bbc_news rows MiniLM-L6 "
                "reached 73%% validation accuracy after 26 steps and 95%% after 65: an under-trained teacher makes "
                "weak targets and a weak knowledge base. Raise --teacher_num_train_epochs (or --teacher_max_steps) "
                "and compare the teacher's validation accuracy in metrics.json.",
                trainer.state.global_step,
                len(train),
            )
        with atomic_path(path, directory=True) as tmp:
            trainer.save_model(str(tmp))
            if budget:
                (tmp / TEACHER_BUDGET_FILE).write_text(json.dumps(_chosen_epoch(trainer.state, budget), indent=2))
        shutil.rmtree(checkpoints, ignore_errors=True)  # the epochs' checkpoints: the best is saved above
    trainer.accelerator.wait_for_everyone()  # no rank reads the teacher before it is complete
    return path


def _metrics_of(problem_type: str):
    """Trainer's `compute_metrics` for the auto budget: the package's own metrics of the task type."""

    def compute(prediction) -> dict[str, float]:
        values = value_predictions(torch.from_numpy(np.asarray(prediction.predictions)), problem_type)
        return task_metrics(values, torch.from_numpy(np.asarray(prediction.label_ids)), problem_type)

    return compute


def _chosen_epoch(state, budget: dict) -> dict:
    """What the auto budget kept: the epoch of the best validation score, the metric, its score, and the cap."""
    metric = budget["metric_for_best_model"]
    sign = 1 if budget["greater_is_better"] else -1
    evaluations = [entry for entry in state.log_history if f"eval_{metric}" in entry]
    best = max(evaluations, key=lambda entry: sign * entry[f"eval_{metric}"])  # the first of equals, as Trainer
    return {
        "epochs_cap": budget["num_train_epochs"],
        "epochs_run": round(evaluations[-1]["epoch"]),
        "best_epoch": round(best["epoch"]),
        "best_optimizer_steps": best["step"],
        "metric": metric,
        f"validation_{metric}": best[f"eval_{metric}"],
    }


def teacher_budget(teacher_path: str | Path) -> dict | None:
    """What `--teacher_num_train_epochs auto` chose for a teacher fine-tuned here (`None` for a teacher used as is,
    or trained to a fixed budget)."""
    path = Path(teacher_path) / TEACHER_BUDGET_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# Teacher outputs, computed once per teacher and data ---------------------------------------------------------


@torch.no_grad()
def teacher_outputs(
    teacher_path: str | Path,
    data: TaskData,
    max_seq_length: int,
    work_dir: Path,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, TeacherOutputs]:
    """Logits and last-layer embeddings (`teacher_batches`) of the teacher for every split, and for the unlabelled
    texts (as `"unlabeled"`) when there are any (a cached stage). The teacher runs in `dtype` (bf16 halves an LLM
    teacher's memory on a GPU); its outputs are stored in fp32. Under `torchrun` / `accelerate launch` every process
    computes its `distributed.shard` of each split into the same memory-mapped files (`distributed.fill_stage`): the
    same batches as one process, so the same bytes, and no process waits for another's whole pass."""
    precision = [str(dtype)] if dtype != torch.float32 else []
    config = AutoConfig.from_pretrained(teacher_path)
    pooling = ["last-token"] if pools_last_token(config) else []  # else mean
    key = fingerprint(model_fingerprint(teacher_path), data.content_fingerprint, max_seq_length, *precision, *pooling)
    path = work_dir / f"teacher-outputs-{key}"
    splits = {**data.splits, **({"unlabeled": data.unlabeled} if data.unlabeled is not None else {})}

    def allocate(tmp: Path) -> None:
        for name, split in splits.items():
            for kind, width in (("logits", config.num_labels), ("embeddings", config.hidden_size)):
                np.lib.format.open_memmap(tmp / f"{name}-{kind}.npy", "w+", np.float32, (len(split), width))

    def fill(tmp: Path) -> None:  # this process's shard of every split
        teacher, tokenizer = load_teacher(teacher_path, dtype=dtype)
        teacher = teacher.to(device).eval()
        for name, split in splits.items():
            rows = shard(len(split), batch_size)
            if not rows:
                continue
            description = f"Tokenizing {name} for the teacher"
            encoded = tokenize(split.select(rows), tokenizer, data.text_column, data.text_pair_column,
                               max_seq_length, description)  # fmt: skip
            logits = np.load(tmp / f"{name}-logits.npy", mmap_mode="r+")
            embeddings = np.load(tmp / f"{name}-embeddings.npy", mmap_mode="r+")
            start = rows.start
            for batch_logits, pooled in teacher_batches(teacher, tokenizer, encoded, batch_size, desc=name):
                end = start + len(pooled)
                logits[start:end] = batch_logits.numpy()
                embeddings[start:end] = pooled.numpy()
                start = end
            logits.flush()
            embeddings.flush()
            del logits, embeddings

    if stage_exists(path):
        logger.info("teacher outputs: reused %s", path)
    else:
        fill_stage(path, allocate, fill)
    return {
        name: TeacherOutputs(
            logits=np.load(path / f"{name}-logits.npy", mmap_mode="r"),
            embeddings=np.load(path / f"{name}-embeddings.npy", mmap_mode="r"),
            fingerprint=key,
        )
        for name in splits
    }


@torch.no_grad()
def teacher_batches(
    teacher, tokenizer, dataset: Dataset, batch_size: int, desc: str = ""
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The teacher's `(logits (B, C), last-layer embeddings (B, H))` over a tokenized dataset, batch by batch, on the
    CPU in fp32: mean-pooled for an encoder, its last token's for a decoder LLM (`pools_last_token`)."""
    pool = last_token_pool if pools_last_token(teacher.config) else mean_pool
    batches = padded_batches(dataset, tokenizer, batch_size, teacher.device)
    for inputs in tqdm(batches, total=-(-len(dataset) // batch_size), desc=f"Teacher outputs {desc}".strip()):
        outputs = teacher(**inputs, output_hidden_states=True)
        pooled = pool(outputs.hidden_states[-1], inputs["attention_mask"])  # (B, H)
        yield outputs.logits.float().cpu(), pooled.float().cpu()


# 2. Teacher projection head ---------------------------------------------------------------------------------


def train_teacher_projection(
    embeddings: np.ndarray | StackedRows,
    labels: torch.Tensor,
    kb_dim: int,
    temperature: float = 0.1,
    num_epochs: int = 10,
    learning_rate: float = 1e-3,
    batch_size: int = 256,
    seed: int = 42,
    problem_type: str = SINGLE_LABEL,
) -> nn.Linear:
    """Train a linear head `H → kb_dim` on frozen teacher embeddings `(N, H)` with the supervised contrastive
    loss, so that same-label examples cluster in the knowledge-base space: for multi-label and regression labels,
    pairs are positives by their label-set overlap or target distance (`losses.pair_weights`). Random batches are
    read from the (memory-mapped) embeddings, so memory does not grow with N; it takes seconds, the teacher is not
    run again."""
    bandwidth = 1.0
    if problem_type == REGRESSION:  # a kernel width in the targets' own unit
        bandwidth = REGRESSION_BANDWIDTH * labels.float().std().clamp_min(1e-6).item()
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
            batch = order[start : start + batch_size].sort().values  # sorted rows: sequential reads of the file
            inputs = torch.from_numpy(embeddings[batch.numpy()])  # (b, H)
            keys = nn.functional.normalize(projection(inputs), dim=-1)  # (b, kb_dim)
            positives = pair_weights(labels[batch], problem_type, bandwidth)  # (b, b)
            loss = supervised_contrastive_loss(keys, labels[batch], temperature, positives)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.4f}")
    return projection.eval()


@torch.no_grad()
def project(projection: nn.Linear, embeddings: np.ndarray | StackedRows) -> torch.Tensor:
    """Knowledge-base keys `normalize(W_t · h_t)` `(N, kb_dim)` of teacher embeddings `(N, H)`, chunk by chunk."""
    keys = torch.empty(len(embeddings), projection.out_features)
    for start in range(0, len(embeddings), CHUNK_ROWS):
        chunk = torch.from_numpy(np.array(embeddings[start : start + CHUNK_ROWS]))  # (chunk, H)
        keys[start : start + len(chunk)] = nn.functional.normalize(projection(chunk), dim=-1)
    return keys


# 3. Knowledge base ------------------------------------------------------------------------------------------


def soft_labels(
    logits: np.ndarray | StackedRows, temperature: float, problem_type: str = SINGLE_LABEL
) -> torch.Tensor:
    """The knowledge-base values of teacher logits `(N, C)`, chunk by chunk: `softmax(logits / T)`, the per-label
    `sigmoid(logits)` or the predicted number (`value_predictions`)."""
    values = torch.empty(logits.shape)
    for start in range(0, len(logits), CHUNK_ROWS):
        chunk = torch.from_numpy(np.array(logits[start : start + CHUNK_ROWS]))  # (chunk, C)
        values[start : start + len(chunk)] = value_predictions(chunk, problem_type, temperature)
    return values


def knowledge_base_stage(
    outputs: dict[str, TeacherOutputs],
    labels: torch.Tensor,
    model_args: ModelArguments,
    kb_dim: int,
    temperature: float,
    seed: int,
    work_dir: Path,
    problem_type: str = SINGLE_LABEL,
) -> tuple[nn.Linear, KnowledgeBase]:
    """Train the projection head and build the knowledge base over the transfer set (a cached stage): the train
    split's rows, then the unlabelled texts' (`outputs["unlabeled"]`) when there are any.

    The head is trained on the labelled rows only: its supervised contrastive loss needs labels, and the teacher's
    own argmax on the unlabelled rows would shape the key space around the teacher's mistakes. A linear head over
    frozen embeddings is well determined by a few thousand labelled rows; the unlabelled rows still get keys."""
    train_outputs, transfer = outputs["train"], transfer_outputs(outputs)
    key = fingerprint(
        train_outputs.fingerprint, kb_dim, model_args.projection_num_epochs, model_args.projection_learning_rate,
        model_args.projection_temperature, temperature, model_args.index_type, model_args.index_params,
        seed, *([len(transfer.logits)] if transfer is not train_outputs else []),
        *([problem_type] if problem_type != SINGLE_LABEL else []),
    )  # fmt: skip
    path = work_dir / f"knowledge-base-{key}"
    if path.exists():
        logger.info("knowledge base: reused %s", path)
    else:
        projection = train_teacher_projection(
            train_outputs.embeddings,
            labels,
            kb_dim,
            temperature=model_args.projection_temperature,
            num_epochs=model_args.projection_num_epochs,
            learning_rate=model_args.projection_learning_rate,
            seed=seed,
            problem_type=problem_type,
        )
        keys = project(projection, transfer.embeddings)  # (N, kb_dim)
        values = soft_labels(transfer.logits, temperature, problem_type)  # (N, C)
        kb = KnowledgeBase.build(keys, values, model_args.index_type, problem_type, **model_args.index_params)
        del keys
        with atomic_path(path, directory=True) as tmp:
            save_projection(projection, tmp / "projection.safetensors")
            kb.save(tmp / "knowledge_base.safetensors")
        del kb
    return load_projection(path / "projection.safetensors"), KnowledgeBase.load(path / "knowledge_base.safetensors")


def save_projection(projection: nn.Linear, path: Path, metadata: dict[str, str] | None = None) -> None:
    """The head as safetensors; `metadata` records how the knowledge base was made with it (teacher, T, length)."""
    tensors = {"weight": projection.weight.detach().contiguous(), "bias": projection.bias.detach()}
    save_file(tensors, str(path), metadata=metadata)


def load_projection(path: Path) -> nn.Linear:
    """The head `save_projection` wrote, checked as strictly as weights: the file lies beside a model that may come
    from the Hub, and its keys become knowledge-base rows."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise InputError(f"Could not read the projection head {path}: {err}") from err
    weight, bias = state.get("weight"), state.get("bias")
    if (
        set(state) != {"weight", "bias"}
        or weight.ndim != 2
        or bias.shape != (weight.shape[0],)
        or not (weight.is_floating_point() and bias.is_floating_point())
    ):
        shapes = {name: list(tensor.shape) for name, tensor in state.items()}
        raise InputError(
            f"{path} is not a projection head: expected a float 'weight' (kb_dim, hidden) and 'bias' (kb_dim,), "
            f"found {shapes}."
        )
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise InputError(f"The projection head {path} holds NaN or inf.")
    projection = nn.Linear(weight.shape[1], weight.shape[0])
    projection.load_state_dict({"weight": weight.float(), "bias": bias.float()})
    return projection.eval()


def projection_settings(path: Path) -> dict:
    """How the knowledge base was made with the head saved beside a student (`distill`'s metadata), checked: `kb add
    --teacher` labels rows with `softmax(logits / distillation_temperature)`, so a negative one would invert them."""
    try:
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise InputError(f"Could not read the projection head {path}: {err}") from err
    checks = {
        "distillation_temperature": (float, lambda t: math.isfinite(t) and t > 0, "a finite number > 0"),
        "max_seq_length": (int, lambda n: n >= 2, "an integer >= 2"),
    }
    settings = dict(metadata)
    for name, (kind, valid, expected) in checks.items():
        try:
            settings[name] = kind(metadata[name])
            if not valid(settings[name]):
                raise ValueError
        except (KeyError, ValueError):
            raise InputError(
                f"The projection head {path} records {name}={metadata.get(name)!r} in its metadata; expected "
                f"{expected}. It was not written by `distill` (or was edited): re-run `distill`, or add rows without "
                "--teacher."
            ) from None
    return settings


def knowledge_base_neighbors(
    knowledge_base: KnowledgeBase, keys: torch.Tensor, num_neighbors: int, own_rows: bool
) -> torch.Tensor:
    """The `num_neighbors` nearest knowledge-base rows `(N, num_neighbors)` of teacher keys `(N, d)`, searched chunk
    by chunk, each process its `distributed.shard` of the chunks (every process gets them all). With `own_rows` (the
    keys are the knowledge base's own, row i = key i) row i's own id is dropped wherever it comes back: not assumed
    first, since duplicate keys tie with it and an approximate index may not return it at all. Rows with a missing hit
    (-1, approximate indexes) are searched again exactly."""
    if num_neighbors >= knowledge_base.size:
        raise InputError(
            f"relational_neighbors={num_neighbors} needs a knowledge base of more entries; it has {knowledge_base.size}."
        )
    rows = shard(len(keys), CHUNK_ROWS)

    def search_shard() -> torch.Tensor:
        neighbors = torch.empty(len(rows), num_neighbors, dtype=torch.long)
        for start in tqdm(range(rows.start, rows.stop, CHUNK_ROWS), desc="Knowledge-base neighbours", leave=False):
            chunk = keys[start : min(start + CHUNK_ROWS, rows.stop)]  # (chunk, d)
            _, ids = knowledge_base.search(chunk, num_neighbors + 1)  # (chunk, n + 1)
            missing = (ids < 0).any(dim=1)  # (chunk,)
            if missing.any():
                ids[missing] = knowledge_base.search_exact(chunk[missing].to(knowledge_base.keys), num_neighbors + 1)[
                    1
                ]
            if own_rows:
                own = torch.arange(start, start + len(chunk)).unsqueeze(1)  # (chunk, 1)
                others_first = (ids == own).int().argsort(dim=1, stable=True)  # rank order kept, self last
                ids = ids.gather(1, others_first)
            neighbors[start - rows.start : start - rows.start + len(chunk)] = ids[:, :num_neighbors]
        return neighbors

    return torch.cat(on_every_rank(search_shard))  # (N, n)


# The student's training data: its tokens plus the teacher's columns ------------------------------------------


def with_teacher_columns(
    dataset: Dataset,
    outputs: TeacherOutputs,
    keys: torch.Tensor,
    neighbors: torch.Tensor | None = None,
    fingerprint_inputs: tuple = (),
) -> Dataset:
    """Add `teacher_logits` `(C,)`, `teacher_keys` `(d,)` and (for the relational loss's knowledge-base variant)
    `teacher_neighbor_ids` `(n,)`, written batch by batch by `datasets.map`. The result's cache fingerprint is
    given (`fingerprint_inputs`, and a hash of the neighbours), so `datasets` never hashes the captured arrays (it
    would pickle all of them)."""
    logits = outputs.logits

    def attach(batch: dict, indices: list[int]) -> dict:
        rows = np.asarray(indices)  # (b,)
        columns = {TEACHER_LOGITS: np.asarray(logits[rows]), TEACHER_KEYS: keys[rows].numpy()}  # (b, C), (b, d)
        if neighbors is not None:
            columns[TEACHER_NEIGHBORS] = neighbors[rows].numpy()  # (b, n)
        return columns

    # the neighbours by content: they depend on the index and its search settings, not only on the keys
    neighbors_id = None if neighbors is None else hashlib.sha256(neighbors.numpy().tobytes()).hexdigest()
    key = fingerprint(dataset._fingerprint, outputs.fingerprint, *fingerprint_inputs, neighbors_id)
    return dataset.map(attach, with_indices=True, batched=True, new_fingerprint=key, desc="Attaching teacher outputs")


def student_training_data(
    data: TaskData,
    outputs: dict[str, TeacherOutputs],
    keys: dict[str, torch.Tensor],
    knowledge_base: KnowledgeBase,
    tokenizer,
    max_seq_length: int,
    neighbors: dict[str, torch.Tensor],
    projection: nn.Linear,
) -> dict[str, Dataset]:
    """Every split tokenized for the student, with the teacher's columns (and `neighbors`, the knowledge-base
    neighbours of the relational and own-key losses by split, from `knowledge_base_neighbors`). Its train split is
    the transfer set (`TaskData.transfer_set`): the labelled rows, then the unlabelled ones, in the knowledge base's
    row order, so `keys["train"]` are the knowledge base's own keys."""
    weights = torch.cat([projection.weight.detach().flatten(), projection.bias.detach()])
    keys_id = hashlib.sha256(weights.numpy().tobytes()).hexdigest()  # the keys are W_t · (fingerprinted outputs)
    student_splits = {**data.splits, "train": data.transfer_set()}
    split_outputs = {**outputs, "train": transfer_outputs(outputs)}
    splits = {}
    for name, split in student_splits.items():
        description = f"Tokenizing {name} for the student"
        encoded = tokenize(split, tokenizer, data.text_column, data.text_pair_column, max_seq_length, description)
        split_neighbors = neighbors.get(name)
        width = 0 if split_neighbors is None else split_neighbors.shape[1]
        stage_inputs = (name, keys_id, knowledge_base.size, knowledge_base.index_type, width)
        splits[name] = with_teacher_columns(encoded, split_outputs[name], keys[name], split_neighbors, stage_inputs)
    return splits


__all__ = [
    "StackedRows",
    "TeacherOutputs",
    "finetune_teacher",
    "knowledge_base_neighbors",
    "knowledge_base_stage",
    "needs_finetuning",
    "project",
    "student_training_data",
    "teacher_outputs",
    "train_teacher_projection",
    "transfer_outputs",
    "with_teacher_columns",
]
