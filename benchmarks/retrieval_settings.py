"""Inference-time retrieval settings of trained students, on validation only: do any pay beyond k and β?

    python benchmarks/quality.py --task rotten_tomatoes=PATH/rotten_tomatoes ...   # trains and saves the students
    python benchmarks/retrieval_settings.py \
        --run_dir benchmarks/runs/quality/SETTING/rotten_tomatoes+labeled4000 \
        --data benchmarks/runs/quality/data/rotten_tomatoes-HASH-labeled4000

For each saved student of `quality.py` (`--variants`, every seed folder of `--run_dir`), the validation split goes
through its own forward and knowledge base once; the neighbours' vote is then recomputed (through the model file's
`neighbor_label_distribution` and `mix_probabilities`, via the package's evaluation) for:
- the knowledge base's **label temperature** T: its values `softmax(log p / T)`, i.e. the teacher's soft labels at
  temperature T, which a teacher trained to near one-hot outputs makes a lever (T = 1 is what the package stores);
- the neighbour-weight temperature **τ_r** (`retrieval_temperature`, 0.1 by default);
with k and β chosen on validation for each, as the package chooses them. Each setting family is scored twice:
the best validation accuracy (what choosing on validation reports, flattered by the choice) and a cross-fitted one
(k, β and the family's other settings chosen on one random half of validation, scored on the other, 2 × `--splits`
times): the difference is how much a family's extra freedom buys on rows it was not chosen on. Test is not read.
Results: `results/retrieval_settings_TASK.json` (TASK: the run folder's task).
"""

import argparse
import dataclasses
import itertools
import statistics
from collections.abc import Iterator
from pathlib import Path

import torch
from common import RESULTS_DIR, environment, write_json
from transformers import AutoTokenizer

from hf_reaugkd import KnowledgeBase, ReAugKDForSequenceClassification
from hf_reaugkd.data import TaskData, load_task_data, tokenize
from hf_reaugkd.evaluation import Predictions, mixed_metrics, predict, retrieved_in_chunks, select_retrieval_settings

LABEL_TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
RETRIEVAL_TEMPERATURES = (0.05, 0.1, 0.2)
KNN_KS = [1, 4, 8, 16, 32]
BETAS = [i / 10 for i in range(11)]  # the package's default grids
SETTINGS = list(itertools.product(LABEL_TEMPERATURES, RETRIEVAL_TEMPERATURES))  # (T, τ_r)
# family name -> the (label temperature, τ_r) settings it may choose from (k and β always), the package's first
FAMILIES = {
    "package (T = 1, τ_r = 0.1)": [(1.0, 0.1)],
    **{f"T = {t:g}": [(t, 0.1)] for t in LABEL_TEMPERATURES[1:]},
    "T chosen": [(t, 0.1) for t in LABEL_TEMPERATURES],
    "τ_r chosen": [(1.0, 0.1)] + [(1.0, tau) for tau in RETRIEVAL_TEMPERATURES if tau != 0.1],
    "T and τ_r chosen": [(1.0, 0.1)] + [setting for setting in SETTINGS if setting != (1.0, 0.1)],
}


def tokenized_split(data: TaskData, name: str, model, tokenizer, max_seq_length: int):
    """Split `name` of the task as the pipeline read it (`load_task_data`), tokenized for the student as
    quality.py's runs were; the student must know the same labels in the same order."""
    if [model.config.id2label[i] for i in range(model.config.num_labels)] != data.label_names:
        raise SystemExit(f"The student's labels {model.config.id2label} are not the data's {data.label_names}.")
    return tokenize(data.splits[name], tokenizer, data.text_column, None, max_seq_length, f"Tokenizing {name}")


def saved_students(run_dir: Path, variants: list[str]) -> Iterator[tuple[str, str, Path, object, object]]:
    """`(seed folder name, variant, model folder, model, tokenizer)` of each saved student of `quality.py` under a
    task's `run_dir`, seed by seed: the run without overrides (`+student_keys` when it measured that baseline)."""
    for seed_dir, variant in itertools.product(sorted(run_dir.glob("seed*")), variants):
        run = next((d for d in (seed_dir / f"{variant}+student_keys", seed_dir / variant) if d.exists()), None)
        if run is not None:
            model = ReAugKDForSequenceClassification.from_pretrained(run / "model").eval()
            yield seed_dir.name, variant, run / "model", model, AutoTokenizer.from_pretrained(run / "model")


