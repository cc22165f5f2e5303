"""A hostile user against a saved student: explanations that outlive an edit of the folder, settings at the edge of
their range, tampered side files, `kb add` fed bad rows, a full disk, killed edits and malformed configs."""

import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import ID2LABEL, SENTENCES, tiny_encoder, tiny_student
from safetensors import SafetensorError
from safetensors.torch import save_file
from transformers import BertForSequenceClassification

from hf_reaugkd import ReAugKDForSequenceClassification, cli, editing
from hf_reaugkd.pipeline_reaugkd import ReAugKDTextClassificationPipeline
from hf_reaugkd.saving import TEACHER_PROJECTION
from hf_reaugkd.settings_reaugkd import MAX_GATE_PARAMETER, MIN_RETRIEVAL_TEMPERATURE
from hf_reaugkd.teacher import save_projection


def labelled_texts(model) -> list[str]:
    """One text per knowledge-base row that starts with the row's teacher label: an explanation that pairs a row
    with another row's text shows it (two times in three with three labels)."""
    labels = model.knowledge_base.values.argmax(dim=1).tolist()
    return [f"{ID2LABEL[label]} row {i}" for i, label in enumerate(labels)]


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer):
    """A tiny student whose knowledge base stores texts, saved with its tokenizer."""
    model = tiny_student(kb_size=24, knn_k=4)
    model.knowledge_base.set_texts(labelled_texts(model))
    model.set_knowledge_base(model.knowledge_base)
    directory = tmp_path / "model"
    model.save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


def write_rows(path, rows, header=("text", "label")):
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([list(header), *rows])
    return path


def cli_error(argv, capsys) -> str:
    """The one line `hf-reaugkd` prints for an error the user can fix (exit 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(arg) for arg in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    return err


def explained_rows(classifier) -> list[dict]:
    return [row for result in classifier(SENTENCES, neighbors=4) for row in result["neighbors"]]


# 1. Explanations stay bound to the knowledge base that was loaded ----------------------------------------------------


@pytest.mark.parametrize("edits", [["add"], ["add", "remove"]], ids=["size changed", "same size"])
def test_a_loaded_pipeline_shows_its_own_texts_after_the_folder_is_edited(model_dir, tiny_tokenizer, edits):
    """Texts read lazily from the path were those of the edited folder: after `kb add` every explanation failed
    (24 entries, 25 texts), and after `kb add` + `kb remove --ids 0` every row showed the next row's text."""
    model, _ = editing.load_student(model_dir)
    classifier = ReAugKDTextClassificationPipeline(model=model, tokenizer=tiny_tokenizer)
    expected = labelled_texts(model)
    if "add" in edits:
        editing.add_rows(model_dir, write_rows(model_dir.parent / "new.csv", [["great fun", "positive"]]))
    if "remove" in edits:
        editing.remove_rows(model_dir, ids=[0])
    rows = explained_rows(classifier)
    assert rows and all(row["text"] == expected[row["id"]] for row in rows)


def test_texts_of_another_save_fail_the_explanations_not_the_predictions(model_dir, tmp_path, caplog):
    """A texts file that is not the one saved with the weights (same number of rows): its SHA-256 is not the
    config's, so explanations refuse to pair ids with it; predictions, which never read it, still serve."""
    other = ReAugKDForSequenceClassification.from_pretrained(model_dir)
    other.knowledge_base.set_texts([f"other {i}" for i in range(other.knowledge_base.size)])
    other.save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "knowledge_base_texts.safetensors", model_dir)
    model, tokenizer = editing.load_student(model_dir)
    assert "not the ones saved with these weights" in caplog.text
    classifier = ReAugKDTextClassificationPipeline(model=model, tokenizer=tokenizer)
    assert classifier(SENTENCES[0])[0]["label"] in ID2LABEL.values()
    with pytest.raises(ValueError, match="not the ones saved with these weights"):
        classifier(SENTENCES[0], neighbors=2)


READER = """
import json, pathlib, sys, time
from transformers import pipeline

model_dir, ready, edited, done = map(pathlib.Path, sys.argv[1:])
load = lambda: pipeline("text-classification", model=str(model_dir), trust_remote_code=True)
kept = load()  # loaded before the edits, first asked to explain after one
ready.touch()
while not edited.exists():
    time.sleep(0.01)
texts = {texts!r}
counts = dict(calls=0, errors=0, wrong=0, rows=0)
errors = []
while True:
    finished = done.exists()
    for classifier in (kept, None):  # the long-lived pipeline, then one loaded now, while the folder is rewritten
        try:
            for result in (classifier or load())(texts, neighbors=4):
                for row in result["neighbors"]:
                    counts["rows"] += 1
                    counts["wrong"] += row["text"].split()[0] != row["label"]
        except Exception as err:
            counts["errors"] += 1
            errors.append(repr(err)[-1500:])
        counts["calls"] += 1
    if finished:
        break
print(json.dumps({{**counts, "first_errors": errors[:3]}}))
"""


