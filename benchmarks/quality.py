"""Quality benchmark: ReAugKD against its baselines, same student init and budget, several seeds.

    python benchmarks/quality.py --task rotten_tomatoes=PATH/rotten_tomatoes --task bbc_news=PATH/bbc_news
    python benchmarks/quality.py --setting labeled --task ...      # the all-labelled setting

Each task directory holds train.csv, validation.csv and test.csv with `text,label` columns. Two data settings:

- `unlabeled` (the headline, `results/quality.json`): a few labelled rows and the rest of train.csv as unlabelled
  text, labels dropped (`--labeled_rows`; rotten_tomatoes 4,000 + ~6,300, bbc_news 400 + ~1,300). The labelled rows
  are the first N after the shuffle `--max_train_samples` uses, so rotten_tomatoes' 4,000 are those of the
  all-labelled setting. The teacher is fine-tuned on the labelled rows only, for `TEACHER_EPOCHS` epochs (chosen on
  validation by teacher_budget.py); its labels of the unlabelled rows join
  the knowledge base and the transfer set of every distilled student (vanilla KD included). The student without KD
  can only use the labelled rows and gets those.
- `labeled` (`results/quality_labeled.json`): train.csv only, cut to the setting's `max_train_samples`.

Per task and seed, one teacher and one knowledge base are shared by the student trainings (the methods differ only
in the loss):

    run                          loss weights (KD, relational, CE, own-key)   methods read from it
    reaugkd                      (1, 1, 0, 0)     reaugkd_relational[_no_retrieval, _student_keys]
    reaugkd_own_key              (1, 0, 0, 1)     reaugkd_own_key[_no_retrieval, _student_keys]
    reaugkd_relational_own_key   (1, 1, 0, 1)     reaugkd_relational_own_key[_no_retrieval, _student_keys]
    vanilla_kd                   (1, 0, 0, 0)     vanilla_kd (β=0), vanilla_kd_retrieval, vanilla_kd_student_keys
    no_kd                        (0, 0, 1, 0)     student_no_kd
    (first run of a seed)                         teacher (one fine-tuned teacher per task and seed)

`reaugkd` and `reaugkd_no_retrieval` (and `reaugkd_student_keys`) are the ReAugKD variant with the best validation
accuracy with retrieval, mean over the seeds all variants have run, chosen per task on validation only (the records
name it: `variant`). With retrieval, k and β are chosen on validation. `*_student_keys` is the baseline that needs no
teacher space: the same student retrieving from the same rows and soft labels keyed by its own queries
(`--evaluate_student_keyed_kb`), with its own k and β from validation. Records of methods with retrieval also carry
the validation kNN accuracy (β = 1, best k) of the student's queries and of the teacher's own queries.

Every run goes through `hf_reaugkd.distill.run`, the pipeline users run. Finished runs are kept under --work_dir
and skipped, so an interrupted benchmark resumes where it stopped. Results: `--output` (a list of
`{"task", "method", "seed", "accuracy", "macro_f1", "validation_accuracy", ...}` records on test), `*_details.json`
(environment, setting, validation grids, kNN accuracies) and `*_retrieval_grid.png` (validation accuracy against β).
"""

import argparse
import csv
import dataclasses
import json
import logging
import statistics
import warnings
from pathlib import Path

import torch
from common import RESULTS_DIR, environment, write_json

from hf_reaugkd import assets
from hf_reaugkd.arguments import DataTrainingArguments, ModelArguments, TeacherArguments
from hf_reaugkd.caching import atomic_path, fingerprint, hash_files
from hf_reaugkd.data import read_data_file
from hf_reaugkd.distill import run
from hf_reaugkd.training_args import ReAugKDTrainingArguments

logger = logging.getLogger("quality")

