"""Training cost: seconds per step and peak memory of ReAugKD against vanilla KD, side by side.

    python benchmarks/training_cost.py --data PATH/rotten_tomatoes

Both train the same student (MiniLM-L6's first 3 layers, batch 32, length 64) with `ReAugKDTrainer` on the
training texts, the teacher outputs (logits and knowledge-base keys) precomputed for both; they differ only in
the loss weights. Each measurement is a fresh process (so its peak memory is its own) that trains for
--warmup + --steps steps and times the last --steps; the rounds alternate the methods (A B A B ...), so both
see the same machine load. Output: `results/training_cost.json` with the ratio ReAugKD / vanilla KD.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import RESULTS_DIR, environment, read_csv, write_json
from datasets import Dataset
from transformers import AutoModel, AutoTokenizer, TrainerCallback

from hf_reaugkd import ReAugKDForSequenceClassification, assets
from hf_reaugkd.trainer import TEACHER_KEYS, TEACHER_LOGITS, ReAugKDTrainer
from hf_reaugkd.training_args import ReAugKDTrainingArguments

METHODS = {
    "vanilla_kd": {"distillation_weight": 1.0, "relational_weight": 0.0},
    "reaugkd": {"distillation_weight": 1.0, "relational_weight": 1.0},
}


class StepTimer(TrainerCallback):
    """Wall-clock seconds of every optimizer step."""

    def __init__(self):
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._start)


def worker(method: str, data: Path, warmup: int, steps: int, batch_size: int, max_length: int, out: Path) -> None:
    """Train `warmup + steps` steps of one method and write its step time and peak memory to `out`."""
    minilm = str(assets.minilm_l6_path())
    texts, labels = read_csv(data / "train.csv")
    count = batch_size * (warmup + steps)
    texts, labels = texts[:count], labels[:count]
    names = sorted(set(labels))
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    torch.manual_seed(0)
    student = ReAugKDForSequenceClassification.from_encoder(
        AutoModel.from_pretrained(minilm, num_hidden_layers=3), dict(enumerate(names))
    )
    generator = torch.Generator().manual_seed(0)
    train = Dataset.from_dict(
        {
            **tokenizer(texts, truncation=True, max_length=max_length),
            "labels": [names.index(label) for label in labels],
            TEACHER_LOGITS: torch.randn(len(texts), len(names), generator=generator).tolist(),
            TEACHER_KEYS: torch.nn.functional.normalize(
                torch.randn(len(texts), student.config.kb_dim, generator=generator), dim=-1
            ).tolist(),
        }
    )
    args = ReAugKDTrainingArguments(
        output_dir=str(out.parent / "trainer"),
        per_device_train_batch_size=batch_size,
        max_steps=warmup + steps,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        logging_strategy="no",
        seed=0,
        **METHODS[method],
    )
    timer = StepTimer()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    ReAugKDTrainer(
        model=student, args=args, train_dataset=train, processing_class=tokenizer, callbacks=[timer]
    ).train()
    result = {
        "seconds_per_step": statistics.median(timer.seconds[warmup:]),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    }
    out.write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="Directory with train.csv (text,label)")
    parser.add_argument("--rounds", type=int, default=3, help="Fresh processes per method, alternating")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--work_dir", type=Path, default=Path(__file__).parent / "runs" / "training_cost")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "training_cost.json")
    parser.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--worker_output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(
            args.worker, args.data, args.warmup, args.steps, args.batch_size, args.max_seq_length, args.worker_output
        )
        return

    runs: dict[str, list[dict]] = {method: [] for method in METHODS}
    setting = f"{args.data.name}-w{args.warmup}-s{args.steps}-b{args.batch_size}-l{args.max_seq_length}"
    (args.work_dir / setting).mkdir(parents=True, exist_ok=True)
    for round_index in range(args.rounds):
        for method in METHODS:
            out = args.work_dir / setting / f"{method}-{round_index}.json"
            if not out.exists():  # finished measurements are kept: an interrupted benchmark resumes
                command = [sys.executable, __file__, "--worker", method, "--worker_output", str(out)]
                for flag in ("data", "warmup", "steps", "batch_size", "max_seq_length"):
                    command += [f"--{flag}", str(getattr(args, flag))]
                subprocess.run(command, check=True)
            runs[method].append(json.loads(out.read_text()))
            print(f"round {round_index} {method}: {runs[method][-1]}", flush=True)

    summary = {
        method: {
            "seconds_per_step": statistics.median(r["seconds_per_step"] for r in results),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in results),
            "peak_cuda_bytes": max((r["peak_cuda_bytes"] or 0) for r in results) or None,
        }
        for method, results in runs.items()
    }
    ratio = summary["reaugkd"]["seconds_per_step"] / summary["vanilla_kd"]["seconds_per_step"]
    memory_ratio = summary["reaugkd"]["peak_rss_bytes"] / summary["vanilla_kd"]["peak_rss_bytes"]
    report = {
        "environment": environment(),
        "setting": {k: getattr(args, k) for k in ("rounds", "warmup", "steps", "batch_size", "max_seq_length")},
        "data": args.data.name,
        "summary": summary,
        "step_time_ratio_reaugkd_over_vanilla_kd": ratio,
        "peak_rss_ratio_reaugkd_over_vanilla_kd": memory_ratio,
        "runs": runs,
    }
    write_json(args.output, report)
    for method, row in summary.items():
        print(f"{method:<11} {row['seconds_per_step']:.3f} s/step, peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB")
    print(f"ReAugKD / vanilla KD: step time ×{ratio:.3f}, peak RSS ×{memory_ratio:.3f}")


if __name__ == "__main__":
    main()
