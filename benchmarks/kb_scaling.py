"""Knowledge-base scaling: build time, batch-32 query latency, recall@16, memory and checkpoint size per backend.

    python benchmarks/kb_scaling.py --data PATH/rotten_tomatoes --data PATH/bbc_news

Keys are realistic rather than uniform: MiniLM-L6 sentence embeddings of the texts in the --data directories
(d=384), and for larger sizes random mixtures of two such embeddings plus a little noise, so the keys lie where
real embeddings lie (anisotropic, clustered) instead of spreading uniformly over the sphere, which would make
approximate search look harder than it is. Queries are other mixtures. At each size every backend is built once
(package defaults), then timed in rounds that take each search setting in turn (exact torch and FAISS flat, HNSW
at several efSearch, IVF at several nprobe), next to the student's own forward pass at batch 32 (MiniLM-L6's
first 3 layers), which gives the overhead retrieval adds. Recall@16 is measured against the torch-exact ids.
Each size is saved to `results/kb_scaling.json` when done, and a rerun skips sizes already there. On a CUDA GPU,
torch-exact search also runs on the GPU and its achieved memory bandwidth is reported.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS_DIR, batches, environment, read_csv, time_per_example, write_json
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from hf_reaugkd import KnowledgeBase, assets
from hf_reaugkd.modeling_reaugkd import mean_pool

BACKENDS = ("torch", "flat", "hnsw", "ivf")
K = 16


@torch.no_grad()
def real_embeddings(data_dirs: list[Path], max_length: int, cache: Path) -> torch.Tensor:
    """Normalised MiniLM-L6 mean-pooled embeddings `(n, 384)` of every text in the data directories (cached)."""
    if cache.exists():
        return torch.load(cache)
    texts = [
        text
        for d in data_dirs
        for split in ("train", "validation", "test")
        for text in read_csv(d / f"{split}.csv")[0]
    ]
    minilm = str(assets.minilm_l6_path())
    tokenizer, encoder = AutoTokenizer.from_pretrained(minilm), AutoModel.from_pretrained(minilm).eval()
    embeddings = []
    for batch in tqdm(batches(tokenizer, texts, 64, max_length), desc="Embedding texts"):
        embeddings.append(mean_pool(encoder(**batch).last_hidden_state, batch["attention_mask"]))
    embeddings = torch.nn.functional.normalize(torch.cat(embeddings), dim=-1)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(embeddings, cache)
    return embeddings


def mixtures(base: torch.Tensor, count: int, generator: torch.Generator, noise: float = 0.05) -> torch.Tensor:
    """`count` unit vectors `λ·a + (1−λ)·b + noise`, a and b random rows of `base` `(n, d)`, built in chunks."""
    out = torch.empty(count, base.shape[1])
    for start in range(0, count, 65536):
        n = min(65536, count - start)
        a = base[torch.randint(len(base), (n,), generator=generator)]
        b = base[torch.randint(len(base), (n,), generator=generator)]
        mix = torch.rand(n, 1, generator=generator)
        noisy = (
            mix * a + (1 - mix) * b + noise * torch.randn(n, base.shape[1], generator=generator) / base.shape[1] ** 0.5
        )
        out[start : start + n] = torch.nn.functional.normalize(noisy, dim=-1)
    return out


def memory_bytes(kb: KnowledgeBase) -> int:
    """The KB's buffers plus the live FAISS index: a copy of the keys (flat), or about its serialized size."""
    buffers = sum(b.numel() * b.element_size() for b in kb.buffers())
    live_index = {"torch": 0, "flat": kb.keys.numel() * kb.keys.element_size()}.get(
        kb.index_type, kb.index_bytes.numel()
    )
    return buffers + live_index


def checkpoint_bytes(kb: KnowledgeBase) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "knowledge_base.safetensors"
        kb.save(path)
        return path.stat().st_size


def gpu_search(keys: torch.Tensor, queries: torch.Tensor) -> dict:
    """Torch-exact search on the GPU: time per batch of 32 and the key bytes read per second."""
    kb = KnowledgeBase.build(keys, torch.full((len(keys), 2), 0.5)).to("cuda")
    batch = queries[:32].to("cuda")
    milliseconds = time_per_example(lambda: kb.search(batch, K), num_examples=1, repeats=20)
    return {
        "device": torch.cuda.get_device_name(),
        "ms_batch32": milliseconds,
        "achieved_gb_per_s": kb.keys.numel() * kb.keys.element_size() / milliseconds / 1e6,
    }


def operating_points(hnsw_ef_search: list[int], ivf_nprobe: list[int]) -> dict[str, tuple[str, dict]]:
    """Named search settings: exact backends once, approximate ones at each efSearch / nprobe."""
    points = {"torch": ("torch", {}), "flat": ("flat", {})}
    points.update({f"hnsw ef={ef}": ("hnsw", {"hnsw_ef_search": ef}) for ef in hnsw_ef_search})
    points.update({f"ivf nprobe={n}": ("ivf", {"ivf_nprobe": n}) for n in ivf_nprobe})
    return points