# ReAugKD variants: run name -> (method name prefix, loss weights). "reaugkd" is the package's default loss.
REAUGKD_VARIANTS = {
    "reaugkd": ("reaugkd_relational", {"distillation_weight": 1.0, "relational_weight": 1.0}),
    "reaugkd_own_key": (
        "reaugkd_own_key",
        {"distillation_weight": 1.0, "relational_weight": 0.0, "own_key_weight": 1.0},
    ),
    "reaugkd_relational_own_key": (
        "reaugkd_relational_own_key",
        {"distillation_weight": 1.0, "relational_weight": 1.0, "own_key_weight": 1.0},
    ),
}
# run name -> (loss weights, {method: model key in the run's metrics})
RUNS = {
    **{
        name: (
            {"ce_weight": 0.0, **weights},
            {
                f"{prefix}_no_retrieval": "student",
                prefix: "student_retrieval",
                f"{prefix}_gated": "student_retrieval_gated",
                f"{prefix}_student_keys": "student_retrieval_student_keys",
            },
        )
        for name, (prefix, weights) in REAUGKD_VARIANTS.items()
    },
    "vanilla_kd": (
        {"distillation_weight": 1.0, "relational_weight": 0.0, "ce_weight": 0.0},
        {
            "vanilla_kd": "student",
            "vanilla_kd_retrieval": "student_retrieval",
            "vanilla_kd_gated": "student_retrieval_gated",
            "vanilla_kd_student_keys": "student_retrieval_student_keys",
        },
    ),
    "no_kd": ({"distillation_weight": 0.0, "relational_weight": 0.0, "ce_weight": 1.0}, {"student_no_kd": "student"}),
}
STUDENT_KEYED_RUNS = (*REAUGKD_VARIANTS, "vanilla_kd")  # runs that also measure the student-keyed baseline
# the validation-chosen ReAugKD variant's records, under these names: chosen method -> suffix of the variant's method
CHOSEN = {
    "reaugkd_no_retrieval": "_no_retrieval",
    "reaugkd": "",
    "reaugkd_gated": "_gated",
    "reaugkd_student_keys": "_student_keys",
}
METHODS = (
    "teacher", "student_no_kd", "vanilla_kd", "vanilla_kd_retrieval", "vanilla_kd_gated", "vanilla_kd_student_keys",
    *CHOSEN,
    *(f"{prefix}{suffix}" for prefix, _ in REAUGKD_VARIANTS.values() for suffix in CHOSEN.values()),
)  # fmt: skip
# the headline setting's labelled rows per task (the rest of train.csv is unlabelled text)
LABELED_ROWS = {"rotten_tomatoes": 4000, "bbc_news": 400}
# the headline setting's teacher epochs per task, chosen on validation (seed 0) by teacher_budget.py for the CPU
# setting's teacher, length and LABELED_ROWS (results/teacher_budget.json): the setting's 2 epochs under-train it
TEACHER_EPOCHS = {"rotten_tomatoes": 10, "bbc_news": 20}


@dataclasses.dataclass
class Setting:
    """Models and budget, identical for every method."""

    teacher: str
    student: str
    student_num_layers: int | None
    max_seq_length: int
    max_train_samples: int | None
    teacher_epochs: float
    student_epochs: float
    batch_size: int = 32
    learning_rate: float = 5e-5


def default_setting(device: str) -> Setting:
    """CPU: MiniLM-L6 → its first 3 layers, sized for ~90 min on 2 cores. CUDA: mpnet-base → MiniLM-L6."""
    minilm = str(assets.minilm_l6_path())
    if device == "cuda":
        return Setting(str(assets.mpnet_base_path()), minilm, None, 128, None, teacher_epochs=3, student_epochs=5)
    return Setting(minilm, minilm, 3, max_seq_length=64, max_train_samples=4000, teacher_epochs=2, student_epochs=3)


def run_dir(work_dir: Path, setting: Setting, task: str, seed: int) -> Path:
    """Runs are kept per setting, so changing the budget never reuses results of another."""
    return work_dir / fingerprint(dataclasses.asdict(setting)) / task / f"seed{seed}"