def test_a_reader_serving_while_another_process_edits_sees_no_error_and_no_wrong_text(model_dir, tmp_path):
    """The issue's goal: while 20 `kb add` / `kb remove` edits rewrite the folder, a reader explains in a loop, with a
    pipeline loaded before the edits and with one loaded anew each time (reading a folder that is being replaced).
    Every explanation must hold and pair each row with its own text (the text names the row's label)."""
    ready, edited, done = tmp_path / "ready", tmp_path / "edited", tmp_path / "done"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    code = textwrap.dedent(READER).format(texts=SENTENCES)
    reader = subprocess.Popen(
        [sys.executable, "-c", code, str(model_dir), str(ready), str(edited), str(done)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert reader.poll() is None and time.monotonic() < deadline, reader.stderr.read() if reader.poll() else ""
            time.sleep(0.1)
        for edit in range(20):
            if edit % 2 == 0:
                new = write_rows(tmp_path / f"new{edit}.csv", [[f"positive added {edit}", "positive"]])
                editing.add_rows(model_dir, new)
            else:
                editing.remove_rows(model_dir, ids=[0])
            edited.touch()
    finally:
        edited.touch()
        done.touch()
        out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err[-3000:]
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts["calls"] > 2 and counts["rows"] > 0
    assert counts["errors"] == 0 and counts["wrong"] == 0, counts


# 2. No accepted setting gives NaN ------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [MIN_RETRIEVAL_TEMPERATURE, 1e-3, 1.0, 1e6])
@pytest.mark.parametrize("gate_scale", [None, MAX_GATE_PARAMETER, -MAX_GATE_PARAMETER])
def test_settings_at_the_edges_of_their_range_give_probabilities(model_dir, tiny_tokenizer, temperature, gate_scale):
    model, _ = editing.load_student(model_dir)
    model.config.retrieval_temperature = temperature
    model.config.retrieval_gate = (
        None if gate_scale is None else [gate_scale, -gate_scale, gate_scale, 0.0, gate_scale]
    )
    inputs = tiny_tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        probabilities = model(**inputs).logits.exp()  # (B, C)
    assert torch.isfinite(probabilities).all()
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(len(SENTENCES)))


@pytest.mark.parametrize("temperature", [1e-40, 0.0, float("nan"), float("inf")])
def test_a_config_with_a_temperature_that_would_give_nan_does_not_load(model_dir, temperature):
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "retrieval_temperature": temperature}))
    with pytest.raises(ValueError, match="retrieval_temperature"):
        ReAugKDForSequenceClassification.from_pretrained(model_dir)


def test_a_huge_gate_set_after_loading_is_refused_at_the_call(model_dir, tiny_tokenizer):
    model, _ = editing.load_student(model_dir)
    model.config.retrieval_gate = [1e300, 0.0, 0.0, 0.0, 0.0]  # finite in Python, inf in fp32: inf · 0 is NaN
    with pytest.raises(ValueError, match="retrieval_gate must be 5 numbers"):
        model(**tiny_tokenizer(SENTENCES[:1], return_tensors="pt"))


@pytest.mark.parametrize("neighbors", [True, 1.5, "3", [], 0])
def test_neighbors_other_than_a_positive_integer_get_the_message_knn_k_gets(model_dir, tiny_tokenizer, neighbors):
    model, _ = editing.load_student(model_dir)
    classifier = ReAugKDTextClassificationPipeline(model=model, tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match="neighbors must be an integer >= 1"):
        classifier(SENTENCES[0], neighbors=neighbors)


# 3. The teacher's projection head is checked as strictly as the weights ---------------------------------------------


@pytest.fixture
def with_teacher(model_dir, tiny_tokenizer):
    """The model folder with a projection head beside it, as `distill` saves it, and a teacher classifier."""
    encoder = tiny_encoder(seed=5)
    config = encoder.config
    config.id2label, config.label2id = dict(ID2LABEL), {label: i for i, label in ID2LABEL.items()}
    teacher = model_dir.parent / "teacher"
    BertForSequenceClassification(config).save_pretrained(teacher)
    tiny_tokenizer.save_pretrained(teacher)
    torch.manual_seed(0)
    metadata = {"teacher_model": "teacher", "distillation_temperature": "2.0", "max_seq_length": "16"}
    save_projection(torch.nn.Linear(32, 16), model_dir / TEACHER_PROJECTION, metadata)
    rows = write_rows(model_dir.parent / "rows.csv", [["great fun", "positive"], ["awful plot", "negative"]])
    return model_dir, teacher, rows


