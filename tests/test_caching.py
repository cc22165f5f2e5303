"""Cached stages: atomic writes, content fingerprints, and data files that are re-read when edited in place."""

import os
import stat
from pathlib import Path

import datasets
import pytest

from hf_reaugkd.caching import atomic_path, fingerprint, model_fingerprint
from hf_reaugkd.data import load_task_data, read_data_file


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_file_replaces_on_success_and_keeps_the_old_file_on_error(tmp_path, umask_022):
    target = tmp_path / "out" / "result.json"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("first")
        assert not target.exists()  # nothing is visible before the block ends
    assert target.read_text() == "first"
    assert mode(target) == 0o644

    with pytest.raises(RuntimeError, match="interrupted"), atomic_path(target) as tmp:
        tmp.write_text("half-writ")
        raise RuntimeError("interrupted")
    assert target.read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]  # no temporary left behind

    with atomic_path(target) as tmp:
        tmp.write_text("second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]
    assert mode(target) == 0o644


def test_atomic_file_follows_a_stricter_umask(tmp_path):
    previous = os.umask(0o077)
    try:
        with atomic_path(tmp_path / "private.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(previous)
    assert mode(tmp_path / "private.txt") == 0o600


def test_atomic_directory_replaces_on_success_and_keeps_the_old_one_on_error(tmp_path, umask_022):
    stage = tmp_path / "stages" / "knowledge-base-abc"
    with atomic_path(stage, directory=True) as tmp:
        assert tmp.is_dir() and tmp.parent == stage.parent
        (tmp / "a.txt").write_text("first")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("nested")
        assert not stage.exists()
    assert (stage / "a.txt").read_text() == "first" and (stage / "sub" / "b.txt").read_text() == "nested"
    assert mode(stage) == 0o755 and mode(stage / "a.txt") == 0o644

    with pytest.raises(KeyboardInterrupt), atomic_path(stage, directory=True) as tmp:
        (tmp / "a.txt").write_text("partial")
        raise KeyboardInterrupt
    assert sorted(p.name for p in stage.iterdir()) == ["a.txt", "sub"]
    assert (stage / "a.txt").read_text() == "first"
    assert [p.name for p in stage.parent.iterdir()] == ["knowledge-base-abc"]  # no temporary, no backup

    with atomic_path(stage, directory=True) as tmp:
        (tmp / "c.txt").write_text("second")
    assert sorted(p.name for p in stage.iterdir()) == ["c.txt"]  # replaced as a whole, not merged
    assert [p.name for p in stage.parent.iterdir()] == ["knowledge-base-abc"]
    assert mode(stage) == 0o755


def test_fingerprint_is_stable_and_order_sensitive():
    a = fingerprint("model@abc", 128, {"lr": 1e-3, "epochs": 3}, [1, 2])
    assert a == fingerprint("model@abc", 128, {"epochs": 3, "lr": 1e-3}, [1, 2])  # dict key order does not matter
    assert len(a) == 16 and int(a, 16) >= 0
    assert a != fingerprint(128, "model@abc", {"lr": 1e-3, "epochs": 3}, [1, 2])
    assert a != fingerprint("model@abc", 128, {"lr": 1e-3, "epochs": 3}, [2, 1])
    assert a != fingerprint("model@abc", 128, {"lr": 1e-3, "epochs": 4}, [1, 2])
    assert fingerprint(1, 2) != fingerprint(2, 1) and fingerprint("1") != fingerprint(1)


def test_model_fingerprint_follows_weight_content_not_size_or_mtime(tmp_path):
    model = tmp_path / "teacher"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 32}')
    weights = model / "model.safetensors"
    weights.write_bytes(bytes(range(200)))
    first = model_fingerprint(model)
    assert model_fingerprint(model) == first == model_fingerprint(str(model))
    stamp = weights.stat()
    edited = bytearray(weights.read_bytes())
    edited[100] ^= 0xFF  # one byte changed, same size
    weights.write_bytes(bytes(edited))
    os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert weights.stat().st_size == stamp.st_size and weights.stat().st_mtime_ns == stamp.st_mtime_ns
    second = model_fingerprint(model)
    assert second != first
    assert model_fingerprint(model) == second
    (model / "nested").mkdir()
    (model / "nested" / "tokenizer.json").write_text("{}")
    assert model_fingerprint(model) != second  # files in subfolders count too


# Data files ------------------------------------------------------------------------------------------------------


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """datasets' cache inside the test's folder (and it would serve stale rows if it were trusted)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")


def write_csv(path, rows: list[str]):
    path.write_text("text,label\n" + "\n".join(rows) + "\n")


def test_csv_edited_in_place_with_the_same_size_and_mtime_is_re_read(tmp_path, datasets_cache):
    train, validation = tmp_path / "train.csv", tmp_path / "validation.csv"
    write_csv(train, ["good movie,pos", "bad movie,neg", "fun plot,pos"])
    write_csv(validation, ["great,pos", "awful,neg"])
    files = {"train": str(train), "validation": str(validation)}
    before = load_task_data(data_files=files)
    assert before.splits["train"]["text"] == ["good movie", "bad movie", "fun plot"]
    assert before.label_names == ["neg", "pos"] and before.splits["train"]["labels"] == [1, 0, 1]

    stamp = train.stat()
    write_csv(train, ["good movie,neg", "bad movie,pos", "fun plot,neg"])  # same length: swapped labels
    os.utime(train, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert train.stat().st_size == stamp.st_size and train.stat().st_mtime_ns == stamp.st_mtime_ns
    after = load_task_data(data_files=files)
    assert after.splits["train"]["labels"] == [0, 1, 0]
    assert after.fingerprint != before.fingerprint
    assert load_task_data(data_files=files).fingerprint == after.fingerprint  # stable when nothing changed

    write_csv(train, ["good movie,pos", "bad movie,neg", "fun plot,pos"])
    os.utime(train, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert load_task_data(data_files=files).fingerprint == before.fingerprint  # content, not history


def test_reading_an_unchanged_file_again_reuses_the_cache_and_keeps_other_processes_files(tmp_path, datasets_cache):
    """Under torchrun each rank reads the files rank 0 has read and is mapping: that must not rebuild (delete) the
    cache folder the first reader's `map` writes into."""
    train = tmp_path / "train.csv"
    write_csv(train, ["good movie,pos", "bad movie,neg", "fun plot,pos"])
    first = read_data_file("train", str(train))
    mapped = first.map(lambda rows: {"n": [len(t) for t in rows["text"]]}, batched=True)  # writes beside the data
    second = read_data_file("train", str(train))
    assert all(Path(f["filename"]).exists() for f in mapped.cache_files)
    assert second.cache_files == first.cache_files and second["text"] == first["text"]


def test_empty_label_cell_is_rejected_naming_file_and_line(tmp_path, datasets_cache):
    train, validation = tmp_path / "train.csv", tmp_path / "validation.csv"
    write_csv(train, ["good movie,pos", "bad movie,neg", "fun plot,", "None,neg"])
    write_csv(validation, ["great,pos"])
    with pytest.raises(ValueError, match=rf"Empty label in column 'label', line 4 of the train file {train}"):
        load_task_data(data_files={"train": str(train), "validation": str(validation)})
    # "None" / "N/A" are ordinary text, not missing values
    write_csv(train, ["None,pos", "N/A,neg"])
    data = load_task_data(data_files={"train": str(train), "validation": str(validation)})
    assert data.splits["train"]["text"] == ["None", "N/A"]
    write_csv(validation, ["great,"])
    with pytest.raises(
        ValueError, match=rf"Empty label in column 'label', line 2 of the validation file {validation}"
    ):
        load_task_data(data_files={"train": str(train), "validation": str(validation)})
