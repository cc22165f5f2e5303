"""What the user reads while the pipeline runs: one line per stage with its time, and transformers' notices that are
expected here (a teacher head about to be trained, the layers left out of a truncated student) kept out of the log,
said once in our own words instead."""

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import transformers

logger = logging.getLogger("hf_reaugkd")


def setup_logging() -> None:
    """INFO lines in one format, transformers' records included (its own handler off, propagated to the root)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Log `name: started` and `name: done in N s` around a stage."""
    logger.info("%s: started", name)
    start = time.perf_counter()
    yield
    logger.info("%s: done in %.1f s", name, time.perf_counter() - start)


@contextmanager
def expected_notices() -> Iterator[None]:
    """Raise transformers' log level to errors for a call whose warnings are expected (load reports of weights
    that are meant to be missing or left out, the tokenizer/config special-token alignment)."""
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
