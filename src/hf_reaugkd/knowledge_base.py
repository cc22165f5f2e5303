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
  finds them faster, so a rebuilt index gives the results the original was built to give.

Checkpoints saved before the checksum existed (no `index_sha256`) get every check but the checksum.
"""

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
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
DEFAULT_INDEX_PARAMS = {
    # torch backend: KB rows scored per block, and queries scored at once; memory is at most
    # search_query_block_size × search_block_size × 4 bytes (256 MiB at the defaults) for any number of queries.
    "search_block_size": 65536,
    "search_query_block_size": 1024,
    "hnsw_m": 32,
    "hnsw_ef_construction": 80,
    "hnsw_ef_search": 64,
    "ivf_nlist": 1024,
    "ivf_nprobe": 32,
}
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
    """

    def __init__(
        self,
        size: int,
        dim: int,
        num_labels: int,
        index_type: str = "torch",
        index_nbytes: int = 0,
        **index_params: int,
    ):
        super().__init__()
        _check_index_type(index_type)
        unknown = set(index_params) - set(DEFAULT_INDEX_PARAMS)
        if unknown:
            raise TypeError(
                f"Unknown index parameters {sorted(unknown)}; expected some of {list(DEFAULT_INDEX_PARAMS)}."
            )
        self.index_type = index_type
        self.index_params = {**DEFAULT_INDEX_PARAMS, **index_params}
        self.register_buffer("keys", torch.zeros(size, dim))
        self.register_buffer("values", torch.zeros(size, num_labels))
        self.register_buffer("index_bytes", torch.zeros(index_nbytes, dtype=torch.uint8))
        self._faiss_index = None
        self._faiss_index_source = None

    @property
    def size(self) -> int:
        return self.keys.shape[0]

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
        **index_params: int,
    ) -> "KnowledgeBase":
        """Make a KB from teacher embeddings `[N, d]` and soft labels `[N, C]`.

        Keys are L2-normalised and stored in fp32. For `"hnsw"` and `"ivf"` the FAISS index is trained and
        filled here and its bytes are kept, so loading never retrains it.
        """
        _check_index_type(index_type)
        if index_type != "torch":
            _require_faiss(index_type)
        validate_entries(keys, values)
        params = {**DEFAULT_INDEX_PARAMS, **index_params}
        kb = cls(len(keys), keys.shape[1], values.shape[1], index_type, 0, **index_params)
        block = params["search_block_size"]
        for start in range(0, len(keys), block):  # normalise in blocks: no full-size temporaries
            chunk = keys[start : start + block].detach().float().cpu()  # (block, d)
            kb.keys[start : start + block] = nn.functional.normalize(chunk, dim=-1)
        kb.values.copy_(values.detach())
        if index_type in TRAINED_INDEX_TYPES:
            index = _train_faiss_index(kb.keys, index_type, params)
            kb.index_bytes = torch.from_numpy(faiss.serialize_index(index))
        return kb

    def validate(self, num_labels: int | None = None) -> None:
        """Check the stored entries (and, for HNSW/IVF, that the index bytes deserialize and match the keys)."""
        validate_entries(self.keys, self.values, num_labels)
        norms = self.keys.float().norm(dim=1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
            worst = (norms - 1).abs().argmax().item()
            raise ValueError(
                f"Knowledge-base keys must be unit vectors; row {worst} has norm {norms[worst].item():.4f}."
            )
        if self.index_type in TRAINED_INDEX_TYPES and faiss is not None:
            index = self._get_faiss_index()
            if index.ntotal != self.size or index.d != self.dim:
                raise ValueError(
                    f"The stored {self.index_type} index holds {index.ntotal} vectors of dim {index.d}, "
                    f"but the knowledge base has {self.size} keys of dim {self.dim}."
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
        """Exact top-k over blocks of queries × blocks of keys, so memory never grows with N or B."""
        query_block = self.index_params["search_query_block_size"]
        results = [self._search_torch_block(chunk, k) for chunk in queries.split(query_block)]
        return torch.cat([scores for scores, _ in results]), torch.cat([ids for _, ids in results])

    def _search_torch_block(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        block = self.index_params["search_block_size"]
        best_scores = best_ids = None
        for start in range(0, self.size, block):
            scores = queries @ self.keys[start : start + block].T  # (b, block)
            top_scores, top_ids = scores.topk(min(k, scores.shape[1]), dim=1)  # (b, ≤k)
            top_ids += start
            if best_scores is not None:
                top_scores = torch.cat([best_scores, top_scores], dim=1)  # (b, ≤2k)
                top_ids = torch.cat([best_ids, top_ids], dim=1)
                top_scores, order = top_scores.topk(min(k, top_scores.shape[1]), dim=1)  # (b, ≤k)
                top_ids = top_ids.gather(1, order)
            best_scores, best_ids = top_scores, top_ids
        return best_scores, best_ids

    def _get_faiss_index(self):
        """The FAISS index for the current buffers, made once and reused until the buffers change."""
        _require_faiss(self.index_type)
        source = self.index_bytes if self.index_type in TRAINED_INDEX_TYPES else self.keys
        source_id = (self.index_type, source.data_ptr(), source._version, source.numel())
        if self._faiss_index_source != source_id:
            if self.index_type == "flat":
                index = faiss.IndexFlatIP(self.dim)
                index.add(self.keys.detach().float().cpu().numpy())
            else:
                index = _deserialize_index(source.cpu().numpy())
            self._faiss_index, self._faiss_index_source = index, source_id
        return self._faiss_index

    def add(self, keys: torch.Tensor, values: torch.Tensor) -> "KnowledgeBase":
        """A new KB with these entries appended (HNSW/IVF indexes are rebuilt over all entries)."""
        return self.build(
            torch.cat([self.keys.cpu(), keys.float().cpu()]),
            torch.cat([self.values.cpu(), values.float().cpu()]),
            self.index_type,
            **self.index_params,
        )

    def remove(self, ids: torch.Tensor | list[int]) -> "KnowledgeBase":
        """A new KB without the entries at `ids` (HNSW/IVF indexes are rebuilt over the remaining entries)."""
        keep = torch.ones(self.size, dtype=torch.bool)
        keep[torch.as_tensor(ids, dtype=torch.long)] = False
        return self.build(self.keys.cpu()[keep], self.values.cpu()[keep], self.index_type, **self.index_params)

    def save(self, path: str | os.PathLike) -> None:
        """Save to one safetensors file, atomically (a failed save leaves an earlier file intact)."""
        path = Path(path)
        tensors = {name: buffer.detach().cpu().contiguous() for name, buffer in self.named_buffers()}
        metadata = {"index_type": self.index_type, "index_params": json.dumps(self.index_params)}
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
        """Load a KB saved by `save()`, validating it."""
        try:
            tensors = load_file(path)
            with safe_open(path, "pt") as f:
                metadata = f.metadata() or {}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"Could not read the knowledge base file {path}: {err}") from err
        missing = {"keys", "values", "index_bytes"} - set(tensors)
        if missing or "index_type" not in metadata:
            raise ValueError(
                f"{path} is not a knowledge-base file: missing {sorted(missing) or ['index_type metadata']}."
            )
        keys, values, index_bytes = tensors["keys"], tensors["values"], tensors["index_bytes"]
        kb = cls(
            *keys.shape,
            values.shape[1],
            metadata["index_type"],
            len(index_bytes),
            **json.loads(metadata["index_params"]),
        )
        kb.keys, kb.values, kb.index_bytes = keys, values, index_bytes
        kb.validate()
        return kb


def _train_faiss_index(keys: torch.Tensor, index_type: str, params: dict):
    """Train and fill an HNSW or IVF inner-product index over unit-norm `keys` `[N, d]`."""
    _require_faiss(index_type)
    vectors = keys.numpy()
    n, dim = vectors.shape
    if index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["hnsw_ef_construction"]
    else:
        nlist = min(params["ivf_nlist"], n)  # k-means needs at least one point per cluster
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
    index.add(vectors)
    return index


def _deserialize_index(data: np.ndarray):
    try:
        return faiss.deserialize_index(data)
    except RuntimeError as err:
        raise ValueError(
            f"The stored FAISS index ({len(data)} bytes) could not be read; it is corrupt or truncated. "
            f"Rebuild the knowledge base with KnowledgeBase.build(...). FAISS said: {str(err).splitlines()[0]}"
        ) from err


__all__ = ["KnowledgeBase", "validate_entries", "INDEX_TYPES"]
