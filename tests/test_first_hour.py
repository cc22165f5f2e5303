"""The first hour of a new user: `--help` that shows this package's flags first, one-line errors without a
traceback, a model card that does not leak local paths, the demo flag's defaults, and launches on CPU."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import pipeline_args, write_task
from huggingface_hub import ModelCard

from hf_reaugkd import arguments, cli, distill
from hf_reaugkd.demo import DATASET_DESCRIPTION
from hf_reaugkd.errors import InputError
from hf_reaugkd.model_card import create_model_card, hub_id

LOSS_FLAGS = [
    "--distillation_weight",
    "--relational_weight",
    "--ce_weight",
    "--distillation_temperature",
    "--relational_temperature",
    "--relational_neighbors",
    "--own_key_weight",
    "--own_key_temperature",
]

pytestmark = pytest.mark.usefixtures("one_thread", "datasets_cache")


@pytest.fixture
def no_launcher_env(monkeypatch):
    """No trace of a launcher (torchrun, accelerate, MPI) in the environment, unless the test sets one."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE", raising=False)


# --help and the command line ---------------------------------------------------------------------------------------


def test_distill_help_shows_this_packages_flags_first(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps to the terminal: the line counts below assume 80 columns
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["distill", "--help"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("usage: hf-reaugkd distill")

    headings = [line[:-1] for line in lines if line and not line[0].isspace() and line.endswith(":")]
    headings = [h for h in headings if h not in ("options", "optional arguments", "positional arguments")]
    assert headings[0] == "student, projection head, knowledge base and retrieval"
    assert headings[1].startswith("teacher (")
    assert headings[2] == "data"
    assert headings[3].startswith("student training (")

    def line_of(flag: str) -> int:
        return next(i for i, line in enumerate(lines) if line.lstrip().startswith(f"{flag} "))

    training = lines.index(headings[3] + ":")
    order = [line_of(flag) for flag in [*LOSS_FLAGS, "--output_dir"]]
    assert training < order[0] and order == sorted(order), "the ReAugKD loss flags come before --output_dir"
    assert line_of("--teacher_max_steps") < 120 and line_of("--demo") < 120


def test_unknown_command_and_bare_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "unknown command 'train'" in captured.err and "distill" in captured.err
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2 and "distill" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0


def test_missing_data_file_is_one_line_without_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["distill", "--train_file", "nope.csv", "--validation_file", "nope.csv"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["hf-reaugkd distill: error: Data file not found: nope.csv"]


def test_missing_column_through_the_cli_is_one_line_without_traceback(task, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["distill", *pipeline_args(task, task / "out", "--text_column_name", "sentence")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("hf-reaugkd distill: error: Column 'sentence' not found")
    assert "train file" in errors[0] and str(task / "train.csv") in errors[0]
    assert not (task / "out" / "stages").exists()


def test_accelerate_cpu_launch_is_refused_with_the_command_that_works(monkeypatch, no_launcher_env, capsys):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(InputError, match="torchrun --nproc_per_node"):
        arguments.parse_args(["--output_dir", "x"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["distill", "--output_dir", "x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "torchrun --nproc_per_node" in err and "Traceback" not in err


def test_torchrun_without_gpus_trains_on_cpu(monkeypatch, no_launcher_env, tmp_path):
    """Constructing TrainingArguments under WORLD_SIZE=2 would join a process group, so the parser is stubbed: what
    is checked is the flag (or JSON key) parse_args hands it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert arguments._distributed_cpu_launch(["--output_dir", "x"]) == ["--output_dir", "x", "--use_cpu"]
    assert arguments._distributed_cpu_launch(["--use_cpu", "--output_dir", "x"]) == ["--use_cpu", "--output_dir", "x"]

    handed = []
    parser_class = type(arguments.build_parser())
    monkeypatch.setattr(parser_class, "parse_args_into_dataclasses", lambda self, args=None, **kw: handed.append(args))
    monkeypatch.setattr(parser_class, "parse_dict", lambda self, values, **kw: handed.append(values))
    arguments.parse_args(["--output_dir", "x"])
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"output_dir": "x"}))
    arguments.parse_args([str(config)])
    assert "--use_cpu" in handed[0] and handed[1]["use_cpu"] is True

    monkeypatch.setenv("WORLD_SIZE", "1")
    assert arguments._distributed_cpu_launch(["--output_dir", "x"]) == ["--output_dir", "x"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert arguments._distributed_cpu_launch(["--output_dir", "x"]) == ["--output_dir", "x"]


# The demo flag (parsed only: running it downloads) -----------------------------------------------------------------


def test_demo_is_the_default_and_explicit_flags_win(tmp_path, no_launcher_env):
    for argv in ([], ["--demo"]):
        model_args, teacher_args, data_args, training_args = arguments.parse_args(argv)
        assert data_args.demo is True, argv
        assert training_args.output_dir == "outputs/demo"
        assert model_args.student_num_layers == 3 and data_args.max_train_samples == 4000

    model_args, _, data_args, training_args = arguments.parse_args(
        ["--demo", "--output_dir", "x", "--max_train_samples", "10"]
    )
    assert data_args.demo is True and training_args.output_dir == "x" and data_args.max_train_samples == 10
    assert model_args.student_num_layers == 3

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"demo": True, "output_dir": "y"}))
    model_args, _, data_args, training_args = arguments.parse_args([str(config)])
    assert data_args.demo is True and training_args.output_dir == "y"
    assert model_args.student_num_layers == 3 and data_args.max_train_samples == 4000

    write_task(tmp_path)  # a run of one's own data: no demo, and none of the demo's defaults leak in
    model_args, _, data_args, training_args = arguments.parse_args(
        ["--train_file", str(tmp_path / "train.csv"), "--validation_file", str(tmp_path / "validation.csv")]
    )
    assert data_args.demo is False
    assert training_args.output_dir != "outputs/demo"
    assert model_args.student_num_layers is None and data_args.max_train_samples is None


# The model card ----------------------------------------------------------------------------------------------------


def card_metadata(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_of_a_run_with_local_checkpoints_leaks_no_path(task, monkeypatch):
    """Teacher and student given as folders relative to the working directory, the way a new user types them:
    `teacher` must not become a Hub link or `base_model`, and the machine's paths stay out of the card."""
    monkeypatch.chdir(task)
    distill.main(pipeline_args(Path("."), Path("out"), "--max_steps", "2", "--teacher_max_steps", "2"))
    text = (task / "out" / "model" / "README.md").read_text()
    metadata = card_metadata(text)
    assert metadata.get("base_model") is None and "datasets" not in metadata
    assert "huggingface.co//" not in text
    assert "huggingface.co/teacher" not in text and "huggingface.co/student" not in text
    assert str(task) not in text and str(task.resolve()) not in text
    saved_config = json.loads((task / "out" / "model" / "config.json").read_text())
    assert saved_config["encoder_config"].get("_name_or_path", "") == ""  # where the student's encoder came from
    assert "reaugkd" in metadata["tags"]
    assert ModelCard(text).data.base_model is None


def test_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-model").mkdir()
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert hub_id("org/name") == "org/name" and hub_id("bert-base-uncased") == "bert-base-uncased"
    for name in (
        "my-model",  # an existing folder, relative
        "org/local",  # looks like an id, but is a folder here
        str(tmp_path / "my-model"),  # absolute, existing
        "/nonexistent/models/bert",  # absolute, not existing
        "./my-model",
        "~/models/bert",
        DATASET_DESCRIPTION,  # a description with spaces
        "",
        None,
    ):
        assert hub_id(name) is None, name


def test_card_with_a_dataset_description():
    metrics = {
        "validation": {m: {"accuracy": 0.8, "macro_f1": 0.79} for m in ("teacher", "student", "student_retrieval")}
    }
    retrieval = {
        "knn_k": 4,
        "retrieval_weight": 0.5,
        "retrieval_temperature": 0.1,
        "index_type": "torch",
        "kb_size": 100,
        "kb_dim": 16,
    }
    card = create_model_card(
        model_id=None,
        base_model="sentence-transformers/all-MiniLM-L6-v2",
        teacher_model="someone/teacher",
        dataset_name=DATASET_DESCRIPTION,
        id2label={0: "negative", 1: "positive"},
        metrics=metrics,
        retrieval=retrieval,
        hyperparameters={"learning_rate": 1e-3},
    )
    text = str(card)
    assert DATASET_DESCRIPTION in text.split("---\n", 2)[2]  # named in the body
    metadata = card_metadata(text)
    assert "datasets" not in metadata and card.data.datasets is None
    assert metadata["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "huggingface.co/datasets/" not in text  # a description is not linked
