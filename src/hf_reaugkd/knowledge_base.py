"""The teacher's knowledge base (KB): normalised embeddings, soft labels, and a nearest-neighbour index.

This file travels with saved checkpoints as remote code, with its flat siblings: `exact_search.py` (the exact torch
search), `faiss_index.py` (FAISS indexes and the checks of stored ones), `kb_texts.py` (the entries' texts) and
`settings_reaugkd.py` (the index settings). Keys and soft labels are what predictions depend on, and they are checked
wherever they come from (`validate_entries`): `build`, `load`, loading a model.
"""

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import logging

from .exact_search import ExactSearch, tensor_identity
from .faiss_index import (
    build_index,
    check_index_bytes,
    faiss_available,
    flat_index,
    read_index,
    require_faiss,
    serialize_index,
)
from .kb_texts import TEXT_TENSORS, decode_texts, encode_texts
from .settings_reaugkd import (
    DEFAULT_INDEX_PARAMS,
    MULTI_LABEL,
    REGRESSION,
    SINGLE_LABEL,
    TRAINED_INDEX_TYPES,
    check_index_params,
    check_index_type,
    check_problem_type,
)

logger = logging.get_logger(__name__)

# What `build(index_type="auto")` makes: exact torch search up to this many entries, HNSW above (torch when FAISS is
# missing). Measured with benchmarks/kb_scaling.py (d = 128, 2 CPU cores, search_dtype "auto", int8 scan): for 32
# queries exact search took 1.3 ms at 10k entries and 2.1 ms at 30k, HNSW (efSearch 128) 1.6 and 3.1 ms; one query
# 0.17 / 0.24 ms against 0.14 / 0.22 ms. Up to 20k exact search is cheaper for batches and at most ~0.04 ms slower for
# one query, finds every true neighbour and needs no index to build or store; its cost grows with N faster than HNSW's.
AUTO_EXACT_MAX_SIZE = 20_000
# Below this many entries IVF at the default nprobe missed the 0.95 recall@16 mark in benchmarks/kb_scaling.py
# (0.82-0.86 from 10k to 100k keys) while HNSW reached 0.98: `build` says so.
IVF_MIN_SIZE = 300_000
# Soft labels must sum to 1 up to this tolerance; fp32 softmax outputs are far closer than that.
DISTRIBUTION_ATOL = 1e-3
# `nn.functional.normalize` divides by max(norm, eps): a key whose fp32 norm is below eps (or overflows) cannot become
# a unit vector.
NORMALIZE_EPS = 1e-12


def resolve_index_type(index_type: str, size: int) -> str:
    """`"auto"` → `"torch"` (exact) for up to `AUTO_EXACT_MAX_SIZE` entries or without FAISS, `"hnsw"` above; any
    other type is returned as it is (after checking it)."""
    if index_type == "auto":
        return "torch" if size <= AUTO_EXACT_MAX_SIZE or not faiss_available() else "hnsw"
    check_index_type(index_type)
    return index_type


def value_predictions(logits: torch.Tensor, problem_type: str, temperature: float = 1.0) -> torch.Tensor:
    """What a classifier's logits `(B, C)` predict in the knowledge base's value space `(B, C)`, fp32: the class
    distribution `softmax(logits / T)` (single-label; T softens a teacher's soft labels), one probability per label
    `sigmoid(logits)` (multi-label), or the number itself (regression). Teacher soft labels, student predictions and
    their mixture all live in this space, so mixing is one weighted mean for every task type."""
    logits = logits.float()
    if problem_type == REGRESSION:
        return logits
    if problem_type == MULTI_LABEL:
        return torch.sigmoid(logits)
    return torch.softmax(logits / temperature, dim=-1)


