"""Content fingerprints for cached stages, and the one atomic-write helper.

A stage's result lives in `<work_dir>/<stage>-<fingerprint>/`: the fingerprint hashes everything that changes the
result (file *contents*, not paths or modification times), so a rerun with the same inputs reuses the work and a
changed input recomputes it. Every result is written next to its destination and renamed into place, so an
interrupted write never looks finished and never destroys the previous result.
"""

import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # files are hashed in 1 MiB reads: memory stays flat for multi-GB checkpoints


def fingerprint(*inputs) -> str:
    """A short stable hash of JSON-able inputs (hyperparameters, content hashes)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def hash_files(paths: list[str | os.PathLike]) -> str:
    """SHA-256 of the files' contents, in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(name_or_path: str | os.PathLike) -> str:
    """What identifies a model's weights: the hash of a local folder's files, or a Hub id and its cached commit.

    A teacher overwritten in place therefore gets a new fingerprint, and its stale outputs are never reused.
    """
    path = Path(name_or_path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        return hash_files(files)
    from transformers.utils import cached_file

    resolved = cached_file(str(name_or_path), "config.json")  # .../snapshots/<commit>/config.json
    return f"{name_or_path}@{Path(resolved).parent.name}"


@contextmanager
def atomic_path(path: str | os.PathLike, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary file (or directory) next to `path` that replaces `path` only if the block finishes.

    The temporary sits in the same folder, so the final rename is atomic; on an exception it is removed and
    whatever was at `path` before is left as it was. A directory that already exists is swapped with the new one
    in one step (Linux `renameat2(RENAME_EXCHANGE)`), so there is no instant without either; elsewhere the old one is
    moved aside first. The temporary's name carries this process id, so `remove_stale_temporaries` can tell a
    leftover of a killed run from one being written right now: those of `path` are removed first. A write that runs
    out of disk space raises an `InputError` that names `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    prefix = f".{path.name}-{os.getpid()}-"
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix))
    else:
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=prefix)
        os.close(handle)
        tmp = Path(name)
    try:
        try:
            yield tmp
        except Exception as err:
            if _out_of_space(err):
                raise InputError(
                    f"No space left on the device to write {path}; it was left as it was. Free some space and run "
                    f"again ({err})."
                ) from err
            raise
        _set_default_permissions(tmp)
        if directory and path.exists():
            if not _exchange(tmp, path):  # tmp now holds the old directory, removed below
                backup = path.with_name(f".{path.name}.old")
                shutil.rmtree(backup, ignore_errors=True)
                os.replace(path, backup)
                os.replace(tmp, path)
                shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


@contextmanager
def folder_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold the edit lock of the folder `path` for the block: an edit loads the folder, changes it and swaps in a
    new one whole, so two edits at once would each swap in their own version, and the rows of one would be lost.

    The lock is `flock` on a file beside the folder (`.NAME.lock`: inside, the swap would move it away), which every
    process and thread that edits takes, and which the OS releases when its holder dies: a killed edit never leaves
    it held. A second edit waits for the first, and says so.
    """
    path = Path(path)
    try:
        import fcntl
    except ImportError:  # Windows: no flock
        logger.warning("No file locks on this platform: do not edit %s from two processes at once.", path)
        yield
        return
    lock_file = path.parent / f".{path.name}.lock"
    with open(lock_file, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Waiting for another edit of %s to finish (it holds %s).", path, lock_file)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _out_of_space(err: BaseException | None) -> bool:
    """Whether `err`, or what caused it, is a full disk or quota: an OSError, or safetensors' SafetensorError, which
    carries the OS error in its message only."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err) or "(os error 28)" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux `renameat2` with `RENAME_EXCHANGE`); False where that is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


_TEMPORARY = re.compile(r"^\.(?P<name>.+)-(?P<pid>\d+)-[A-Za-z0-9_]{8}$")


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove what interrupted `atomic_path` writes left in `folder` (of `name` only, if given): temporaries of
    processes that no longer run, and `.NAME.old` backups whose NAME is in place. Returns what was removed."""
    folder = Path(folder)
    removed = []
    for entry in folder.iterdir() if folder.is_dir() else ():
        match = _TEMPORARY.match(entry.name)
        backup_of = entry.name[1:-4] if entry.name.startswith(".") and entry.name.endswith(".old") else None
        if name is not None:
            match = match if match and match["name"] == name else None
            backup_of = backup_of if backup_of == name else None
        stale_backup = backup_of is not None and (folder / backup_of).exists()
        if (match and not _process_is_running(int(match["pid"]))) or stale_backup:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            removed.append(entry)
    return removed


def _process_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _set_default_permissions(path: Path) -> None:
    """mkstemp/mkdtemp (and safetensors' own temporary files) create owner-only entries; results are shared like any
    file the user saves, so every entry gets the usual permissions under the umask."""
    umask = os.umask(0)
    os.umask(umask)
    for entry in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not entry.is_symlink():
            os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~umask)


def write_json(path: str | os.PathLike, payload) -> None:
    """Write `payload` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))
