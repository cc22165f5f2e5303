"""The whole ReAugKD pipeline, top to bottom like `run_glue.py`'s `main()`: arguments → data → teacher → knowledge base
→ student → k and β on validation → evaluation → save (and push) with a model card.

`examples/distill.py` and the `hf-reaugkd distill` console script both call `main()`. An empty command line (or
`--demo`) runs the offline demo (see `demo.py`).
"""

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.trainer_utils import set_seed

from . import demo
from .arguments import DataTrainingArguments, ModelArguments, TeacherArguments, parse_args
from .caching import remove_stale_temporaries, write_json
from .data import LABEL_COLUMN, load_task_data, load_unlabeled_texts, texts_of
from .errors import InputError
from .evaluation import evaluate_student, query_mean
from .model_card import create_model_card, hub_id
from .modeling_reaugkd import ReAugKDForSequenceClassification
from .reporting import expected_notices, setup_logging, stage
from .saving import push_saved, save_student
from .settings_reaugkd import SINGLE_LABEL, problem_type_of
from .teacher import (
    finetune_teacher,
    knowledge_base_neighbors,
    knowledge_base_stage,
    needs_finetuning,
    project,
    student_training_data,
    teacher_budget,
    teacher_outputs,
)
from .trainer import ReAugKDTrainer
from .training_args import ReAugKDTrainingArguments

logger = logging.getLogger(__name__)


