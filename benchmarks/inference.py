"""Inference benchmark: what retrieval adds to the student's latency, lever by lever, side by side.

    python benchmarks/ablations.py --task rotten_tomatoes=PATH/rotten_tomatoes \
        --variants kb_dim=64 kb_dim=128 kb_dim=256 kb_dim=384        # trains the students (validation only)
    python benchmarks/inference.py --data PATH/rotten_tomatoes \
        --student kb64=RUN/reaugkd+kb_dim=64 --student kb128=RUN/reaugkd+kb_dim=128 ...

Levers measured, each against the same plain student (β = 0) in the same timing round:
- the KB dimension (`--kb_dim`): one trained student per dimension (`--student NAME=DIR`, e.g. the ablation runs);
  its validation accuracy with retrieval (its own KB and validation-chosen k, β) sits beside its overhead;
- the precision of the exact scan (`search_dtype` auto / float32 / bfloat16 / float16 / int8; candidates re-scored in
  fp32; auto, the default, scans int8 keys against int8 queries on a CPU with native bf16) and
  the backend (torch exact, FAISS HNSW), each with the validation accuracy it gives the same student;
- search alone, and FAISS int8 keys (scalar quantizer), for scale (as a share of the plain student's time);
- per search setting, recall of the exact neighbours (fp32, every key scored) in the timing KB for the validation
  queries, at the student's k and at 16: what a reduced-precision scan and its re-scoring window give up.

Timing KB: the whole training set (train.csv) keyed by each student's own queries, so neighbours are as close as a
trained student's are. In each round, per student and batch, every retrieval forward runs right after a plain
forward of the same student on the same batch (pairs, at batch 32, then at batch 1), so a ratio compares
measurements taken under the same machine load; the overhead is the median over rounds of each round's
t(retrieval) / t(plain) − 1, with its range. The `retrieve` step (search + neighbour vote) is also timed inside each retrieval
forward: its share of the plain forward has none of the forward's own round-to-round noise, which at batch 32 (±1-3
points) exceeds a 1% goal. Search alone is timed apart (hot caches, no forward around it). Without `--student`,
untrained students (MiniLM-L6's first 3 layers with fresh heads) at each `--kb_dims` are timed (no accuracy). The
teacher (MiniLM-L6) is timed for scale.
Output: `results/inference.json`; `default` names the configuration the package's defaults give.
"""

import argparse
import copy
import statistics
import time
from pathlib import Path

import faiss
import torch
from common import RESULTS_DIR, batches, environment, read_csv, recall, student_queries, write_json
from tqdm.auto import tqdm
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from hf_reaugkd import KnowledgeBase, ReAugKDForSequenceClassification, assets
from hf_reaugkd.knowledge_base import resolve_index_type

# name -> (index_type, index parameters) of the retrieval configurations timed for every student
SEARCH_SETTINGS = {
    "torch auto": ("torch", {"search_dtype": "auto"}),  # the default: int8 keys and queries on a CPU with native bf16
    "torch fp32": ("torch", {"search_dtype": "float32"}),
    "torch bf16": ("torch", {"search_dtype": "bfloat16"}),
    "torch fp16": ("torch", {"search_dtype": "float16"}),
    "torch int8": ("torch", {"search_dtype": "int8"}),
    "hnsw": ("hnsw", {}),
}


@torch.no_grad()
def accuracy(model, tokenizer, texts: list[str], labels: list[str], max_length: int, **forward_kwargs) -> float:
    """Accuracy of `model`'s own forward (its config's k and β unless overridden) on `texts`."""
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    predicted = [
        names[i]
        for batch in batches(tokenizer, texts, 64, max_length)
        for i in model(**batch, **forward_kwargs).logits.argmax(-1).tolist()
    ]
    return sum(p == str(label) for p, label in zip(predicted, labels, strict=True)) / len(labels)


