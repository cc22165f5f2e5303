"""Training arguments of the distillation stages: `TrainingArguments` plus the ReAugKD loss weights."""

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .errors import InputError


@dataclass
class ReAugKDTrainingArguments(TrainingArguments):
    """`TrainingArguments` for the student, with the loss of docs/method.md §4:

        L = distillation_weight · L_kd + relational_weight · L_rel + ce_weight · CE + own_key_weight · L_own
            + own_key_cosine_weight · L_own_cos

    The defaults (KD and relational terms at full weight, no gold-label CE, no own-key term) follow the reference run
    in which `L_kd + 1.0 · L_rel` beat both vanilla KD and `α · L_kd + (1 − α) · L_rel` with α = 0.5.
    The baselines are the same code with other weights: student without KD = (0, 0, 1), vanilla KD = (1, 0, 0).
    CE only sees labelled rows: unlabelled ones (label -100) get the teacher's losses only.
    """

    _argument_group_name = "student training (the ReAugKD loss, then every TrainingArguments flag)"

    distillation_weight: float = field(default=1.0, metadata={"help": "Weight of the soft-label KD loss (T² · KL)."})
    relational_weight: float = field(
        default=1.0, metadata={"help": "Weight of the relational alignment loss; 0 trains a plain KD student."}
    )
    ce_weight: float = field(default=0.0, metadata={"help": "Weight of cross-entropy on the gold labels."})
    distillation_temperature: float = field(
        default=1.0, metadata={"help": "T: temperature of the teacher's soft labels (KD loss and knowledge base)."}
    )
    relational_temperature: float = field(
        default=0.1, metadata={"help": "τ: temperature of the similarity distributions in the relational loss."}
    )

    relational_neighbors: int = field(
        default=0,
        metadata={
            "help": "Also relate each example to its teacher key's N nearest knowledge-base entries, besides the "
            "batch: the student then learns the teacher's neighbourhoods, not only its in-batch (mostly "
            "class-level) similarities; the own-key loss takes them as extra negatives. 0: the batch only."
        },
    )
    own_key_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the own-key loss: InfoNCE pulling each student query onto its own teacher key, the "
            "other in-batch keys (and, with --relational_neighbors, its knowledge-base neighbours) as negatives. "
            "It teaches the example's place in the teacher's space, which the class-level relational targets of a "
            "SupCon head leave loose. 0: off."
        },
    )
    own_key_temperature: float = field(
        default=0.1, metadata={"help": "Temperature of the own-key loss's softmax over the keys."}
    )
    own_key_cosine_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the own-key cosine loss 1 − z_s · k_own, pulling each query onto its own teacher key "
            "(the InfoNCE form stops at the class boundary when the teacher's classes have collapsed). 0: off."
        },
    )

    export_onnx: str = field(
        default="none",
        metadata={
            "help": "Also export the saved student with its knowledge base to ONNX (onnx/model.onnx; 'int8' adds "
            "onnx/model_quantized.onnx), before --push_to_hub: 'none', 'fp32' or 'int8'. Needs hf-reaugkd[export]."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.export_onnx not in ("none", "fp32", "int8"):
            raise InputError(f"--export_onnx must be 'none', 'fp32' or 'int8', got {self.export_onnx!r}")
        weights = (
            self.distillation_weight, self.relational_weight, self.ce_weight, self.own_key_weight,
            self.own_key_cosine_weight,
        )  # fmt: skip
        if min(weights) < 0 or max(weights) == 0:
            raise InputError(
                "distillation_weight, relational_weight, ce_weight, own_key_weight and own_key_cosine_weight must be "
                f">= 0 and not all 0, got {weights}."
            )
        if self.relational_neighbors < 0:
            raise InputError(f"relational_neighbors must be >= 0, got {self.relational_neighbors}.")
        temperatures = (self.distillation_temperature, self.relational_temperature, self.own_key_temperature)
        if min(temperatures) <= 0:
            raise InputError(
                "distillation_temperature, relational_temperature and own_key_temperature must be > 0, got "
                f"{temperatures}."
            )

    @property
    def uses_teacher(self) -> bool:
        """Whether a loss reads the teacher's outputs (only those can learn from unlabelled rows)."""
        return (
            max(self.distillation_weight, self.relational_weight, self.own_key_weight, self.own_key_cosine_weight) > 0
        )
