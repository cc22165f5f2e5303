"""The teacher's knowledge base (KB): normalised embeddings, soft labels, and a nearest-neighbour index.

This file travels with saved checkpoints as remote code. FAISS is optional: a checkpoint with a FAISS index
still loads and searches without it (exactly, in torch), and building a FAISS index says that `faiss-cpu` is needed.

A stored HNSW/IVF index comes from a checkpoint, i.e. untrusted bytes, and FAISS trusts the length fields it reads (one
changed 8-byte field can make it allocate gigabytes). So the bytes are checked before FAISS reads them, and the index
FAISS returns is checked against the keys before it is searched. What happens when a check fails:

- Refused (ValueError): keys or soft labels that are invalid (shape, NaN/inf, zero or non-unit norm, rows that are
  not distributions); and index bytes that are not a well-formed index of this knowledge base -- a size outside the
  plausible range for `size x dim`, a header (kind, d, ntotal, metric, nlist) that contradicts the config, or a
  length field that points past the end -- unless they are byte for byte what was built (SHA-256 matches).
- Rebuilt from the stored keys, with a warning: an index that is well formed but whose bytes differ from what was
  built (SHA-256 mismatch), that FAISS cannot read, or whose content disagrees with the keys (stored vectors, ids,
  graph links, trained flag, a search probe). Keys and soft labels are what predictions depend on; the index only
  finds them faster, so a rebuilt index (same keys, same settings) serves the same purpose as the original.

Checkpoints saved before the checksum existed (no `index_sha256`) get every check but the checksum.
"""

import functools
import hashlib
import json
import math
import numbers
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import logging

try:
    import faiss
except ImportError:
    faiss = None

logger = logging.get_logger(__name__)

INDEX_TYPES = ("torch", "flat", "hnsw", "ivf")
TRAINED_INDEX_TYPES = ("hnsw", "ivf")  # stored serialized; exact indexes are rebuilt from the keys
# What `build(index_type="auto")` makes: exact torch search up to this many entries, HNSW above (torch when FAISS is
# missing). Measured with benchmarks/kb_scaling.py (d = 128, 2 CPU cores, search_dtype "auto", int8 scan): for 32
# queries exact search took 1.3 ms at 10k entries and 2.1 ms at 30k, HNSW (efSearch 128) 1.6 and 3.1 ms; one query
# 0.17 / 0.24 ms against 0.14 / 0.22 ms. Up to 20k exact search is cheaper for batches and at most ~0.04 ms slower for
# one query, finds every true neighbour and needs no index to build or store; its cost grows with N faster than HNSW's.
AUTO_EXACT_MAX_SIZE = 20_000
# Below this many entries IVF at the default nprobe missed the 0.95 recall@16 mark in benchmarks/kb_scaling.py
# (0.82-0.86 from 10k to 100k keys) while HNSW reached 0.98: `build` says so.
IVF_MIN_SIZE = 300_000
SEARCH_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
DEFAULT_INDEX_PARAMS = {
    # torch backend: KB rows scored per block, and queries scored at once; memory is at most
    # search_query_block_size × search_block_size × 4 bytes (256 MiB at the defaults) for any number of queries.
    "search_block_size": 65536,
    "search_query_block_size": 1024,
    # torch backend: the dtype the keys are scanned in ("auto": see `scan_dtype`); the candidates found are re-scored
    # from the fp32 keys, so returned similarities are exact.
    "search_dtype": "auto",
    "hnsw_m": 32,
    "hnsw_ef_construction": 80,
    "hnsw_ef_search": 128,  # recall@16 >= 0.95 from 10k to 1M keys (benchmarks/kb_scaling.py)
    "ivf_nlist": 0,  # 0: about 4·√N clusters for N entries (set when the index is built)
    "ivf_nprobe": 32,
}
# The integer index settings' accepted ranges: FAISS needs M >= 2 and nprobe >= 1; the upper bounds are far above any
# useful value and keep a crafted config from sizing the graph, the clusters or a search block out of memory.
INDEX_PARAM_RANGES = {
    "search_block_size": (1, 2**24),
    "search_query_block_size": (1, 2**20),
    "hnsw_m": (2, 256),
    "hnsw_ef_construction": (1, 2**16),
    "hnsw_ef_search": (1, 2**16),
    "ivf_nlist": (0, 2**20),  # 0: about 4·√N
    "ivf_nprobe": (1, 2**20),
}
# A reduced-precision scan keeps k + max(k, RESCORE_EXTRA[its dtype]) candidates per query for exact re-scoring: a true
# top-k key is lost only if that many others outscore it by less than the scan's error (unit vectors at d = 128,
# measured: up to ~3e-3 in bfloat16, ~6e-3 with int8 keys and queries). With k = 1 two candidates were too few (on a
# 384-d KB, 4 of 1,275 validation predictions changed). Trained KBs are the hard case: their classes are tight
# clusters, full of near-ties. On two of them (benchmarks/rescore_window.py: the demo student's 4,000 teacher keys and
# 10,200 student keys of rotten_tomatoes, 1,275 validation queries, k = 1 to 16) the int8 scan's top k + 8 missed up
# to 4 of 20,400 exact neighbours and its top k + 12 none, so 16 keeps a margin; float16 (the CUDA default) missed
# none from k + 12. bfloat16 (8 significant bits on both sides) is far coarser on such keys: at k = 16 its top k + 16
# missed 2.2% of the teacher keys' neighbours, k + 32 still 0.35% (it is the scan `auto` picks only where the int8
# kernel is missing). 16 candidates fewer saved ~0.1 ms of a batch of 32 inside a forward in a probe (the top-k and
# the gather of the candidates' fp32 keys, which the encoder has evicted from cache).
# float32 scans only keys stored in another dtype (the KB's own are fp32) and is as exact as re-scoring itself.
RESCORE_EXTRA = {torch.int8: 16, torch.float16: 16, torch.bfloat16: 32, torch.float32: 16}
# Soft labels must sum to 1 up to this tolerance; fp32 softmax outputs are far closer than that.
DISTRIBUTION_ATOL = 1e-3
# `nn.functional.normalize` divides by max(norm, eps): a key whose fp32 norm is below eps (or overflows) cannot become
# a unit vector.
NORMALIZE_EPS = 1e-12
# Stored keys searched for themselves after deserializing an index; an approximate index may miss a few of them.
PROBE_SIZE = 32
PROBE_MAX_MISSES = PROBE_SIZE // 10
# FAISS serialization (faiss/impl/index_write.cpp): a fourcc per index class; METRIC_INNER_PRODUCT is 0.
INDEX_FOURCC = {"hnsw": b"IHNf", "ivf": b"IwFl"}
FLAT_IP_FOURCC = b"IxFI"
_METRIC_INNER_PRODUCT = 0


def _require_faiss(index_type: str) -> None:
    if faiss is None:
        raise ImportError(
            f"index_type={index_type!r} needs FAISS, which is not installed: `pip install faiss-cpu`, "
            "or use index_type='torch' (exact search in torch)."
        )


def _check_index_type(index_type: str) -> None:
    if index_type not in INDEX_TYPES:
        raise ValueError(f"Unknown index_type {index_type!r}: expected one of {INDEX_TYPES}.")


def _check_search_dtype(search_dtype: str) -> None:
    if search_dtype not in SEARCH_DTYPES:
        raise ValueError(f"Unknown search_dtype {search_dtype!r}: expected one of {SEARCH_DTYPES}.")