def train_run(
    task: str,
    data_dir: Path,
    seed: int,
    name: str,
    setting: Setting,
    work_dir: Path,
    overrides: dict | None = None,
    unlabeled_file: Path | None = None,
    student_keys: bool = False,
) -> dict:
    """One student training through the user-facing pipeline; returns its metrics (cached in metrics.json).

    `overrides` sets other `ModelArguments` / `TeacherArguments` / `ReAugKDTrainingArguments` fields (ablations); the
    teacher and, when its inputs are unchanged, the knowledge base are shared with the plain run. `task` names the
    run's folder (one per data setting). `unlabeled_file` joins the teacher-labelled texts to the knowledge base and
    the transfer set; `student_keys` also measures the student-keyed baseline (a folder of its own)."""
    overrides = overrides or {}
    suffix = "".join(f"+{key}={value}" for key, value in sorted(overrides.items()))
    suffix += "+student_keys" if student_keys else ""
    output_dir = run_dir(work_dir, setting, task, seed) / f"{name}{suffix}"
    metrics_file = output_dir / "metrics.json"
    if metrics_file.exists():
        return json.loads(metrics_file.read_text())
    logger.info("Running %s / seed %d / %s%s", task, seed, name, suffix)
    weights, _ = RUNS[name]
    model_fields = {f.name for f in dataclasses.fields(ModelArguments)}
    teacher_fields = {f.name for f in dataclasses.fields(TeacherArguments)}
    model_args = ModelArguments(
        student_model_name_or_path=setting.student,
        student_num_layers=setting.student_num_layers,
        stages_dir=str(run_dir(work_dir, setting, task, seed) / "stages"),
        evaluate_student_keyed_kb=student_keys,
        **{key: value for key, value in overrides.items() if key in model_fields},
    )
    teacher_args = TeacherArguments(
        teacher_model_name_or_path=setting.teacher,
        teacher_num_train_epochs=setting.teacher_epochs,
        teacher_per_device_train_batch_size=setting.batch_size,
        **{key: value for key, value in overrides.items() if key in teacher_fields},
    )
    data_args = DataTrainingArguments(
        train_file=str(data_dir / "train.csv"),
        validation_file=str(data_dir / "validation.csv"),
        test_file=str(data_dir / "test.csv"),
        unlabeled_file=str(unlabeled_file) if unlabeled_file else None,
        max_seq_length=setting.max_seq_length,
        max_train_samples=setting.max_train_samples,
    )
    training_kwargs = {
        "output_dir": str(output_dir),
        "seed": seed,
        "num_train_epochs": setting.student_epochs,
        "learning_rate": setting.learning_rate,
        "per_device_train_batch_size": setting.batch_size,
        "per_device_eval_batch_size": 64,
        "save_strategy": "no",
        "logging_steps": 50,
        "report_to": [],
        **weights,
    }
    training_kwargs.update(
        (key, value) for key, value in overrides.items() if key not in model_fields | teacher_fields
    )
    training_args = ReAugKDTrainingArguments(**training_kwargs)
    return run(model_args, teacher_args, data_args, training_args)


def records_from(task: str, seed: int, name: str, metrics: dict, with_teacher: bool = False) -> list[dict]:
    """The test-set records of the methods a run yields (the student-keyed one when the run measured it), and the
    teacher's if asked (every run of a task and seed shares one teacher)."""
    _, methods = RUNS[name]
    methods = {"teacher": "teacher", **methods} if with_teacher else methods
    knn = metrics["validation_knn_accuracy"]
    records = []
    for method, key in methods.items():
        if key not in metrics["splits"]["test"]:
            continue
        test = metrics["splits"]["test"][key]
        record = {"task": task, "method": method, "seed": seed, **test}
        record["validation_accuracy"] = metrics["splits"]["validation"][key]["accuracy"]
        if key in ("student_retrieval", "student_retrieval_student_keys"):
            own_keys = key == "student_retrieval_student_keys"
            selection = metrics["selection_student_keys" if own_keys else "selection"]
            queries = knn["student_query_student_keys" if own_keys else "student_query"]
            record.update(
                knn_k=selection["knn_k"],
                retrieval_weight=selection["retrieval_weight"],
                validation_knn_student_query=max(queries.values()),
                validation_knn_teacher_query=max(knn["teacher_query"].values()),
            )
        if key == "student_retrieval_gated":  # the per-query β(x) at the chosen k; served only if `gate_used`
            record.update(knn_k=metrics["gate"]["knn_k"], gate_used=metrics["gate"]["used"])
        records.append(record)
    return records


