"""Quality benchmark: ReAugKD against its baselines, same student init and budget, several seeds.

    python benchmarks/quality.py --task rotten_tomatoes=PATH/rotten_tomatoes --task bbc_news=PATH/bbc_news

Each task directory holds train.csv, validation.csv and test.csv with `text,label` columns. Per task and seed,
one teacher and one knowledge base are shared by three student trainings (the methods differ only in the loss):

    run          loss weights (KD, relational, CE)   methods read from it
    reaugkd      (1, 1, 0)                           reaugkd_no_retrieval (β=0), reaugkd (k, β from validation)
    vanilla_kd   (1, 0, 0)                           vanilla_kd (β=0), vanilla_kd_retrieval (k, β from validation)
    no_kd        (0, 0, 1)                           student_no_kd
    (any run)                                        teacher

Every run goes through `hf_reaugkd.distill.run`, the pipeline users run. Finished runs are kept under --work_dir
and skipped, so an interrupted benchmark resumes where it stopped. Results: `results/quality.json` (a list of
`{"task", "method", "seed", "accuracy", "macro_f1", ...}` records on test), `results/quality_details.json`
(environment, setting, validation grids) and `results/quality_retrieval_grid.png` (validation accuracy against β).
"""

import argparse
import dataclasses
import json
import logging
import statistics
from pathlib import Path

import torch
from common import RESULTS_DIR, environment, write_json

from hf_reaugkd import assets
from hf_reaugkd.arguments import DataTrainingArguments, ModelArguments, TeacherArguments
from hf_reaugkd.caching import fingerprint
from hf_reaugkd.distill import run
from hf_reaugkd.training_args import ReAugKDTrainingArguments

logger = logging.getLogger("quality")

METHODS = ("teacher", "student_no_kd", "vanilla_kd", "reaugkd_no_retrieval", "reaugkd", "vanilla_kd_retrieval")
# run name -> (loss weights, {method: model key in the run's metrics})
RUNS = {
    "reaugkd": (
        {"distillation_weight": 1.0, "relational_weight": 1.0, "ce_weight": 0.0},
        {"teacher": "teacher", "reaugkd_no_retrieval": "student", "reaugkd": "student_retrieval"},
    ),
    "vanilla_kd": (
        {"distillation_weight": 1.0, "relational_weight": 0.0, "ce_weight": 0.0},
        {"vanilla_kd": "student", "vanilla_kd_retrieval": "student_retrieval"},
    ),
    "no_kd": ({"distillation_weight": 0.0, "relational_weight": 0.0, "ce_weight": 1.0}, {"student_no_kd": "student"}),
}


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
    task: str, data_dir: Path, seed: int, name: str, setting: Setting, work_dir: Path, overrides: dict | None = None
) -> dict:
    """One student training through the user-facing pipeline; returns its metrics (cached in metrics.json).

    `overrides` sets other `ModelArguments` / `TeacherArguments` / `ReAugKDTrainingArguments` fields (ablations); the teacher and, when
    its inputs are unchanged, the knowledge base are shared with the plain run."""
    overrides = overrides or {}
    suffix = "".join(f"+{key}={value}" for key, value in sorted(overrides.items()))
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


def records_from(task: str, seed: int, name: str, metrics: dict) -> list[dict]:
    """The test-set records of the methods a run yields."""
    _, methods = RUNS[name]
    records = []
    for method, key in methods.items():
        test = metrics["splits"]["test"][key]
        record = {"task": task, "method": method, "seed": seed, **test}
        record["validation_accuracy"] = metrics["splits"]["validation"][key]["accuracy"]
        if key == "student_retrieval":
            record.update(
                knn_k=metrics["selection"]["knn_k"], retrieval_weight=metrics["selection"]["retrieval_weight"]
            )
        records.append(record)
    return records


