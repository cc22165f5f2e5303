"""Teacher budget: how many epochs of fine-tuning the quality benchmark's teacher gets, chosen on validation.

    python benchmarks/teacher_budget.py --task rotten_tomatoes=PATH/rotten_tomatoes --task bbc_news=PATH/bbc_news

A teacher fine-tuned too briefly makes every distilled student look good against it: with 400 labelled bbc_news rows,
2 epochs are 26 optimiser steps. This fine-tunes the teacher of the headline (unlabelled) setting on each task's
labelled rows (the same rows as `quality.py`) for each number of epochs, with the package's other teacher defaults
and seed 0, and reports its validation accuracy; the best (fewest epochs on a tie) is what `quality.py` uses
(`TEACHER_EPOCHS` there). `--epochs auto` is the package's default budget (`--teacher_num_train_epochs auto`: an
evaluation on validation after every epoch, the best one kept), measured beside the fixed budgets it should match.
Fine-tuning goes through the pipeline's own `finetune_teacher`, cached under --work_dir.
Results: `results/teacher_budget.json`.
"""

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
from common import RESULTS_DIR, environment, write_json
from quality import LABELED_ROWS, default_setting, parse_labeled_rows, parse_task, unlabeled_setting_dir
from transformers import TrainingArguments, set_seed

from hf_reaugkd.arguments import TeacherArguments
from hf_reaugkd.data import LABEL_COLUMN, load_task_data
from hf_reaugkd.teacher import finetune_teacher, teacher_budget, teacher_outputs

logger = logging.getLogger("teacher_budget")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", type=parse_task, action="append", required=True, help="NAME=DIRECTORY (repeat)")
    parser.add_argument("--labeled_rows", type=parse_labeled_rows, action="append", default=[], help="NAME=ROWS")
    parser.add_argument("--epochs", type=parse_epochs, nargs="+", default=[2.0, 5.0, 10.0, 20.0], help="or auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", type=Path, default=Path(__file__).parent / "runs" / "teacher_budget")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "teacher_budget.json")
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    setting = default_setting("cpu")
    labeled_rows = {**LABELED_ROWS, **dict(args.labeled_rows)}
    run_args = TrainingArguments(output_dir=str(args.work_dir), seed=args.seed, report_to=[], logging_steps=50)
    # earlier results are kept, so the grid can grow task by task and an interrupted run resumes; a grid point is the
    # data folder (its name holds the task, a hash of train.csv and the labelled rows), the seed and the epochs
    records = json.loads(args.output.read_text())["records"] if args.output.exists() else []
    done = {(r["data"], r["seed"], r["epochs"]) for r in records}
    grids = set()  # (data folder, seed) of the tasks asked for: their whole grid is reported
    for task, data_dir in args.task:
        folder = unlabeled_setting_dir(task, data_dir, labeled_rows[task], args.work_dir)
        data = load_task_data(data_files={split: str(folder / f"{split}.csv") for split in ("train", "validation")})
        labels = np.asarray(data.splits["validation"][LABEL_COLUMN])
        grids.add((folder.name, args.seed))
        for epochs in args.epochs:
            if (folder.name, args.seed, epochs) in done:
                continue
            set_seed(args.seed)  # as the pipeline does before fine-tuning: the new head's initialisation
            teacher_args = TeacherArguments(
                teacher_model_name_or_path=setting.teacher,
                teacher_num_train_epochs=epochs,
                teacher_per_device_train_batch_size=setting.batch_size,
            )
            started = time.perf_counter()
            path = finetune_teacher(teacher_args, data, run_args, setting.max_seq_length, args.work_dir)
            seconds = time.perf_counter() - started
            outputs = teacher_outputs(path, data, setting.max_seq_length, args.work_dir)
            accuracy = float((outputs["validation"].logits.argmax(-1) == labels).mean())
            record = {"task": task, "data": folder.name, "seed": args.seed, "labeled_rows": labeled_rows[task],
                      "epochs": epochs, "validation_accuracy": accuracy, "fine_tuning_seconds": round(seconds, 1)}  # fmt: skip
            if epochs == "auto":
                budget = teacher_budget(path)  # the record's accuracy is measured here, like the fixed budgets'
                record |= {"optimizer_steps": budget["best_optimizer_steps"]}
                record |= {key: value for key, value in budget.items() if key != "validation_accuracy"}
            else:  # as Trainer counts
                record["optimizer_steps"] = math.ceil(
                    math.ceil(len(data.splits["train"]) / setting.batch_size) * epochs
                )
            records.append(record)
            logger.info("%s, %s epochs: validation accuracy %.4f", task, epochs, accuracy)
            records.sort(key=lambda r: (r["task"], r["labeled_rows"], r["seed"], epochs_order(r["epochs"])))
            write_json(args.output, {"environment": environment(), "records": records})

    rows = [r for r in records if (r["data"], r["seed"]) in grids]
    print(f"{'task':18s} {'labelled':>8s} {'epochs':>6s} {'steps':>6s} {'validation':>10s}")
    for row in rows:
        print(
            f"{row['task']:18s} {row['labeled_rows']:8d} {row['epochs']!s:>6} {row['optimizer_steps']:6d} "
            f"{100 * row['validation_accuracy']:10.2f}"
        )
    for task, _ in args.task:
        fixed = [r for r in rows if r["task"] == task and r["epochs"] != "auto"]
        best = max(fixed, key=lambda r: (r["validation_accuracy"], -r["epochs"]))
        print(
            f"{task}: best fixed budget on validation {best['epochs']:g} epochs ({100 * best['validation_accuracy']:.2f})"
        )
        for auto in (r for r in rows if r["task"] == task and r["epochs"] == "auto"):
            print(
                f"{task}: auto kept epoch {auto['best_epoch']} of up to {auto['epochs_cap']} (ran {auto['epochs_run']}): "
                f"{100 * auto['validation_accuracy']:.2f}, {100 * (auto['validation_accuracy'] - best['validation_accuracy']):+.2f} "
                "against the best fixed budget"
            )


def parse_epochs(value: str) -> float | str:
    return value if value == "auto" else float(value)


def epochs_order(epochs: float | str) -> float:
    return math.inf if epochs == "auto" else epochs


if __name__ == "__main__":
    main()
