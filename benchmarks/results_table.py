"""The README's results table, generated from the current records in `benchmarks/results/`.

    python benchmarks/results_table.py           # print the table
    python benchmarks/results_table.py --write   # replace it in README.md, between the two markers

One row per goal: the setting and the record it comes from, the figures measured, the goal and a verdict. Every
figure is read from the JSON records, so the README cannot claim more than they hold, and
`tests/test_results_table.py` fails when README.md and this script disagree. Verdicts follow four rules, applied to
each figure (`verdict`):

- **met** / **missed**: the whole paired spread lies on one side of the goal. The spread is mean ± standard
  deviation of the per-seed paired differences (or ratios) for quality, and the min–max range of the per-round
  paired ratios for timings; a figure with no spread (a count over every test row, a recall) is compared as it is.
- **within noise**: the spread straddles the goal, so the record cannot tell met from missed; the verdict says on
  which side the mean (or the median of the rounds) falls, which is not evidence either way.
- **not measured**: there is no current record (the all-labelled setting's was retired); or the record is not an
  end-to-end measurement of what the goal names (search timed alone, not inside a forward); or it has no spread
  (one seed).

A row with several figures lists each verdict with the figures it holds for. It imports no torch (the package's
`caching` only, for the atomic write): it runs in a fraction of a second.
"""

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hf_reaugkd.caching import atomic_path

RESULTS_DIR = Path(__file__).parent / "results"
README = Path(__file__).parents[1] / "README.md"
START, END = "<!-- results-table:start -->", "<!-- results-table:end -->"
SECTION = "benchmarks/README.md#"  # the README links each setting to the benchmarks README's section
DEFAULT_HNSW_ROW = "hnsw ef=128"  # kb_scaling's row for the package's default `hnsw_ef_search`
FP32_TOLERANCE = 1e-5  # fp32 ONNX "identical" to PyTorch: probabilities equal up to float32 rounding
# quality goals, `reaugkd` against another method on test accuracy: (goal, other method, as a ratio, threshold)
LABELED_GOALS = (
    ("all-labelled: `reaugkd` ≥ `vanilla_kd` + 0.5 point", "vanilla_kd", False, 0.5),
    ("all-labelled: `reaugkd` ≥ 100% of `teacher`", "teacher", True, 100.0),
)
HEADLINE_GOALS = (
    ("headline: `reaugkd` − `vanilla_kd` ≥ +1.0 point (test accuracy)", "vanilla_kd", False, 1.0),
    (
        "headline: `reaugkd` ≥ 99% (rotten_tomatoes) / 100% (bbc_news) of `teacher`",
        "teacher",
        True,
        {"rotten_tomatoes": 99.0, "bbc_news": 100.0},
    ),
    (
        "headline: retrieval adds ≥ +0.5 point over the same student (`reaugkd` − `reaugkd_no_retrieval`)",
        "reaugkd_no_retrieval",
        False,
        0.5,
    ),
)


@dataclass(frozen=True)
class Check:
    """One figure against one threshold. `low`..`high` is its paired spread (equal when it has none);
    `not_measured` says why the figure cannot decide the goal (empty when it can)."""

    label: str
    figure: str
    low: float
    high: float
    threshold: float
    at_least: bool
    not_measured: str = ""
    center: float | None = None  # the mean (or median) inside the spread


@dataclass(frozen=True)
class Row:
    """One goal: where its figures come from, the checks that decide it, and context that decides nothing."""

    setting: str
    goal: str
    checks: tuple[Check, ...] = ()
    context: str = ""
    not_measured: str = ""


def verdict(check: Check) -> str:
    """The module docstring's rules for one figure."""
    if check.not_measured:
        return f"not measured {check.not_measured}"

    def meets(value: float) -> bool:
        return value >= check.threshold if check.at_least else value <= check.threshold

    if meets(check.low) and meets(check.high):
        return "met"
    if not meets(check.low) and not meets(check.high):
        return "missed"
    return "within noise (mean misses it)" if not meets(check.center) else "within noise (mean meets it)"


