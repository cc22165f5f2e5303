"""The whole distillation pipeline on a tiny random teacher/student and a tiny synthetic task."""

import json
import logging
import math

import numpy as np
import pytest
from conftest import pipeline_args, run_fresh_python, tiny_encoder, write_task
from transformers import BertForSequenceClassification

from hf_reaugkd import teacher as teacher_module
from hf_reaugkd.arguments import parse_args
from hf_reaugkd.distill import main


def test_end_to_end_then_fresh_process_pipeline(task, capsys):
    output_dir = task / "out"
    main(pipeline_args(task, output_dir, "--relational_neighbors", "4", "--export_onnx", "fp32"))
    printed = capsys.readouterr().out
    assert "student + retrieval" in printed and "chosen on validation" in printed

    metrics = json.loads((output_dir / "metrics.json").read_text())
    # train is never scored: its examples are in the knowledge base, so retrieval would find each one itself
    assert set(metrics["splits"]) == {"validation", "test"}
    for split in metrics["splits"].values():
        assert set(split) == {"teacher", "student", "student_retrieval", "student_retrieval_gated"}
        assert all(0 <= m["accuracy"] <= 1 and 0 <= m["macro_f1"] <= 1 for m in split.values())
    chosen = metrics["selection"]
    assert chosen["knn_k"] in (1, 4) and chosen["retrieval_weight"] in (0.0, 0.5, 1.0)
    best = max(row["accuracy"] for row in metrics["validation_grid"])
    assert chosen["accuracy"] == best
    # kNN accuracy of the student's queries is the β=1 column of the grid; the teacher's queries get their own
    knn = metrics["validation_knn_accuracy"]
    beta_one = {
        str(row["knn_k"]): row["accuracy"] for row in metrics["validation_grid"] if row["retrieval_weight"] == 1
    }
    assert knn["student_query"] == beta_one
    assert set(knn["teacher_query"]) == {"1", "4"} and all(0 <= a <= 1 for a in knn["teacher_query"].values())

    model_dir = output_dir / "model"
    assert not (output_dir / "student-checkpoints").exists()  # removed once the model is saved
    config = json.loads((model_dir / "config.json").read_text())
    assert config["knn_k"] == chosen["knn_k"] and config["retrieval_weight"] == chosen["retrieval_weight"]
    assert config["kb_size"] == 96 and config["encoder_config"]["num_hidden_layers"] == 1
    gate = metrics["gate"]  # fitted at the chosen k; served only when it won on held-out validation halves
    assert gate["knn_k"] == chosen["knn_k"] and len(gate["parameters"]) == 5
    assert config["retrieval_gate"] == (gate["parameters"] if gate["used"] else None)
    card = (model_dir / "README.md").read_text()
    assert "reaugkd" in card and "trust_remote_code=True" in card

    got = run_fresh_python(
        f"""
        import json
        from transformers import pipeline
        classifier = pipeline("text-classification", model={str(model_dir)!r}, trust_remote_code=True)
        print(json.dumps(classifier(["the movie was great fun", "awful boring plot"])))
        """,
        task,
    )
    assert [row["label"] for row in got] and all(row["label"] in ("negative", "positive") for row in got)
    # --export_onnx: the saved folder carries the graph of the knowledge base it was saved with
    from hf_reaugkd.onnx_pipeline import ONNXTextClassificationPipeline

    onnx_labels = ONNXTextClassificationPipeline(model_dir)(["the movie was great fun", "awful boring plot"])
    assert [row["label"] for row in onnx_labels] == [row["label"] for row in got]
    assert not (model_dir / "onnx" / "model_quantized.onnx").exists()


def test_rerun_skips_finished_stages(task):
    output_dir = task / "out"
    main(pipeline_args(task, output_dir, "--num_train_epochs", "1"))
    stages = sorted(p.name for p in (output_dir / "stages").iterdir())
    stamps = {p.name: p.stat().st_mtime_ns for p in (output_dir / "stages").iterdir()}
    main(pipeline_args(task, output_dir, "--num_train_epochs", "1"))
    assert sorted(p.name for p in (output_dir / "stages").iterdir()) == stages
    assert {p.name: p.stat().st_mtime_ns for p in (output_dir / "stages").iterdir()} == stamps
    # a changed input (projection epochs) rebuilds the knowledge base but reuses the teacher and its outputs
    main(pipeline_args(task, output_dir, "--num_train_epochs", "1", "--projection_num_epochs", "1"))
    after = sorted(p.name for p in (output_dir / "stages").iterdir())
    assert len([n for n in after if n.startswith("knowledge-base-")]) == 2
    assert len([n for n in after if n.startswith("teacher-outputs-")]) == 1
    assert len(_teachers(output_dir / "stages")) == 1