def check_index_params(params: dict[str, int | str]) -> None:
    """Refuse index settings out of range before they reach FAISS, which asserts, aborts or crashes the process on
    some (`hnsw_m` 1 segfaults, `ivf_nprobe` 0 fails at search): a checkpoint's config is untrusted input."""
    _check_search_dtype(params.get("search_dtype", DEFAULT_INDEX_PARAMS["search_dtype"]))
    for name, value in params.items():
        if name == "search_dtype":
            continue
        low, high = INDEX_PARAM_RANGES[name]
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def resolve_index_type(index_type: str, size: int) -> str:
    """`"auto"` → `"torch"` (exact) for up to `AUTO_EXACT_MAX_SIZE` entries or without FAISS, `"hnsw"` above; any
    other type is returned as it is (after checking it)."""
    if index_type == "auto":
        return "torch" if size <= AUTO_EXACT_MAX_SIZE or faiss is None else "hnsw"
    _check_index_type(index_type)
    return index_type


def scan_dtype(search_dtype: str, device_type: str, dim: int) -> torch.dtype:
    """The dtype the exact torch search reads `dim`-dimensional keys in. Scanning the keys is memory-bound (and, right
    after an encoder forward has evicted them from cache, bound by memory bandwidth), so fewer bytes is less time,
    where the hardware computes in the smaller type natively. `"auto"`: float16 on CUDA (tensor cores; three more
    mantissa bits than bfloat16); on CPUs with native bf16 matmul (AVX512-BF16 or AMX, which come with VNNI int8 dot
    products) int8 keys and queries through torch's int8 matmul, bfloat16 where that kernel is missing; float32
    elsewhere (emulated half precision is slower than float32). Inside a 3-layer student's forward (10.2k × 128
    keys, 2 cores; search and neighbour vote) the int8 scan took 0.40 ms for one query and 1.13 ms for 32, against
    0.46 and 1.58 ms for the int8-weight and bfloat16 kernels it replaced."""
    return _scan_dtype(search_dtype, device_type, dim)


@functools.cache
def _scan_dtype(search_dtype: str, device_type: str, dim: int) -> torch.dtype:
    _check_search_dtype(search_dtype)
    if search_dtype != "auto":
        return getattr(torch, search_dtype)
    if device_type == "cuda":
        return torch.float16
    if device_type == "cpu" and cpu_has_native_bf16():
        return torch.int8 if int8_matmul(device_type, dim) is not None else torch.bfloat16
    return torch.float32


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX, through oneDNN)."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the probe: assume no native bf16
        return False


Int8Matmul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@functools.cache
def int8_matmul(device_type: str, dim: int) -> Int8Matmul | None:
    """torch's int8 matmul `(queries (b, d) int8, keys.T (d, n) int8) -> (b, n) int32` where it applies, else None
    (an int8 scan then multiplies dequantized blocks). Only its CPU kernel is used (the CUDA one needs more than 16
    query rows). Since this file runs on whatever torch and CPU loads a checkpoint, the kernel is checked once per
    `d` against an exact integer matmul, and not used if it disagrees: torch 2.13's is wrong with oneDNN's AVX2
    kernels (`ONEDNN_MAX_CPU_ISA=AVX2`: off by up to 23,233 on the probe's 32 dimensions)."""
    if device_type != "cpu" or dim * 127 * 127 > torch.iinfo(torch.int32).max:  # int32 scores would overflow
        return None
    try:
        kernel = torch._int_mm
        generator = torch.Generator().manual_seed(0)
        keys = torch.randint(-127, 128, (37, dim), generator=generator, dtype=torch.int8)  # (37, d): odd n on purpose
        queries = torch.randint(-127, 128, (3, dim), generator=generator, dtype=torch.int8)  # (3, d)
        found = kernel(queries, keys.T)  # (3, 37)
        expected = queries.long() @ keys.long().T  # (3, 37)
    except (AttributeError, RuntimeError, NotImplementedError):  # a torch without it, or a build that refuses
        return None
    return kernel if torch.equal(found.long(), expected) else None


def quantize_columns(keys: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per dimension around that dimension's midrange, `block_size` rows at a time (no
    full-size fp32 temporaries): `keys ≈ quantized * scales + center`, `(N, d)` int8 and `(d,)` fp32. Per dimension
    rather than per row so that the scales fold into the query (`q · k ≈ (q * scales) · quantized + q · center`): the
    scan is then one int8 × int8 matmul whose int32 scores rank the keys with no multiply after it. `q · center` is the
    same for every key, so it is dropped; subtracting it keeps a dimension that all keys share (an offset common in
    raw embeddings) from widening that dimension's steps, and through the query's own scale every other dimension's.
    Every coordinate is off by at most half a step, `(max_n keys[n, i] - min_n keys[n, i]) / 254`."""
    high = torch.full((keys.shape[1],), -torch.inf, dtype=keys.dtype, device=keys.device)  # (d,)
    low = torch.full((keys.shape[1],), torch.inf, dtype=keys.dtype, device=keys.device)  # (d,)
    for start in range(0, len(keys), block_size):
        block = keys[start : start + block_size]  # (block, d)
        high, low = torch.maximum(high, block.amax(dim=0)), torch.minimum(low, block.amin(dim=0))
    center = (high + low) / 2  # (d,)
    scales = ((high - low) / 254).clamp_min(torch.finfo(keys.dtype).tiny)  # a dimension equal in every key stays 0
    quantized = torch.empty(keys.shape, dtype=torch.int8, device=keys.device)  # (N, d)
    for start in range(0, len(keys), block_size):
        steps = (keys[start : start + block_size] - center) / scales  # (block, d): coordinates in scale steps
        quantized[start : start + block_size] = torch.round(steps).clamp_(-127, 127)
    return quantized, scales


def quantize_queries(queries: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`(b, d)` int8 queries for keys quantized by `quantize_columns`: the key scales folded in, then one symmetric
    scale per query, which multiplies all of that query's scores alike and so leaves its ranking as it is."""
    scaled = queries.float() * scales  # (b, d)
    steps = scaled.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(scaled.dtype).tiny) / 127  # (b, 1)
    return torch.round(scaled / steps).to(torch.int8)  # (b, d)


def _identity(tensor: torch.Tensor) -> tuple:
    """What changes when a buffer is replaced or edited in place: a derived copy made from it is stale once this
    differs. Inference-mode tensors have no version counter (and cannot be edited in place outside that mode)."""
    version = 0 if tensor.is_inference() else tensor._version
    return (tensor.data_ptr(), version, tuple(tensor.shape), tensor.device)