def row_verdict(row: Row) -> str:
    """One verdict when every figure has the same; otherwise each verdict and the figures it holds for."""
    if row.not_measured or not row.checks:
        return f"not measured: {row.not_measured}"
    groups: dict[str, list[str]] = {}
    for check in row.checks:
        groups.setdefault(verdict(check), []).append(check.label)
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{name}: {', '.join(labels)}" for name, labels in groups.items())


# --- figures --------------------------------------------------------------------------------------------------


def signed(value: float, digits: int) -> str:
    return f"{value:+.{digits}f}".replace("-", "−")


def percent(value: float) -> str:
    return f"{signed(100 * value, 1)}%"


def times(value: float) -> str:
    return f"{value:.2f}×"


def seeds_check(label: str, values: list[float], threshold: float, ratio: bool = False) -> Check:
    """Per-seed paired differences in accuracy (fractions; shown in points) or ratios (shown in %), against an
    at-least goal: mean ± standard deviation over the seeds."""
    values = [100 * v for v in values]
    if len(values) < 2:
        return Check(label, f"{label}: {len(values)} seed", 0, 0, threshold, True, "(one seed: no spread)")
    mean, std = statistics.mean(values), statistics.stdev(values)
    shown = f"{mean:.1f}% ± {std:.1f}" if ratio else f"{signed(mean, 2)} ± {std:.2f}"
    return Check(label, f"{label} {shown}", mean - std, mean + std, threshold, at_least=True, center=mean)


def rounds_check(
    label: str, median: float, spread: list[float], threshold: float, at_least: bool, fmt: Callable[[float], str]
) -> Check:
    """A per-round paired ratio: its median over the rounds and their min–max range."""
    low, high = spread
    figure = f"{label} {fmt(median)} ({fmt(low)} to {fmt(high)})"
    return Check(label, figure, low, high, threshold, at_least, center=median)


def exact(label: str, figure: str, value: float, threshold: float, at_least: bool, not_measured: str = "") -> Check:
    """A figure with no spread (a count over every test row, a recall): compared as it is."""
    return Check(label, figure, value, value, threshold, at_least, not_measured)


# --- records ----------------------------------------------------------------------------------------------------


def load(name: str, results_dir: Path) -> dict | list | None:
    path = results_dir / name
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def source(name: str, record: dict) -> str:
    return f"`{name}`, {record['environment']['date'][:10]}"


def paired(records: list[dict], task: str, a: str, b: str, ratio: bool = False) -> list[float]:
    """Per seed, test accuracy of method `a` − `b` (or `a` / `b`), over the seeds both have."""
    accuracy = {(r["method"], r["seed"]): r["accuracy"] for r in records if r["task"] == task}
    seeds = sorted(seed for method, seed in accuracy if method == a and (b, seed) in accuracy)
    return [accuracy[a, s] / accuracy[b, s] if ratio else accuracy[a, s] - accuracy[b, s] for s in seeds]


def model_name(path: str) -> str:
    return "mpnet-base" if "mpnet" in path.lower() else "MiniLM-L6" if "minilm-l6" in path.lower() else Path(path).name


def quality_setting(title: str, name: str, records: list[dict], details: dict) -> str:
    """Which quality run: labelled rows, teacher → student, seeds, the ReAugKD variant validation chose."""
    tasks = list(dict.fromkeys(r["task"] for r in records))
    settings = details.get("settings") or dict.fromkeys(tasks, details["setting"])
    labeled = details.get("data", {}).get("tasks", {})
    if labeled:
        rows = " / ".join(f"{labeled[t]['labeled_rows']:,}" for t in tasks) + " labelled rows + the rest unlabelled"
    else:
        rows = "all rows labelled"
    epochs = " / ".join(f"{settings[t]['teacher_epochs']:g}" for t in tasks)
    first = settings[tasks[0]]
    variants = sorted({r["variant"] for r in records if r["method"] == "reaugkd" and "variant" in r})
    text = (
        f"[Quality]({SECTION}quality-reaugkd-against-its-baselines), {title}: {' / '.join(tasks)}, {rows}; "
        f"{model_name(first['teacher'])} teacher ({epochs} epochs) → {first['student_num_layers']} "
        f"{model_name(first['student'])} layers; {len({r['seed'] for r in records})} seeds"
    )
    if variants:
        text += f"; `reaugkd` = {', '.join(variants)} (chosen on validation)"
    return f"{text} ({source(name, details)})"


