"""Re-scoring window: how many candidates beyond k a reduced-precision scan must keep for the exact neighbours to be
among them, on a trained student's knowledge bases.

    hf-reaugkd distill    # the offline demo: outputs/demo/model
    python benchmarks/rescore_window.py --data PATH/rotten_tomatoes --student outputs/demo/model

The exact torch search scans the keys in a reduced precision (`search_dtype`: int8 keys against int8 queries on CPUs
with native bf16, fp16 on CUDA, bf16 where the int8 kernel is missing), keeps its best k + max(k, extra) candidates
and re-scores them from the fp32 keys (`exact_search.RESCORE_EXTRA` is `extra` per scan dtype). A true neighbour is
lost when more than `extra` others outscore it in the scan by less than the scan's rounding error, so trained KBs are
the hard case: their classes are tight clusters, full of near-ties. For each scan dtype, each k and each candidate
window, this prints the share of the exact fp32 top-k (validation queries) that the scan's own top-(k + extra) holds,
through the package's scan (`exact_search._scan`), in two KBs: the student's own (teacher keys) and the timing KB of
`inference.py` (the whole training set keyed by the student's queries, denser). Output: `results/rescore_window.json`.
"""

import argparse
from pathlib import Path

import torch
from common import RESULTS_DIR, environment, read_csv, student_queries, write_json
from transformers import AutoTokenizer

from hf_reaugkd import KnowledgeBase, ReAugKDForSequenceClassification, exact_search
from hf_reaugkd.exact_search import RESCORE_EXTRA

SCAN_DTYPES = ("int8", "float16", "bfloat16")
KS = (1, 4, 8, 16)
EXTRAS = (0, 4, 8, 12, 16, 24, 32)


@torch.no_grad()
def window_recall(kb: KnowledgeBase, queries: torch.Tensor, exact: torch.Tensor, extra: int) -> float:
    """Share of the exact top-k ids `exact` `(Q, k)` found among the scan's top k + extra candidates of each query."""
    block_size = kb.index_params["search_block_size"]
    # the copy `search` scans, in the KB's search_dtype
    scan_keys, scales = kb._exact_search.keys_for_scan(kb.keys, kb.index_params["search_dtype"], block_size)
    _, candidates = exact_search._scan(
        queries, scan_keys, scales, exact.shape[1] + extra, block_size
    )  # (Q, k + extra)
    return (exact.unsqueeze(-1) == candidates.unsqueeze(1)).any(-1).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="Directory with train/validation.csv")
    parser.add_argument("--student", type=Path, required=True, help="A saved student (with its knowledge base)")
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--work_dir", type=Path, default=Path(__file__).parent / "runs" / "rescore_window")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "rescore_window.json")
    args = parser.parse_args()

    student = ReAugKDForSequenceClassification.from_pretrained(args.student).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    train_texts, _ = read_csv(args.data / "train.csv")
    validation_texts, _ = read_csv(args.data / "validation.csv")
    queries = student_queries(student, tokenizer, validation_texts, args.max_seq_length, args.work_dir)
    train_queries = student_queries(student, tokenizer, train_texts, args.max_seq_length, args.work_dir)
    knowledge_bases = {
        "student's KB (teacher keys)": student.knowledge_base,
        "timing KB (student keys of train)": KnowledgeBase.build(
            train_queries, torch.full((len(train_queries), 2), 0.5)
        ),
    }

    rows = []
    for kb_name, kb in knowledge_bases.items():
        for dtype in SCAN_DTYPES:
            scanned = KnowledgeBase.build(kb.keys, kb.values, "torch", search_dtype=dtype)
            for k in KS:
                exact = (queries @ scanned.keys.T).topk(k, dim=1).indices  # (Q, k): every key scored in fp32
                found = {extra: window_recall(scanned, queries, exact, extra) for extra in EXTRAS}
                rows.append({"kb": kb_name, "kb_size": kb.size, "search_dtype": dtype, "k": k, "recall": found})

    write_json(
        args.output,
        {
            "environment": environment(),
            "setting": {
                "data": args.data.name,
                "student": args.student.name,
                "queries": len(queries),
                "shipped_extra": {str(dtype).removeprefix("torch."): extra for dtype, extra in RESCORE_EXTRA.items()},
            },
            "results": rows,
        },
    )
    print(f"\nShare of the exact top-k within the scan's top k + extra ({len(queries):,} validation queries)")
    print(f"{'knowledge base':<36}{'scan':>10}{'k':>4}" + "".join(f"{'+' + str(e):>9}" for e in EXTRAS))
    for row in rows:
        cells = "".join(f"{row['recall'][e]:>9.5f}" for e in EXTRAS)
        print(
            f"{row['kb'] + ' (' + format(row['kb_size'], ',') + ')':<36}{row['search_dtype']:>10}{row['k']:>4}{cells}"
        )


if __name__ == "__main__":
    main()
