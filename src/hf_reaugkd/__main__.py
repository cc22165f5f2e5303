"""`python -m hf_reaugkd ...` is the `hf-reaugkd` console script."""

from .cli import main

main()
