"""Ablations on validation only: which ReAugKD settings move the student, its retrieval and vanilla KD.

    python benchmarks/ablations.py --task rotten_tomatoes=PATH/rotten_tomatoes --seeds 0

Each variant changes one setting of the quality benchmark's pipeline (same teacher, same budget) and reruns the
ReAugKD student, and the vanilla KD student too when the setting applies to it. Nothing here reads the test
split's results: the table shows validation accuracy of the plain student (β=0), with retrieval (best k and β on
the grid, so slightly optimistic), and the kNN accuracy (β=1, best k) of the student's and of the teacher's own
queries, which tells whether the student's queries or the knowledge base limit retrieval. Runs are shared with
`quality.py` (same --work_dir), so its default runs are reused. Output: `results/ablations.json`.
"""

import argparse
import dataclasses
from pathlib import Path

import torch
from common import RESULTS_DIR, environment, write_json
from quality import default_setting, parse_task, train_run

# name -> (overrides, runs that use the setting)
VARIANTS = {
    "default": ({}, ("reaugkd", "vanilla_kd")),
    "relational_weight=4": ({"relational_weight": 4.0}, ("reaugkd",)),
    "relational_temperature=0.5": ({"relational_temperature": 0.5}, ("reaugkd",)),
    "projection_temperature=0.5": ({"projection_temperature": 0.5}, ("reaugkd",)),
    "relational_neighbors=16": ({"relational_neighbors": 16}, ("reaugkd",)),
    "learning_rate=1e-4": ({"learning_rate": 1e-4}, ("reaugkd", "vanilla_kd")),
    # The KB dimension sets retrieval's cost (bytes scanned per query); benchmarks/inference.py times these students.
    **{f"kb_dim={dim}": ({"kb_dim": dim}, ("reaugkd",)) for dim in (64, 128, 256, 384)},
}


def validation_row(metrics: dict) -> dict:
    validation = metrics["splits"]["validation"]
    knn = metrics["validation_knn_accuracy"]
    return {
        "student": validation["student"]["accuracy"],
        "with_retrieval": metrics["selection"]["accuracy"],
        "knn_k": metrics["selection"]["knn_k"],
        "retrieval_weight": metrics["selection"]["retrieval_weight"],
        "student_query_knn": max(knn["student_query"].values()),
        "teacher_query_knn": max(knn["teacher_query"].values()),
        "teacher": validation["teacher"]["accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", type=parse_task, required=True, help="NAME=DIRECTORY")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--work_dir", type=Path, default=Path(__file__).parent / "runs" / "quality")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "ablations.json")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    setting = default_setting(args.device)
    task, data_dir = args.task
    rows = []
    for seed in args.seeds:
        for variant in args.variants:
            overrides, runs = VARIANTS[variant]
            for name in runs:
                metrics = train_run(task, data_dir, seed, name, setting, args.work_dir, overrides)
                rows.append({"task": task, "seed": seed, "variant": variant, "run": name, **validation_row(metrics)})
                write_json(
                    args.output,
                    {"environment": environment(), "setting": dataclasses.asdict(setting), "rows": rows},
                )

    print(f"\n{task}, validation accuracy (%), seeds {args.seeds}")
    header = f"{'variant':<28}{'run':<12}{'β=0':>7}{'+retr.':>8}{'k/β':>8}{'kNN s':>8}{'kNN t':>8}"
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print(
            f"{r['variant']:<28}{r['run']:<12}{100 * r['student']:>7.2f}{100 * r['with_retrieval']:>8.2f}"
            f"{r['knn_k']:>5}/{r['retrieval_weight']:<3g}{100 * r['student_query_knn']:>7.2f}"
            f"{100 * r['teacher_query_knn']:>8.2f}"
        )


if __name__ == "__main__":
    main()