def with_search_setting(model, index_type: str, params: dict):
    """A copy of `model` whose knowledge base (same entries) is searched with `index_type` and `params`."""
    kb = model.knowledge_base
    copied = copy.deepcopy(model)
    copied.set_knowledge_base(KnowledgeBase.build(kb.keys, kb.values, index_type, **{**kb.index_params, **params}))
    return copied


def load_students(args, train_labels: list[str]) -> dict[str, ReAugKDForSequenceClassification]:
    if args.student:
        return {name: ReAugKDForSequenceClassification.from_pretrained(path).eval() for name, path in args.student}
    minilm = str(assets.minilm_l6_path())
    id2label = dict(enumerate(sorted(set(train_labels))))
    students = {}
    for dim in args.kb_dims:
        torch.manual_seed(0)
        encoder = AutoModel.from_pretrained(minilm, num_hidden_layers=3)
        model = ReAugKDForSequenceClassification.from_encoder(encoder, id2label, kb_dim=dim, retrieval_weight=0.5)
        students[f"kb{dim}"] = model.eval()
    return students


def record_retrieve_seconds(model, seconds: list[float]) -> None:
    """Append the duration of every `retrieve` call (search + neighbour vote) inside `model`'s own forward to
    `seconds`: the retrieval step timed where it runs, with the caches the encoder leaves behind, and without the
    noise of the ~100 ms forward around it that the paired ratio carries."""
    retrieve = model.reaugkd.retrieve

    def timed_retrieve(*args, **kwargs):
        start = time.perf_counter()
        result = retrieve(*args, **kwargs)
        seconds.append(time.perf_counter() - start)
        return result

    model.reaugkd.retrieve = timed_retrieve  # an instance attribute: `forward`'s `self.retrieve` finds it first


