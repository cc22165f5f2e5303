"""Inference benchmark: latency and throughput of teacher, student and student + retrieval, side by side.

    python benchmarks/inference.py --data PATH/rotten_tomatoes

The knowledge base is the whole training set (train.csv): its keys are the student's own projected embeddings of
the training texts, so neighbours are as close as a trained student's would be; timing does not depend on the
weights, so the models are MiniLM-L6 (teacher, 6 layers) and its first 3 layers (student) with fresh heads, or
the student given with --student. Each round times every configuration once, in turn (teacher, student, then
student + retrieval for each backend), so the ratios compare measurements taken under the same machine load.
The embeddings are cached under --work_dir; the timings are remeasured as a unit on every run.
Output: `results/inference.json`, with `retrieval_overhead_batch32` = t(student + retrieval) / t(student) − 1 at
batch 32 for the default backend.
"""

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from common import RESULTS_DIR, batches, environment, read_csv, write_json
from tqdm.auto import tqdm
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from hf_reaugkd import KnowledgeBase, ReAugKDConfig, ReAugKDForSequenceClassification, assets

BACKENDS = ("torch", "flat", "hnsw")


@torch.no_grad()
def training_set_knowledge_base(student, tokenizer, texts, labels, max_length, cache: Path) -> tuple:
    """Keys: the student's queries for every training text (cached); values: one-hot training labels."""
    if cache.exists():
        keys = torch.load(cache)
    else:
        queries = []
        for batch in tqdm(batches(tokenizer, texts, 64, max_length), desc="Embedding the training set"):
            queries.append(student(**batch, retrieval_weight=0.0).query_embedding)
        keys = torch.cat(queries)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(keys, cache)
    names = sorted(set(labels))
    values = torch.nn.functional.one_hot(torch.tensor([names.index(label) for label in labels]), len(names))
    return keys, values.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="Directory with train.csv and test.csv (text,label)")
    parser.add_argument("--student", help="A saved ReAugKD student (default: MiniLM-L6's first 3 layers)")
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--knn_k", type=int, default=16)
    parser.add_argument("--num_examples", type=int, default=256, help="Test texts timed at batch 32")
    parser.add_argument("--num_single", type=int, default=64, help="Test texts timed one at a time (batch 1)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--work_dir", type=Path, default=Path(__file__).parent / "runs" / "inference")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "inference.json")
    args = parser.parse_args()

    train_texts, train_labels = read_csv(args.data / "train.csv")
    test_texts, _ = read_csv(args.data / "test.csv")
    num_labels = len(set(train_labels))
    minilm = str(assets.minilm_l6_path())
    tokenizer = AutoTokenizer.from_pretrained(args.student or minilm)
    teacher = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=num_labels).eval()
    if args.student:
        student = ReAugKDForSequenceClassification.from_pretrained(args.student).eval()
    else:
        torch.manual_seed(0)
        encoder = AutoModel.from_pretrained(minilm, num_hidden_layers=3)
        id2label = dict(enumerate(sorted(set(train_labels))))
        student = ReAugKDForSequenceClassification.from_encoder(encoder, id2label).eval()
    student.config.knn_k, student.config.retrieval_weight = args.knn_k, 0.5
    cache = args.work_dir / f"{args.data.name}-{args.student is not None}-{args.max_seq_length}-keys.pt"
    keys, values = training_set_knowledge_base(
        student, tokenizer, train_texts, train_labels, args.max_seq_length, cache
    )

    with_retrieval = {}
    for backend in BACKENDS:
        start = time.perf_counter()
        kb = KnowledgeBase.build(keys, values, backend)
        build_seconds = time.perf_counter() - start
        model = copy.deepcopy(student)
        model.set_knowledge_base(kb)
        with_retrieval[backend] = (model, build_seconds)
    default_backend = ReAugKDConfig().index_type

    inputs = {
        32: batches(tokenizer, test_texts[: args.num_examples], 32, args.max_seq_length),
        1: batches(tokenizer, test_texts[: args.num_single], 1, args.max_seq_length),
    }
    configs = {
        "teacher": lambda batch: teacher(**batch),
        "student": lambda batch: student(**batch, retrieval_weight=0),
    }
    for backend, (model, _) in with_retrieval.items():
        configs[f"student+retrieval[{backend}]"] = lambda batch, model=model: model(**batch)
    queries = {
        size: [student(**batch, retrieval_weight=0).query_embedding for batch in batch_list]
        for size, batch_list in inputs.items()
    }
    for backend, (model, _) in with_retrieval.items():
        kb = model.reaugkd.knowledge_base
        configs[f"search only[{backend}]"] = lambda query, kb=kb: kb.search(query, args.knn_k)

    times: dict[tuple[str, int], list[float]] = {}
    with torch.no_grad():
        for name, run in configs.items():  # warm-up: FAISS indexes are deserialized on first search
            run(queries[1][0] if name.startswith("search") else inputs[1][0])
        for _ in tqdm(range(args.rounds), desc="Timing rounds"):
            for batch_size, batch_list in inputs.items():
                for name, run in configs.items():
                    items = queries[batch_size] if name.startswith("search") else batch_list
                    start = time.perf_counter()
                    for item in items:
                        run(item)
                    times.setdefault((name, batch_size), []).append(time.perf_counter() - start)

    results = []
    for (name, batch_size), seconds in times.items():
        count = len(test_texts[: args.num_examples if batch_size == 32 else args.num_single])
        median = statistics.median(seconds)
        results.append(
            {
                "model": name,
                "batch_size": batch_size,
                "ms_per_batch": 1000 * median / len(inputs[batch_size]),
                "ms_per_example": 1000 * median / count,
                "examples_per_second": count / median,
            }
        )
    by_key = {(r["model"], r["batch_size"]): r["ms_per_batch"] for r in results}
    overhead = {
        backend: {f"batch{b}": by_key[f"student+retrieval[{backend}]", b] / by_key["student", b] - 1 for b in inputs}
        for backend in BACKENDS
    }
    report = {
        "environment": environment(),
        "setting": {
            "data": args.data.name,
            "kb_size": len(keys),
            "kb_dim": keys.shape[1],
            "knn_k": args.knn_k,
            "max_seq_length": args.max_seq_length,
            "rounds": args.rounds,
            "student": args.student or "MiniLM-L6, first 3 layers",
            "teacher": "MiniLM-L6 (6 layers)",
            "build_seconds": {backend: seconds for backend, (_, seconds) in with_retrieval.items()},
        },
        "default_backend": default_backend,
        "retrieval_overhead_batch32": overhead[default_backend]["batch32"],
        "retrieval_overhead": overhead,
        "teacher_over_student_batch32": by_key["teacher", 32] / by_key["student", 32],
        "results": results,
    }
    write_json(args.output, report)

    print(f"\nKB = {args.data.name} training set: {len(keys)} × {keys.shape[1]}, k={args.knn_k}")
    print(f"{'model':<28}{'batch':>6}{'ms/batch':>11}{'ms/example':>12}{'examples/s':>12}")
    for r in sorted(results, key=lambda r: (r["batch_size"], list(configs).index(r["model"]))):
        print(
            f"{r['model']:<28}{r['batch_size']:>6}{r['ms_per_batch']:>11.2f}{r['ms_per_example']:>12.3f}"
            f"{r['examples_per_second']:>12.1f}"
        )
    for backend, values_by_batch in overhead.items():
        print(
            f"retrieval overhead [{backend}]: " + ", ".join(f"{k} {100 * v:+.1f}%" for k, v in values_by_batch.items())
        )


if __name__ == "__main__":
    main()