def paired_rows(setting: str, records: list[dict], goals: tuple) -> list[Row]:
    """One row per goal `(text, b, ratio, threshold)`: `reaugkd` against method `b` on every task, paired by seed;
    `threshold` is one number or one per task."""
    tasks = list(dict.fromkeys(r["task"] for r in records))
    rows = []
    for text, b, ratio, threshold in goals:
        at = threshold if isinstance(threshold, dict) else dict.fromkeys(tasks, threshold)
        checks = tuple(seeds_check(t, paired(records, t, "reaugkd", b, ratio), at[t], ratio) for t in tasks)
        rows.append(Row(setting, text, checks))
    return rows


def quality_rows(results_dir: Path) -> list[Row]:
    """All-labelled, headline and stronger-teacher goals: test accuracy, paired over seeds."""
    labeled = load("quality_labeled.json", results_dir)
    if labeled is None:
        setting = f"[Quality]({SECTION}all-labelled-setting), all-labelled setting"
        why = (
            "no run with the current defaults (the last record, with kb_dim 384, a fixed β and the 2-epoch teacher, "
            "left `results/`: git history keeps it)"
        )
        rows = [Row(setting, goal[0], not_measured=why) for goal in LABELED_GOALS]
    else:
        details = load("quality_labeled_details.json", results_dir)
        rows = paired_rows(
            quality_setting("all-labelled", "quality_labeled.json", labeled, details), labeled, LABELED_GOALS
        )

    headline = load("quality.json", results_dir)
    setting = quality_setting("headline", "quality.json", headline, load("quality_details.json", results_dir))
    rows += paired_rows(setting, headline, HEADLINE_GOALS)

    mpnet = load("quality_mpnet.json", results_dir)
    task = mpnet[0]["task"]
    checks = (
        seeds_check("− vanilla_kd", paired(mpnet, task, "reaugkd", "vanilla_kd"), 1.0),
        seeds_check("/ teacher", paired(mpnet, task, "reaugkd", "teacher", True), 99.0, True),
        seeds_check("retrieval", paired(mpnet, task, "reaugkd", "reaugkd_no_retrieval"), 0.5),
    )
    details = load("quality_mpnet_details.json", results_dir)
    setting = quality_setting("stronger teacher", "quality_mpnet.json", mpnet, details)
    goal = "stronger teacher: the headline's three goals (+1.0 over `vanilla_kd`, ≥ 99% of `teacher`, retrieval +0.5)"
    return [*rows, Row(setting, goal, checks)]