def validate_entries(keys: torch.Tensor, values: torch.Tensor, num_labels: int | None = None) -> None:
    """Raise a ValueError naming what was expected and what was found if `keys`/`values` are not a valid KB.

    Keys must be a finite `[N, d]` float tensor with N > 0 whose rows can be normalised (non-zero norm); values a
    `[N, C]` tensor of probability distributions (non-negative rows summing to 1), with C equal to `num_labels` when
    given. `build` and `load` both run this, so a KB that builds also loads, and with the same message otherwise.
    """
    if keys.ndim != 2 or values.ndim != 2:
        raise ValueError(
            f"Knowledge-base keys must be [N, d] and soft labels [N, C]; got keys {tuple(keys.shape)} "
            f"and soft labels {tuple(values.shape)}."
        )
    if keys.shape[0] == 0:
        raise ValueError("The knowledge base is empty: expected at least one (key, soft label) entry, got 0.")
    if keys.shape[0] != values.shape[0]:
        raise ValueError(
            f"Knowledge-base keys and soft labels disagree on the number of entries: "
            f"{keys.shape[0]} keys vs {values.shape[0]} soft labels."
        )
    if num_labels is not None and values.shape[1] != num_labels:
        raise ValueError(f"Soft labels have {values.shape[1]} classes, expected num_labels={num_labels}.")
    bad_keys = (~torch.isfinite(keys)).any(dim=1).nonzero().flatten()
    if len(bad_keys):
        raise ValueError(f"{len(bad_keys)} knowledge-base keys hold NaN or inf, e.g. row {bad_keys[0].item()}.")
    norms = keys.float().norm(dim=1)  # (N,)
    bad_keys = ((norms < NORMALIZE_EPS) | torch.isinf(norms)).nonzero().flatten()
    if len(bad_keys):
        row = bad_keys[0].item()
        raise ValueError(
            f"{len(bad_keys)} knowledge-base keys cannot be normalised to unit length (zero norm, or a norm outside "
            f"float32 range), e.g. row {row} with norm {norms[row].item():.3g}: keys are compared by cosine similarity."
        )
    values = values.float()
    bad_rows = (
        (
            (~torch.isfinite(values)).any(dim=1)
            | (values < 0).any(dim=1)
            | ((values.sum(dim=1) - 1).abs() > DISTRIBUTION_ATOL)
        )
        .nonzero()
        .flatten()
    )
    if len(bad_rows):
        row = bad_rows[0].item()
        raise ValueError(
            f"{len(bad_rows)} soft labels are not probability distributions (non-negative, summing to 1), "
            f"e.g. row {row}: {values[row].tolist()} sums to {values[row].sum().item():.4f}."
        )


