"""Peak memory and wall time of the whole pipeline at real size: N = 10k, 100k, 300k training rows, side by side.

    python benchmarks/pipeline_memory.py                      # N = 10k, 100k, 300k
    python benchmarks/pipeline_memory.py --sizes 10000 50000  # any sizes

Each size runs `hf_reaugkd.distill.main` — the pipeline users run, every stage — in a fresh process (so its peak
RSS is its own) on a synthetic `text,label` task with a tiny random BERT teacher (fine-tuned for
`--teacher_max_steps 20`) and a tiny random student, `--kb_dim 384 --max_steps 20`: what grows with N is then the
pipeline itself (teacher outputs, projection head, knowledge base, neighbour search, attaching the teacher columns,
evaluation, save), not the models. Finished sizes are kept under --work_dir, so an interrupted run resumes.
Output: `results/pipeline_memory.json` and a table with peak RSS, wall time, and the growth per training row
next to the knowledge base's own bytes per row (`kb_dim × 4 + num_labels × 4`).
"""

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS_DIR, environment, write_json

WORDS = [f"w{i}" for i in range(400)]
CUE_WORDS = {"negative": ["awful", "boring", "bad", "dull"], "positive": ["great", "fun", "good", "moving"]}
KB_DIM = 384


def write_task(directory: Path, num_train: int, num_eval: int, seed: int = 0) -> None:
    """Synthetic two-class CSVs: 12 random words plus one cue word of the label (noisy, like real text)."""
    rng = random.Random(seed)
    for split, size in (("train", num_train), ("validation", num_eval), ("test", num_eval)):
        with (directory / f"{split}.csv").open("w", encoding="utf-8") as f:
            f.write("text,label\n")
            for _ in range(size):
                label = rng.choice(list(CUE_WORDS))
                words = rng.choices(WORDS, k=12) + [rng.choice(CUE_WORDS[label])]
                rng.shuffle(words)
                f.write(f"{' '.join(words)},{label}\n")


def write_models(directory: Path) -> None:
    """A tiny random BERT encoder as teacher (fine-tuned by the pipeline) and another as student, with a tokenizer
    over the task's words."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *sum(CUE_WORDS.values(), [])]
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab_file), model_max_length=32)
    for name, seed in (("teacher", 1), ("student", 2)):
        import torch

        torch.manual_seed(seed)
        config = BertConfig(
            vocab_size=len(vocab),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=64,
        )
        BertModel(config).save_pretrained(directory / name)
        tokenizer.save_pretrained(directory / name)


def worker(size: int, work_dir: Path, extra: list[str]) -> dict:
    """One whole pipeline run on `size` training rows; its peak RSS and wall time."""
    from hf_reaugkd.distill import main

    run_dir = work_dir / f"n{size}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    write_task(run_dir, size, num_eval=2000)
    write_models(run_dir)
    start = time.perf_counter()
    metrics = main(
        [
            "--teacher_model_name_or_path", str(run_dir / "teacher"),
            "--student_model_name_or_path", str(run_dir / "student"),
            "--train_file", str(run_dir / "train.csv"),
            "--validation_file", str(run_dir / "validation.csv"),
            "--test_file", str(run_dir / "test.csv"),
            "--output_dir", str(run_dir / "out"),
            "--kb_dim", str(KB_DIM),
            "--max_steps", "20",
            "--teacher_max_steps", "20",
            "--max_seq_length", "32",
            "--per_device_train_batch_size", "32",
            "--per_device_eval_batch_size", "256",
            "--projection_num_epochs", "1",
            "--save_strategy", "no",
            "--report_to", "none",
            "--disable_tqdm", "true",
            "--use_cpu",
            *extra,
        ]
    )  # fmt: skip
    seconds = time.perf_counter() - start
    model_bytes = (run_dir / "out" / "model" / "model.safetensors").stat().st_size
    result = {
        "train_rows": size,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "wall_seconds": seconds,
        "model_safetensors_bytes": model_bytes,
        "test_accuracy_student_retrieval": metrics["splits"]["test"]["student_retrieval"]["accuracy"],
    }
    shutil.rmtree(run_dir)  # hundreds of MB of stages and models per size
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 300_000])
    parser.add_argument(
        "--pipeline_flags",
        default="",
        help="Extra pipeline flags for every size, e.g. '--relational_neighbors 8 --index_type hnsw'",
    )
    parser.add_argument("--work_dir", type=Path, default=Path(__file__).parent / "runs" / "pipeline_memory")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "pipeline_memory.json")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    extra = args.pipeline_flags.split()
    setting = "default" if not extra else "_".join(flag.lstrip("-") for flag in extra)
    if args.worker:
        result = worker(args.worker, args.work_dir / setting, extra)
        (args.work_dir / setting / f"result-{args.worker}.json").write_text(json.dumps(result))
        return

    results = []
    for size in args.sizes:
        out = args.work_dir / setting / f"result-{size}.json"
        if not out.exists():  # finished sizes are kept: an interrupted benchmark resumes
            command = [sys.executable, __file__, "--worker", str(size), "--work_dir", str(args.work_dir)]
            subprocess.run([*command, "--pipeline_flags", args.pipeline_flags], check=True)
        results.append(json.loads(out.read_text()))
        print(f"N={size}: {results[-1]}", flush=True)

    kb_bytes_per_row = (KB_DIM + 2) * 4
    base = results[0]
    lines = [
        f"| train rows | peak RSS (MiB) | wall (s) | RSS growth per row vs N={base['train_rows']:,} (bytes) |",
        "|---|---|---|---|",
    ]
    for row in results:
        extra_rows = row["train_rows"] - base["train_rows"]
        growth = (row["peak_rss_bytes"] - base["peak_rss_bytes"]) / extra_rows if extra_rows else float("nan")
        row["rss_growth_bytes_per_row"] = growth
        lines.append(
            f"| {row['train_rows']:,} | {row['peak_rss_bytes'] / 2**20:,.0f} | {row['wall_seconds']:.0f} | "
            f"{growth:,.0f} |"
        )
    lines.append(f"\nknowledge base bytes per row (kb_dim {KB_DIM}, 2 classes, fp32): {kb_bytes_per_row:,}")
    report = {
        "environment": environment(),
        "setting": {"pipeline_flags": extra, "kb_dim": KB_DIM, "max_steps": 20, "eval_rows": 2000},
        "kb_bytes_per_row": kb_bytes_per_row,
        "results": results,
    }
    output = args.output if not extra else args.output.with_name(f"{args.output.stem}_{setting}.json")
    write_json(output, report)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