def inference_rows(results_dir: Path) -> list[Row]:
    """Retrieval overhead inside the student's forward (paired per round), and at 1M keys (search alone)."""
    report = load("inference_demo_student.json", results_dir)
    name, student = next(iter(report["setting"]["students"].items()))
    results = {(r["model"], r["batch_size"]): r for r in report["results"]}
    setting = (
        f"[Inference]({SECTION}inference-what-retrieval-costs): the demo student (kb_dim {student['kb_dim']}, "
        f"k {student['knn_k']}), `{report['default_search']}` search, KB = the training set keyed by its queries "
        f"({student['timing_kb_size']:,} keys), {report['setting']['rounds']} rounds "
        f"({source('inference_demo_student.json', report)})"
    )
    rows = []
    goals = (
        "retrieval overhead ≤ 1% at batch 32, KB = training set, defaults",
        "retrieval overhead ≤ 10% at batch 1, KB = training set, defaults",
    )
    for goal, batch_size, threshold in zip(goals, (32, 1), (0.01, 0.10), strict=True):
        r = results[f"{name} +retrieval[{report['default_search']}]", batch_size]
        check = rounds_check("paired", r["overhead"], r["overhead_range"], threshold, False, percent)
        context = f"the `retrieve` step alone, not paired: {100 * r['retrieve_share_in_forward']:.2f}% of the forward"
        rows.append(Row(setting, goal, (check,), context))

    scaling = load("kb_scaling.json", results_dir)
    largest = max(scaling["sizes"], key=lambda entry: entry["size"])
    hnsw = largest["rows"][DEFAULT_HNSW_ROW]
    alone = {b: hnsw[f"overhead_vs_student_batch{b}"] for b in (32, 1)}  # search ms / the student's forward ms
    checks = tuple(
        exact(
            f"batch {b}",
            f"search alone, batch {b}: {100 * share:.1f}% of the student's forward",
            share,
            0.10,
            at_least=False,
            not_measured="end to end (search timed alone)",
        )
        for b, share in alone.items()
    )
    checks += (exact("recall@16", f"recall@16 {hnsw['recall_at_16']:.3f}", hnsw["recall_at_16"], 0.95, True),)
    inside = [
        results[f"{name} +retrieval[hnsw]", b]["retrieve_ms_in_forward"]
        / results[f"{name} search[hnsw]", b]["ms_per_batch"]
        for b in (32, 1)
    ]
    context = (
        f"inside a forward ({student['timing_kb_size']:,} keys), HNSW's `retrieve` step took {inside[0]:.1f}× "
        f"(batch 32) and {inside[1]:.1f}× (batch 1) its search-alone time"
    )
    setting = (
        f"[Knowledge-base scaling]({SECTION}knowledge-base-scaling): HNSW efSearch "
        f"{hnsw['search_params']['hnsw_ef_search']}, {largest['size']:,} keys, d = {largest['dim']}, search timed "
        f"alone ({source('kb_scaling.json', scaling)}; `inference_demo_student.json`)"
    )
    return [*rows, Row(setting, "≤ 10% overhead at 1M keys with recall@16 ≥ 0.95", checks, context)]