def choose_variant(records: list[dict], task: str) -> str | None:
    """The ReAugKD variant (run name) with the best mean validation accuracy with retrieval over the seeds all its
    run variants share; ties go to the earlier variant (the package default first). None before any has run."""
    accuracy = {
        name: {r["seed"]: r["validation_accuracy"] for r in records if r["task"] == task and r["method"] == prefix}
        for name, (prefix, _) in REAUGKD_VARIANTS.items()
    }
    accuracy = {name: by_seed for name, by_seed in accuracy.items() if by_seed}
    if not accuracy:
        return None
    seeds = set.intersection(*(set(by_seed) for by_seed in accuracy.values())) or None
    order = list(REAUGKD_VARIANTS)

    def score(name: str) -> tuple[float, int]:
        values = [v for seed, v in accuracy[name].items() if seeds is None or seed in seeds]
        return statistics.mean(values), -order.index(name)

    return max(accuracy, key=score)


def with_chosen_variant(records: list[dict]) -> list[dict]:
    """`records` plus, per task, the chosen variant's records under the names `reaugkd`, `reaugkd_no_retrieval` and
    `reaugkd_student_keys` (with a `variant` field)."""
    chosen_records = []
    for task in dict.fromkeys(r["task"] for r in records):
        variant = choose_variant(records, task)
        if variant is None:
            continue
        prefix, _ = REAUGKD_VARIANTS[variant]
        for chosen, suffix in CHOSEN.items():
            chosen_records += [
                {**r, "method": chosen, "variant": variant}
                for r in records
                if r["task"] == task and r["method"] == prefix + suffix
            ]
    return records + chosen_records


