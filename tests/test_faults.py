"""Nothing lost, nothing stale: inputs changed in place are noticed, interrupted runs resume and leave nothing
behind, saves are atomic and readable by others, and bad data is refused with the file and row in the message."""

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import pipeline_args, tiny_encoder
from transformers import BertForSequenceClassification

from hf_reaugkd import caching, distill
from hf_reaugkd.arguments import parse_args
from hf_reaugkd.data import load_task_data
from hf_reaugkd.distill import main
from hf_reaugkd.errors import InputError
from hf_reaugkd.trainer import ReAugKDTrainer

FAST = ("--max_steps", "2", "--teacher_max_steps", "2", "--knn_k_grid", "1", "--retrieval_weight_grid", "0,1")

pytestmark = pytest.mark.usefixtures("one_thread", "datasets_cache")


def save_fixed_teacher(directory: Path, bias: tuple[float, float]) -> None:
    """A classifier for exactly the task's labels (so it is used as is) whose logits are `bias` for every input:
    the same encoder each time, only the head's bias differs (same files, same sizes)."""
    torch.manual_seed(1)
    teacher = BertForSequenceClassification(tiny_encoder(seed=1).config)
    teacher.config.id2label, teacher.config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    with torch.no_grad():
        teacher.classifier.weight.zero_()
        teacher.classifier.bias.copy_(torch.tensor(bias))
    teacher.save_pretrained(directory)


ALWAYS_NEGATIVE, ALWAYS_POSITIVE = (4.0, -4.0), (-4.0, 4.0)


def write_validation(directory: Path, labels: list[str]) -> Path:
    path = directory / "validation.csv"
    words = ["the movie", "a plot", "the story", "an actor"]
    path.write_text("text,label\n" + "".join(f"{words[i % 4]},{label}\n" for i, label in enumerate(labels)))
    return path


def stage_names(directory: Path, prefix: str) -> set[str]:
    return {p.name for p in (directory / "stages").iterdir() if p.name.startswith(prefix)}


def teacher_accuracy(output_dir: Path) -> float:
    return json.loads((output_dir / "metrics.json").read_text())["splits"]["validation"]["teacher"]["accuracy"]


# Stale stages ------------------------------------------------------------------------------------------------------


