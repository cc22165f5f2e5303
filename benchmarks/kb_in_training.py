"""Why the knowledge base stays out of the student during training: step time and checkpoint size, side by side.

    python benchmarks/kb_in_training.py                 # 2 processes (torchrun, gloo on CPU), KB 100k × 384
    python benchmarks/kb_in_training.py --kb_size 300000

Two variants train the same tiny student for --steps steps with `ReAugKDTrainer` under a 2-process DDP launch:
- `kb_in_model`: the knowledge base attached to the student before training (the earlier pipeline). Its keys, soft
  labels and index bytes are model buffers, so DDP broadcasts them from rank 0 on every step and every training
  checkpoint stores them.
- `kb_in_trainer`: the knowledge base held by the trainer (`ReAugKDTrainer(..., knowledge_base=kb)`, the pipeline
  now) and attached to the student after training.
Each variant is a fresh launch; rounds alternate the variants. Output: `results/kb_in_training.json`.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import RESULTS_DIR, environment, write_json

VARIANTS = ("kb_in_model", "kb_in_trainer")


def worker(variant: str, kb_size: int, steps: int, out: Path) -> None:
    from datasets import Dataset
    from transformers import BertConfig, BertModel, BertTokenizerFast, TrainerCallback

    from hf_reaugkd import KnowledgeBase, ReAugKDForSequenceClassification
    from hf_reaugkd.trainer import ReAugKDTrainer
    from hf_reaugkd.training_args import ReAugKDTrainingArguments

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds = []

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._start)

    words = [f"w{i}" for i in range(100)]
    vocab = out.parent / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=105, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
    )
    student = ReAugKDForSequenceClassification.from_encoder(BertModel(config), {0: "a", 1: "b"}, kb_dim=384)
    generator = torch.Generator().manual_seed(0)
    kb = KnowledgeBase.build(torch.randn(kb_size, 384, generator=generator), torch.full((kb_size, 2), 0.5))
    rows = 16 * 2 * steps
    texts = [" ".join(words[(i * 7 + j) % 100] for j in range(12)) for i in range(rows)]
    train = Dataset.from_dict(
        {
            **tokenizer(texts, truncation=True, max_length=32),
            "labels": [i % 2 for i in range(rows)],
            "teacher_logits": torch.randn(rows, 2, generator=generator).tolist(),
            "teacher_keys": kb.keys[:rows].tolist(),
        }
    )
    if variant == "kb_in_model":
        student.set_knowledge_base(kb)
    args = ReAugKDTrainingArguments(
        output_dir=str(out.parent / f"trainer-{variant}"),
        per_device_train_batch_size=16,
        max_steps=steps,
        save_strategy="steps",
        save_steps=steps,
        report_to=[],
        disable_tqdm=True,
        logging_strategy="no",
        use_cpu=True,
        seed=0,
    )
    timer = StepTimer()
    trainer = ReAugKDTrainer(
        model=student,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[timer],
        knowledge_base=kb if variant == "kb_in_trainer" else None,
    )
    trainer.train()
    if trainer.is_world_process_zero():
        checkpoint = Path(args.output_dir) / f"checkpoint-{steps}"
        result = {
            "world_size": trainer.args.world_size,
            "seconds_per_step": statistics.median(timer.seconds[2:]),
            "checkpoint_bytes": sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()),
        }
        out.write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kb_size", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--work_dir", type=Path, default=Path(__file__).parent / "runs" / "kb_in_training")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "kb_in_training.json")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--worker_output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.kb_size, args.steps, args.worker_output)
        return

    args.work_dir.mkdir(parents=True, exist_ok=True)
    runs = {variant: [] for variant in VARIANTS}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for round_index in range(args.rounds):
        for variant in VARIANTS:
            out = args.work_dir / f"{variant}-{args.kb_size}-{round_index}.json"
            if not out.exists():
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
                command += ["--nproc_per_node", str(args.nproc), __file__, "--worker", variant]
                command += ["--worker_output", str(out), "--kb_size", str(args.kb_size), "--steps", str(args.steps)]
                subprocess.run(command, check=True, env=env)
            runs[variant].append(json.loads(out.read_text()))
            print(f"round {round_index} {variant}: {runs[variant][-1]}", flush=True)

    summary = {
        variant: {
            "world_size": results[0]["world_size"],
            "seconds_per_step": statistics.median(r["seconds_per_step"] for r in results),
            "checkpoint_bytes": results[0]["checkpoint_bytes"],
        }
        for variant, results in runs.items()
    }
    report = {
        "environment": environment(),
        "setting": {"kb_size": args.kb_size, "kb_dim": 384, "steps": args.steps, "nproc": args.nproc},
        "summary": summary,
        "step_time_ratio_in_model_over_in_trainer": summary["kb_in_model"]["seconds_per_step"]
        / summary["kb_in_trainer"]["seconds_per_step"],
        "runs": runs,
    }
    write_json(args.output, report)
    for variant, row in summary.items():
        print(
            f"{variant:<14} world size {row['world_size']}: {row['seconds_per_step'] * 1000:.0f} ms/step, "
            f"checkpoint {row['checkpoint_bytes'] / 2**20:.1f} MiB"
        )
    print(f"step time, KB in the model / KB in the trainer: ×{report['step_time_ratio_in_model_over_in_trainer']:.2f}")


if __name__ == "__main__":
    main()