def deploy_rows(results_dir: Path) -> list[Row]:
    """ONNX Runtime against PyTorch and the teachers: paired per-round speed-ups and knowledge-base shares, parity."""
    report = load("deploy.json", results_dir)
    task = report["setting"]["data"]
    setting = (
        f"[Deployment]({SECTION}deployment-onnx-runtime-against-pytorch): the demo student ({task}, KB "
        f"{report['parity'][task]['kb_size']:,} rows), {report['setting']['threads']} threads, "
        f"{report['setting']['rounds']} rounds; figures per batch × length ({source('deploy.json', report)})"
    )
    timing = {(r["runtime"], r["batch_size"], r["max_length"]): r for r in report["timing"]}
    shapes = sorted({(b, t) for _, b, t in timing}, key=lambda shape: (-shape[0], shape[1]))  # 32×64 first

    def timed(runtime: str, key: str, label: str, goal: dict[int, float], fmt: Callable[[float], str]) -> list[Check]:
        """`key` of `runtime` at every batch × length against `goal[batch size]` (speed-ups at least, shares at
        most)."""
        checks = []
        for b, t in shapes:
            r = timing[runtime, b, t]
            at_least = key.startswith("speedup")
            checks.append(rounds_check(f"{label}{b}×{t}", r[key], r[f"{key}_range"], goal[b], at_least, fmt))
        return checks

    def profiled(kb: str) -> str:
        found = [v for k, v in report["profiled_retrieval_share"].items() if k.startswith(f"{kb} ONNX")]
        return f"ONNX Runtime's profiler (kernel time, not paired): {100 * min(found):.2f}–{100 * max(found):.2f}%"

    int8 = "student+KB ONNX int8"
    pays = []
    if (int8, 32, 128) in timing and "speedup_vs_ONNX_int8" in timing[int8, 32, 128]:
        pays = timed(int8, "speedup_vs_ONNX_int8", "", {32: 3.0, 1: 3.0}, times)
        teacher = report["parity"][task]["teacher"]["PyTorch accuracy"]
        kept = 100 * report["parity"][task]["student+KB"]["ONNX int8 accuracy"] / teacher
        pays.append(exact("accuracy kept", f"{kept:.1f}% of the teacher's test accuracy", kept, 97.0, True))
    speedups = timed(int8, "speedup_vs_MiniLM-L6", "MiniLM-L6 ", {32: 4.0, 1: 3.0}, times)
    speedups += timed(int8, "speedup_vs_mpnet-base", "mpnet-base ", {32: 12.0, 1: 8.0}, times)
    fp32 = timed("student+KB ONNX fp32", "speedup_vs_pytorch_student_kb", "", {32: 1.3, 1: 1.3}, times)
    shares, million = [], []
    for precision in ("fp32", "int8"):
        key, label = "knowledge_base_share", f"{precision} "
        shares += timed(f"student+KB ONNX {precision}", key, label, {32: 0.03, 1: 0.03}, percent)
        million += timed(f"student+1M KB ONNX {precision}", key, label, {32: 0.10, 1: 0.10}, percent)
    recall = report["million_keys_recall_at_16"]
    own = recall["int8_scan_vs_exact_for_its_query"]
    million.append(exact("recall@16", f"recall@16 {own:.3f}", own, 0.95, at_least=True))
    million_context = (
        f"paired, 1 − t(one-entry KB) / t(KB); {profiled('student+1M KB')}; recall@16 of the int8 scan against the "
        f"exact neighbours of its own query ({recall['int8_graph_vs_fp32_student_exact']:.3f} against the fp32 "
        "student's, the int8 encoder's drift included)"
    )
    int8_gap, same = parity_checks(report["parity"])
    others = ", ".join(
        f"{name}: its own student, KB {entry['kb_size']:,} rows"
        for name, entry in report["parity"].items()
        if name != task
    )
    pays_rows = [
        Row(
            setting,
            "ONNX int8 student + KB ≥ 3× the throughput of the teacher itself in ONNX int8, keeping ≥ 97% of its test "
            "accuracy (the demo's pair)",
            tuple(pays),
            "paired per round; the teacher quantized as optimum does (dynamic int8, per-channel weights)",
        )
    ]
    return (pays_rows if pays else []) + [
        Row(
            setting,
            "ONNX int8 student + KB ≥ 4× / 12× the MiniLM-L6 / mpnet-base teacher's PyTorch throughput at batch 32, "
            "≥ 3× / 8× at batch 1",
            tuple(speedups),
            "paired per round",
        ),
        Row(setting, "ONNX fp32 student + KB ≥ 1.3× the PyTorch student + KB", tuple(fp32), "paired per round"),
        Row(
            setting,
            "retrieval inside the ONNX graph ≤ 3% of its time, KB = training set",
            tuple(shares),
            f"paired, 1 − t(one-entry KB) / t(KB); {profiled('student+KB')}",
        ),
        Row(
            setting,
            "retrieval inside the ONNX graph ≤ 10% of its time at 1M keys with recall@16 ≥ 0.95",
            tuple(million),
            million_context,
        ),
        Row(
            setting,
            "ONNX int8 within 0.5 point of fp32 (test accuracy)",
            int8_gap,
            f"one run over every test row; {others}",
        ),
        Row(
            setting,
            "ONNX fp32 identical to PyTorch: every label, the neighbour ids, probabilities to fp32 rounding",
            same,
            f"student alone and with its KB, every test row; {others}",
        ),
    ]


