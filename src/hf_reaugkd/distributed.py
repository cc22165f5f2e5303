"""Passes over every row shared by the processes of a run (`torchrun`, `accelerate launch`), and cached stages that
they fill together.

The rule that keeps a multi-process run from hanging: the processes meet only in `on_every_rank`, which runs a step on
each of them and then exchanges how it went, so a step that fails on one process fails on all of them, at the same
point, with that process's message, instead of leaving the others waiting at their next collective. A process that is
killed never reaches the exchange; the launcher (torchrun's agent, which `accelerate launch` uses too) then stops the
others, and the stage it was filling never appears: it is written to a temporary folder that replaces the stage only
when every process has finished, and that the next run removes (`caching.remove_stale_temporaries`).
"""

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch.distributed as dist

from .caching import atomic_path

T = TypeVar("T")


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes (0 and 1 outside a distributed run)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def on_every_rank(step: Callable[[], T]) -> list[T]:
    """Run `step` on every process and return every process's result, in rank order. If it raised anywhere, it
    raises everywhere: the failed process its own exception, the others a `RuntimeError` naming the failed rank and
    its message."""
    rank, world_size = rank_and_world_size()
    error = None
    try:
        value = step()
    except Exception as err:
        if world_size == 1:
            raise
        value, error = None, err
    if world_size == 1:
        return [value]
    outcomes = [None] * world_size
    dist.all_gather_object(outcomes, (value, None if error is None else f"{type(error).__name__}: {error}"))
    failed = [(other, message) for other, (_, message) in enumerate(outcomes) if message is not None]
    if error is not None:
        raise error
    if failed:
        other, message = failed[0]
        raise RuntimeError(f"Process {other} of {world_size} failed, so this one stops too: {message}")
    return [value for value, _ in outcomes]


def shard(num_rows: int, batch_size: int) -> range:
    """This process's contiguous share of `num_rows` rows, cut at multiples of `batch_size`: each process runs the very
    batches one process would (same rows, same padding), so the outputs are the same bytes whatever the process
    count. The first processes take one batch more when the batches do not divide evenly."""
    rank, world_size = rank_and_world_size()
    batches = -(-num_rows // batch_size)
    per_rank, extra = divmod(batches, world_size)
    first = rank * per_rank + min(rank, extra)
    last = first + per_rank + (rank < extra)
    return range(min(first * batch_size, num_rows), min(last * batch_size, num_rows))


def fill_stage(path: Path, prepare: Callable[[Path], None], fill: Callable[[Path], None]) -> None:
    """Write the cached stage `path` with every process: the main process opens it as an `atomic_path` folder and
    `prepare(tmp)`s it (allocates the files), then every process runs `fill(tmp)` (its `shard` of the rows, written at
    their offsets), then the main process's `atomic_path` renames the folder to `path`. No process returns before
    `path` is complete, and a failure anywhere leaves no `path`."""
    rank, _ = rank_and_world_size()

    def steps(tmp: Path | None) -> None:
        tmp = Path(on_every_rank(lambda: None if tmp is None else str(tmp))[0])  # the main process's folder
        on_every_rank(lambda: prepare(tmp) if rank == 0 else None)
        on_every_rank(lambda: fill(tmp))

    if rank != 0:
        steps(None)
        on_every_rank(lambda: None)  # returns once the main process has renamed the folder, fails if it could not
        return
    filled, rename_error = False, None
    try:
        with atomic_path(path, directory=True) as tmp:
            steps(tmp)
            filled = True
    except Exception as err:
        if not filled:  # a step failed, on every process at once
            raise
        rename_error = err
    on_every_rank(lambda: _raise(rename_error))


def _raise(error: Exception | None) -> None:
    if error is not None:
        raise error


def stage_exists(path: Path) -> bool:
    """Whether the stage `path` is there, as the main process sees it: every process takes the same branch."""
    return on_every_rank(path.exists)[0]