def parse_student(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--student takes NAME=DIRECTORY, got {value!r}")
    return name, Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="Directory with train/validation/test.csv")
    parser.add_argument("--student", type=parse_student, action="append", help="NAME=DIR of a saved student")
    parser.add_argument("--kb_dims", type=int, nargs="+", default=[64, 128, 256, 384], help="Without --student")
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--num_examples", type=int, default=256, help="Test texts timed at batch 32")
    parser.add_argument("--num_single", type=int, default=64, help="Test texts timed one at a time (batch 1)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--work_dir", type=Path, default=Path(__file__).parent / "runs" / "inference")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "inference.json")
    args = parser.parse_args()

    train_texts, train_labels = read_csv(args.data / "train.csv")
    validation_texts, validation_labels = read_csv(args.data / "validation.csv")
    test_texts, _ = read_csv(args.data / "test.csv")
    minilm = str(assets.minilm_l6_path())
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    teacher = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=len(set(train_labels))).eval()
    students = load_students(args, train_labels)

    models, searches, validation, neighbour_recall, setting = {}, {}, {}, {}, {}
    for name, student in students.items():
        keys = student_queries(student, tokenizer, train_texts, args.max_seq_length, args.work_dir)
        validation_queries = student_queries(student, tokenizer, validation_texts, args.max_seq_length, args.work_dir)
        label_names = sorted(set(train_labels))
        values = torch.nn.functional.one_hot(torch.tensor([label_names.index(label) for label in train_labels]))
        timing_kb = KnowledgeBase.build(keys, values.float())
        recall_ks = sorted({student.config.knn_k, 16})
        exact = {k: (validation_queries @ timing_kb.keys.T).topk(k, dim=1).indices for k in recall_ks}  # (Q, k)
        with_timing_kb = copy.deepcopy(student)
        with_timing_kb.set_knowledge_base(timing_kb)
        searches[name] = {}
        for search, (index_type, params) in SEARCH_SETTINGS.items():
            models[name, search] = with_search_setting(with_timing_kb, index_type, params)
            searches[name][search] = models[name, search].knowledge_base
            neighbour_recall[name, search] = {
                f"recall_at_{k}": recall(searches[name][search].search(validation_queries, k)[1], exact[k])
                for k in recall_ks
            }
            if args.student:  # accuracy of the trained student with its own KB under this search setting
                model = with_search_setting(student, index_type, params)
                validation[f"{name} +retrieval[{search}]"] = accuracy(
                    model, tokenizer, validation_texts, validation_labels, args.max_seq_length
                )
        quantized = faiss.IndexScalarQuantizer(
            keys.shape[1], faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
        quantized.train(timing_kb.keys.numpy())
        quantized.add(timing_kb.keys.numpy())
        searches[name]["faiss int8"] = quantized
        if args.student:
            validation[f"{name} student"] = accuracy(
                student, tokenizer, validation_texts, validation_labels, args.max_seq_length, retrieval_weight=0.0
            )
        setting[name] = {
            "kb_dim": student.config.kb_dim,
            "knn_k": student.config.knn_k,
            "retrieval_weight": student.config.retrieval_weight,
            "timing_kb_size": len(keys),
            "trained_kb_size": student.config.kb_size,
        }

    inputs = {
        32: batches(tokenizer, test_texts[: args.num_examples], 32, args.max_seq_length),
        1: batches(tokenizer, test_texts[: args.num_single], 1, args.max_seq_length),
    }
    with torch.no_grad():
        queries = {  # per student and batch size: its queries of the timed texts
            name: {
                size: [student(**b, retrieval_weight=0).query_embedding for b in batch_list]
                for size, batch_list in inputs.items()
            }
            for name, student in students.items()
        }

    def timed(run) -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    # Forward passes: per student, each item runs pairs (plain forward, forward with one retrieval setting) of the
    # same model object, so each retrieval forward is compared with the plain forward just before it, on the same
    # item, the same weights in cache and under the same load. (Timing the plain forward on another copy of the
    # student put the retrieval model's encoder weights out of cache: +5% at batch 1 with no retrieval at all.)
    # An untimed plain forward opens each pair: FAISS's threads, still spinning after the previous item's HNSW
    # search, would otherwise slow the next timed run. Search alone is timed apart, setting after setting.
    totals: dict[tuple, list[float]] = {}  # (kind, student, setting, batch size) -> per-round seconds
    retrieve_seconds: dict[tuple[str, str], list[float]] = {key: [] for key in models}
    with torch.no_grad():
        for key, model in models.items():  # warm-up: FAISS indexes deserialized, bf16/int8 scan copies made
            model(**inputs[1][0])  # one query: the int8 copy on CPU
            model(**inputs[32][0])  # a batch: the bf16 copy
            record_retrieve_seconds(model, retrieve_seconds[key])
        for _ in tqdm(range(args.rounds), desc="Timing rounds"):
            for batch_size, batch_list in inputs.items():
                round_totals: dict[tuple, float] = {}

                def add(key: tuple, seconds: float, round_totals=round_totals) -> None:
                    round_totals[key] = round_totals.get(key, 0.0) + seconds

                for item in batch_list:
                    add(("teacher", "", "", batch_size), timed(lambda item=item: teacher(**item)))
                for name in students:
                    for item in batch_list:
                        for search in SEARCH_SETTINGS:
                            model = models[name, search]
                            model(**item, retrieval_weight=0.0)
                            plain = timed(lambda item=item, m=model: m(**item, retrieval_weight=0.0))
                            add(("plain", name, search, batch_size), plain)
                            add(("retrieval", name, search, batch_size), timed(lambda item=item, m=model: m(**item)))
                            add(("in forward", name, search, batch_size), retrieve_seconds[name, search].pop())
                    for search, index in searches[name].items():
                        for query in queries[name][batch_size]:
                            run = (
                                (lambda q=query, i=index: i.search(q, 16))
                                if isinstance(index, KnowledgeBase)
                                else (lambda q=query, i=index: i.search(q.numpy(), 16))
                            )
                            add(("search", name, search, batch_size), timed(run))
                for key, seconds in round_totals.items():
                    totals.setdefault(key, []).append(seconds)

    def ms_per_batch(seconds: list[float], batch_size: int) -> float:
        return 1000 * statistics.median(seconds) / len(inputs[batch_size])

    results = []
    for batch_size in inputs:
        results.append(
            {
                "model": "teacher",
                "batch_size": batch_size,
                "ms_per_batch": ms_per_batch(totals["teacher", "", "", batch_size], batch_size),
            }
        )
        for name in students:
            plain_all = [t for search in SEARCH_SETTINGS for t in totals["plain", name, search, batch_size]]
            results.append(
                {
                    "model": f"{name} student",
                    "batch_size": batch_size,
                    "ms_per_batch": ms_per_batch(plain_all, batch_size),
                    "validation_accuracy": validation.get(f"{name} student"),
                }
            )
            for search in SEARCH_SETTINGS:
                plain, retrieval = (
                    totals["plain", name, search, batch_size],
                    totals["retrieval", name, search, batch_size],
                )
                ratios = [r / p - 1 for r, p in zip(retrieval, plain, strict=True)]
                in_forward = totals["in forward", name, search, batch_size]
                shares = [r / p for r, p in zip(in_forward, plain, strict=True)]
                results.append(
                    {
                        "model": f"{name} +retrieval[{search}]",
                        "batch_size": batch_size,
                        "ms_per_batch": ms_per_batch(retrieval, batch_size),
                        "overhead": statistics.median(ratios),
                        "overhead_range": [min(ratios), max(ratios)],
                        "retrieve_ms_in_forward": ms_per_batch(in_forward, batch_size),
                        "retrieve_share_in_forward": statistics.median(shares),
                        "validation_accuracy": validation.get(f"{name} +retrieval[{search}]"),
                        **neighbour_recall[name, search],
                    }
                )
            plain_ms = ms_per_batch(plain_all, batch_size)
            for search in searches[name]:
                ms = ms_per_batch(totals["search", name, search, batch_size], batch_size)
                results.append(
                    {
                        "model": f"{name} search[{search}]",
                        "batch_size": batch_size,
                        "ms_per_batch": ms,
                        "overhead": ms / plain_ms,
                    }
                )

    default_search = "torch auto" if resolve_index_type("auto", len(train_texts)) == "torch" else "hnsw"
    report = {
        "environment": environment(),
        "setting": {
            "data": args.data.name,
            "max_seq_length": args.max_seq_length,
            "rounds": args.rounds,
            "students": setting,
            "teacher": "MiniLM-L6 (6 layers)",
        },
        "default_search": default_search,
        "results": results,
    }
    write_json(args.output, report)

    print(f"\nTiming KB = {args.data.name} training set ({len(train_texts)} rows); default search: {default_search}")
    header = f"{'configuration':<34}{'batch':>6}{'ms/batch':>10}{'overhead (range over rounds)':>30}"
    print(f"{header}{'retrieve() in forward':>24}{'val. acc.':>10}  recall vs fp32 exact (validation queries)")
    for r in results:
        overhead, in_forward = "", ""
        if "overhead_range" in r:
            low, high = r["overhead_range"]
            overhead = f"{100 * r['overhead']:+.1f}% ({100 * low:+.1f} to {100 * high:+.1f})"
            in_forward = f"{r['retrieve_ms_in_forward']:.2f} ms ({100 * r['retrieve_share_in_forward']:.1f}%)"
        elif "overhead" in r:
            overhead = f"{100 * r['overhead']:.1f}% of the student"
        acc = f"{100 * r['validation_accuracy']:.2f}" if r.get("validation_accuracy") is not None else ""
        recalls = "  ".join(
            f"@{key[len('recall_at_') :]} {value:.4f}" for key, value in r.items() if "recall_at" in key
        )
        print(
            f"{r['model']:<34}{r['batch_size']:>6}{r['ms_per_batch']:>10.2f}{overhead:>30}{in_forward:>24}{acc:>10}"
            f"  {recalls}"
        )


if __name__ == "__main__":
    main()