def test_teacher_overwritten_in_place_gets_new_outputs(task):
    """Same path, same file sizes and mtimes, other weights: the cached teacher outputs must not be reused."""
    write_validation(task, ["positive"] * 24 + ["negative"] * 8)
    save_fixed_teacher(task / "teacher", ALWAYS_NEGATIVE)
    output_dir = task / "out"
    main(pipeline_args(task, output_dir, *FAST))
    first_outputs = stage_names(output_dir, "teacher-outputs-")
    assert len(first_outputs) == 1
    assert teacher_accuracy(output_dir) == 0.25

    stamps = {p.name: p.stat() for p in (task / "teacher").iterdir()}
    save_fixed_teacher(task / "teacher", ALWAYS_POSITIVE)
    for name, stamp in stamps.items():
        os.utime(task / "teacher" / name, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert {p.name: p.stat().st_size for p in (task / "teacher").iterdir()} == {
        name: s.st_size for name, s in stamps.items()
    }
    main(pipeline_args(task, output_dir, *FAST))
    outputs = stage_names(output_dir, "teacher-outputs-")
    assert len(outputs) == 2 and first_outputs < outputs
    assert len(stage_names(output_dir, "knowledge-base-")) == 2  # built on the new outputs, not reused
    (new,) = outputs - first_outputs
    logits = np.load(output_dir / "stages" / new / "validation-logits.npy")
    np.testing.assert_allclose(logits, np.tile(ALWAYS_POSITIVE, (32, 1)), atol=1e-5)
    assert teacher_accuracy(output_dir) == 0.75


def test_data_file_edited_with_same_size_and_mtime_is_re_read(task):
    """Flipping every validation label keeps the byte size ("negative" and "positive" are both 8 characters);
    the mtime is put back too. The run must read the new rows, and every stage built on the data changes."""
    validation = write_validation(task, ["positive"] * 24 + ["negative"] * 8)
    save_fixed_teacher(task / "teacher", ALWAYS_NEGATIVE)
    output_dir = task / "out"
    main(pipeline_args(task, output_dir, *FAST))
    assert teacher_accuracy(output_dir) == 0.25
    before = {prefix: stage_names(output_dir, prefix) for prefix in ("teacher-outputs-", "knowledge-base-")}

    stamp = validation.stat()
    content = validation.read_bytes()
    flipped = (
        content.replace(b"positive", b"POSITIVE").replace(b"negative", b"positive").replace(b"POSITIVE", b"negative")
    )
    assert len(flipped) == len(content) and flipped != content
    validation.write_bytes(flipped)
    os.utime(validation, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert validation.stat().st_size == stamp.st_size and validation.stat().st_mtime_ns == stamp.st_mtime_ns

    main(pipeline_args(task, output_dir, *FAST))
    assert teacher_accuracy(output_dir) == 0.75  # 24 of 32 rows are now negative, which this teacher predicts
    for prefix, names in before.items():
        after = stage_names(output_dir, prefix)
        assert len(after) == 2 and names < after, prefix


# Resume ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def resumed_from(monkeypatch):
    """What `trainer.train` was asked to resume from, call by call (the real train still runs)."""
    calls = []
    train = ReAugKDTrainer.train

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("resume_from_checkpoint", args[0] if args else None))
        return train(self, *args, **kwargs)

    monkeypatch.setattr(ReAugKDTrainer, "train", spy)
    return calls


def test_resume_skips_incomplete_checkpoints(task, caplog, resumed_from):
    save_fixed_teacher(task / "teacher", ALWAYS_NEGATIVE)
    output_dir = task / "out"
    main(pipeline_args(task, output_dir, "--num_train_epochs", "1", "--keep_checkpoints"))
    checkpoints = output_dir / "student-checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-6"]  # 96 rows / 16 per batch, 1 epoch
    # two checkpoints a kill interrupted while they were written, both "later" than the complete one
    (checkpoints / "checkpoint-999").mkdir()
    (checkpoints / "checkpoint-1000").mkdir()
    (checkpoints / "checkpoint-1000" / "config.json").write_text("{}")

    caplog.set_level(logging.WARNING)
    args = ("--num_train_epochs", "2", "--keep_checkpoints", "--resume_from_checkpoint", "true")
    main(pipeline_args(task, output_dir, *args))
    assert resumed_from == [None, str(checkpoints / "checkpoint-6")]
    skipped = [r.getMessage() for r in caplog.records if "Skipping the incomplete checkpoint" in r.getMessage()]
    assert len(skipped) == 2
    assert str(checkpoints / "checkpoint-1000") in skipped[0] and str(checkpoints / "checkpoint-999") in skipped[1]
    state = json.loads((checkpoints / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["global_step"] == 12
    assert (output_dir / "model" / "model.safetensors").is_file()


def test_resume_takes_this_runs_latest_checkpoint_not_an_earlier_runs_higher_step(tmp_path):
    """An earlier run kept checkpoint-1000 (--keep_checkpoints, or it failed after saving); this run, started
    afresh, wrote checkpoint-200 and was interrupted: `true` resumes checkpoint-200."""
    for step, written in ((1000, 1_000_000_000), (200, 2_000_000_000)):
        checkpoint = tmp_path / f"checkpoint-{step}"
        checkpoint.mkdir()
        (checkpoint / "model.safetensors").write_bytes(b"")
        (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        os.utime(checkpoint / "trainer_state.json", ns=(written, written))
    args = SimpleNamespace(resume_from_checkpoint="true")
    assert distill._resume_checkpoint(args, tmp_path) == str(tmp_path / "checkpoint-200")


@pytest.mark.parametrize("leftovers", [["checkpoint-3"], []])
def test_resume_without_a_complete_checkpoint_is_refused(task, leftovers):
    output_dir = task / "out"
    for name in leftovers:
        (output_dir / "student-checkpoints" / name).mkdir(parents=True)
        (output_dir / "student-checkpoints" / name / "config.json").write_text("{}")
    with pytest.raises(InputError, match="no complete checkpoint found"):
        main(pipeline_args(task, output_dir, "--resume_from_checkpoint", "true"))
    assert not (output_dir / "stages").exists()  # refused before any work


def test_killed_run_resumes_from_its_last_complete_checkpoint(task, resumed_from):
    """A real SIGKILL during student training (a checkpoint every step), then `--resume_from_checkpoint true`."""
    save_fixed_teacher(task / "teacher", ALWAYS_NEGATIVE)
    output_dir = task / "out"
    args = pipeline_args(task, output_dir, "--save_strategy", "steps", "--save_steps", "1", "--keep_checkpoints")
    checkpoints = output_dir / "student-checkpoints"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "HF_DATASETS_CACHE": str(task / "hf-datasets-cache"),
    }
    code = "import sys; from hf_reaugkd.cli import main; main(sys.argv[1:])"
    with open(task / "killed-run.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-c", code, "distill", *args], env=env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 120
            while not list(checkpoints.glob("checkpoint-*/trainer_state.json")):
                assert process.poll() is None, (task / "killed-run.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint within 120 s"
                time.sleep(0.02)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (output_dir / "model").exists() and not (output_dir / "metrics.json").exists()

    main([*args, "--resume_from_checkpoint", "true"])
    (resumed,) = resumed_from
    assert Path(resumed).parent == checkpoints and (Path(resumed) / "trainer_state.json").is_file()
    assert int(Path(resumed).name.split("-")[1]) >= 1
    state = json.loads((checkpoints / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["global_step"] == 12  # 2 epochs of 6 steps, the killed run's ones included
    assert (output_dir / "model" / "model.safetensors").is_file()
    # the killed process's temporaries (if any) are gone, its pid no longer runs
    assert not [p for p in output_dir.rglob(f".*-{process.pid}-*")]


# Orphans and atomic replacement ------------------------------------------------------------------------------------


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_orphaned_temporaries_are_removed_at_run_start(task):
    save_fixed_teacher(task / "teacher", ALWAYS_NEGATIVE)
    output_dir, dead = task / "out", dead_pid()
    stages = output_dir / "stages"
    stages.mkdir(parents=True)
    orphans = [
        output_dir / f".model-{dead}-abcdefgh",
        stages / f".knowledge-base-0123456789abcdef-{dead}-abcdefgh",
        stages / f".teacher-outputs-0123456789abcdef-{dead}-x_Y1z2W3",
    ]
    for orphan in orphans:
        orphan.mkdir()
        (orphan / "model.safetensors").write_bytes(b"half")
    (output_dir / f".metrics.json-{dead}-abcdefgh").write_text("{")  # an atomic file write, interrupted
    orphans.append(output_dir / f".metrics.json-{dead}-abcdefgh")
    kept = [
        output_dir / f".model-{os.getpid()}-abcdefgh",  # being written right now by a running process
        output_dir / f"model-{dead}-abcdefgh",  # not a temporary: no leading dot
        output_dir / f".model-{dead}-abc",  # not a temporary: the random part has 8 characters
    ]
    for path in kept:
        path.mkdir()
    kept.append(stages / "notes.txt")
    kept[-1].write_text("mine")

    main(pipeline_args(task, output_dir, *FAST))
    assert [p for p in orphans if p.exists()] == []
    assert [p for p in kept if not p.exists()] == []
    assert (output_dir / "model" / "model.safetensors").is_file()


def model_copies(folder: Path) -> dict[str, str]:
    """Every complete model in `folder`, by folder name: {name: content of its weights}."""
    return {
        p.name: (p / "model.safetensors").read_text()
        for p in folder.iterdir()
        if p.is_dir() and (p / "model.safetensors").is_file()
    }


def make_model(directory: Path, content: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text("{}")
    (directory / "model.safetensors").write_text(content)


@pytest.fixture(params=["exchange", "fallback"])
def swap(request, monkeypatch):
    """Both ways `atomic_path` replaces an existing directory: Linux's atomic exchange, and moving the old one aside
    (what happens where `renameat2` is missing)."""
    if request.param == "fallback":
        monkeypatch.setattr(caching, "_exchange", lambda a, b: False)
    else:
        assert caching._exchange.__name__ == "_exchange"
    return request.param


def test_atomic_directory_keeps_the_old_model_when_the_block_fails(tmp_path, swap):
    target = tmp_path / "out" / "model"
    make_model(target, "old")
    with pytest.raises(RuntimeError, match="disk full"), caching.atomic_path(target, directory=True) as tmp:
        make_model(tmp, "new")
        (tmp / "tokenizer.json").write_text("{}")
        raise RuntimeError("disk full")
    assert model_copies(target.parent) == {"model": "old"}
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]  # no temporary left behind
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]


def test_atomic_directory_always_has_a_complete_model(tmp_path, swap, monkeypatch):
    """At every step of the replacement a complete model (old or new) exists; with the exchange, always at the
    target itself."""
    target = tmp_path / "out" / "model"
    make_model(target, "old")
    seen = []
    replace, exchange = os.replace, caching._exchange

    def record(step, function):
        def wrapped(*args):
            seen.append((f"before {step}", model_copies(target.parent)))
            result = function(*args)
            seen.append((f"after {step}", model_copies(target.parent)))
            return result

        return wrapped

    monkeypatch.setattr(os, "replace", record("replace", replace))
    monkeypatch.setattr(caching, "_exchange", record("exchange", exchange))
    with caching.atomic_path(target, directory=True) as tmp:
        make_model(tmp, "new")
    assert seen, "the replacement went through neither os.replace nor _exchange"
    for step, copies in seen:
        assert {"old", "new"} & set(copies.values()), (step, copies)
        if swap == "exchange":
            assert copies.get("model") in ("old", "new"), (step, copies)
    assert model_copies(target.parent) == {"model": "new"}
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]


def test_crash_between_fallback_steps_keeps_the_old_model(tmp_path, monkeypatch):
    """Without the exchange the old directory is moved aside first; a crash before the new one is moved in leaves
    the old one as the backup, which the cleanup at the next start must not delete (it is the only copy)."""
    monkeypatch.setattr(caching, "_exchange", lambda a, b: False)
    target = tmp_path / "out" / "model"
    make_model(target, "old")
    replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("killed")
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(OSError, match="killed"), caching.atomic_path(target, directory=True) as tmp:
        make_model(tmp, "new")
    monkeypatch.setattr(os, "replace", replace)
    assert "old" in model_copies(target.parent).values()
    caching.remove_stale_temporaries(target.parent)
    assert "old" in model_copies(target.parent).values()
    # once a model is back in place, the backup is stale and goes
    with caching.atomic_path(target, directory=True) as tmp:
        make_model(tmp, "newer")
    caching.remove_stale_temporaries(target.parent)
    assert model_copies(target.parent) == {"model": "newer"}
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]


# Saved model permissions -------------------------------------------------------------------------------------------


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def modes(directory: Path) -> dict[str, int]:
    return {
        str(p.relative_to(directory.parent)): stat.S_IMODE(p.stat().st_mode)
        for p in [directory, *directory.rglob("*")]
    }


def test_saved_model_is_readable_by_others(task, umask_022):
    save_fixed_teacher(task / "teacher", ALWAYS_NEGATIVE)
    output_dir = task / "out"
    for _ in range(2):  # a first save, then one that replaces the existing model
        main(pipeline_args(task, output_dir, *FAST))
        found = modes(output_dir / "model")
        for name in ("model/model.safetensors", "model/config.json", "model/README.md"):
            assert found[name] == 0o644, name
        assert found["model"] == 0o755
        assert {name: m for name, m in found.items() if m not in (0o644, 0o755)} == {}
        assert stat.S_IMODE((output_dir / "metrics.json").stat().st_mode) == 0o644
        for stage in (output_dir / "stages").iterdir():
            assert stat.S_IMODE(stage.stat().st_mode) == 0o755, stage.name


# Bad data: refused with the file and the row in the message -------------------------------------------------------

GOOD = "text,label\ngood movie,positive\nbad movie,negative\nfun plot,positive\n"


def load(tmp_path: Path, train: str | bytes, validation: str | bytes = GOOD):
    files = {}
    for split, content in (("train", train), ("validation", validation)):
        path = tmp_path / f"{split}.csv"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        files[split] = str(path)
    return load_task_data(data_files=files)


def test_mixed_numeric_and_named_labels(tmp_path):
    train = "text,label\ngood movie,positive\nbad movie,negative\nfun plot,1\nthe film,positive\n"
    with pytest.raises(InputError) as error:
        load(tmp_path, train)
    message = str(error.value)
    assert str(tmp_path / "train.csv") in message
    assert "line 4 is '1'" in message and "line 2 is 'positive'" in message  # the file's lines, header included


@pytest.mark.parametrize(
    ("train", "line"),
    [
        ("text,label\ngood movie,positive\nbad movie,\nfun plot,negative\n", 3),
        ("text,label\ngood movie,0\nbad movie,1\nfun plot,\nthe film,1\n", 4),  # integer labels with a blank
        ('text,label\n"good\nmovie",0\n\nbad movie,1\nfun plot,\nthe film,1\n', 6),  # a quoted newline, a blank line
    ],
)
def test_blank_label_cell(tmp_path, train, line):
    with pytest.raises(
        InputError, match=rf"Empty label in column 'label', line {line} of the train file \S*train.csv"
    ):
        load(tmp_path, train)


def test_whitespace_around_labels_is_stripped(tmp_path):
    train = "text,label\ngood movie,positive \nbad movie,negative\nfun plot,positive\nthe film, negative\n"
    data = load(tmp_path, train, "text,label\ngreat,positive \nawful,negative\n")
    assert data.label_names == ["negative", "positive"]
    assert data.splits["train"]["labels"] == [1, 0, 1, 0]
    assert data.splits["validation"]["labels"] == [1, 0]


def test_label_column_missing_in_the_validation_file_only(tmp_path):
    with pytest.raises(InputError) as error:
        load(tmp_path, GOOD, "text,gold\ngreat,positive\n")
    message = str(error.value)
    assert "Column 'label' not found in the validation file" in message
    assert str(tmp_path / "validation.csv") in message and "train.csv" not in message


@pytest.mark.parametrize(
    ("content", "line"),
    [
        (b"text,label\ngood movie,positive\nbad \xff movie,negative\nfun plot,positive\n", 3),
        pytest.param(
            b"text,label\ngood movie,positive\nbad movie,negative\nfun plot,positive\nla pel\xc3",
            5,
            id="truncated-at-end",
        ),
    ],
)
def test_non_utf8_bytes(tmp_path, content, line):
    with pytest.raises(InputError) as error:
        load(tmp_path, content)
    message = str(error.value)
    assert str(tmp_path / "train.csv") in message and f"line {line}" in message and "UTF-8" in message


def test_header_only_file(tmp_path):
    with pytest.raises(InputError, match=r"train file \S*train.csv has no rows"):
        load(tmp_path, "text,label\n")


def test_a_single_class_is_refused_naming_file_and_label(tmp_path):
    with pytest.raises(InputError, match=r"train file \S*train.csv has a single label \['positive'\]"):
        load(tmp_path, "text,label\ngood movie,positive\nfun plot,positive\n")


def test_a_text_column_of_numbers_is_refused_naming_column_and_file(tmp_path):
    """A wrong --text_column_name pointing at ids: read as int64, it used to fail deep in the tokenizer."""
    with pytest.raises(InputError, match=r"Column 'text' of the train file \S*train.csv holds int64 values, not text"):
        load(tmp_path, "text,label\n17,positive\n42,negative\n")


@pytest.mark.parametrize("length", [-1, 0, 1])
def test_max_seq_length_below_2_is_refused_on_the_command_line(length):
    with pytest.raises(InputError, match=rf"--max_seq_length must be >= 2 \(tokens per example\), got {length}"):
        parse_args(["--demo", "--max_seq_length", str(length)])


def test_extra_comma_in_a_row(tmp_path):
    train = "text,label\ngood movie,positive\nbad movie,negative\nfun plot,positive\nthe film, I think,negative\n"
    with pytest.raises(InputError) as error:
        load(tmp_path, train)
    message = str(error.value)
    assert str(tmp_path / "train.csv") in message and "Expected 2 fields in line 5" in message


def test_extra_comma_in_every_row_is_not_silently_read(tmp_path):
    train = "text,label\ngood, fun movie,positive\nbad, long plot,negative\n"
    try:
        data = load(tmp_path, train)
    except InputError as error:
        assert str(tmp_path / "train.csv") in str(error)
    else:
        assert data.splits["train"]["text"] == ["good, fun movie", "bad, long plot"]


def test_generic_three_label_teacher_head_on_a_two_label_task(task):
    """A teacher with an untrained `LABEL_0..2` head is fine-tuned with a new 2-label head (no size-mismatch error);
    labels written with whitespace around them are one class, and no model gets a 'None' or 'positive ' label."""
    torch.manual_seed(1)
    config = tiny_encoder(seed=1).config
    config.num_labels = 3
    BertForSequenceClassification(config).save_pretrained(task / "teacher")
    train = task / "train.csv"
    train.write_text(train.read_text().replace(",positive\n", ",positive \n"))
    output_dir = task / "out"
    main(pipeline_args(task, output_dir, *FAST))

    expected = {"0": "negative", "1": "positive"}
    teachers = [
        p for p in (output_dir / "stages").iterdir() if p.name.startswith("teacher-") and "outputs" not in p.name
    ]
    assert len(teachers) == 1
    teacher_config = json.loads((teachers[0] / "config.json").read_text())
    assert teacher_config["id2label"] == expected
    student_config = json.loads((output_dir / "model" / "config.json").read_text())
    assert student_config["id2label"] == expected
