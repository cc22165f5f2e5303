"""Knowledge-base scaling: build time, query latency at batch 32 and 1, recall@16, memory and checkpoint size per
backend, and from them the size above which `index_type="auto"` switches from exact search to HNSW.

    python benchmarks/kb_scaling.py --data PATH/rotten_tomatoes --data PATH/bbc_news --dim 128

Keys are realistic rather than uniform: MiniLM-L6 sentence embeddings of the texts in the --data directories
(d=384), and for larger sizes random mixtures of two such embeddings plus a little noise, so the keys lie where
real embeddings lie (anisotropic, clustered) instead of spreading uniformly over the sphere, which would make
approximate search look harder than it is; `--dim` below 384 maps them through a fixed random Gaussian projection
(which keeps their geometry, Johnson–Lindenstrauss) and renormalises. Queries are other mixtures. At each size every backend is built once
(package defaults, IVF with about 4·√N clusters), then timed in rounds that take each search setting in turn
(exact torch in the default reduced-precision scan and in float32, FAISS flat, HNSW at several efSearch, IVF at
several nprobe) at batch 32 and at batch 1, next to the student's own forward pass at the same batch sizes
(MiniLM-L6's first 3 layers), which gives the overhead retrieval adds. Recall@16 is measured against the torch-exact ids.
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
from common import RESULTS_DIR, batches, environment, read_csv, recall, time_per_example, write_json
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from hf_reaugkd import KnowledgeBase, assets
from hf_reaugkd.modeling_reaugkd import mean_pool

K = 16
# name -> (index_type, index parameters it is built with)
BACKENDS = {
    "torch": ("torch", {}),
    "torch fp32": ("torch", {"search_dtype": "float32"}),
    "flat": ("flat", {}),
    "hnsw": ("hnsw", {}),
    "ivf": ("ivf", {}),
}


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
    """The KB's buffers plus what searching keeps: the reduced-precision copy of the keys (torch), a copy of the keys
    (flat), or the live FAISS index (about its serialized size)."""
    buffers = sum(b.numel() * b.element_size() for b in kb.buffers())
    if kb.index_type == "torch":  # the scan copy made so far (int8 and its scales, or bf16), not the fp32 keys
        scan_copy = [t for t in (kb._exact_search._scan_keys or (None, ()))[1] if t is not None]
        live_index = sum(t.numel() * t.element_size() for t in scan_copy)
    else:
        live_index = {"flat": kb.keys.numel() * kb.keys.element_size()}.get(kb.index_type, kb.index_bytes.numel())
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


def projected(embeddings: torch.Tensor, dim: int) -> torch.Tensor:
    """Unit vectors `(n, dim)`: `embeddings` through a fixed random Gaussian projection (identity at full size)."""
    if dim == embeddings.shape[1]:
        return embeddings
    projection = torch.randn(embeddings.shape[1], dim, generator=torch.Generator().manual_seed(0))
    return torch.nn.functional.normalize(embeddings @ projection, dim=-1)


def operating_points(hnsw_ef_search: list[int], ivf_nprobe: list[int]) -> dict[str, tuple[str, dict]]:
    """Named search settings (backend name, search parameters): exact backends once, approximate ones at each
    efSearch / nprobe."""
    points = {"torch": ("torch", {}), "torch fp32": ("torch fp32", {}), "flat": ("flat", {})}
    points.update({f"hnsw ef={ef}": ("hnsw", {"hnsw_ef_search": ef}) for ef in hnsw_ef_search})
    points.update({f"ivf nprobe={n}": ("ivf", {"ivf_nprobe": n}) for n in ivf_nprobe})
    return points


@torch.no_grad()
def measure_size(size: int, base: torch.Tensor, student_runs: dict, rounds: int, points: dict) -> dict:
    generator = torch.Generator().manual_seed(size)
    keys = base[:size].clone() if size <= len(base) else torch.cat([base, mixtures(base, size - len(base), generator)])
    values = torch.nn.functional.one_hot(torch.randint(2, (size,), generator=generator), 2).float()
    query_batches = mixtures(base, 32 * rounds, generator).split(32)

    kbs, built = {}, {}
    for name, (index_type, params) in BACKENDS.items():  # each index is built once; search settings vary below
        start = time.perf_counter()
        kbs[name] = KnowledgeBase.build(keys, values, index_type, **params)
        kbs[name].search(query_batches[0], K)  # made on first search: FAISS index, exact scan copy
        seconds = time.perf_counter() - start
        built[name] = {
            "build_seconds": seconds,
            "memory_bytes": memory_bytes(kbs[name]),
            "checkpoint_bytes": checkpoint_bytes(kbs[name]),
        }
        tqdm.write(f"{size}: built {name} in {seconds:.1f} s")

    times: dict[tuple[str, int], list[float]] = {}
    found: dict[str, list[torch.Tensor]] = {name: [] for name in points}
    for queries in tqdm(query_batches, desc=f"{size} keys: timing rounds"):
        for batch_size, student_run in student_runs.items():
            start = time.perf_counter()
            student_run()
            times.setdefault(("student", batch_size), []).append(time.perf_counter() - start)
        for name, (backend, params) in points.items():
            kb = kbs[backend]
            kb.index_params.update(params)
            start = time.perf_counter()
            _, ids = kb.search(queries, K)
            times.setdefault((name, 32), []).append(time.perf_counter() - start)
            found[name].append(ids)
            start = time.perf_counter()
            for query in queries.split(1):
                kb.search(query, K)
            times.setdefault((name, 1), []).append((time.perf_counter() - start) / len(queries))

    median_ms = {key: 1000 * statistics.median(values) for key, values in times.items()}
    exact = torch.cat(found["torch fp32"])
    rows = {}
    for name, (backend, params) in points.items():
        ids = torch.cat(found[name])
        rows[name] = {
            "backend": BACKENDS[backend][0],
            "search_params": {**BACKENDS[backend][1], **params},
            "search_ms_batch32": median_ms[name, 32],
            "overhead_vs_student_batch32": median_ms[name, 32] / median_ms["student", 32],
            "search_ms_batch1": median_ms[name, 1],
            "overhead_vs_student_batch1": median_ms[name, 1] / median_ms["student", 1],
            "recall_at_16": recall(ids, exact),
            **built[backend],
        }
    result = {
        "size": size,
        "dim": keys.shape[1],
        "student_ms_batch32": median_ms["student", 32],
        "student_ms_batch1": median_ms["student", 1],
        "ivf_nlist": kbs["ivf"]._get_faiss_index().nlist,
        "rows": rows,
    }
    if torch.cuda.is_available():
        result["gpu_torch_exact"] = gpu_search(keys, torch.cat(query_batches))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, action="append", required=True, help="Directory with text,label CSVs")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000, 300_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=384, help="Key dimension (a random projection below 384)")
    parser.add_argument("--rounds", type=int, default=10, help="Timed batches of 32 queries per backend")
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--hnsw_ef_search", type=int, nargs="+", default=[64, 128, 256], help="efSearch values")
    parser.add_argument("--ivf_nprobe", type=int, nargs="+", default=[8, 32, 64], help="nprobe values")
    parser.add_argument("--work_dir", type=Path, default=Path(__file__).parent / "runs" / "kb_scaling")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "kb_scaling.json")
    args = parser.parse_args()

    points = operating_points(args.hnsw_ef_search, args.ivf_nprobe)
    names = "-".join(d.name for d in args.data)
    base = real_embeddings(args.data, args.max_seq_length, args.work_dir / f"{names}-{args.max_seq_length}.pt")
    base = projected(base, args.dim)

    minilm = str(assets.minilm_l6_path())
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    student = AutoModel.from_pretrained(minilm, num_hidden_layers=3).eval()
    texts = read_csv(args.data[0] / "test.csv")[0]
    student_inputs = {
        32: batches(tokenizer, texts[:32], 32, args.max_seq_length)[0],
        1: batches(tokenizer, texts[:1], 1, args.max_seq_length)[0],
    }
    student_runs = {size: lambda inputs=inputs: student(**inputs) for size, inputs in student_inputs.items()}

    report = json.loads(args.output.read_text()) if args.output.exists() else {"sizes": []}
    done = {(r["size"], r["dim"], tuple(r["rows"])) for r in report["sizes"]}
    report.update(environment=environment(), base_embeddings=len(base), k=K, data=[d.name for d in args.data])
    for size in args.sizes:
        if (size, args.dim, tuple(points)) in done:
            print(f"{size} × {args.dim}: already measured, skipping")
            continue
        result = measure_size(size, base, student_runs, args.rounds, points)
        report["sizes"].append(result)
        write_json(args.output, report)
        print_size(result)


def print_size(result: dict) -> None:
    print(
        f"\n{result['size']} keys × {result['dim']} (IVF nlist {result['ivf_nlist']}); student forward: "
        f"{result['student_ms_batch32']:.1f} ms at batch 32, {result['student_ms_batch1']:.2f} ms at batch 1"
    )
    header = (
        f"{'search':<16}{'build s':>9}{'ms/32 q':>9}{'ovh b32':>9}{'ms/q b1':>9}{'ovh b1':>8}{'recall@16':>11}"
        f"{'memory MB':>11}{'ckpt MB':>9}"
    )
    print(header)
    for name, row in result["rows"].items():
        print(
            f"{name:<16}{row['build_seconds']:>9.2f}{row['search_ms_batch32']:>9.2f}"
            f"{100 * row['overhead_vs_student_batch32']:>8.1f}%{row['search_ms_batch1']:>9.3f}"
            f"{100 * row['overhead_vs_student_batch1']:>7.1f}%{row['recall_at_16']:>11.3f}"
            f"{row['memory_bytes'] / 2**20:>11.1f}{row['checkpoint_bytes'] / 2**20:>9.1f}"
        )


if __name__ == "__main__":
    main()
