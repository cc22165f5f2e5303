"""FAISS indexes of the knowledge base: building them, and checking stored ones before and after FAISS reads them.

This file travels with saved checkpoints as remote code (a flat sibling of `knowledge_base.py`). FAISS is optional: a
checkpoint with a FAISS index still loads and searches without it (exactly, in torch), and building one says that
`faiss-cpu` is needed.

A stored HNSW/IVF index comes from a checkpoint, i.e. untrusted bytes, and FAISS trusts the length fields it reads (one
changed 8-byte field can make it allocate gigabytes). So the bytes are checked before FAISS reads them, and the index
FAISS returns is checked against the keys before it is searched. What happens when a check fails:

- Refused (ValueError): index bytes that are not a well-formed index of this knowledge base -- a size outside the
  plausible range for `size x dim`, a header (kind, d, ntotal, metric, nlist) that contradicts the config, or a
  length field that points past the end -- unless they are byte for byte what was built (SHA-256 matches).
- Rebuilt from the stored keys, with a warning (`KnowledgeBase.validate(repair_index=True)`, what loading does): an
  index that is well formed but whose bytes differ from what was built (SHA-256 mismatch), that FAISS cannot read, or
  whose content disagrees with the keys (stored vectors, ids, graph links, trained flag, a search probe). Keys and
  soft labels are what predictions depend on; the index only finds them faster, so a rebuilt index (same keys, same
  settings) serves the same purpose as the original.

Checkpoints saved before the checksum existed (no `index_sha256`) get every check but the checksum.
"""

import hashlib
import math
import struct

import numpy as np

try:
    import faiss
except ImportError:
    faiss = None

# Stored keys searched for themselves after deserializing an index; an approximate index may miss a few of them.
PROBE_SIZE = 32
PROBE_MAX_MISSES = PROBE_SIZE // 10
# FAISS serialization (faiss/impl/index_write.cpp): a fourcc per index class; METRIC_INNER_PRODUCT is 0.
INDEX_FOURCC = {"hnsw": b"IHNf", "ivf": b"IwFl"}
FLAT_IP_FOURCC = b"IxFI"
_METRIC_INNER_PRODUCT = 0


def faiss_available() -> bool:
    return faiss is not None


def require_faiss(index_type: str) -> None:
    if faiss is None:
        raise ImportError(
            f"index_type={index_type!r} needs FAISS, which is not installed: `pip install faiss-cpu`, "
            "or use index_type='torch' (exact search in torch)."
        )


def build_index(keys: np.ndarray, index_type: str, params: dict):
    """Train and fill an HNSW or IVF inner-product index over unit-norm fp32 `keys` `(N, d)`."""
    require_faiss(index_type)
    n, dim = keys.shape
    if index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["hnsw_ef_construction"]
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, ivf_nlist(n, params), faiss.METRIC_INNER_PRODUCT)
        index.train(keys)
    index.add(keys)
    return index


def flat_index(keys: np.ndarray):
    """FAISS exact inner-product search over `keys` `(N, d)` (never stored: rebuilt from the keys)."""
    require_faiss("flat")
    index = faiss.IndexFlatIP(keys.shape[1])
    index.add(keys)
    return index


def serialize_index(index) -> tuple[np.ndarray, str]:
    """The index's bytes `(n,)` uint8, and their SHA-256, which loading compares before FAISS reads them."""
    data = faiss.serialize_index(index)
    return data, hashlib.sha256(data).hexdigest()


def check_index_bytes(
    data: np.ndarray, index_type: str, size: int, dim: int, params: dict, expected_sha256: str | None
) -> tuple[str, str | None]:
    """Refuse index bytes that are not a well-formed index of a knowledge base of `size` keys of `dim`, before
    anything reads them.

    Returns their SHA-256, and why they are malformed when they nevertheless are byte for byte what was built (the
    checksum matches, e.g. a layout from another FAISS version that these checks do not know): `read_index` then
    says to rebuild rather than read them. Otherwise malformed bytes raise a ValueError.
    """
    digest = hashlib.sha256(data).hexdigest()
    try:
        _check_index_layout(data, index_type, size, dim, params)
    except _MalformedIndexError as err:
        if digest != expected_sha256:
            raise ValueError(
                f"The stored {index_type} FAISS index ({len(data)} bytes) is corrupt or truncated: {err} "
                "(found before reading it). Rebuild the knowledge base with KnowledgeBase.build(...)."
            ) from None
        return digest, f"its layout is not one these checks know ({err}), so it is not read"
    return digest, None


def read_index(
    data: np.ndarray, index_type: str, keys: np.ndarray, params: dict, expected_sha256: str | None
) -> tuple[object | None, str, str | None]:
    """Deserialize stored HNSW/IVF bytes after `check_index_bytes`, and check the index against the fp32 `keys`
    `(N, d)`. Returns `(index, digest, None)`, or `(None, digest, why it is unusable)` for bytes that differ from what
    was built, that FAISS cannot read, or whose index disagrees with the keys; malformed bytes raise."""
    digest, problem = check_index_bytes(data, index_type, *keys.shape, params, expected_sha256)
    if problem is None and expected_sha256 is not None and digest != expected_sha256:
        problem = (
            f"its SHA-256 ({digest[:16]}...) differs from the one recorded when it was built "
            f"({expected_sha256[:16]}...)"
        )
    if problem is not None:
        return None, digest, problem
    try:
        index = _deserialize_index(data)
        _check_index_content(index, keys, index_type, params)
    except ValueError as err:
        return None, digest, str(err)
    return index, digest, None


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
