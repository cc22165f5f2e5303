"""The knowledge base's texts file: one text per entry, stored beside the weights to show with explanations.

This file travels with saved checkpoints as remote code and needs only numpy and safetensors, so the PyTorch model
and the torch-free ONNX runtime read and check the same file the same way. Texts are stored as tensors (their UTF-8
bytes end to end, and offsets), never pickled; the file comes from a checkpoint, i.e. untrusted bytes, so decoding
checks the offsets and the UTF-8.
"""

import hashlib
import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load

TEXTS_FILE = "knowledge_base_texts.safetensors"  # beside model.safetensors
TEXT_TENSORS = ("texts_offsets", "texts_utf8")


def encode_texts(texts: list[str]) -> dict[str, np.ndarray]:
    """Texts as safetensors-storable arrays: their UTF-8 bytes end to end, and offsets `(N + 1,)`."""
    encoded = [text.encode("utf-8") for text in texts]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    utf8 = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return {"texts_utf8": utf8, "texts_offsets": offsets}


def decode_texts(encoded: dict[str, np.ndarray], source: object = "the texts file") -> list[str]:
    """Inverse of `encode_texts`, checking what an untrusted file holds (offsets in order and in bounds, UTF-8)."""
    utf8, offsets = encoded["texts_utf8"].tobytes(), encoded["texts_offsets"].tolist()
    spans = list(zip(offsets[:-1], offsets[1:], strict=True))  # (start, end) of each text
    if offsets[:1] != [0] or offsets[-1] != len(utf8) or any(end < start for start, end in spans):
        raise ValueError(f"The knowledge-base texts in {source} are corrupt: their offsets do not cover the bytes.")
    try:
        return [utf8[start:end].decode("utf-8") for start, end in spans]
    except UnicodeDecodeError as err:
        raise ValueError(f"The knowledge-base texts in {source} are not valid UTF-8: {err}") from err


def texts_sha256(encoded: dict[str, np.ndarray]) -> str:
    """SHA-256 of encoded texts: `save_pretrained` records it in the config, so loading can tell the texts file saved
    with these weights from one that a later edit wrote."""
    digest = hashlib.sha256()
    for name in sorted(TEXT_TENSORS):  # the order every saved kb_texts_sha256 was computed in
        digest.update(np.ascontiguousarray(encoded[name]).tobytes())
    return digest.hexdigest()


def load_texts(data: bytes, source: object) -> dict[str, np.ndarray]:
    """The encoded texts in the bytes of a texts file (`source` names it in errors)."""
    try:
        encoded = load(data)
    except SafetensorError as err:
        raise ValueError(f"Could not read the knowledge-base texts {source}: {err}") from err
    if not set(encoded) >= set(TEXT_TENSORS):
        raise ValueError(f"{source} holds no knowledge-base texts (expected {list(TEXT_TENSORS)}).")
    return encoded


def read_texts_file(path: str | os.PathLike, expected_sha256: str | None = None) -> dict[str, np.ndarray]:
    """The encoded texts of a texts file, read whole into memory (`decode_texts` makes them strings when they are
    first shown): what was read with the weights stays theirs whatever an edit writes to the folder afterwards. With
    `expected_sha256` (the config's), texts another save wrote are refused."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"Could not read the knowledge-base texts {path}: {err}") from err
    encoded = load_texts(data, path)
    if expected_sha256 is not None and texts_sha256(encoded) != expected_sha256:
        raise ValueError(
            f"The knowledge-base texts {path} are not the ones saved with these weights (their SHA-256 is not the "
            "config's kb_texts_sha256): the folder was edited while it was loading, or the file was replaced. "
            "Load the model again."
        )
    return encoded