def summarize(records: list[dict]) -> str:
    """Markdown tables: test accuracy and macro-F1 (mean ± std over seeds) per task, and the paired gaps."""

    def mean_std(values: list[float]) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"

    lines = []
    for task in dict.fromkeys(r["task"] for r in records):
        rows = {m: [r for r in records if r["task"] == task and r["method"] == m] for m in METHODS}
        seeds = sorted({r["seed"] for r in records if r["task"] == task})
        lines += [f"**{task}** (test, seeds {', '.join(map(str, seeds))})", ""]
        lines += ["| method | accuracy | macro-F1 | k, β chosen on validation |", "|---|---|---|---|"]
        for method, found in rows.items():
            if not found:
                continue
            chosen = ", ".join(f"{r['knn_k']}/{r['retrieval_weight']:g}" for r in found if "knn_k" in r)
            accuracy = mean_std([r["accuracy"] for r in found])
            lines.append(f"| {method} | {accuracy} | {mean_std([r['macro_f1'] for r in found])} | {chosen} |")
        by_seed = {(r["method"], r["seed"]): r["accuracy"] for r in records if r["task"] == task}
        lines.append("")
        for a, b in (("reaugkd", "vanilla_kd"), ("reaugkd", "teacher"), ("reaugkd", "reaugkd_no_retrieval")):
            gaps = [by_seed[a, s] - by_seed[b, s] for s in seeds if (a, s) in by_seed and (b, s) in by_seed]
            if gaps:
                lines.append(f"- paired accuracy {a} − {b}: {mean_std(gaps)} points over {len(gaps)} seeds")
        lines.append("")
    return "\n".join(lines)


def plot_retrieval_grid(details: dict, path: Path) -> None:
    """Validation accuracy of the ReAugKD student against β, one line per k (mean over seeds), one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({d["task"] for d in details["runs"] if d["run"] == "reaugkd"})
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        runs = [d for d in details["runs"] if d["run"] == "reaugkd" and d["task"] == task]
        cells: dict[tuple[int, float], list[float]] = {}
        for d in runs:
            for row in d["validation_grid"]:
                cells.setdefault((row["knn_k"], row["retrieval_weight"]), []).append(row["accuracy"])
        for k in sorted({k for k, _ in cells}):
            betas = sorted(b for kk, b in cells if kk == k)
            ax.plot(betas, [100 * statistics.mean(cells[k, b]) for b in betas], marker="o", ms=3, label=f"k={k}")
        teacher = statistics.mean(d["teacher_validation_accuracy"] for d in runs)
        ax.axhline(100 * teacher, color="black", linestyle="--", linewidth=1, label="teacher")
        ax.set(title=f"{task} (validation, {len(runs)} seeds)", xlabel="β (weight of retrieved labels)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(finished: list[tuple[str, int, str, dict]], setting: Setting, output: Path) -> None:
    records, runs = [], []
    for task, seed, name, metrics in finished:
        records += records_from(task, seed, name, metrics)
        runs.append(
            {
                "task": task,
                "seed": seed,
                "run": name,
                "selection": metrics["selection"],
                "validation_grid": metrics["validation_grid"],
                "validation_knn_accuracy": metrics["validation_knn_accuracy"],
                "teacher_validation_accuracy": metrics["splits"]["validation"]["teacher"]["accuracy"],
            }
        )
    order = {m: i for i, m in enumerate(METHODS)}
    records.sort(key=lambda r: (r["task"], order[r["method"]], r["seed"]))
    write_json(output, records)
    details = {"environment": environment(), "setting": dataclasses.asdict(setting), "runs": runs}
    write_json(output.with_name(output.stem + "_details.json"), details)
    plot_retrieval_grid(details, output.with_name(output.stem + "_retrieval_grid.png"))


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", type=parse_task, action="append", required=True, help="NAME=DIRECTORY (repeat)")
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
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "quality.json")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max_train_samples", type=int, help="Override the setting's training subset.")
    parser.add_argument("--max_seq_length", type=int, help="Override the setting's sequence length.")
    parser.add_argument("--teacher_epochs", type=float, help="Override the setting's teacher epochs.")
    parser.add_argument("--student_epochs", type=float, help="Override the setting's student epochs.")
    args = parser.parse_args()

    overrides = {
        key: getattr(args, key)
        for key in ("max_train_samples", "max_seq_length", "teacher_epochs", "student_epochs")
        if getattr(args, key) is not None
    }
    setting = dataclasses.replace(default_setting(args.device), **overrides)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.info("Setting: %s", setting)
    finished = []
    for seed in args.seeds:  # seed-major: an interrupted benchmark has whole seeds for every task
        for task, data_dir in args.task:
            for name in args.runs:
                metrics = train_run(task, data_dir, seed, name, setting, args.work_dir, dict(args.overrides))
                finished.append((task, seed, name, metrics))
                write_results(finished, setting, args.output)
    print(summarize(json.loads(args.output.read_text())))


if __name__ == "__main__":
    main()