def run(
    model_args: ModelArguments,
    teacher_args: TeacherArguments,
    data_args: DataTrainingArguments,
    training_args: ReAugKDTrainingArguments,
) -> dict:
    """Run every stage; return the metrics (also written to `<output_dir>/metrics.json`)."""
    setup_logging()
    demo_data = data_args.demo and not (data_args.train_file or data_args.dataset_name)
    if data_args.demo:
        teacher_args, model_args, data_args = demo.fill_in(teacher_args, model_args, data_args)
    if not teacher_args.teacher_model_name_or_path or not (data_args.train_file or data_args.dataset_name):
        raise InputError(
            "Give a teacher (--teacher_model_name_or_path) and data (--train_file/--validation_file or "
            "--dataset_name), or run the offline demo with --demo."
        )
    output_dir = Path(training_args.output_dir)
    work_dir = Path(model_args.stages_dir) if model_args.stages_dir else output_dir / "stages"
    teacher_name = teacher_args.teacher_model_name_or_path
    student_name = model_args.student_model_name_or_path or teacher_name
    checkpoint_dir = output_dir / "student-checkpoints"
    resume = _resume_checkpoint(training_args, checkpoint_dir)
    if training_args.should_save:
        for folder in (output_dir, work_dir):
            for leftover in remove_stale_temporaries(folder):
                logger.info("Removed %s, left by an interrupted run", leftover)
    if not torch.cuda.is_available():
        training_args = dataclasses.replace(training_args, dataloader_pin_memory=False)  # nothing to pin to
    set_seed(training_args.seed)

    # Data, checked before any long work.
    with training_args.main_process_first(desc="data"):
        data = load_task_data(
            dataset_name=data_args.dataset_name,
            dataset_config_name=data_args.dataset_config_name,
            data_files=data_args.data_files,
            text_column=data_args.text_column_name,
            text_pair_column=data_args.text_pair_column_name,
            label_column=data_args.label_column_name,
            max_train_samples=data_args.max_train_samples,
            max_eval_samples=data_args.max_eval_samples,
            problem_type=data_args.problem_type,
            label_separator=data_args.label_separator,
        )
        data = load_unlabeled_texts(
            data,
            data_args.unlabeled_file,
            data_args.unlabeled_dataset_name,
            data_args.unlabeled_dataset_config_name,
            data_args.unlabeled_dataset_split,
        )
    if data.unlabeled is not None and not training_args.uses_teacher:
        raise InputError(
            "Unlabelled texts only reach the student through the teacher's losses, but distillation_weight, "
            "relational_weight and own_key_weight are all 0 (cross-entropy skips unlabelled rows): drop "
            "--unlabeled_file / --unlabeled_dataset_name or give one of those losses a weight."
        )
    single_label_only = {
        "--unlabeled_file / --unlabeled_dataset_name": data.unlabeled is not None,
        "--export_onnx": training_args.export_onnx != "none",
    }
    if data.problem_type != SINGLE_LABEL and any(single_label_only.values()):
        flags = [flag for flag, given in single_label_only.items() if given]
        raise InputError(
            f"{' and '.join(flags)} serve single-label classification only; this is a {data.problem_type} task: "
            "drop them."
        )
    id2label = dict(enumerate(data.label_names))

    # 1. Teacher: used as is when it already classifies these labels, fine-tuned otherwise; its outputs, once.
    teacher_path = teacher_name
    if needs_finetuning(teacher_name, data.label_names, data.problem_type):
        with stage("teacher fine-tuning"):
            teacher_path = finetune_teacher(teacher_args, data, training_args, data_args.max_seq_length, work_dir)
    else:
        logger.info("teacher: %s already classifies %s, used as is", teacher_name, data.label_names)
    with stage("teacher outputs"):  # every process computes its share of the rows
        outputs = teacher_outputs(
            teacher_path,
            data,
            data_args.max_seq_length,
            work_dir,
            batch_size=training_args.per_device_eval_batch_size,
            device=training_args.device,
            dtype=torch.bfloat16 if training_args.bf16 and training_args.device.type == "cuda" else torch.float32,
        )

    # 2.–3. Teacher projection head (supervised contrastive, labelled rows) and the knowledge base over the transfer
    #       set: the training set, then the unlabelled texts labelled by the teacher.
    kb_dim = model_args.kb_dim
    with stage("projection head and knowledge base"), training_args.main_process_first(desc="knowledge base"):
        projection, kb = knowledge_base_stage(
            outputs,
            torch.as_tensor(data.splits["train"][LABEL_COLUMN]),
            model_args,
            kb_dim,
            training_args.distillation_temperature,
            training_args.seed,
            work_dir,
            data.problem_type,
        )
    keys = {
        name: kb.keys if name == "train" else project(projection, outputs[name].embeddings) for name in data.splits
    }

    # 4. Student: encoder (optionally truncated) + fresh projection head and classifier, trained with ReAugKD.
    #    The knowledge base stays with the trainer (relational loss) and joins the student only after training.
    tokenizer = AutoTokenizer.from_pretrained(student_name)
    set_seed(training_args.seed)
    student = _new_student(model_args, student_name, id2label, kb_dim, tokenizer, data.problem_type)
    neighbors = {  # each process searches its share of the rows
        name: knowledge_base_neighbors(kb, keys[name], training_args.relational_neighbors, own_rows=name == "train")
        for name in keys
        if training_args.relational_neighbors and name != "test"
    }
    with training_args.main_process_first(desc="student training data"):  # one rank writes the caches
        splits = student_training_data(
            data, outputs, keys, kb, tokenizer, data_args.max_seq_length, neighbors, projection
        )
    with expected_notices():  # the special-token alignment notice
        trainer = ReAugKDTrainer(
            model=student,
            # the pipeline pushes the finished model itself (push_saved): the Trainer must not push checkpoints
            args=dataclasses.replace(training_args, output_dir=str(checkpoint_dir), push_to_hub=False),
            train_dataset=splits["train"],
            eval_dataset=splits["validation"],
            processing_class=tokenizer,
            knowledge_base=kb,
        )
    with stage("student training"):
        trainer.train(resume_from_checkpoint=resume)
    student = trainer.model  # every process evaluates its share of the rows; the main process saves
    if model_args.store_kb_texts:
        kb.set_texts(texts_of(data.transfer_set(), data.text_column, data.text_pair_column))
    student.set_knowledge_base(kb)

    # 5.–6. k and β on validation only, then teacher, student and student + retrieval on validation and test.
    with stage("evaluation"):
        metrics = evaluate_student(
            student,
            tokenizer,
            {name: splits[name] for name in ("validation", "test") if name in splits},
            {name: outputs[name].logits for name in outputs},
            keys["validation"],
            model_args.knn_ks,
            model_args.betas,
            model_args.retrieval_temperature,
            training_args.per_device_eval_batch_size,
            knowledge_base_texts=splits["train"] if model_args.evaluate_student_keyed_kb else None,
            fit_gate=model_args.retrieval_gate and data.problem_type == SINGLE_LABEL,  # β(x) weighs class votes
        )
        # where `kb add` without a teacher centres the queries that key gold rows
        student.config.query_mean = query_mean(
            student, splits["validation"], tokenizer, training_args.per_device_eval_batch_size
        )
    if not trainer.is_world_process_zero():
        return {}
    metrics["world_size"] = training_args.world_size  # processes that trained the student
    if (budget := teacher_budget(teacher_path)) is not None:  # --teacher_num_train_epochs auto chose the epoch
        metrics["teacher_budget"] = budget
    student.config.knn_k = metrics["selection"]["knn_k"]
    student.config.retrieval_weight = metrics["selection"]["retrieval_weight"]
    gate = metrics.get("gate")
    student.config.retrieval_gate = gate["parameters"] if gate and gate["used"] else None

    # 7. Save (atomically) and push what was saved.
    dataset_name = demo.DATASET_DESCRIPTION if demo_data else data_args.dataset_name
    unlabeled_rows = 0 if data.unlabeled is None else len(data.unlabeled)
    # the repository pushed to, which the card's usage snippets name
    repo_id = (training_args.hub_model_id or output_dir.resolve().name) if training_args.push_to_hub else None
    card = _model_card(
        repo_id,
        student,
        teacher_name,
        student_name,
        dataset_name,
        metrics,
        model_args,
        teacher_args,
        data_args,
        training_args,
        unlabeled_rows,
    )
    projection_metadata = {  # what `kb add --teacher` needs to key new rows as in training
        # the teacher that made the KB: the fine-tuned one (under --stages_dir) when the given one was fine-tuned
        "teacher_model": hub_id(str(teacher_path)) or Path(teacher_path).name,
        "teacher_fine_tuned_from": ""
        if str(teacher_path) == teacher_name
        else (hub_id(teacher_name) or Path(teacher_name).name),
        "distillation_temperature": str(training_args.distillation_temperature),
        "max_seq_length": str(data_args.max_seq_length),
    }
    model_dir = save_student(output_dir / "model", student, tokenizer, card, metrics, projection, projection_metadata)
    if training_args.export_onnx != "none":  # into the saved folder, so a push carries it
        from .onnx_export import export_onnx

        export_onnx(student, tokenizer, model_dir, quantize="int8" if training_args.export_onnx == "int8" else "none")
        logger.info("Exported the student to %s/onnx (%s)", model_dir, training_args.export_onnx)
    write_json(output_dir / "metrics.json", metrics)
    print_results(metrics)
    logger.info("Saved the retrieval-augmented student to %s", model_dir)
    if checkpoint_dir.exists() and not model_args.keep_checkpoints:
        shutil.rmtree(checkpoint_dir)
        logger.info(
            "Removed the training checkpoints %s (the model is saved; --keep_checkpoints keeps them)", checkpoint_dir
        )
    if repo_id is not None:
        push_saved(
            model_dir, repo_id, training_args.hub_token, training_args.hub_private_repo, training_args.hub_revision
        )
    return metrics