def summarize(records: list[dict]) -> str:
    """Markdown tables: test accuracy and macro-F1 (mean ± std over seeds) per task, the paired gaps and the goals,
    and the validation kNN accuracy of each student's queries against the teacher's own."""

    def mean_std(values: list[float]) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"

    lines = []
    for task in dict.fromkeys(r["task"] for r in records):
        rows = {m: [r for r in records if r["task"] == task and r["method"] == m] for m in METHODS}
        seeds = sorted({r["seed"] for r in records if r["task"] == task})
        variant = next((REAUGKD_VARIANTS[r["variant"]][0] for r in rows["reaugkd"] if "variant" in r), None)
        lines += [f"**{task}** (test, seeds {', '.join(map(str, seeds))}; reaugkd = {variant}, chosen on validation)"]
        lines += ["", "| method | accuracy | macro-F1 | k, β chosen on validation |", "|---|---|---|---|"]
        for method, found in rows.items():
            if not found:
                continue
            chosen = ", ".join(
                f"{r['knn_k']}/{r['retrieval_weight']:g}"
                if "retrieval_weight" in r
                else f"{r['knn_k']}/β(x) {'served' if r['gate_used'] else 'not served'}"
                for r in found
                if "knn_k" in r
            )
            accuracy = mean_std([r["accuracy"] for r in found])
            lines.append(f"| {method} | {accuracy} | {mean_std([r['macro_f1'] for r in found])} | {chosen} |")
        by_seed = {(r["method"], r["seed"]): r["accuracy"] for r in records if r["task"] == task}
        lines.append("")
        pairs = (
            ("reaugkd", "vanilla_kd"),
            ("reaugkd", "teacher"),
            ("reaugkd", "reaugkd_no_retrieval"),
            ("reaugkd", "reaugkd_student_keys"),
            ("reaugkd_gated", "reaugkd"),
            ("vanilla_kd_student_keys", "vanilla_kd"),
        )
        for a, b in pairs:
            gaps = [by_seed[a, s] - by_seed[b, s] for s in seeds if (a, s) in by_seed and (b, s) in by_seed]
            if gaps:
                lines.append(f"- paired accuracy {a} − {b}: {mean_std(gaps)} points over {len(gaps)} seeds")
        ratios = [by_seed["reaugkd", s] / by_seed["teacher", s] for s in seeds if ("reaugkd", s) in by_seed]
        if ratios:
            lines.append(f"- reaugkd / teacher: {100 * statistics.mean(ratios):.1f}% (mean of the paired ratios)")
        knn = [r for r in records if r["task"] == task and "validation_knn_student_query" in r]
        if knn:
            lines += ["", "| method (validation kNN, β = 1, best k) | student queries | teacher queries, teacher KB |"]
            lines.append("|---|---|---|")
            for method in dict.fromkeys(r["method"] for r in sorted(knn, key=lambda r: METHODS.index(r["method"]))):
                found = [r for r in knn if r["method"] == method]
                student = mean_std([r["validation_knn_student_query"] for r in found])
                lines.append(
                    f"| {method} | {student} | {mean_std([r['validation_knn_teacher_query'] for r in found])} |"
                )
        lines.append("")
    return "\n".join(lines)


def plot_retrieval_grid(details: dict, path: Path) -> None:
    """Validation accuracy of the chosen ReAugKD variant's student against β, one line per k (mean over seeds), one
    panel per task. Optional: without matplotlib the records are kept and the plot is skipped with a warning."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        warnings.warn(f"matplotlib is not installed: {path} is not drawn (pip install matplotlib)", stacklevel=2)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({d["task"] for d in details["runs"] if d["run"] == details["chosen"].get(d["task"])})
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        runs = [d for d in details["runs"] if d["run"] == details["chosen"][task] and d["task"] == task]
        cells: dict[tuple[int, float], list[float]] = {}
        for d in runs:
            for row in d["validation_grid"]:
                cells.setdefault((row["knn_k"], row["retrieval_weight"]), []).append(row["accuracy"])
        for k in sorted({k for k, _ in cells}):
            betas = sorted(b for kk, b in cells if kk == k)
            ax.plot(betas, [100 * statistics.mean(cells[k, b]) for b in betas], marker="o", ms=3, label=f"k={k}")
        teacher = statistics.mean(d["teacher_validation_accuracy"] for d in runs)
        ax.axhline(100 * teacher, color="black", linestyle="--", linewidth=1, label="teacher")
        title = f"{task}, {details['chosen'][task]} (validation, {len(runs)} seeds)"
        ax.set(title=title, xlabel="β (weight of retrieved labels)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(
    finished: list[tuple[str, int, str, dict]], settings: dict[str, Setting], data: dict, output: Path
) -> None:
    records, runs, teachers = [], [], set()
    for task, seed, name, metrics in finished:
        records += records_from(task, seed, name, metrics, with_teacher=(task, seed) not in teachers)
        teachers.add((task, seed))
        runs.append(
            {
                "task": task,
                "seed": seed,
                "run": name,
                "selection": metrics["selection"],
                "validation_grid": metrics["validation_grid"],
                "validation_knn_accuracy": metrics["validation_knn_accuracy"],
                "teacher_validation_accuracy": metrics["splits"]["validation"]["teacher"]["accuracy"],
                **{
                    key: metrics[key]
                    for key in ("selection_student_keys", "validation_grid_student_keys")
                    if key in metrics
                },
            }
        )
    records = with_chosen_variant(records)
    order = {m: i for i, m in enumerate(METHODS)}
    records.sort(key=lambda r: (r["task"], order[r["method"]], r["seed"]))
    write_json(output, records)
    chosen = {task: choose_variant(records, task) for task in dict.fromkeys(r["task"] for r in records)}
    details = {
        "environment": environment(),
        "settings": {task: dataclasses.asdict(task_setting) for task, task_setting in settings.items()},
        "data": data,
        "chosen": chosen,
        "runs": runs,
    }
    write_json(output.with_name(output.stem + "_details.json"), details)
    plot_retrieval_grid(details, output.with_name(output.stem + "_retrieval_grid.png"))


def unlabeled_setting_dir(task: str, data_dir: Path, labeled_rows: int, work_dir: Path) -> Path:
    """A data folder for the unlabelled setting, made once: `train.csv` holds the first `labeled_rows` rows of the
    task's train.csv after the shuffle `--max_train_samples` uses (seed 0), `unlabeled.csv` the other rows' texts
    (labels dropped), and `validation.csv` / `test.csv` link to the task's own files."""
    source = data_dir / "train.csv"
    folder = work_dir / "data" / f"{task}-{hash_files([source])[:16]}-labeled{labeled_rows}"
    if folder.exists():
        return folder
    rows = read_data_file("train", str(source)).shuffle(seed=0)
    if not 0 < labeled_rows < len(rows):
        raise SystemExit(f"--labeled_rows {task}={labeled_rows}: {source} has {len(rows)} rows")
    with atomic_path(folder, directory=True) as tmp:
        _write_csv(tmp / "train.csv", rows.select(range(labeled_rows)), ["text", "label"])
        _write_csv(tmp / "unlabeled.csv", rows.select(range(labeled_rows, len(rows))), ["text"])
        for split in ("validation", "test"):
            (tmp / f"{split}.csv").symlink_to((data_dir / f"{split}.csv").resolve())
    return folder