def test_kb_add_with_the_teacher_works_with_a_well_formed_head(with_teacher):
    model_dir, teacher, rows = with_teacher
    assert editing.add_rows(model_dir, rows, teacher=teacher) == [24, 25]


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"distillation_temperature": "-1"}, "distillation_temperature='-1'.*a finite number > 0"),
        ({"distillation_temperature": None}, "distillation_temperature=None"),
        ({"distillation_temperature": "nan"}, "distillation_temperature='nan'"),
        ({"max_seq_length": "-5"}, "max_seq_length='-5'.*an integer >= 2"),
        ({"max_seq_length": "16.5"}, "max_seq_length='16.5'"),
    ],
)
def test_a_tampered_head_metadata_is_refused_in_one_line(with_teacher, capsys, metadata, message):
    """T = -1 used to invert every soft label `kb add --teacher` made, silently."""
    model_dir, teacher, rows = with_teacher
    settings = {"distillation_temperature": "2.0", "max_seq_length": "16", **metadata}
    settings = {name: value for name, value in settings.items() if value is not None}
    save_projection(torch.nn.Linear(32, 16), model_dir / TEACHER_PROJECTION, settings)
    err = cli_error(["kb", "add", model_dir, "--file", rows, "--teacher", teacher], capsys)
    assert TEACHER_PROJECTION in err
    assert re.search(message, err), err


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"weight": torch.randn(16, 32)}, "is not a projection head"),  # no bias
        ({"weight": torch.randn(16, 32), "bias": torch.randn(8)}, "is not a projection head"),
        ({"weight": torch.randn(16, 32).int(), "bias": torch.randn(16).int()}, "is not a projection head"),
        ({"weight": torch.full((16, 32), float("nan")), "bias": torch.zeros(16)}, "holds NaN or inf"),
        ({"weight": torch.randn(8, 32), "bias": torch.randn(8)}, "maps to 8 dimensions"),
        (b"not safetensors at all", "Could not read the projection head"),
    ],
)
def test_a_malformed_head_is_refused_in_one_line(with_teacher, capsys, tensors, message):
    model_dir, teacher, rows = with_teacher
    path = model_dir / TEACHER_PROJECTION
    if isinstance(tensors, bytes):
        path.write_bytes(tensors)
    else:
        save_file(tensors, str(path), metadata={"distillation_temperature": "2.0", "max_seq_length": "16"})
    err = cli_error(["kb", "add", model_dir, "--file", rows, "--teacher", teacher], capsys)
    assert message in err and TEACHER_PROJECTION in err


def test_kb_info_on_a_garbage_head_says_so(with_teacher, capsys):
    model_dir, _, _ = with_teacher
    (model_dir / TEACHER_PROJECTION).write_bytes(b"\x00" * 64)
    assert "Could not read the projection head" in cli_error(["kb", "info", model_dir], capsys)


# 4. kb add checks rows as training does ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("blank.csv", "text,label\ngreat fun,positive\n  ,positive\n", "Empty text in column 'text', line 3"),
        ("nolabel.csv", "text,label\ngreat fun,positive\nawful,\n", "Empty label in column 'label', line 3"),
        (
            "missing.jsonl",
            '{"text": "great fun", "label": "positive"}\n\n{"label": "negative"}\n',
            "Empty text in column 'text', line 3",
        ),
        (
            "leading_blank.jsonl",
            '\n{"text": "great fun", "label": "positive"}\n{"label": "negative"}\n',
            "Empty text in column 'text', line 3",
        ),
        (
            "nolabel.jsonl",
            '{"text": "great fun", "label": "positive"}\n{"text": "awful"}\n',
            "Empty label in column 'label', line 2",
        ),
        (
            "unknown.csv",
            "text,label\ngreat fun,positive\nmeh,so-so\n",
            "labels ['so-so'] that the model does not know",
        ),
    ],
)
def test_kb_add_refuses_bad_rows_naming_the_line(model_dir, capsys, name, content, message):
    """A blank text was added silently, a JSONL row without its text gave a TypeError and a missing label became the
    label 'None'. Nothing is written: the folder keeps its 24 rows."""
    path = model_dir.parent / name
    path.write_text(content)
    err = cli_error(["kb", "add", model_dir, "--file", path], capsys)
    assert message in err and str(path) in err
    assert json.loads((model_dir / "config.json").read_text())["kb_size"] == 24