def truncated_layers(config, num_layers: int) -> dict:
    """The config changes that keep an encoder's first `num_layers` layers: their number, and the per-layer attention
    pattern where the config has one (`layer_types`: ModernBERT alternates global and sliding-window layers), cut to
    the same layers so each kept layer attends as it was trained to."""
    changes = {"num_hidden_layers": num_layers}
    if getattr(config, "layer_types", None) is not None:
        changes["layer_types"] = list(config.layer_types[:num_layers])
    return changes


def _new_student(
    model_args: ModelArguments,
    student_name: str,
    id2label: dict[int, str],
    kb_dim: int,
    tokenizer,
    problem_type: str = SINGLE_LABEL,
) -> ReAugKDForSequenceClassification:
    """The student encoder (optionally its first N layers) with a fresh projection head and classifier (one output
    per label, or one for regression)."""
    config = AutoConfig.from_pretrained(student_name)
    layers = config.num_hidden_layers
    if model_args.student_num_layers and not 1 <= model_args.student_num_layers <= layers:
        raise InputError(
            f"--student_num_layers must be in [1, {layers}] for {student_name}, got {model_args.student_num_layers}."
        )
    encoder_kwargs = truncated_layers(config, model_args.student_num_layers) if model_args.student_num_layers else {}
    with expected_notices():  # a truncated student leaves the upper layers' weights unused, by design
        encoder = AutoModel.from_pretrained(student_name, **encoder_kwargs)
    logger.info("student: first %d of %d layers of %s", encoder.config.num_hidden_layers, layers, student_name)
    return ReAugKDForSequenceClassification.from_encoder(
        encoder,
        id2label,
        kb_dim=kb_dim,
        pooling=model_args.pooling,
        retrieval_temperature=model_args.retrieval_temperature,
        pad_token_id=tokenizer.pad_token_id,
        problem_type=problem_type,
    )