def parity_checks(parity: dict) -> tuple[tuple[Check, ...], tuple[Check, ...]]:
    """Per task: int8 − fp32 test accuracy (student alone and with its KB), and fp32 against PyTorch on every row."""
    int8, same = [], []
    for name, entry in parity.items():
        for runtime in ("student", "student+KB"):
            gap = 100 * (entry[runtime]["ONNX int8 accuracy"] - entry[runtime]["ONNX fp32 accuracy"])
            int8.append(exact(f"{name} {runtime}", f"{name} {runtime} {signed(gap, 2)}", abs(gap), 0.5, False))
        found = [entry[runtime]["ONNX fp32 vs PyTorch"] for runtime in ("student", "student+KB")]
        agree, total = sum(p["same_label_rows"] for p in found), sum(p["rows"] for p in found)
        delta = max(p["max_abs_probability_difference"] for p in found)
        overlap = min(p["neighbour_overlap"] for p in found)
        in_order = sum(p["same_neighbour_ids_rows"] for p in found)
        same += [
            exact(f"{name} labels", f"{name}: labels {agree}/{total}", agree / total, 1.0, True),
            exact(f"{name} max \\|Δp\\|", f"max \\|Δp\\| {delta:.1e}", delta, FP32_TOLERANCE, False),
            exact(
                f"{name} neighbours",
                f"neighbour ids {overlap:.3f} (same order in {in_order}/{total} rows)",
                overlap,
                1.0,
                True,
            ),
        ]
    return tuple(int8), tuple(same)


def training_rows(results_dir: Path) -> list[Row]:
    """Seconds per training step, ReAugKD over vanilla KD, paired by round (the rounds alternate the methods)."""
    report = load("training_cost.json", results_dir)
    runs, setting = report["runs"], report["setting"]
    ratios = [
        r["seconds_per_step"] / v["seconds_per_step"] for r, v in zip(runs["reaugkd"], runs["vanilla_kd"], strict=True)
    ]
    check = rounds_check("per round", statistics.median(ratios), [min(ratios), max(ratios)], 1.2, False, times)
    text = (
        f"[Training cost]({SECTION}training-cost): batch {setting['batch_size']}, length {setting['max_seq_length']}, "
        f"{setting['steps']} timed steps per fresh process, {setting['rounds']} rounds; ReAugKD = the relational "
        f"loss ({source('training_cost.json', report)})"
    )
    return [Row(text, "ReAugKD training step ≤ 1.2 × vanilla KD", (check,), "ReAugKD / vanilla KD seconds per step")]