class KnowledgeBase(nn.Module):
    """Teacher keys `[N, d]` (L2-normalised, fp32), teacher soft labels `[N, C]`, and a search backend.

    Keys, soft labels and (for HNSW/IVF) the serialized FAISS index are persistent buffers, so a model that
    holds a `KnowledgeBase` saves them to `model.safetensors` and moves them with `.to(device)`. Their shapes
    come from the constructor (the model config's `kb_size`, `kb_dim`, `num_labels`, `index_nbytes`) so that
    `from_pretrained` can allocate them before loading.

    Backends (`index_type`):
    - `"torch"`: exact inner-product search, `queries @ keys.T` + top-k over blocks of `search_block_size`
      rows, so memory stays `B × block` even for millions of keys. Runs on the keys' device (GPU too).
    - `"flat"`: FAISS `IndexFlatIP`, exact; rebuilt from the keys when first searched.
    - `"hnsw"`, `"ivf"`: FAISS approximate indexes; built once by `build()`, stored as `uint8` bytes
      (never pickle), deserialized when first searched.

    Keys and queries are compared by inner product, which is cosine similarity for unit vectors: `build()`
    normalises the keys, and callers pass normalised queries.

    `index_sha256` is the SHA-256 of the index bytes as built (recorded by `build()`, kept by `save()` and in the
    model config); loading compares it before FAISS reads the bytes (see the module docstring for what is refused
    and what is rebuilt).
    """

    def __init__(
        self,
        size: int,
        dim: int,
        num_labels: int,
        index_type: str = "torch",
        index_nbytes: int = 0,
        index_sha256: str | None = None,
        **index_params: int | str,
    ):
        super().__init__()
        _check_index_type(index_type)
        if size < 0 or dim < 1 or num_labels < 1 or index_nbytes < 0:
            raise ValueError(
                "size and index_nbytes must be >= 0, dim and num_labels >= 1, got "
                f"size={size}, dim={dim}, num_labels={num_labels}, index_nbytes={index_nbytes}"
            )
        unknown = set(index_params) - set(DEFAULT_INDEX_PARAMS)
        if unknown:
            raise TypeError(
                f"Unknown index parameters {sorted(unknown)}; expected some of {list(DEFAULT_INDEX_PARAMS)}."
            )
        self.index_type = index_type
        self.index_params = {**DEFAULT_INDEX_PARAMS, **index_params}
        check_index_params(self.index_params)  # refuse bad settings now, not at search (or in FAISS)
        self.register_buffer("keys", torch.zeros(size, dim))
        self.register_buffer("values", torch.zeros(size, num_labels))
        self.register_buffer("index_bytes", torch.zeros(index_nbytes, dtype=torch.uint8))
        self.index_sha256 = index_sha256
        self._faiss_index = None
        self._faiss_index_source = None
        self._scan_keys: tuple[tuple, tuple[torch.Tensor, torch.Tensor | None]] | None = None  # (source, copy)
        self._texts: list[str] | None = None
        self._texts_loader: Callable[[], list[str]] | None = None

    @property
    def has_texts(self) -> bool:
        """Whether the entries' texts are stored (without reading them)."""
        return self._texts is not None or self._texts_loader is not None

    @property
    def texts(self) -> list[str] | None:
        """The entries' texts, when stored (`store_kb_texts`): read from their file on first access, so a model
        that never explains pays nothing for them. `None` when not stored."""
        if self._texts is None and self._texts_loader is not None:
            texts = self._texts_loader()
            if len(texts) != self.size:
                raise ValueError(f"The knowledge base has {self.size} entries but {len(texts)} stored texts.")
            self._texts, self._texts_loader = texts, None
        return self._texts

    def set_texts(self, texts: list[str] | None, loader: Callable[[], list[str]] | None = None) -> "KnowledgeBase":
        """Store one text per entry (or a `loader` that reads them when first needed); `None` drops them."""
        if texts is not None:
            texts = [str(text) for text in texts]
            if len(texts) != self.size:
                raise ValueError(f"Expected one text per entry ({self.size}), got {len(texts)}.")
        self._texts, self._texts_loader = texts, loader
        return self

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @property
    def exhaustive(self) -> bool:
        """Whether `search` scores every key, so each query always gets its k hits (k clamped to the size): exact
        torch and FAISS flat search do; HNSW and IVF may return fewer (id -1), and without FAISS they fall back to the
        exact torch search."""
        return self.index_type not in TRAINED_INDEX_TYPES or faiss is None

    @property
    def dim(self) -> int:
        return self.keys.shape[1]

    @property
    def num_labels(self) -> int:
        return self.values.shape[1]

    def _apply(self, fn, recurse=True):
        """Follow device moves but not dtype casts: `model.half()` / `model.to(torch.bfloat16)` would round the keys
        and lose neighbour order among close similarities (the same reason as `_keep_in_fp32_modules_strict`)."""
        for name, buffer in self._buffers.items():
            moved = fn(buffer)
            self._buffers[name] = moved if moved.dtype == buffer.dtype else buffer.to(moved.device)
        return self

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, num_labels={self.num_labels}, index_type={self.index_type!r}"

    @classmethod
    def build(
        cls,
        keys: torch.Tensor,
        values: torch.Tensor,
        index_type: str = "torch",
        **index_params: int | str,
    ) -> "KnowledgeBase":
        """Make a KB from teacher embeddings `[N, d]` and soft labels `[N, C]`.

        Keys are L2-normalised and stored in fp32. `index_type="auto"` picks the backend by size (see
        `resolve_index_type`). For `"hnsw"` and `"ivf"` the FAISS index is trained and filled here and its bytes are
        kept, so loading never retrains it.
        """
        return cls._build(keys, values, index_type, normalize_rows=0, **index_params)

    @classmethod
    def _build(
        cls, keys: torch.Tensor, values: torch.Tensor, index_type: str, normalize_rows: int, **index_params: int | str
    ) -> "KnowledgeBase":
        """`build`, normalising only the keys from row `normalize_rows` on: `add` and `remove` keep the stored rows'
        bytes as they are (normalising a unit vector again moves it by an ulp), so removing the rows an `add` added
        gives back the same knowledge base, bit for bit."""
        validate_entries(keys, values)
        index_type = resolve_index_type(index_type, len(keys))
        if index_type != "torch":
            _require_faiss(index_type)
        params = {**DEFAULT_INDEX_PARAMS, **index_params}
        nprobe = params["ivf_nprobe"]
        if index_type == "ivf" and len(keys) < IVF_MIN_SIZE and nprobe <= DEFAULT_INDEX_PARAMS["ivf_nprobe"]:
            logger.warning(
                f"An IVF index over {len(keys):,} keys at ivf_nprobe={nprobe} misses true neighbours: below "
                f"{IVF_MIN_SIZE:,} entries recall@16 measured 0.82-0.86 at nprobe 32 (benchmarks/kb_scaling.py). "
                "index_type='hnsw' (what 'auto' builds above 20,000 entries) reached 0.98 or more at every size; or "
                "raise ivf_nprobe."
            )
        kb = cls(len(keys), keys.shape[1], values.shape[1], index_type, 0, **index_params)
        block = params["search_block_size"]
        kb.keys[:normalize_rows] = keys[:normalize_rows].detach().float().cpu()
        for start in range(normalize_rows, len(keys), block):  # normalise in blocks: no full-size temporaries
            chunk = keys[start : start + block].detach().float().cpu()  # (block, d)
            kb.keys[start : start + block] = nn.functional.normalize(chunk, dim=-1)
        kb.values.copy_(values.detach())
        kb._check_entries()  # exactly what `load` checks, on what will be stored
        if index_type in TRAINED_INDEX_TYPES:
            kb._set_index(_train_faiss_index(kb.keys, index_type, params))
        return kb

    def validate(self, num_labels: int | None = None, repair_index: bool = False) -> None:
        """Check the stored entries and, for HNSW/IVF, the stored index (before and after FAISS reads it).

        Args:
            num_labels (`int`, *optional*): the number of classes the soft labels must have.
            repair_index (`bool`, defaults to `False`): when the index bytes are well formed but do not hold the
                index that was built (checksum, FAISS read or consistency check fails), rebuild the index from the
                keys with a warning instead of raising. Malformed index bytes and invalid entries always raise.

        Raises:
            `ValueError` naming what failed.
        """
        self._check_entries(num_labels)
        if self.index_type not in TRAINED_INDEX_TYPES:
            return
        if faiss is None:  # the bytes are never read (search runs in torch), but a malformed file is still refused
            self._check_index_bytes()
            return
        self._cache_index(self._load_index(repair_index))

    def _check_entries(self, num_labels: int | None = None) -> None:
        validate_entries(self.keys, self.values, num_labels)
        norms = self.keys.float().norm(dim=1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
            worst = (norms - 1).abs().argmax().item()
            raise ValueError(
                f"Knowledge-base keys must be unit vectors; row {worst} has norm {norms[worst].item():.4f}."
            )

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k inner-product search.

        Args:
            queries (`torch.Tensor` of shape `(B, d)`): L2-normalised query embeddings.
            k (`int`): neighbours per query; clamped to the KB size.

        Returns:
            `(scores, ids)`, both `(B, k)` on the queries' device, best first. Approximate indexes may return
            fewer than k hits for a query; those slots have id -1 and score -inf.
        """
        if self.size == 0:
            raise ValueError(
                "The knowledge base is empty: build one with KnowledgeBase.build(keys, soft_labels) and attach it "
                "with model.set_knowledge_base(kb), or predict without retrieval (retrieval_weight=0)."
            )
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"Queries must be [B, {self.dim}], got {tuple(queries.shape)}.")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(k, self.size)
        if len(queries) == 0:
            return queries.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long, device=queries.device)
        if self.index_type == "torch" or faiss is None:
            if self.index_type != "torch":
                logger.warning_once(
                    f"FAISS is not installed: searching the {self.index_type!r} knowledge base exactly in torch "
                    "instead (same or better neighbours, possibly slower). `pip install faiss-cpu` to use the index."
                )
            return self._search_torch(queries.to(self.keys), k)
        index = self._get_faiss_index()
        if self.index_type == "hnsw":
            index.hnsw.efSearch = max(self.index_params["hnsw_ef_search"], k)
        elif self.index_type == "ivf":
            index.nprobe = self.index_params["ivf_nprobe"]
        scores, ids = index.search(queries.detach().float().cpu().numpy(), k)  # (B, k), (B, k)
        scores, ids = torch.from_numpy(scores), torch.from_numpy(ids)
        scores = scores.masked_fill(ids < 0, float("-inf"))
        return scores.to(queries.device), ids.to(queries.device)

    def _search_torch(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k `(B, k)`: a scan of the keys in `search_dtype` over blocks of queries × keys (memory bounded
        for any N and B), then, for a reduced-precision scan, its `k + max(k, RESCORE_EXTRA[dtype])` best candidates
        re-scored from the fp32 keys. Scores are exact fp32 cosines; the neighbours are the exact ones unless a true
        neighbour fell behind that many others by less than the scan's rounding error."""
        scan_keys, scales = self._keys_for_scan()  # (N, d) fp32 keys or a scan copy; int8: scales (d,)
        rescore = scan_keys.dtype != self.keys.dtype
        candidates = min(k + max(k, RESCORE_EXTRA[scan_keys.dtype]), self.size) if rescore else k
        query_block = self.index_params["search_query_block_size"]
        if len(queries) <= query_block:  # the common case, without the split and concatenation
            scores, ids = self._scan(queries, scan_keys, scales, candidates)  # (B, c), (B, c)
        else:
            found = [self._scan(chunk, scan_keys, scales, candidates) for chunk in queries.split(query_block)]
            scores, ids = torch.cat([s for s, _ in found]), torch.cat([i for _, i in found])  # (B, c)
        if not rescore:
            return scores, ids
        candidates = self.keys.index_select(0, ids.flatten()).view(*ids.shape, -1)  # (B, c, d), fp32
        scores = (candidates * queries.unsqueeze(1)).sum(-1)  # (B, c): exact fp32 (bmm: 4× slower at B = 32)
        scores, order = scores.topk(k, dim=1)  # (B, k): one top-k, where two sorts cost 0.1 ms more in a forward
        return scores, ids.gather(1, order)

    def _scan(
        self, queries: torch.Tensor, scan_keys: torch.Tensor, scales: torch.Tensor | None, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k `(scores, ids)` `(b, k)` of `queries @ keys.T`, one block of `search_block_size` keys at a time. int8
        keys are scored against int8 queries with the key scales folded in (`quantize_queries`): int32 scores in
        units of each query's own scale, which rank that query's keys."""
        block = self.index_params["search_block_size"]
        int8_kernel = int8_matmul(scan_keys.device.type, self.dim) if scales is not None else None
        if scales is not None:
            queries = quantize_queries(queries, scales)  # (b, d) int8
            if int8_kernel is None:  # dequantized blocks: slower, the same ranking
                queries = queries.float()
        else:
            queries = queries.to(scan_keys.dtype).contiguous()  # (b, d)
        best_scores = best_ids = None
        for start in range(0, self.size, block):
            keys = scan_keys[start : start + block]  # (block, d)
            if int8_kernel is not None:
                scores = int8_kernel(queries, keys.T)  # (b, block) int32
            elif scales is not None:
                scores = queries @ keys.T.float()  # (b, block)
            elif keys.device.type == "cpu":
                scores = (keys @ queries.T).T  # (b, block): key-major, faster on CPU than queries @ keys.T
            else:
                scores = queries @ keys.T  # (b, block)
            top_scores, top_ids = scores.topk(min(k, scores.shape[1]), dim=1)  # (b, ≤k)
            if best_scores is not None:
                top_scores = torch.cat([best_scores, top_scores], dim=1)  # (b, ≤2k)
                top_ids = torch.cat([best_ids, top_ids + start], dim=1)
                top_scores, order = top_scores.topk(min(k, top_scores.shape[1]), dim=1)  # (b, ≤k)
                top_ids = top_ids.gather(1, order)
            best_scores, best_ids = top_scores, top_ids
        return best_scores, best_ids

    def _keys_for_scan(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The keys in the scan dtype for their device, and for int8 their per-dimension scales: the fp32 buffer
        itself, or a reduced-precision copy made on first use and remade when the keys or `search_dtype` change (not
        a buffer: never saved, and the fp32 keys stay the reference)."""
        dtype = scan_dtype(self.index_params["search_dtype"], self.keys.device.type, self.dim)
        if dtype == self.keys.dtype:
            return self.keys, None
        source = (_identity(self.keys), dtype)
        cached = self._scan_keys  # one read: another thread may replace it meanwhile, source and copy together
        if cached is not None and cached[0] == source:
            return cached[1]
        if dtype == torch.int8:
            copy = quantize_columns(self.keys, self.index_params["search_block_size"])
        else:
            copy = (self.keys.to(dtype), None)
        self._scan_keys = (source, copy)
        return copy

    def _get_faiss_index(self):
        """The FAISS index for the current buffers, made once and reused until the buffers change. Stored HNSW/IVF
        bytes go through the same checks as loading (`_load_index(repair=True)`)."""
        _require_faiss(self.index_type)
        if self._faiss_index_source != self._index_source_id():
            if self.index_type == "flat":
                index = faiss.IndexFlatIP(self.dim)
                index.add(self.keys.detach().float().cpu().numpy())
            else:
                index = self._load_index(repair=True)
            self._cache_index(index)
        return self._faiss_index

    def _index_source_id(self) -> tuple:
        source = self.index_bytes if self.index_type in TRAINED_INDEX_TYPES else self.keys
        return (self.index_type, *_identity(source))

    def _cache_index(self, index) -> None:
        self._faiss_index, self._faiss_index_source = index, self._index_source_id()

    def _set_index(self, index) -> None:
        """Store a freshly built HNSW/IVF index: its bytes, their checksum, and the index itself."""
        data = faiss.serialize_index(index)
        self.index_bytes = torch.from_numpy(data).to(self.index_bytes.device)
        self.index_sha256 = hashlib.sha256(data).hexdigest()
        self._cache_index(index)

    def _check_index_bytes(self) -> tuple[np.ndarray, str, str | None]:
        """Refuse index bytes that are not a well-formed index of this KB, before anything reads them.

        Returns the bytes, their SHA-256, and why they are malformed when they nevertheless are byte for byte what
        was built (the checksum matches, e.g. a layout from another FAISS version that these checks do not know):
        `_load_index` then rebuilds rather than reads them. Otherwise malformed bytes raise a ValueError.
        """
        data = np.ascontiguousarray(self.index_bytes.detach().cpu().numpy())
        digest = hashlib.sha256(data).hexdigest()
        try:
            _check_index_layout(data, self.index_type, self.size, self.dim, self.index_params)
        except _MalformedIndexError as err:
            if digest != self.index_sha256:
                raise ValueError(
                    f"The stored {self.index_type} FAISS index ({len(data)} bytes) is corrupt or truncated: {err} "
                    "(found before reading it). Rebuild the knowledge base with KnowledgeBase.build(...)."
                ) from None
            return data, digest, f"its layout is not one these checks know ({err}), so it is not read"
        return data, digest, None

    def _load_index(self, repair: bool):
        """Deserialize the stored HNSW/IVF index after checking its bytes, and check it against the keys.

        Malformed bytes raise (`_check_index_bytes`). Well-formed bytes that differ from what was built, that FAISS
        cannot read, or whose index disagrees with the keys raise too unless `repair`, which rebuilds the index from
        the keys with a warning.
        """
        data, digest, problem = self._check_index_bytes()
        if problem is None and self.index_sha256 is not None and digest != self.index_sha256:
            problem = (
                f"its SHA-256 ({digest[:16]}...) differs from the one recorded when it was built "
                f"({self.index_sha256[:16]}...)"
            )
        if problem is None:
            try:
                index = _deserialize_index(data)
                _check_index_content(
                    index, self.keys.detach().float().cpu().numpy(), self.index_type, self.index_params
                )
            except ValueError as err:
                problem = str(err)
        if problem is None:
            if self.index_sha256 is None:  # an older checkpoint, now verified: saving it again records the checksum
                self.index_sha256 = digest
            return index
        if not repair:
            raise ValueError(f"The stored {self.index_type} FAISS index ({len(data)} bytes) is unusable: {problem}.")
        logger.warning(
            f"The stored {self.index_type} FAISS index of this knowledge base ({len(data)} bytes) is unusable: "
            f"{problem}. Rebuilt it from the {self.size} stored keys (which passed validation) with the stored index "
            "settings; save the model or knowledge base again to store the rebuilt index."
        )
        keys = self.keys.detach().float().cpu().contiguous()
        self._set_index(_train_faiss_index(keys, self.index_type, self.index_params))
        return self._faiss_index

    def add(self, keys: torch.Tensor, values: torch.Tensor, texts: list[str] | None = None) -> "KnowledgeBase":
        """A new KB with these entries appended (HNSW/IVF indexes are rebuilt over all entries).

        Raises `ValueError` for keys that are not `[n, dim]`, soft labels that are not `[n, num_labels]`, and
        whatever `build`/`load` reject (row numbers then count in the grown KB).
        """
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(
                f"New keys must be [n, {self.dim}] (this knowledge base's key dim); got {tuple(keys.shape)}."
            )
        if values.ndim != 2 or values.shape[1] != self.num_labels:
            raise ValueError(
                f"New soft labels must be [n, {self.num_labels}] (this knowledge base has {self.num_labels} "
                f"classes); got {tuple(values.shape)}."
            )
        if keys.shape[0] != values.shape[0]:
            raise ValueError(f"New entries disagree: {keys.shape[0]} keys vs {values.shape[0]} soft labels.")
        if self.has_texts and (texts is None or len(texts) != keys.shape[0]):
            raise ValueError(
                f"This knowledge base stores its entries' texts: give one text per new entry ({keys.shape[0]})."
            )
        grown = self._build(
            torch.cat([self.keys.cpu(), keys.float().cpu()]),
            torch.cat([self.values.cpu(), values.float().cpu()]),
            self.index_type,
            normalize_rows=self.size,
            **self.index_params,
        )
        return grown.set_texts(self.texts + list(texts)) if self.has_texts else grown

    def remove(self, ids: torch.Tensor | list[int]) -> "KnowledgeBase":
        """A new KB without the entries at `ids` (HNSW/IVF indexes are rebuilt over the remaining entries).

        `ids` are row numbers in `[0, size)`; repeats are fine. Raises `ValueError` for non-integer or out-of-range
        ids and for removing every entry.
        """
        ids = torch.as_tensor(ids).flatten()
        if ids.numel() == 0:
            ids = ids.long()
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"Ids to remove must be integer row numbers, got dtype {ids.dtype}: {ids[:5].tolist()}.")
        bad = ids[(ids < 0) | (ids >= self.size)]
        if len(bad):
            raise ValueError(
                f"Ids to remove must be in [0, {self.size}) (rows of this knowledge base); got {len(bad)} outside, "
                f"e.g. {bad[:5].tolist()}."
            )
        keep = torch.ones(self.size, dtype=torch.bool)
        keep[ids.long()] = False
        if not keep.any():
            raise ValueError(
                f"Removing these ids would remove all {self.size} entries and leave the knowledge base empty; "
                "build a new one with KnowledgeBase.build(keys, soft_labels) instead."
            )
        kept = self._build(
            self.keys.cpu()[keep],
            self.values.cpu()[keep],
            self.index_type,
            normalize_rows=int(keep.sum()),
            **self.index_params,
        )
        if self.has_texts:
            kept.set_texts([text for text, k in zip(self.texts, keep.tolist(), strict=True) if k])
        return kept

    def save(self, path: str | os.PathLike) -> None:
        """Save to one safetensors file, atomically (a failed save leaves an earlier file intact)."""
        path = Path(path)
        tensors = {name: buffer.detach().cpu().contiguous() for name, buffer in self.named_buffers()}
        if self.has_texts:
            tensors.update(encode_texts(self.texts))
        metadata = {"index_type": self.index_type, "index_params": json.dumps(self.index_params)}
        if self.index_sha256 is not None:
            metadata["index_sha256"] = self.index_sha256
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
            tmp_path = tmp.name
        try:
            save_file(tensors, tmp_path, metadata=metadata)
            os.replace(tmp_path, path)
        finally:
            if os.path.exists(tmp_path):
                os.remove(tmp_path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "KnowledgeBase":
        """Load a KB saved by `save()`, validating it (an unusable HNSW/IVF index is rebuilt with a warning)."""
        try:
            tensors = load_file(path)
            with safe_open(path, "pt") as f:
                metadata = f.metadata() or {}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"Could not read the knowledge base file {path}: {err}") from err
        missing = sorted({"keys", "values", "index_bytes"} - set(tensors))
        missing += [f"{name} metadata" for name in ("index_type", "index_params") if name not in metadata]
        if missing:
            raise ValueError(f"{path} is not a knowledge-base file: missing {missing}.")
        keys, values, index_bytes = tensors["keys"], tensors["values"], tensors["index_bytes"]
        if (keys.ndim, values.ndim, index_bytes.ndim) != (2, 2, 1):
            raise ValueError(
                f"{path}: expected keys (N, d), values (N, C) and index_bytes (n,), got shapes {tuple(keys.shape)}, "
                f"{tuple(values.shape)} and {tuple(index_bytes.shape)}."
            )
        try:
            params = json.loads(metadata["index_params"])
            kb = cls(
                *keys.shape,
                values.shape[1],
                metadata["index_type"],
                len(index_bytes),
                metadata.get("index_sha256"),
                **params,
            )
        except (TypeError, ValueError) as err:  # not JSON, unknown or out-of-range settings
            raise ValueError(f"{path} holds invalid index settings {metadata['index_params']!r}: {err}") from err
        kb.keys, kb.values, kb.index_bytes = keys, values, index_bytes
        kb.validate(repair_index=True)
        if set(tensors) >= TEXT_TENSORS:
            kb.set_texts(decode_texts(tensors["texts_utf8"], tensors["texts_offsets"], path))
        return kb


TEXTS_FILE = "knowledge_base_texts.safetensors"  # beside model.safetensors; read only when texts are needed
TEXT_TENSORS = {"texts_utf8", "texts_offsets"}


def encode_texts(texts: list[str]) -> dict[str, torch.Tensor]:
    """Texts as safetensors-storable tensors (never pickle): their UTF-8 bytes end to end, and offsets `(N + 1,)`."""
    encoded = [text.encode("utf-8") for text in texts]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    utf8 = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return {"texts_utf8": torch.from_numpy(utf8), "texts_offsets": torch.from_numpy(offsets)}


def decode_texts(utf8: torch.Tensor, offsets: torch.Tensor, source: object = "the texts file") -> list[str]:
    """Inverse of `encode_texts`, checking what an untrusted file holds (offsets in order and in bounds, UTF-8)."""
    offsets = offsets.tolist()
    spans = list(zip(offsets[:-1], offsets[1:], strict=True))  # (start, end) of each text
    if offsets[:1] != [0] or offsets[-1] != len(utf8) or any(end < start for start, end in spans):
        raise ValueError(f"The knowledge-base texts in {source} are corrupt: their offsets do not cover the bytes.")
    data = utf8.numpy().tobytes()
    try:
        return [data[start:end].decode("utf-8") for start, end in spans]
    except UnicodeDecodeError as err:
        raise ValueError(f"The knowledge-base texts in {source} are not valid UTF-8: {err}") from err


def texts_sha256(encoded: dict[str, torch.Tensor]) -> str:
    """SHA-256 of encoded texts (`encode_texts`): `save_pretrained` records it in the config, so loading can tell the
    texts file saved with these weights from one that a later edit wrote."""
    digest = hashlib.sha256()
    for name in sorted(TEXT_TENSORS):
        digest.update(encoded[name].numpy().tobytes())
    return digest.hexdigest()


def read_texts_file(path: str | os.PathLike, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The encoded texts of a texts file, read whole into memory (`decode_texts` makes them strings when they are
    first shown): what was read with the weights stays theirs whatever an edit writes to the folder afterwards. With
    `expected_sha256` (the config's), texts another save wrote are refused."""
    try:
        tensors = safetensors_load(Path(path).read_bytes())
    except (SafetensorError, OSError) as err:
        raise ValueError(f"Could not read the knowledge-base texts {path}: {err}") from err
    if not set(tensors) >= TEXT_TENSORS:
        raise ValueError(f"{path} holds no knowledge-base texts (expected {sorted(TEXT_TENSORS)}).")
    if expected_sha256 is not None and texts_sha256(tensors) != expected_sha256:
        raise ValueError(
            f"The knowledge-base texts {path} are not the ones saved with these weights (their SHA-256 is not the "
            "config's kb_texts_sha256): the folder was edited while it was loading, or the file was replaced. "
            "Load the model again."
        )
    return tensors


def _train_faiss_index(keys: torch.Tensor, index_type: str, params: dict):
    """Train and fill an HNSW or IVF inner-product index over unit-norm `keys` `[N, d]`."""
    _require_faiss(index_type)
    vectors = keys.numpy()
    n, dim = vectors.shape
    if index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["hnsw_ef_construction"]
    else:
        nlist = ivf_nlist(n, params)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
    index.add(vectors)
    return index


def _deserialize_index(data: np.ndarray):
    """`faiss.deserialize_index`, with any failure (RuntimeError, MemoryError from std::bad_alloc, ...) as a
    ValueError that keeps FAISS's whole message."""
    try:
        return faiss.deserialize_index(data)
    except Exception as err:  # noqa: BLE001 (FAISS raises RuntimeError, MemoryError, ...: all mean unreadable)
        raise ValueError(
            f"FAISS could not read it ({type(err).__name__}; it is corrupt or truncated). FAISS said: {err}"
        ) from err


class _MalformedIndexError(ValueError):
    """The index bytes are not a well-formed serialized index of the expected kind and shape."""


class _ByteReader:
    """Bounds-checked little-endian reads over serialized index bytes: nothing is allocated from a length field."""

    def __init__(self, data: np.ndarray):
        self.data = memoryview(data).cast("B")
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def skip(self, nbytes: int, what: str) -> int:
        if nbytes > self.remaining:
            raise _MalformedIndexError(
                f"{what} at byte {self.pos} needs {nbytes} bytes but only {self.remaining} remain"
            )
        start, self.pos = self.pos, self.pos + nbytes
        return start

    def unpack(self, fmt: str, what: str):
        return struct.unpack_from("<" + fmt, self.data, self.skip(struct.calcsize("<" + fmt), what))[0]

    def vector(self, itemsize: int, what: str, expected: int | None = None) -> tuple[int, int]:
        """A FAISS vector: a uint64 count, then count items. Returns (offset of the items, count)."""
        at = self.pos
        count = self.unpack("Q", f"the length of {what}")
        if count > self.remaining // itemsize:
            raise _MalformedIndexError(
                f"{what} at byte {at} claims {count} items of {itemsize} bytes but only {self.remaining} bytes remain"
            )
        if expected is not None and count != expected:
            raise _MalformedIndexError(f"{what} at byte {at} holds {count} items, expected {expected}")
        return self.skip(count * itemsize, what), count

    def index_header(self, fourcc: bytes, what: str, dim: int, ntotal: int) -> None:
        at = self.pos
        found = bytes(self.data[self.skip(4, f"the type code of {what}") : at + 4])
        if found != fourcc:
            raise _MalformedIndexError(f"{what} at byte {at} has type code {found!r}, expected {fourcc!r}")
        found_dim, found_ntotal = self.unpack("i", f"the d of {what}"), self.unpack("q", f"the ntotal of {what}")
        self.skip(8 + 8 + 1, f"the header of {what}")  # two unused int64 fields, is_trained
        metric = self.unpack("i", f"the metric of {what}")
        if found_dim != dim or found_ntotal != ntotal:
            raise _MalformedIndexError(
                f"{what} holds ntotal={found_ntotal} vectors of d={found_dim}, but the knowledge base has "
                f"{ntotal} of dim {dim}"
            )
        if metric != _METRIC_INNER_PRODUCT:
            raise _MalformedIndexError(
                f"{what} uses metric {metric}, expected inner product ({_METRIC_INNER_PRODUCT})"
            )


def ivf_nlist(size: int, params: dict) -> int:
    """IVF clusters for `size` entries: `ivf_nlist`, or about 4·√size when it is 0 (FAISS's rule of thumb: lists of
    ~√N/4 keys keep both the coarse and the fine scan short); never more than the entries (one point per cluster)."""
    nlist = params["ivf_nlist"] or round(4 * math.sqrt(size))
    return max(1, min(nlist, size))


def _index_size_bounds(index_type: str, size: int, dim: int, params: dict) -> tuple[int, int]:
    """Plausible byte range of a serialized HNSW/IVF index over `size` keys of `dim` floats: at least the vectors,
    at most twice a generous estimate (vectors, HNSW links or IVF ids and centroids) plus 1 MiB of headers."""
    vectors = 4 * size * dim
    if index_type == "hnsw":
        estimate = vectors + size * (4 + 8 + 4 * 4 * params["hnsw_m"])  # level, offset, ~2M + M links (4M here)
    else:
        estimate = vectors + 8 * size + ivf_nlist(size, params) * (4 * dim + 16)
    return vectors, 2 * estimate + (1 << 20)


def _check_index_layout(data: np.ndarray, index_type: str, size: int, dim: int, params: dict) -> None:
    """Walk the serialized IndexHNSWFlat / IndexIVFFlat (inner product) that `build` writes, checking its size, type
    codes, header fields and every length field against the knowledge base's shape and the bytes that remain, so
    that FAISS reading it allocates no more than the bytes imply. Raises `_MalformedIndexError`."""
    low, high = _index_size_bounds(index_type, size, dim, params)
    if not low <= len(data) <= high:
        raise _MalformedIndexError(
            f"{len(data)} bytes is outside the plausible range [{low}, {high}] for a {index_type} index over "
            f"{size} keys of dim {dim}"
        )
    reader = _ByteReader(data)
    reader.index_header(INDEX_FOURCC[index_type], f"the {index_type} index", dim, size)
    if index_type == "hnsw":
        reader.vector(8, "the HNSW level probabilities")
        reader.vector(4, "the HNSW neighbours per level")
        reader.vector(4, "the HNSW node levels", expected=size)
        reader.vector(8, "the HNSW link offsets", expected=size + 1)
        reader.vector(4, "the HNSW links")
        reader.skip(5 * 4, "the HNSW entry point and search settings")
        reader.index_header(FLAT_IP_FOURCC, "the HNSW storage", dim, size)
        reader.vector(4, "the stored vectors", expected=size * dim)
    else:
        nlist = ivf_nlist(size, params)
        found_nlist = reader.unpack("Q", "nlist")
        if found_nlist != nlist:
            raise _MalformedIndexError(f"the IVF index has nlist={found_nlist}, expected {nlist}")
        reader.skip(8, "nprobe")
        reader.index_header(FLAT_IP_FOURCC, "the IVF quantizer", dim, nlist)
        reader.vector(4, "the IVF centroids", expected=nlist * dim)
        at = reader.pos
        direct_map = reader.unpack("B", "the direct-map type")
        if direct_map > 2:
            raise _MalformedIndexError(f"the direct-map type at byte {at} is {direct_map}, expected 0, 1 or 2")
        reader.vector(8, "the direct map")
        if direct_map == 2:
            reader.vector(16, "the direct-map hash table")
        at = reader.pos
        found = bytes(reader.data[reader.skip(4, "the inverted-lists type code") : at + 4])
        if found != b"ilar":
            raise _MalformedIndexError(f"the inverted lists at byte {at} have type code {found!r}, expected b'ilar'")
        found_nlist, code_size = reader.unpack("Q", "the inverted-lists nlist"), reader.unpack("Q", "the code size")
        if found_nlist != nlist or code_size != 4 * dim:
            raise _MalformedIndexError(
                f"the inverted lists have nlist={found_nlist} and code size {code_size}, expected {nlist} and {4 * dim}"
            )
        at = reader.pos
        list_type = bytes(reader.data[reader.skip(4, "the inverted-lists layout") : at + 4])
        if list_type not in (b"full", b"sprs"):
            raise _MalformedIndexError(
                f"the inverted-lists layout at byte {at} is {list_type!r}, expected full or sprs"
            )
        start, count = reader.vector(8, "the inverted-list sizes", expected=nlist if list_type == b"full" else None)
        sizes = np.frombuffer(reader.data, dtype="<u8", count=count, offset=start)
        if list_type == b"sprs":
            if count % 2 or (count and sizes[0::2].max() >= nlist):
                raise _MalformedIndexError("the sparse inverted-list sizes are not (list < nlist, size) pairs")
            sizes = sizes[1::2]
        entry = code_size + 8  # a vector and its int64 id
        if len(sizes) and int(sizes.max()) > reader.remaining // entry:
            raise _MalformedIndexError(f"an inverted list claims {int(sizes.max())} entries, more than the bytes hold")
        total = int(sizes.sum())
        if total != size:
            raise _MalformedIndexError(f"the inverted lists hold {total} entries, but the knowledge base has {size}")
        reader.skip(total * entry, "the inverted-list vectors and ids")
    if reader.remaining:
        raise _MalformedIndexError(f"{reader.remaining} unexpected bytes follow the index at byte {reader.pos}")


def _swig_array(vector, dtype) -> np.ndarray:
    """A zero-copy numpy view of a FAISS vector (valid while the index lives)."""
    if vector.size() == 0:
        return np.zeros(0, dtype=dtype)
    return faiss.rev_swig_ptr(vector.data(), vector.size()).view(dtype)


def _check_index_content(index, keys: np.ndarray, index_type: str, params: dict) -> None:
    """Raise ValueError unless the deserialized `index` holds exactly the unit `keys` `[N, d]` under ids 0..N-1, its
    structure is consistent (trained, links and ids in range), and it finds sampled keys when searching for them."""
    size, dim = keys.shape
    expected_class = faiss.IndexHNSWFlat if index_type == "hnsw" else faiss.IndexIVFFlat
    if not isinstance(index, expected_class):
        raise ValueError(f"it is a {type(index).__name__}, expected {expected_class.__name__}")
    if index.d != dim or index.ntotal != size or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError(
            f"it holds {index.ntotal} vectors of dim {index.d} (metric {index.metric_type}), but the knowledge base "
            f"has {size} keys of dim {dim} compared by inner product"
        )
    if not index.is_trained:
        raise ValueError("it is marked untrained")
    block = 65536
    if index_type == "hnsw":
        storage = faiss.downcast_index(index.storage)
        if not isinstance(storage, faiss.IndexFlat) or storage.ntotal != size or storage.d != dim:
            raise ValueError("its vector storage is not a flat index of the keys' shape")
        vectors = faiss.rev_swig_ptr(storage.get_xb(), size * dim).reshape(size, dim)
        for start in range(0, size, block):
            if not np.array_equal(vectors[start : start + block], keys[start : start + block]):
                raise ValueError(f"its stored vectors differ from the keys (rows {start}..{start + block - 1})")
        hnsw = index.hnsw
        levels = faiss.vector_to_array(hnsw.levels).astype(np.int64)
        cumulative = faiss.vector_to_array(hnsw.cum_nneighbor_per_level).astype(np.int64)
        offsets = faiss.vector_to_array(hnsw.offsets).astype(np.int64)
        links = _swig_array(hnsw.neighbors, np.int32)
        top = int(levels.max()) if len(levels) else 0
        if (
            len(levels) != size
            or (size and levels.min() < 1)
            or len(cumulative) <= top
            or (len(cumulative) and cumulative[0] != 0)
            or (np.diff(cumulative) < 0).any()
            or hnsw.max_level != top - 1
            or not 0 <= hnsw.entry_point < size
            or levels[hnsw.entry_point] != top
        ):
            raise ValueError("its HNSW levels, entry point or neighbours-per-level table are inconsistent")
        if len(offsets) != size + 1 or offsets[0] != 0 or not np.array_equal(np.diff(offsets), cumulative[levels]):
            raise ValueError("its HNSW link offsets disagree with the node levels")
        if len(links) != offsets[-1] or (len(links) and (links.min() < -1 or links.max() >= size)):
            raise ValueError(f"its HNSW links are not ids in [-1, {size})")
        index.hnsw.efSearch = max(params["hnsw_ef_search"], 1)
    else:
        nlist = ivf_nlist(size, params)
        quantizer = faiss.downcast_index(index.quantizer)
        if (
            index.nlist != nlist
            or not isinstance(quantizer, faiss.IndexFlat)
            or quantizer.metric_type != faiss.METRIC_INNER_PRODUCT
            or quantizer.ntotal != nlist
            or quantizer.d != dim
            or not quantizer.is_trained
        ):
            raise ValueError(f"its coarse quantizer is not a flat inner-product index of {nlist} centroids")
        if not np.isfinite(faiss.rev_swig_ptr(quantizer.get_xb(), nlist * dim)).all():
            raise ValueError("its centroids hold NaN or inf")
        lists = index.invlists
        if lists.nlist != nlist or lists.code_size != 4 * dim:
            raise ValueError("its inverted lists do not match nlist and the key dim")
        seen, total = np.zeros(size, dtype=bool), 0
        for list_no in range(nlist):
            count = lists.list_size(list_no)
            if count == 0:
                continue
            ids = faiss.rev_swig_ptr(lists.get_ids(list_no), count)
            if ids.min() < 0 or ids.max() >= size:
                raise ValueError(f"inverted list {list_no} holds ids outside [0, {size})")
            codes = faiss.rev_swig_ptr(lists.get_codes(list_no), count * 4 * dim).view(np.float32).reshape(count, dim)
            if not np.array_equal(codes, keys[ids]):
                raise ValueError(f"inverted list {list_no} holds vectors that differ from the keys of their ids")
            seen[ids] = True
            total += count
        if total != size or not seen.all():
            raise ValueError(f"its inverted lists do not hold each id in [0, {size}) exactly once")
        index.nprobe = params["ivf_nprobe"]
    _probe_index(index, keys)


def _probe_index(index, keys: np.ndarray) -> None:
    """Search up to PROBE_SIZE evenly spread stored keys with k=1: every hit must be a valid id whose score is its
    key's similarity, and all but PROBE_MAX_MISSES must find the key itself (or one exactly as similar)."""
    size = len(keys)
    sample = np.unique(np.linspace(0, size - 1, min(PROBE_SIZE, size)).round().astype(np.int64))
    queries = keys[sample]
    try:
        scores, ids = index.search(queries, 1)
    except Exception as err:  # noqa: BLE001 (any FAISS failure means the index is unusable)
        raise ValueError(f"searching it failed ({type(err).__name__}: {err})") from err
    scores, ids = scores[:, 0], ids[:, 0]
    if ((ids < -1) | (ids >= size)).any():
        raise ValueError(f"searching it returned ids outside [0, {size})")
    found = ids >= 0
    similarity = (keys[ids[found]] * queries[found]).sum(axis=1)
    if not np.allclose(scores[found], similarity, atol=1e-4):
        raise ValueError("searching it returned scores that are not the similarities of the returned keys")
    self_similarity = (queries * queries).sum(axis=1)
    hits = np.zeros(len(sample), dtype=bool)
    hits[found] = (ids[found] == sample[found]) | (similarity >= self_similarity[found] - 1e-5)
    misses = int((~hits).sum())
    if misses > min(PROBE_MAX_MISSES, len(sample) // 10):
        raise ValueError(f"searching it for {len(sample)} of its own keys missed {misses} of them")


__all__ = [
    "KnowledgeBase",
    "validate_entries",
    "INDEX_TYPES",
    "TEXTS_FILE",
    "decode_texts",
    "encode_texts",
    "read_texts_file",
    "texts_sha256",
]