def _model_card(
    repo_id,
    student,
    teacher_name,
    student_name,
    dataset_name,
    metrics,
    model_args,
    teacher_args,
    data_args,
    training_args,
    unlabeled_rows,
):
    kb = student.knowledge_base
    return create_model_card(
        model_id=repo_id or training_args.hub_model_id,
        base_model=student_name,
        teacher_model=teacher_name,
        dataset_name=dataset_name,
        id2label=student.config.id2label,
        metrics=metrics["splits"],
        retrieval={
            "knn_k": student.config.knn_k,
            "retrieval_weight": student.config.retrieval_weight,
            "retrieval_gate": student.config.retrieval_gate,
            "retrieval_temperature": model_args.retrieval_temperature,
            "index_type": kb.index_type,
            "kb_size": kb.size,
            "kb_dim": kb.dim,
        },
        hyperparameters=_hyperparameters(model_args, teacher_args, data_args, training_args, unlabeled_rows)
        | _teacher_budget_hyperparameters(metrics.get("teacher_budget")),
        num_parameters=sum(p.numel() for p in student.parameters()),
        problem_type=problem_type_of(student.config),
    )


def _teacher_budget_hyperparameters(budget: dict | None) -> dict:
    if budget is None:
        return {}
    metric = budget.get("metric", "accuracy")  # teachers fine-tuned before the other task types: accuracy
    return {
        "teacher_epochs_kept": f"{budget['best_epoch']} of up to {budget['epochs_cap']} (best on validation)",
        f"teacher_validation_{metric}": round(budget[f"validation_{metric}"], 4),
    }


