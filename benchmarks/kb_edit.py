"""A deployment fix without retraining: add labelled examples of an unseen sub-topic to a saved student's knowledge
base, measure, then remove them and get the original predictions back.

    python benchmarks/kb_edit.py --data $HF_REAUGKD_CACHE/data/bbc_news            # slice: tech articles on music
    python benchmarks/kb_edit.py --data DIR --slice LABEL:KEYWORD

The slice is one class's sub-topic: rows of LABEL whose text contains KEYWORD (default `tech:music`, BBC's
digital-music and iPod stories, easy to mistake for entertainment). All slice rows are held out of the distillation
(teacher, knowledge base, student). Half of the training split's slice rows are then added with `kb add` (gold
labels, no teacher: the labelled examples a deployment collects); the other half and the
validation/test slice rows are the evaluation slice, never seen. Reported: accuracy on the evaluation slice and on
the rest of the test split, before the edit, after it, and after `kb remove` of the added rows (which must restore
every prediction exactly). Output: `results/kb_edit.json` and a table.
"""

import argparse
import csv
import json
import random
from pathlib import Path

import torch
from common import RESULTS_DIR, environment, read_csv, write_json

from hf_reaugkd import assets, editing
from hf_reaugkd.distill import main as distill

MAX_LENGTH = 128


def write_rows(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("text", "label"), *rows])


@torch.no_grad()
def predict(model_dir: Path, texts: list[str], retrieval_weight: float | None) -> torch.Tensor:
    """Predicted class ids, in batches of 32, with the saved β or the one given."""
    model, tokenizer = editing.load_student(model_dir)
    predictions = []
    for start in range(0, len(texts), 32):
        inputs = tokenizer(
            texts[start : start + 32], truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt"
        )
        predictions.append(model(**inputs, retrieval_weight=retrieval_weight).logits.argmax(-1))
    return torch.cat(predictions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="Directory with train/validation/test.csv")
    parser.add_argument("--slice", default="tech:music", help="LABEL:KEYWORD")
    parser.add_argument("--fixed_beta", type=float, default=0.5, help="Also report this β beside the saved one")
    parser.add_argument("--work_dir", type=Path, default=Path(__file__).parent / "runs" / "kb_edit")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "kb_edit.json")
    args = parser.parse_args()
    label, keyword = args.slice.split(":")

    def in_slice(text: str, gold: str) -> bool:
        return gold == label and keyword in text.lower()

    splits = {
        name: list(zip(*read_csv(args.data / f"{name}.csv"), strict=True)) for name in ("train", "validation", "test")
    }
    slice_train = [row for row in splits["train"] if in_slice(*row)]
    random.Random(0).shuffle(slice_train)
    to_add, slice_eval = slice_train[: len(slice_train) // 2], slice_train[len(slice_train) // 2 :]
    slice_eval += [row for name in ("validation", "test") for row in splits[name] if in_slice(*row)]
    rest_test = [row for row in splits["test"] if not in_slice(*row)]

    data_dir = args.work_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        write_rows(data_dir / f"{name}.csv", [row for row in rows if not in_slice(*row)])
    write_rows(data_dir / "to_add.csv", to_add)
    model_dir = args.work_dir / "out" / "model"
    if not (model_dir / "config.json").is_file():
        minilm = str(assets.minilm_l6_path())
        distill(
            [
                "--teacher_model_name_or_path", minilm, "--student_model_name_or_path", minilm,
                "--student_num_layers", "3", "--max_seq_length", str(MAX_LENGTH), "--teacher_num_train_epochs", "3",
                "--train_file", str(data_dir / "train.csv"), "--validation_file", str(data_dir / "validation.csv"),
                "--test_file", str(data_dir / "test.csv"), "--output_dir", str(args.work_dir / "out"),
                "--num_train_epochs", "3", "--per_device_train_batch_size", "32", "--learning_rate", "1e-4",
                "--save_strategy", "no", "--report_to", "none", "--seed", "0",
            ]
        )  # fmt: skip
    saved_beta = json.loads((model_dir / "config.json").read_text())["retrieval_weight"]
    label2id = json.loads((model_dir / "config.json").read_text())["label2id"]

    def accuracies(beta: float | None) -> dict[str, float]:
        result = {}
        for name, rows in (("slice", slice_eval), ("rest_of_test", rest_test)):
            gold = torch.tensor([label2id[row[1]] for row in rows])
            result[name] = (predict(model_dir, [row[0] for row in rows], beta) == gold).float().mean().item()
        return result

    betas = {"saved": saved_beta, "fixed": args.fixed_beta}
    texts = [row[0] for row in slice_eval + rest_test]
    before = {key: accuracies(beta) for key, beta in betas.items()}
    original = {key: predict(model_dir, texts, beta) for key, beta in betas.items()}
    added = editing.add_rows(model_dir, data_dir / "to_add.csv")
    after = {key: accuracies(beta) for key, beta in betas.items()}
    editing.remove_rows(model_dir, ids=added)
    restored = {key: bool(torch.equal(predict(model_dir, texts, beta), original[key])) for key, beta in betas.items()}

    report = {
        "environment": environment(),
        "setting": {
            "slice": args.slice,
            "added_rows": len(to_add),
            "slice_eval_rows": len(slice_eval),
            "rest_of_test_rows": len(rest_test),
            "betas": betas,
        },  # fmt: skip
        "before": before,
        "after_add": after,
        "remove_restores_predictions": restored,
    }
    write_json(args.output, report)
    lines = [
        f"slice {args.slice}: {len(to_add)} rows added, {len(slice_eval)} slice rows and {len(rest_test)} other test "
        "rows evaluated (none in training or the knowledge base)",
        "| β | slice before | slice after kb add | rest of test before | after | kb remove restores predictions |",
        "|---|---|---|---|---|---|",
    ]
    for key, beta in betas.items():
        lines.append(
            f"| {beta:g} ({key}) | {100 * before[key]['slice']:.1f} | {100 * after[key]['slice']:.1f} | "
            f"{100 * before[key]['rest_of_test']:.1f} | {100 * after[key]['rest_of_test']:.1f} | {restored[key]} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