def _teachers(stages):
    return [
        p
        for p in stages.iterdir()
        if p.name.startswith("teacher-") and p.name.split("-")[1] not in ("outputs", "checkpoints")
    ]


def test_runs_share_a_stages_dir(task):
    stages = task / "shared-stages"
    main(pipeline_args(task, task / "reaugkd", "--num_train_epochs", "1", "--stages_dir", str(stages)))
    stamps = {p.name: p.stat().st_mtime_ns for p in stages.iterdir() if p.name != "teacher-checkpoints"}
    assert any(name.startswith("knowledge-base-") for name in stamps)
    # a run that differs only in the student's loss reuses the teacher and the knowledge base
    main(
        pipeline_args(
            task, task / "kd", "--num_train_epochs", "1", "--relational_weight", "0", "--stages_dir", str(stages)
        )
    )
    assert {p.name: p.stat().st_mtime_ns for p in stages.iterdir() if p.name != "teacher-checkpoints"} == stamps
    assert not (task / "kd" / "stages").exists() and (task / "kd" / "model" / "model.safetensors").is_file()


def test_finetuned_teacher_with_these_labels_is_used_as_is(task):
    teacher = BertForSequenceClassification(tiny_encoder(seed=1).config)
    teacher.config.id2label, teacher.config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    teacher.save_pretrained(task / "teacher")
    output_dir = task / "out"
    main(pipeline_args(task, output_dir, "--num_train_epochs", "1"))
    assert not _teachers(output_dir / "stages")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--text_column_name": "sentence"}, "Column 'sentence' not found in the train file"),
        ({"--label_column_name": "gold"}, "Column 'gold' not found"),
    ],
)
def test_bad_columns_fail_before_training(task, change, message):
    args = pipeline_args(task, task / "out")
    for flag, value in change.items():
        args[args.index(flag) + 1] if flag in args else args.extend([flag, value])
    with pytest.raises(ValueError, match=message):
        main(args)
    assert not (task / "out" / "stages").exists()


def test_unseen_labels_empty_texts_and_foreign_teacher_are_rejected(task):
    (task / "test.csv").write_text("text,label\ngood movie,positive\nbad plot,neutral\n")
    with pytest.raises(ValueError, match=r"test file .* labels never seen in training: \['neutral'\]"):
        main(pipeline_args(task, task / "out"))
    (task / "test.csv").write_text('text,label\ngood movie,positive\n" ",negative\n')
    with pytest.raises(ValueError, match="Empty text in column 'text', line 3 of the test file"):
        main(pipeline_args(task, task / "out"))
    write_task(task)
    teacher = BertForSequenceClassification(tiny_encoder(seed=1).config)
    teacher.config.id2label = {0: "sports", 1: "politics"}
    teacher.save_pretrained(task / "teacher")
    with pytest.raises(ValueError, match=r"classifier for the labels \['sports', 'politics'\]"):
        main(pipeline_args(task, task / "out"))


def test_missing_file_and_bad_flags_are_reported():
    with pytest.raises(ValueError, match="Data file not found: nope.csv"):
        parse_args(["--train_file", "nope.csv", "--validation_file", "nope.csv"])
    with pytest.raises(ValueError, match="index_type must be .auto. or one of"):
        parse_args(["--index_type", "annoy"])