def print_results(metrics: dict) -> None:
    """The results table: the selection metric (accuracy for classification) per evaluated split of teacher,
    student and student + retrieval."""
    names = {
        "teacher": "teacher",
        "student": "student (β=0)",
        "student_retrieval": "student + retrieval",
        "student_retrieval_gated": "student + retrieval, β(x)",
        "student_retrieval_student_keys": "student + own-keyed KB",
    }
    splits = list(metrics["splits"])
    selection = metrics["selection"]
    metric = selection["metric"]
    scale, short = (100, "acc") if metric == "accuracy" else (1, metric)
    header = f"{'model':<24}" + "".join(f"{s + ' ' + short:>16}" for s in splits)
    lines = ["", header, "-" * len(header)]
    for key, label in names.items():
        if key not in metrics["splits"][splits[0]]:  # the gate and the student-keyed baseline are measured on request
            continue
        scores = "".join(
            f"{scale * metrics['splits'][s][key][metric]:>16.{2 if scale == 100 else 4}f}" for s in splits
        )
        lines.append(f"{label:<24}{scores}")
    if "teacher_budget" in metrics:
        budget = metrics["teacher_budget"]
        kept = budget.get("metric", "accuracy")
        lines.append(
            f"\nteacher: epoch {budget['best_epoch']} of up to {budget['epochs_cap']} kept, the best on validation "
            f"({kept} {budget[f'validation_{kept}']:.4f})"
        )
    lines.append(f"\nretrieval chosen on validation: k={selection['knn_k']}, β={selection['retrieval_weight']}")
    if "gate" in metrics:
        gate = metrics["gate"]
        lines.append(
            f"per-query β(x): {gate['validation_accuracy_crossfit']:.4f} on held-out validation halves vs "
            f"{gate['validation_accuracy_fixed']:.4f} with the fixed β: {'used' if gate['used'] else 'not used'}"
        )
    if "selection_student_keys" in metrics:
        chosen = metrics["selection_student_keys"]
        lines.append(f"own-keyed KB chosen on validation: k={chosen['knn_k']}, β={chosen['retrieval_weight']}")
    print("\n".join(lines), flush=True)


def _hyperparameters(model_args, teacher_args, data_args, training_args, unlabeled_rows: int) -> dict:
    keys = (
        "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
        "seed", "distillation_weight", "relational_weight", "ce_weight", "own_key_weight", "own_key_cosine_weight",
        "distillation_temperature",
        "relational_temperature", "own_key_temperature", "relational_neighbors",
    )  # fmt: skip
    values = {key: getattr(training_args, key) for key in keys}
    values.update(
        unlabeled_rows=unlabeled_rows,
        max_seq_length=data_args.max_seq_length,
        student_num_layers=model_args.student_num_layers,
        teacher_num_train_epochs=teacher_args.teacher_num_train_epochs,
        teacher_learning_rate=teacher_args.teacher_learning_rate,
        projection_temperature=model_args.projection_temperature,
        pooling=model_args.pooling,
    )
    return values


def _resume_checkpoint(training_args, checkpoint_dir: Path) -> str | None:
    """`--resume_from_checkpoint PATH` as given; `true`/`last` means the last *complete* checkpoint of this run's
    student: one a kill interrupted while it was being written (no trainer state or weights yet) is skipped.
    "Last" is the most recently written, not the highest step: a kept or failed earlier run's checkpoint-1000 must
    not win over this run's checkpoint-200 (the step breaks ties)."""
    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("false", ""):
        return None
    if str(value).lower() not in ("true", "last"):
        return value
    found = sorted(
        (path for path in checkpoint_dir.glob("checkpoint-*") if path.name.split("-")[-1].isdigit()),
        key=lambda path: (_written_at(path), int(path.name.split("-")[-1])),
        reverse=True,
    )
    for path in found:
        if _is_complete(path):
            return str(path)
        logger.warning("Skipping the incomplete checkpoint %s (interrupted while it was written)", path)
    raise InputError(f"--resume_from_checkpoint {value}: no complete checkpoint found in {checkpoint_dir}")


def _written_at(checkpoint: Path) -> int:
    """When the Trainer finished writing a checkpoint: its trainer state's mtime (written last), else the folder's."""
    state = checkpoint / "trainer_state.json"
    return (state if state.exists() else checkpoint).stat().st_mtime_ns


def _is_complete(checkpoint: Path) -> bool:
    """The Trainer writes the weights, then the trainer state, last and not atomically: both must be there, whole."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return any(checkpoint.glob("model*.safetensors"))


def main(argv: list[str] | None = None) -> dict:
    try:
        return run(*parse_args(argv))
    finally:
        # Under torchrun, a process group left open when the interpreter exits can abort a rank ("terminate called
        # without an active exception") after all its work is done; close it while the process is still whole.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