def settings_predictions(model, validation: Predictions) -> dict[tuple[float, float], Predictions]:
    """The validation predictions with the vote recomputed for every (label temperature, τ_r)."""
    knowledge_base = model.knowledge_base
    log_labels = knowledge_base.values.clamp_min(torch.finfo(torch.float32).tiny).log()  # (N, C)
    out = {}
    for label_temperature in LABEL_TEMPERATURES:
        values = (log_labels / label_temperature).softmax(-1)  # (N, C)
        tempered = KnowledgeBase.build(
            knowledge_base.keys, values, knowledge_base.index_type, **knowledge_base.index_params
        )
        for tau in RETRIEVAL_TEMPERATURES:
            retrieved, top = retrieved_in_chunks(tempered, validation.queries, KNN_KS, tau)
            out[label_temperature, tau] = dataclasses.replace(validation, retrieved=retrieved, top_similarity=top)
    return out


def choose(by_setting: dict, rows: torch.Tensor, allowed) -> tuple:
    """The (label temperature, τ_r, k, β) with the best accuracy on `rows`, among the family's settings; ties go to the
    package's order (smaller β, then k: `select_retrieval_settings`), then to the setting listed first (the
    package's own)."""
    best = None
    for setting in allowed:
        chosen = select_retrieval_settings(by_setting[setting].subset(rows), BETAS)
        if best is None or chosen["accuracy"] > best[0]:
            best = (chosen["accuracy"], setting, chosen["knn_k"], chosen["retrieval_weight"])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", type=Path, required=True, help="quality.py's folder of one task (seed* inside)")
    parser.add_argument("--data", type=Path, required=True, help="The task's data folder (train.csv, validation.csv)")
    parser.add_argument(
        "--variants", nargs="+", default=["vanilla_kd", "reaugkd", "reaugkd_own_key", "reaugkd_relational_own_key"]
    )
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--splits", type=int, default=20, help="Random halvings of validation for cross-fitting")
    parser.add_argument("--output", type=Path, help="Default: results/retrieval_settings_TASK.json")
    args = parser.parse_args()
    output = args.output or RESULTS_DIR / f"retrieval_settings_{args.run_dir.name.split('+')[0]}.json"

    data = load_task_data(data_files={name: str(args.data / f"{name}.csv") for name in ("train", "validation")})
    records = []
    for seed, variant, _, model, tokenizer in saved_students(args.run_dir, args.variants):
        split = tokenized_split(data, "validation", model, tokenizer, args.max_seq_length)
        validation = predict(model, split, tokenizer, KNN_KS, model.config.retrieval_temperature)
        by_setting = settings_predictions(model, validation)
        rows = len(validation.labels)
        generator = torch.Generator().manual_seed(0)
        halvings = [torch.randperm(rows, generator=generator).chunk(2) for _ in range(args.splits)]
        for family, allowed in FAMILIES.items():
            accuracy, setting, knn_k, beta = choose(by_setting, torch.arange(rows), allowed)
            held_out = []
            for first, second in halvings:
                for fit_rows, score_rows in ((first, second), (second, first)):
                    _, chosen, k, b = choose(by_setting, fit_rows, allowed)
                    held_out.append(mixed_metrics(by_setting[chosen].subset(score_rows), k, b)["accuracy"])
            records.append(
                {"seed": seed, "variant": variant, "family": family, "validation_accuracy": accuracy,
                 "crossfit_accuracy": statistics.mean(held_out), "label_temperature": setting[0],
                 "retrieval_temperature": setting[1], "knn_k": knn_k, "retrieval_weight": beta}
            )  # fmt: skip
            print(
                f"{seed} {variant:28s} {family:28s} {100 * accuracy:6.2f} {100 * records[-1]['crossfit_accuracy']:6.2f}"
            )
        write_json(output, {"environment": environment(), "run_dir": str(args.run_dir), "records": records})

    print(f"\n{'variant':28s} {'family':28s} {'validation':>10s} {'cross-fit':>9s} {'Δ cross-fit vs package':>24s}")
    for variant, family in itertools.product(args.variants, FAMILIES):
        mine = [r for r in records if (r["variant"], r["family"]) == (variant, family)]
        base = {r["seed"]: r for r in records if (r["variant"], r["family"]) == (variant, next(iter(FAMILIES)))}
        if not mine:
            continue
        diffs = [100 * (r["crossfit_accuracy"] - base[r["seed"]]["crossfit_accuracy"]) for r in mine]
        spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        print(
            f"{variant:28s} {family:28s} {100 * statistics.mean(r['validation_accuracy'] for r in mine):10.2f} "
            f"{100 * statistics.mean(r['crossfit_accuracy'] for r in mine):9.2f} "
            f"{statistics.mean(diffs):+15.2f} ± {spread:.2f}"
        )


if __name__ == "__main__":
    main()