def drift_rows(results_dir: Path) -> list[Row]:
    """The knowledge base as a deployment memory (`drift.py`): `kb add` with gold labels against distilling again and
    fine-tuning, paired by the seed that drew the new rows, at the shift's goal size (100 rows, or its whole pool)."""
    report = load("drift.json", results_dir)
    if report is None:
        return []
    cells = {(c["shift"], c["fix"], c["n_rows"], c["seed"]): c for c in report["cells"]}
    shifts = sorted(report["goals"].keys() & report["setting"].keys())
    at = {name: report["goals"][name]["n_rows"] for name in shifts}
    seeds = sorted({seed for name, fix, n, seed in cells if fix == "kb_gold" and n == at.get(name)})
    none = {name: cells[name, "none", 0, 0] for name in shifts}

    def change(name: str, fix: str, n: int, seed: int, metric: str) -> float:
        return cells[name, fix, n, seed][metric] - none[name][metric]

    redistill_seeds = sorted({seed for name, fix, n, seed in cells if fix == "redistill" and n == at[name]})
    redistill_gain = statistics.mean(
        statistics.mean(change(name, "redistill", at[name], s, "new_domain_test") for s in redistill_seeds)
        for name in shifts
    )
    shares = [
        statistics.mean(change(name, "kb_gold", at[name], seed, "new_domain_test") for name in shifts) / redistill_gain
        for seed in seeds
    ]
    sizes = " / ".join(f"{name} {at[name]}" for name in shifts)
    setting = (
        f"[Drift]({SECTION}drift-the-knowledge-base-against-fine-tuning-and-distilling-again): a deployed 3-layer "
        f"MiniLM-L6 student meets {len(shifts)} shifted domains; new labelled rows {sizes}; {len(seeds)} row samples, "
        f"distilling again {len(redistill_seeds)} seed{'s' if len(redistill_seeds) > 1 else ''} "
        f"({source('drift.json', report)})"
    )
    memory_fixes = ("kb_gold", "kb_gold_mixed")
    forgetting = tuple(
        seeds_check(f"{name} `{fix}`", [change(name, fix, at[name], s, "original_test") for s in seeds], -0.2)
        for name in shifts
        for fix in memory_fixes
    )
    memory_cells = {
        (name, fix): [cells[name, fix, at[name], s] for s in seeds] for name in shifts for fix in memory_fixes
    }
    forgetting += tuple(  # the rows' own effect: the same k and β as with them, on the student without them
        seeds_check(f"{name} `{fix}` rows alone", [c["original_test"] - c["original_test_without_rows"] for c in found],
                    -0.2)
        for (name, fix), found in memory_cells.items()
        if all("original_test_without_rows" in c for c in found)
    )  # fmt: skip
    tuned = ", ".join(
        f"{name} {signed(100 * report['goals'][name]['finetune_original_test_change'], 1)}" for name in shifts
    )
    timing = []
    for name in shifts:  # the seed draws the rows: `kb add` and distilling again of the same rows, paired by it
        pairs = [
            (cells[name, "kb_gold", at[name], s], cells[name, "redistill", at[name], s])
            for s in redistill_seeds
            if s in seeds
        ]
        time_shares = [100 * memory["seconds"] / redo["seconds"] for memory, redo in pairs]
        spread = [min(time_shares), max(time_shares)]
        timing.append(rounds_check(name, statistics.median(time_shares), spread, 1.0, False, lambda v: f"{v:.2f}%"))
    small = tuple(
        seeds_check(name, [cells[name, "kb_gold", 25, s]["new_domain_test"] - cells[name, "finetune", 25, s][
            "new_domain_test"] for s in seeds], 0.001)
        for name in shifts
    )  # fmt: skip
    return [
        Row(setting, "`kb add` (gold) recovers ≥ 90% of distilling again's new-domain gain, mean over shifts",
            (seeds_check("mean over shifts", shares, 90.0, ratio=True),),
            f"distilling again gains {signed(100 * redistill_gain, 2)} points on average"),
        Row(setting, "`kb add` (gold) loses ≤ 0.2 point on the original test split", forgetting,
            f"fine-tuning's change: {tuned}; `kb_gold_mixed` chooses k, β on new + original validation rows; "
            "rows alone: the fixed student against itself without the new rows at the k and β it chose"),
        Row(setting, "`kb add` (gold) takes ≤ 1% of distilling again's wall time", tuple(timing),
            "`kb add` seconds / distilling again's seconds on the same rows, median and range over the row samples"),
        Row(setting, "with 25 rows, `kb add` (gold) beats fine-tuning on the new domain (> 0 point)", small,
            "new-domain test accuracy, `kb_gold` − `finetune`, paired by row sample"),
    ]  # fmt: skip


def table(results_dir: Path = RESULTS_DIR) -> str:
    """The Markdown table README.md holds between `START` and `END`."""
    lines = ["| setting | figure | goal | verdict |", "|---|---|---|---|"]
    for builder in (quality_rows, inference_rows, deploy_rows, training_rows, drift_rows):
        for row in builder(results_dir):
            figure = "; ".join(check.figure for check in row.checks) or "no current record"
            figure += f" — {row.context}" if row.context else ""
            lines.append(f"| {row.setting} | {figure} | {row.goal} | {row_verdict(row)} |")
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """`text` with what lies between the markers replaced by `block`; an error unless each marker is there once."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"README.md needs one {START} followed by one {END}")
    head, rest = text.split(START)
    return f"{head}{START}\n{block}\n{END}{rest.split(END)[1]}"


def readme_block(text: str) -> str:
    """What `text` holds between the markers (what `replace_block` put there)."""
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"Replace the table in {README}")
    parser.add_argument("--results_dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    block = table(args.results_dir)
    if not args.write:
        return print(block)
    text = replace_block(README.read_text(encoding="utf-8"), block)
    with atomic_path(README) as tmp:  # the package's one atomic write: a reader sees the old README or the new one
        tmp.write_text(text, encoding="utf-8")
    print(f"Wrote the results table to {README}", file=sys.stderr)


if __name__ == "__main__":
    main()