@torch.no_grad()
def measure_size(size: int, base: torch.Tensor, student_run, rounds: int, points: dict) -> dict:
    generator = torch.Generator().manual_seed(size)
    keys = base[:size].clone() if size <= len(base) else torch.cat([base, mixtures(base, size - len(base), generator)])
    values = torch.nn.functional.one_hot(torch.randint(2, (size,), generator=generator), 2).float()
    query_batches = mixtures(base, 32 * rounds, generator).split(32)

    kbs, built = {}, {}
    for backend in BACKENDS:  # each index is built once (package defaults); search settings vary below
        start = time.perf_counter()
        kbs[backend] = KnowledgeBase.build(keys, values, backend)
        kbs[backend].search(query_batches[0], K)  # FAISS indexes are deserialized on first search
        seconds = time.perf_counter() - start
        built[backend] = {
            "build_seconds": seconds,
            "memory_bytes": memory_bytes(kbs[backend]),
            "checkpoint_bytes": checkpoint_bytes(kbs[backend]),
        }
        tqdm.write(f"{size}: built {backend} in {seconds:.1f} s")

    times: dict[str, list[float]] = {name: [] for name in (*points, "student")}
    found: dict[str, list[torch.Tensor]] = {name: [] for name in points}
    for queries in tqdm(query_batches, desc=f"{size} keys: timing rounds"):
        start = time.perf_counter()
        student_run()
        times["student"].append(time.perf_counter() - start)
        for name, (backend, params) in points.items():
            kb = kbs[backend]
            kb.index_params.update(params)
            start = time.perf_counter()
            _, ids = kb.search(queries, K)
            times[name].append(time.perf_counter() - start)
            found[name].append(ids)

    student_ms = 1000 * statistics.median(times["student"])
    exact = torch.cat(found["torch"])
    rows = {}
    for name, (backend, params) in points.items():
        ids = torch.cat(found[name])
        recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, exact, strict=True)) / exact.numel()
        search_ms = 1000 * statistics.median(times[name])
        rows[name] = {
            "backend": backend,
            "search_params": params,
            "search_ms_batch32": search_ms,
            "overhead_vs_student_batch32": search_ms / student_ms,
            "recall_at_16": recall,
            **built[backend],
        }
    result = {"size": size, "dim": keys.shape[1], "student_ms_batch32": student_ms, "rows": rows}
    if torch.cuda.is_available():
        result["gpu_torch_exact"] = gpu_search(keys, torch.cat(query_batches))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, action="append", required=True, help="Directory with text,label CSVs")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--rounds", type=int, default=10, help="Timed batches of 32 queries per backend")
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--hnsw_ef_search", type=int, nargs="+", default=[64, 128, 256], help="efSearch values")
    parser.add_argument("--ivf_nprobe", type=int, nargs="+", default=[8, 32], help="nprobe values")
    parser.add_argument("--work_dir", type=Path, default=Path(__file__).parent / "runs" / "kb_scaling")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "kb_scaling.json")
    args = parser.parse_args()

    points = operating_points(args.hnsw_ef_search, args.ivf_nprobe)
    names = "-".join(d.name for d in args.data)
    base = real_embeddings(args.data, args.max_seq_length, args.work_dir / f"{names}-{args.max_seq_length}.pt")

    minilm = str(assets.minilm_l6_path())
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    student = AutoModel.from_pretrained(minilm, num_hidden_layers=3).eval()
    student_batch = batches(tokenizer, read_csv(args.data[0] / "test.csv")[0][:32], 32, args.max_seq_length)[0]

    report = json.loads(args.output.read_text()) if args.output.exists() else {"sizes": []}
    done = {(r["size"], tuple(r["rows"])) for r in report["sizes"]}
    report.update(environment=environment(), base_embeddings=len(base), k=K, data=[d.name for d in args.data])
    for size in args.sizes:
        if (size, tuple(points)) in done:
            print(f"{size}: already measured, skipping")
            continue
        result = measure_size(size, base, lambda: student(**student_batch), args.rounds, points)
        report["sizes"].append(result)
        write_json(args.output, report)
        print_size(result)


def print_size(result: dict) -> None:
    print(
        f"\n{result['size']} keys × {result['dim']}; student forward at batch 32: {result['student_ms_batch32']:.1f} ms"
    )
    header = (
        f"{'search':<16}{'build s':>9}{'ms/32 q':>9}{'overhead':>10}{'recall@16':>11}{'memory MB':>11}{'ckpt MB':>9}"
    )
    print(header)
    for name, row in result["rows"].items():
        print(
            f"{name:<16}{row['build_seconds']:>9.2f}{row['search_ms_batch32']:>9.2f}"
            f"{100 * row['overhead_vs_student_batch32']:>9.1f}%{row['recall_at_16']:>11.3f}"
            f"{row['memory_bytes'] / 2**20:>11.1f}{row['checkpoint_bytes'] / 2**20:>9.1f}"
        )


if __name__ == "__main__":
    main()
