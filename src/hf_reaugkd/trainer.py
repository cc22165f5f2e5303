"""`ReAugKDTrainer`: the stock `Trainer` loop with the ReAugKD loss in `compute_loss`."""

from collections import defaultdict

import torch
from transformers import Trainer

from .data import TEACHER_KEYS, TEACHER_LOGITS, TEACHER_NEIGHBORS, UNLABELED
from .knowledge_base import KnowledgeBase
from .losses import distillation_loss, own_key_cosine_loss, own_key_loss, relational_loss
from .modeling_reaugkd import prediction_loss
from .settings_reaugkd import SINGLE_LABEL, problem_type_of
from .training_args import ReAugKDTrainingArguments


class ReAugKDTrainer(Trainer):
    """Trains a `ReAugKDForSequenceClassification` student against precomputed teacher outputs.

    The train dataset carries, besides the student's tokenized inputs and `labels`, two columns made once by
    the teacher: `teacher_logits` `(C,)` and `teacher_keys` `(d,)` (the teacher's projected, normalised
    embedding, i.e. the example's knowledge-base key), and with `relational_neighbors > 0` a third,
    `teacher_neighbor_ids` `(n,)`: the example's nearest other entries of `knowledge_base`. The knowledge base is
    held by the trainer, not by the student: under DDP it is never broadcast as a model buffer, and training
    checkpoints do not carry it; it is attached to the student after training.
    Each loss part is logged (`loss_distillation`, `loss_relational`, `loss_ce`, `loss_own_key`,
    `loss_own_key_cosine`).

    Under DDP the relational and own-key losses relate each local example to the teacher keys of *all* processes'
    batches (gathered; they are constants, so no gradient needs to flow through the gather), which makes them the
    same losses as one process with the global batch. The example's own key is among those keys (j = i): the
    relational target keeps that self term, and the own-key loss makes it the positive.

    Rows with label -100 (unlabelled texts the teacher labelled) get every loss but cross-entropy, which is the mean
    over the batch's labelled rows (0, not NaN, for a batch without any). For multi-label and regression students
    (`config.problem_type`) the distillation and gold-label losses are binary cross-entropy and squared error
    (`distillation_loss`, `prediction_loss`); their rows are all labelled.
    """

    args: ReAugKDTrainingArguments

    def __init__(self, *args, knowledge_base: KnowledgeBase | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.knowledge_base = knowledge_base
        # Our loss is a mean over the batch: the Trainer divides it by the accumulation steps as usual, and must not
        # expect a normalisation by `num_items_in_batch` as well.
        self.model_accepts_loss_kwargs = False
        self._loss_part_sums = defaultdict(float)
        self._loss_part_count = 0

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in (TEACHER_LOGITS, TEACHER_KEYS, TEACHER_NEIGHBORS):
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher_logits = inputs.pop(TEACHER_LOGITS)  # (B, C)
        teacher_keys = inputs.pop(TEACHER_KEYS)  # (B, d)
        labels = inputs.pop("labels")  # (B,)
        neighbor_ids = inputs.pop(TEACHER_NEIGHBORS, None)  # (B, N)
        outputs = model(**inputs, retrieval_weight=0.0)
        args = self.args
        problem_type = problem_type_of(self.model.config)  # self.model: never wrapped (DDP)

        parts = {}
        if args.distillation_weight > 0:
            parts["distillation"] = distillation_loss(
                outputs.student_logits, teacher_logits, args.distillation_temperature, problem_type
            )
        if args.relational_weight > 0 or args.own_key_weight > 0:
            keys = self.accelerator.gather(teacher_keys.contiguous())  # (world × B, d), rank-major
            if args.relational_neighbors > 0:
                neighbor_keys = self._neighbor_keys(neighbor_ids)  # (B, n, d)
                keys = torch.cat([keys.expand(len(teacher_keys), -1, -1), neighbor_keys], dim=1)  # (B, M + n, d)
            if args.relational_weight > 0:
                parts["relational"] = relational_loss(
                    outputs.query_embedding, teacher_keys, keys, args.relational_temperature
                )
            if args.own_key_weight > 0:
                first = self.accelerator.process_index * len(teacher_keys)  # this rank's rows in the gathered keys
                own = torch.arange(first, first + len(teacher_keys), device=teacher_keys.device)  # (B,)
                parts["own_key"] = own_key_loss(outputs.query_embedding, keys, own, args.own_key_temperature)
        if args.own_key_cosine_weight > 0:
            parts["own_key_cosine"] = own_key_cosine_loss(outputs.query_embedding, teacher_keys)
        if args.ce_weight > 0 and problem_type != SINGLE_LABEL:
            parts["ce"] = prediction_loss(outputs.student_logits, labels, problem_type)
        elif args.ce_weight > 0:
            labelled = labels != UNLABELED  # (B,)
            total = torch.nn.functional.cross_entropy(
                outputs.student_logits.float(), labels, ignore_index=UNLABELED, reduction="sum"
            )
            parts["ce"] = total / labelled.sum().clamp_min(1)
        weights = {
            "distillation": args.distillation_weight,
            "relational": args.relational_weight,
            "ce": args.ce_weight,
            "own_key": args.own_key_weight,
            "own_key_cosine": args.own_key_cosine_weight,
        }
        loss = sum(weights[name] * value for name, value in parts.items())

        if model.training:
            for name, value in parts.items():
                self._loss_part_sums[name] += value.detach().float()  # a tensor: no device sync per step
            self._loss_part_count += 1
        return (loss, outputs) if return_outputs else loss

    def _neighbor_keys(self, neighbor_ids: torch.Tensor | None) -> torch.Tensor:
        """Keys `(B, n, d)` of each example's knowledge-base neighbours."""
        if neighbor_ids is None or self.knowledge_base is None:
            raise ValueError(
                f"relational_neighbors={self.args.relational_neighbors} needs a '{TEACHER_NEIGHBORS}' column in the "
                "train dataset and the knowledge base passed to the trainer (ReAugKDTrainer(..., knowledge_base=kb))."
            )
        if self.knowledge_base.keys.device != neighbor_ids.device:  # once: the keys then stay on the device
            self.knowledge_base.to(neighbor_ids.device)
        return self.knowledge_base.keys[neighbor_ids]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._loss_part_count:
            names = sorted(self._loss_part_sums)
            means = torch.stack([self._loss_part_sums[name] / self._loss_part_count for name in names])
            means = self.accelerator.reduce(
                means.to(self.args.device), reduction="mean"
            )  # over processes, like "loss"
            for name, value in zip(names, means.tolist(), strict=True):
                logs[f"loss_{name}"] = round(value, 4)
            self._loss_part_sums.clear()
            self._loss_part_count = 0
        super().log(logs, start_time)
