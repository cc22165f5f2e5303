"""Content fingerprints for cached stages, and the one atomic-write helper.

A stage's result lives in `<work_dir>/<stage>-<fingerprint>/`: the fingerprint hashes everything that changes the
result (file *contents*, not paths or modification times), so a rerun with the same inputs reuses the work and a
changed input recomputes it. Every result is written next to its destination and renamed into place, so an
interrupted write never looks finished and never destroys the previous result.
"""

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
    whatever was at `path` before is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    else:
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
        os.close(handle)
        tmp = Path(name)
    try:
        yield tmp
        _set_default_permissions(tmp)
        if directory and path.exists():
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


def _set_default_permissions(path: Path) -> None:
    """mkstemp/mkdtemp create owner-only entries; results are shared like any file the user saves (umask applies)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def write_json(path: str | os.PathLike, payload) -> None:
    """Write `payload` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))