def test_training_flags_reach_the_student_and_teacher_flags_the_teacher(task, caplog, monkeypatch):
    """--max_steps limits the student only, --eval_strategy steps evaluates on validation, activation checkpointing
    runs; the teacher has its own --teacher_* budget, and a changed teacher budget retrains the teacher. A teacher
    fine-tuned for fewer than TEACHER_MIN_STEPS steps is reported."""
    monkeypatch.setattr(teacher_module, "TEACHER_MIN_STEPS", 3)
    caplog.set_level(logging.WARNING, logger="hf_reaugkd")

    def short_teacher_warnings() -> list[str]:
        found = [r.getMessage() for r in caplog.records if "optimizer steps" in r.getMessage()]
        caplog.clear()
        return found

    output_dir = task / "out"
    flags = ["--max_steps", "3", "--eval_strategy", "steps", "--eval_steps", "2", "--activation_checkpointing"]
    main(
        pipeline_args(
            task, output_dir, *flags, "--teacher_max_steps", "2", "--save_strategy", "steps", "--keep_checkpoints"
        )
    )
    state = json.loads((output_dir / "student-checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["max_steps"] == 3
    evaluations = [row for row in state["log_history"] if "eval_loss" in row]
    assert evaluations[0]["step"] == 2 and all(math.isfinite(row["eval_loss"]) for row in evaluations)
    teachers = _teachers(output_dir / "stages")
    assert len(teachers) == 1
    assert [message.split(" (")[0] for message in short_teacher_warnings()] == [
        "teacher: fine-tuned for only 2 optimizer steps"
    ]
    # the student's --max_steps does not touch the teacher's fingerprint; the teacher's own budget does
    main(pipeline_args(task, output_dir, "--max_steps", "2", "--teacher_max_steps", "2"))
    assert _teachers(output_dir / "stages") == teachers
    main(pipeline_args(task, output_dir, "--max_steps", "2", "--teacher_max_steps", "3"))
    assert len(_teachers(output_dir / "stages")) == 2
    assert short_teacher_warnings() == []  # 3 steps: not fewer than TEACHER_MIN_STEPS


def test_bf16_training_keeps_the_saved_knowledge_base_fp32(task):
    output_dir = task / "out"
    main(pipeline_args(task, output_dir, "--max_steps", "2", "--teacher_max_steps", "2", "--bf16"))
    config = json.loads((output_dir / "model" / "config.json").read_text())
    assert config["kb_size"] == 96
    from safetensors import safe_open

    with safe_open(output_dir / "model" / "model.safetensors", "pt") as f:
        assert f.get_slice("reaugkd.knowledge_base.keys").get_dtype() == "F32"


def test_auto_teacher_budget_keeps_the_epoch_best_on_validation(task, monkeypatch):
    """`--teacher_num_train_epochs auto` (the default): epochs up to the cap, an evaluation after each, and the saved
    teacher is the best one on validation, whose accuracy metrics.json and the card report."""
    monkeypatch.setattr(teacher_module, "AUTO_BUDGET_STEPS", 12)  # 96 rows, batch 32: 3 steps an epoch, 4 epochs
    output_dir = task / "out"
    args = [a for a in pipeline_args(task, output_dir, "--max_steps", "2") if a != "--teacher_num_train_epochs"]
    args.remove("3")  # its value
    main(args)
    budget = json.loads((output_dir / "metrics.json").read_text())["teacher_budget"]
    assert budget["epochs_cap"] == 4 and 1 <= budget["best_epoch"] <= budget["epochs_run"] <= 4
    (teacher,) = _teachers(output_dir / "stages")
    saved = teacher_module.teacher_budget(teacher)
    assert saved == budget
    # the saved teacher is the kept epoch's: its own validation accuracy is the one reported
    from hf_reaugkd.data import LABEL_COLUMN, load_task_data
    from hf_reaugkd.teacher import teacher_outputs

    data = load_task_data(data_files={split: str(task / f"{split}.csv") for split in ("train", "validation", "test")})
    outputs = teacher_outputs(teacher, data, 16, task / "outputs-check")
    predicted = outputs["validation"].logits.argmax(-1)
    labels = np.asarray(data.splits["validation"][LABEL_COLUMN])
    assert (predicted == labels).mean() == pytest.approx(budget["validation_accuracy"])
    card = (output_dir / "model" / "README.md").read_text()
    assert f"{budget['best_epoch']} of up to 4 (best on validation)" in card


@pytest.mark.parametrize("value", ["many", "0", "-2", "inf"])
def test_a_teacher_budget_that_is_not_auto_or_a_positive_number_is_refused(value):
    from hf_reaugkd.errors import InputError

    with pytest.raises(InputError, match="--teacher_num_train_epochs must be 'auto' or a number of epochs > 0"):
        parse_args(["--demo", "--teacher_num_train_epochs", value])