def _write_csv(path: Path, rows, columns: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(zip(*(rows[column] for column in columns), strict=True))


def parse_task(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--task takes NAME=DIRECTORY, got {value!r}")
    for split in ("train", "validation", "test"):
        if not (Path(path) / f"{split}.csv").is_file():
            raise argparse.ArgumentTypeError(f"--task {value}: {Path(path) / f'{split}.csv'} not found")
    return name, Path(path)


def parse_override(value: str) -> tuple[str, object]:
    key, sep, raw = value.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--overrides takes KEY=VALUE, got {value!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def parse_labeled_rows(value: str) -> tuple[str, int]:
    name, sep, rows = value.partition("=")
    if not sep or not rows.isdigit():
        raise argparse.ArgumentTypeError(f"--labeled_rows takes NAME=ROWS, got {value!r}")
    return name, int(rows)


SETTING_OVERRIDES = (
    "teacher", "student", "student_num_layers", "max_train_samples", "max_seq_length", "teacher_epochs",
    "student_epochs", "learning_rate",
)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", type=parse_task, action="append", required=True, help="NAME=DIRECTORY (repeat)")
    parser.add_argument(
        "--setting",
        choices=["unlabeled", "labeled"],
        default="unlabeled",
        help="unlabeled: a few labelled rows + the rest of train.csv as unlabelled text (the headline); "
        "labeled: train.csv only",
    )
    parser.add_argument(
        "--labeled_rows",
        type=parse_labeled_rows,
        action="append",
        default=[],
        help=f"NAME=ROWS: labelled rows of a task in the unlabeled setting (defaults: {LABELED_ROWS})",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument(
        "--overrides",
        type=parse_override,
        nargs="+",
        default=[],
        help="KEY=VALUE settings of ModelArguments / ReAugKDTrainingArguments for every run (e.g. a setting "
        "chosen with ablations.py); write to another --output",
    )
    parser.add_argument("--work_dir", type=Path, default=Path(__file__).parent / "runs" / "quality")
    parser.add_argument(
        "--output", type=Path, help="Records file. Default: results/quality.json (unlabeled), quality_labeled.json"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--teacher", help="Override the setting's teacher checkpoint.")
    parser.add_argument("--student", help="Override the setting's student checkpoint.")
    parser.add_argument("--student_num_layers", type=int, help="Override the setting's student layers.")
    parser.add_argument("--max_train_samples", type=int, help="Override the setting's training subset (labeled).")
    parser.add_argument("--max_seq_length", type=int, help="Override the setting's sequence length.")
    parser.add_argument(
        "--teacher_epochs", type=float, help="Override the teacher epochs (the setting's and TEACHER_EPOCHS)."
    )
    parser.add_argument("--student_epochs", type=float, help="Override the setting's student epochs.")
    parser.add_argument("--learning_rate", type=float, help="Override the setting's learning rate (all methods).")
    args = parser.parse_args()

    overrides = {key: getattr(args, key) for key in SETTING_OVERRIDES if getattr(args, key) is not None}
    setting = dataclasses.replace(default_setting(args.device), **overrides)
    labeled_rows = {**LABELED_ROWS, **dict(args.labeled_rows)}
    if args.setting == "unlabeled":
        setting = dataclasses.replace(setting, max_train_samples=None)  # the labelled rows are a file of their own
        missing = [task for task, _ in args.task if task not in labeled_rows]
        if missing:
            parser.error(f"--setting unlabeled needs --labeled_rows for {missing}")
    output = args.output or RESULTS_DIR / ("quality.json" if args.setting == "unlabeled" else "quality_labeled.json")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.info("Setting: %s, %s", args.setting, setting)

    # task -> (run folder name, labelled data folder, unlabelled file)
    data = {}
    for task, data_dir in args.task:
        if args.setting == "labeled":
            data[task] = (task, data_dir, None)
        else:
            folder = unlabeled_setting_dir(task, data_dir, labeled_rows[task], args.work_dir)
            data[task] = (f"{task}+labeled{labeled_rows[task]}", folder, folder / "unlabeled.csv")
    # TEACHER_EPOCHS hold for the teacher, length and labelled rows they were chosen for; --teacher_epochs overrides
    settings = {task: setting for task, _ in args.task}
    budget_setting = default_setting("cpu")
    if (
        args.setting == "unlabeled"
        and args.teacher_epochs is None
        and (setting.teacher, setting.max_seq_length) == (budget_setting.teacher, budget_setting.max_seq_length)
    ):
        for task in settings.keys() & TEACHER_EPOCHS.keys():
            if labeled_rows[task] == LABELED_ROWS.get(task):
                settings[task] = dataclasses.replace(setting, teacher_epochs=TEACHER_EPOCHS[task])
    logger.info("Teacher epochs: %s", {task: task_setting.teacher_epochs for task, task_setting in settings.items()})
    described = {
        task: {"run_folder": key, "labeled_rows": labeled_rows[task] if unlabeled else None}
        for task, (key, _, unlabeled) in data.items()
    }
    finished = []
    for seed in args.seeds:  # seed-major: an interrupted benchmark has whole seeds for every task
        for task, _ in args.task:
            key, data_dir, unlabeled_file = data[task]
            for name in args.runs:
                metrics = train_run(
                    key,
                    data_dir,
                    seed,
                    name,
                    settings[task],
                    args.work_dir,
                    dict(args.overrides),
                    unlabeled_file=unlabeled_file if name != "no_kd" else None,  # CE only: it cannot use them
                    student_keys=name in STUDENT_KEYED_RUNS,
                )
                finished.append((task, seed, name, metrics))
                write_results(finished, settings, {"setting": args.setting, "tasks": described}, output)
    print(summarize(json.loads(output.read_text())))


if __name__ == "__main__":
    main()