def test_unknown_label_names_its_line(model_dir, capsys):
    path = write_rows(model_dir.parent / "rows.csv", [["great fun", "positive"], ["meh", "so-so"]])
    assert "first at line 3" in cli_error(["kb", "add", model_dir, "--file", path], capsys)


# 5. A full disk and killed edits -------------------------------------------------------------------------------------


def test_a_full_disk_during_kb_add_is_one_line_naming_the_folder(model_dir, capsys, monkeypatch):
    """safetensors reports ENOSPC as a SafetensorError that carries the OS error in its message only."""
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}

    def disk_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", disk_full)
    rows = write_rows(model_dir.parent / "rows.csv", [["great fun", "positive"]])
    err = cli_error(["kb", "add", model_dir, "--file", rows], capsys)
    assert f"No space left on the device to write {model_dir}; it was left as it was" in err
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before
    # no temporary left; the edit lock's file stays (removing it would let two edits hold two files)
    assert [p.name for p in model_dir.parent.iterdir() if p.name.startswith(".")] == [".model.lock"]


def test_a_really_full_disk_during_kb_add(model_dir, tmp_path, capsys):
    """The same on a real file system too small for the edit (a tmpfs; needs the right to mount one)."""
    small = tmp_path / "small"
    small.mkdir()
    size = sum(p.stat().st_size for p in model_dir.iterdir()) + 64 * 1024  # room for the model, not for its copy
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        shutil.copytree(model_dir, small / "model")
        rows = write_rows(tmp_path / "rows.csv", [["great fun", "positive"]])
        err = cli_error(["kb", "add", small / "model", "--file", rows], capsys)
        assert f"No space left on the device to write {small / 'model'}" in err
        assert ReAugKDForSequenceClassification.from_pretrained(small / "model").knowledge_base.size == 24
    finally:
        subprocess.run(["umount", "--lazy", str(small)], check=False)  # this process may still map its files


def test_an_edit_removes_what_killed_edits_of_the_same_folder_left(model_dir):
    """A killed `kb add` leaves a full `.model-PID-*` copy beside the folder; the next edit of that folder removes
    it, and keeps those of a process still running and of other names."""
    dead = model_dir.parent / ".model-999999999-abcd1234"  # no process has that id
    alive = model_dir.parent / f".model-{os.getpid()}-abcd1234"
    other = model_dir.parent / ".other-999999999-abcd1234"
    for leftover in (dead, alive, other):
        shutil.copytree(model_dir, leftover)
    editing.remove_rows(model_dir, ids=[3])
    assert not dead.exists() and alive.exists() and other.exists()


# 6. Malformed configs get a message, not a KeyError or silently renamed labels --------------------------------------


def edit_config(model_dir, **changes):
    config = json.loads((model_dir / "config.json").read_text())
    for name, value in changes.items():
        if name == "encoder_config":
            config[name].update(value)
        else:
            config[name] = value
    (model_dir / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"id2label": {"0": "negative", "2": "neutral", "3": "positive"}},
            r"id2label must name every class id 0..2 once, got ids \[0, 2, 3\]",
        ),
        ({"id2label": {"0": "negative"}, "num_labels": 3}, "num_labels=3 but an id2label of 1 labels"),
        (
            {"encoder_config": {"intermediate_size": 40}},
            r"encoder.encoder.layer.0.intermediate.dense.weight: config expects \[40, 32\], checkpoint has \[37, 32\]",
        ),
    ],
)
def test_a_malformed_config_is_refused_in_one_line(model_dir, capsys, changes, message):
    edit_config(model_dir, **changes)
    err = cli_error(["kb", "info", model_dir], capsys)
    assert re.search(message, err), err


def test_a_config_read_before_an_edit_loads_the_edited_folder(model_dir):
    """`pipeline()` reads the config, then loads the weights with it: an edit in between used to fail the load (the
    config's kb_size is the old one). The stored knowledge base's fields are read again from the folder; the
    config's other settings are kept."""
    config = ReAugKDForSequenceClassification.config_class.from_pretrained(model_dir)
    config.knn_k = 2
    editing.remove_rows(model_dir, ids=[0])
    model = ReAugKDForSequenceClassification.from_pretrained(model_dir, config=config)
    assert model.knowledge_base.size == 23 and model.config.knn_k == 2
    assert all(
        text.split()[0] == ID2LABEL[label]
        for text, label in zip(
            model.knowledge_base.texts, model.knowledge_base.values.argmax(dim=1).tolist(), strict=True
        )
    )