def validate_entries(
    keys: torch.Tensor, values: torch.Tensor, num_labels: int | None = None, problem_type: str = SINGLE_LABEL
) -> None:
    """Raise a ValueError naming what was expected and what was found if `keys`/`values` are not a valid KB.

    Keys must be a finite `[N, d]` float tensor with N > 0 whose rows can be normalised (non-zero norm); values a
    finite `[N, C]` tensor, with C equal to `num_labels` when given, whose rows are what `problem_type` makes them:
    probability distributions (non-negative, summing to 1) for single-label classification, one probability in
    [0, 1] per label for multi-label, any number for regression. `build` and `load` both run this, so a KB that builds
    also loads, and with the same message otherwise.
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
    not_finite = (~torch.isfinite(values)).any(dim=1)  # (N,)
    if problem_type == REGRESSION:
        bad_rows = not_finite.nonzero().flatten()
        if len(bad_rows):
            raise ValueError(f"{len(bad_rows)} knowledge-base values hold NaN or inf, e.g. row {bad_rows[0].item()}.")
        return
    if problem_type == MULTI_LABEL:
        bad_rows = (not_finite | (values < 0).any(dim=1) | (values > 1).any(dim=1)).nonzero().flatten()
        if len(bad_rows):
            row = bad_rows[0].item()
            raise ValueError(
                f"{len(bad_rows)} knowledge-base values are not per-label probabilities (each in [0, 1]), e.g. row "
                f"{row}: {values[row].tolist()}."
            )
        return
    bad_rows = (
        (not_finite | (values < 0).any(dim=1) | ((values.sum(dim=1) - 1).abs() > DISTRIBUTION_ATOL))
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
        problem_type: str = SINGLE_LABEL,
        **index_params: int | str,
    ):
        super().__init__()
        check_index_type(index_type)
        check_problem_type(problem_type)
        self.problem_type = problem_type  # what a value row is: see `validate_entries`
        if size < 0 or dim < 1 or num_labels < 1 or index_nbytes < 0:
            raise ValueError(
                "size and index_nbytes must be >= 0, dim and num_labels >= 1, got "
                f"size={size}, dim={dim}, num_labels={num_labels}, index_nbytes={index_nbytes}"
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
        self._exact_search = ExactSearch()
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
        return self.index_type not in TRAINED_INDEX_TYPES or not faiss_available()

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
        problem_type: str = SINGLE_LABEL,
        **index_params: int | str,
    ) -> "KnowledgeBase":
        """Make a KB from teacher embeddings `[N, d]` and soft labels `[N, C]` (per-label probabilities for
        multi-label, the teacher's predicted number `[N, 1]` for regression: `problem_type`).

        Keys are L2-normalised and stored in fp32. `index_type="auto"` picks the backend by size (see
        `resolve_index_type`). For `"hnsw"` and `"ivf"` the FAISS index is trained and filled here and its bytes are
        kept, so loading never retrains it.
        """
        return cls._build(keys, values, index_type, normalize_rows=0, problem_type=problem_type, **index_params)

    @classmethod
    def _build(
        cls,
        keys: torch.Tensor,
        values: torch.Tensor,
        index_type: str,
        normalize_rows: int,
        problem_type: str = SINGLE_LABEL,
        **index_params: int | str,
    ) -> "KnowledgeBase":
        """`build`, normalising only the keys from row `normalize_rows` on: `add` and `remove` keep the stored rows'
        bytes as they are (normalising a unit vector again moves it by an ulp), so removing the rows an `add` added
        gives back the same knowledge base, bit for bit."""
        validate_entries(keys, values, problem_type=problem_type)
        index_type = resolve_index_type(index_type, len(keys))
        if index_type != "torch":
            require_faiss(index_type)
        params = {**DEFAULT_INDEX_PARAMS, **index_params}
        nprobe = params["ivf_nprobe"]
        if index_type == "ivf" and len(keys) < IVF_MIN_SIZE and nprobe <= DEFAULT_INDEX_PARAMS["ivf_nprobe"]:
            logger.warning(
                f"An IVF index over {len(keys):,} keys at ivf_nprobe={nprobe} misses true neighbours: below "
                f"{IVF_MIN_SIZE:,} entries recall@16 measured 0.82-0.86 at nprobe 32 (benchmarks/kb_scaling.py). "
                "index_type='hnsw' (what 'auto' builds above 20,000 entries) reached 0.98 or more at every size; or "
                "raise ivf_nprobe."
            )
        kb = cls(len(keys), keys.shape[1], values.shape[1], index_type, 0, problem_type=problem_type, **index_params)
        block = params["search_block_size"]
        kb.keys[:normalize_rows] = keys[:normalize_rows].detach().float().cpu()
        for start in range(normalize_rows, len(keys), block):  # normalise in blocks: no full-size temporaries
            chunk = keys[start : start + block].detach().float().cpu()  # (block, d)
            kb.keys[start : start + block] = nn.functional.normalize(chunk, dim=-1)
        kb.values.copy_(values.detach())
        kb._check_entries()  # exactly what `load` checks, on what will be stored
        if index_type in TRAINED_INDEX_TYPES:
            kb._set_index(build_index(kb.keys.numpy(), index_type, params))
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
        if not faiss_available():  # the bytes are never read (search runs in torch), but malformed ones are refused
            check_index_bytes(
                self._index_data(), self.index_type, self.size, self.dim, self.index_params, self.index_sha256
            )
            return
        self._cache_index(self._load_index(repair_index))

    def _check_entries(self, num_labels: int | None = None) -> None:
        validate_entries(self.keys, self.values, num_labels, self.problem_type)
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
        if self.index_type == "torch" or not faiss_available():
            if self.index_type != "torch":
                logger.warning_once(
                    f"FAISS is not installed: searching the {self.index_type!r} knowledge base exactly in torch "
                    "instead (same or better neighbours, possibly slower). `pip install faiss-cpu` to use the index."
                )
            return self.search_exact(queries.to(self.keys), k)
        index = self._get_faiss_index()
        if self.index_type == "hnsw":
            index.hnsw.efSearch = max(self.index_params["hnsw_ef_search"], k)
        elif self.index_type == "ivf":
            index.nprobe = self.index_params["ivf_nprobe"]
        scores, ids = index.search(queries.detach().float().cpu().numpy(), k)  # (B, k), (B, k)
        scores, ids = torch.from_numpy(scores), torch.from_numpy(ids)
        scores = scores.masked_fill(ids < 0, float("-inf"))
        return scores.to(queries.device), ids.to(queries.device)

    def search_exact(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k `(B, k)` in torch whatever the index type, `queries` `(B, d)` on the keys' device and `k <= size`:
        what `search` runs for `"torch"` (and without FAISS), and what finds the hits an approximate index missed."""
        params = self.index_params
        return self._exact_search.search(
            queries,
            self.keys,
            k,
            params["search_dtype"],
            params["search_block_size"],
            params["search_query_block_size"],
        )

    def _get_faiss_index(self):
        """The FAISS index for the current buffers, made once and reused until the buffers change. Stored HNSW/IVF
        bytes go through the same checks as loading (`_load_index(repair=True)`)."""
        if self._faiss_index_source != self._index_source_id():
            if self.index_type == "flat":
                index = flat_index(self.keys.detach().float().cpu().numpy())
            else:
                index = self._load_index(repair=True)
            self._cache_index(index)
        return self._faiss_index

    def _index_source_id(self) -> tuple:
        source = self.index_bytes if self.index_type in TRAINED_INDEX_TYPES else self.keys
        return (self.index_type, *tensor_identity(source))

    def _cache_index(self, index) -> None:
        self._faiss_index, self._faiss_index_source = index, self._index_source_id()

    def _set_index(self, index) -> None:
        """Store a freshly built HNSW/IVF index: its bytes, their checksum, and the index itself."""
        data, self.index_sha256 = serialize_index(index)
        self.index_bytes = torch.from_numpy(data).to(self.index_bytes.device)
        self._cache_index(index)

    def _index_data(self) -> np.ndarray:
        return np.ascontiguousarray(self.index_bytes.detach().cpu().numpy())

    def _load_index(self, repair: bool):
        """Deserialize the stored HNSW/IVF index after checking its bytes, and check it against the keys
        (`faiss_index.read_index`). Malformed bytes raise. Bytes that differ from what was built, that FAISS cannot
        read, or whose index disagrees with the keys raise too unless `repair`, which rebuilds the index from the keys
        with a warning."""
        data = self._index_data()
        keys = self.keys.detach().float().cpu().contiguous().numpy()
        index, digest, problem = read_index(data, self.index_type, keys, self.index_params, self.index_sha256)
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
        self._set_index(build_index(keys, self.index_type, self.index_params))
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
            problem_type=self.problem_type,
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
            problem_type=self.problem_type,
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
            tensors.update({name: torch.from_numpy(array) for name, array in encode_texts(self.texts).items()})
        metadata = {
            "index_type": self.index_type,
            "index_params": json.dumps(self.index_params),
            "problem_type": self.problem_type,
        }
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
                metadata.get("problem_type", SINGLE_LABEL),
                **params,
            )
        except (TypeError, ValueError) as err:  # not JSON, unknown or out-of-range settings
            raise ValueError(f"{path} holds invalid index settings {metadata['index_params']!r}: {err}") from err
        kb.keys, kb.values, kb.index_bytes = keys, values, index_bytes
        kb.validate(repair_index=True)
        if set(tensors) >= set(TEXT_TENSORS):
            kb.set_texts(decode_texts({name: tensors[name].numpy() for name in TEXT_TENSORS}, path))
        return kb


__all__ = ["KnowledgeBase", "validate_entries", "value_predictions"]