# 7. Edits of one folder at the same moment lose nothing ---------------------------------------------------------------


def slow_loads(monkeypatch, seconds: float = 0.5):
    """Every edit dwells between loading the folder and writing it: two unserialized edits then both read the folder
    before either writes, as two `kb add` processes did."""
    load = editing.load_student

    def load_then_wait(model_dir):
        loaded = load(model_dir)
        time.sleep(seconds)
        return loaded

    monkeypatch.setattr(editing, "load_student", load_then_wait)


def test_concurrent_edits_of_one_folder_keep_every_writers_rows(model_dir, tmp_path, monkeypatch):
    """Two `kb add` processes adding 2 rows each to one folder both reported their ids, and the folder ended with the
    rows of one of them (load → modify → swap, unlocked). Here two threads add and a third removes, each taking its
    time after loading: every reported row is there at the end, and the removed one is not."""
    slow_loads(monkeypatch)
    reported, errors = {}, []

    def add(name):
        try:
            reported[name] = editing.add_texts(model_dir, [f"{name} one", f"{name} two"], ["positive", "negative"])
        except Exception as err:  # the assertion below shows it
            errors.append(err)

    def remove():
        try:
            editing.remove_rows(model_dir, ids=[0])
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=add, args=(name,)) for name in ("writer a", "writer b")]
    threads.append(threading.Thread(target=remove))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    model, _ = editing.load_student(model_dir)
    texts = model.knowledge_base.texts
    assert model.knowledge_base.size == 24 + 4 - 1, texts
    assert {"writer a one", "writer a two", "writer b one", "writer b two"} <= set(texts)
    assert not any(text.endswith(" row 0") for text in texts)


def test_an_edit_waits_for_the_lock_of_another_process(model_dir, tmp_path):
    """The lock is the OS's, so another process holding it (here a child holding it for 2 s) makes an edit wait, and
    the edit then reads what that process left."""
    held = tmp_path / "held"
    code = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from hf_reaugkd.caching import folder_lock
        with folder_lock(sys.argv[1]):
            Path(sys.argv[2]).touch()
            time.sleep(2)
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(model_dir), str(held)])
    try:
        deadline = time.monotonic() + 60
        while not held.exists():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        start = time.monotonic()
        editing.add_texts(model_dir, ["waited"], ["positive"])
        waited = time.monotonic() - start
    finally:
        holder.wait(timeout=60)
    assert holder.returncode == 0 and waited > 1.0, waited


# 8. The web demo's sessions remove their own rows ---------------------------------------------------------------------

APP = Path(__file__).parents[1] / "examples" / "app.py"


@pytest.fixture
def handlers(model_dir):
    """The app's `add` and `remove` handlers over a tiny student whose knowledge base stores texts."""
    pytest.importorskip("gradio")
    spec = importlib.util.spec_from_file_location("app", APP)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    blocks = app.build_app(model_dir)
    found = {block.fn.__name__: block.fn for block in blocks.fns.values()}
    return found["add"], found["remove"], model_dir


def stored_texts(directory) -> list[str]:
    return editing.load_student(directory)[0].knowledge_base.texts


def test_a_session_removes_its_own_rows_after_another_removed_one(handlers):
    """The issue's sequence: A adds, B adds, A removes, A adds, B removes. Remembered by id, B's click removed A's
    second row (ids had shifted) and said the knowledge base was as it was; A's next remove raised."""
    add, remove, model_dir = handlers
    a, b = [], []
    *_, a = add("first of a", "positive", a)
    *_, b = add("only row of b", "negative", b)
    *_, a = remove("first of a", a)
    *_, a = add("second of a", "positive", a)
    *_, message, b = remove("only row of b", b)
    texts = stored_texts(model_dir)
    assert "second of a" in texts and "only row of b" not in texts and "first of a" not in texts
    assert message.startswith("Removed this session's rows (1)") and b == []
    *_, message, a = remove("second of a", a)
    assert stored_texts(model_dir)[24:] == [] and a == [] and "(1)" in message


def test_an_oversized_text_is_refused_not_stored(handlers):
    add, _, model_dir = handlers
    *_, message, added = add("x" * 200_000, "positive", [])
    assert message.startswith("Not added:") and "limited to 100,000" in message and added == []
    assert len(stored_texts(model_dir)) == 24
