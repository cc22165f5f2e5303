"""Exact nearest-neighbour search in torch: a blockwise scan of the keys, in reduced precision where the hardware
computes it natively, then an exact fp32 re-scoring of the best candidates.

This file travels with saved checkpoints as remote code (a flat sibling of `knowledge_base.py`, which searches with
it). It runs on whatever torch and CPU loads a checkpoint, so the fast kernels it picks are probed before they are
trusted.
"""

import functools
from collections.abc import Callable

import torch

from .settings_reaugkd import check_search_dtype

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
    check_search_dtype(search_dtype)
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


def tensor_identity(tensor: torch.Tensor) -> tuple:
    """What changes when a buffer is replaced or edited in place: a derived copy made from it is stale once this
    differs. Inference-mode tensors have no version counter (and cannot be edited in place outside that mode)."""
    version = 0 if tensor.is_inference() else tensor._version
    return (tensor.data_ptr(), version, tuple(tensor.shape), tensor.device)


class ExactSearch:
    """Exact top-k inner-product search over fp32 keys `(N, d)`, holding the reduced-precision copy of the keys it
    scans: made on first use and remade when the keys or the dtype change; not a buffer, so never saved, and the fp32
    keys stay the reference. Memory is bounded for any N and any number of queries (`query_block_size × block_size`
    scores). Settings come with every call: `KnowledgeBase.index_params` may change between calls."""

    def __init__(self):
        self._scan_keys: tuple[tuple, tuple[torch.Tensor, torch.Tensor | None]] | None = None  # (source, copy)

    def keys_for_scan(
        self, keys: torch.Tensor, search_dtype: str, block_size: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`keys` in the scan dtype for their device, and for int8 their per-dimension scales: `keys` itself, or the
        cached copy."""
        dtype = scan_dtype(search_dtype, keys.device.type, keys.shape[1])
        if dtype == keys.dtype:
            return keys, None
        source = (tensor_identity(keys), dtype)
        cached = self._scan_keys  # one read: another thread may replace it meanwhile, source and copy together
        if cached is not None and cached[0] == source:
            return cached[1]
        copy = quantize_columns(keys, block_size) if dtype == torch.int8 else (keys.to(dtype), None)
        self._scan_keys = (source, copy)
        return copy

    def search(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        k: int,
        search_dtype: str,
        block_size: int,
        query_block_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k `(B, k)` of unit `queries` `(B, d)` against unit `keys` `(N, d)`, `k <= N`: a scan in the scan
        dtype, then, for a reduced-precision scan, its `k + max(k, RESCORE_EXTRA[dtype])` best candidates re-scored
        from the fp32 keys. Scores are exact fp32 cosines; the neighbours are the exact ones unless a true neighbour
        fell behind that many others by less than the scan's rounding error."""
        # (N, d): the fp32 keys or a scan copy; int8: scales (d,)
        scan_keys, scales = self.keys_for_scan(keys, search_dtype, block_size)
        rescore = scan_keys.dtype != keys.dtype
        candidates = min(k + max(k, RESCORE_EXTRA[scan_keys.dtype]), len(keys)) if rescore else k
        if len(queries) <= query_block_size:  # the common case, without the split and concatenation
            scores, ids = _scan(queries, scan_keys, scales, candidates, block_size)  # (B, c), (B, c)
        else:
            found = [
                _scan(chunk, scan_keys, scales, candidates, block_size) for chunk in queries.split(query_block_size)
            ]
            scores, ids = torch.cat([s for s, _ in found]), torch.cat([i for _, i in found])  # (B, c)
        if not rescore:
            return scores, ids
        candidates = keys.index_select(0, ids.flatten()).view(*ids.shape, -1)  # (B, c, d), fp32
        scores = (candidates * queries.unsqueeze(1)).sum(-1)  # (B, c): exact fp32 (bmm: 4× slower at B = 32)
        scores, order = scores.topk(k, dim=1)  # (B, k): one top-k, where two sorts cost 0.1 ms more in a forward
        return scores, ids.gather(1, order)


def _scan(
    queries: torch.Tensor, scan_keys: torch.Tensor, scales: torch.Tensor | None, k: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k `(scores, ids)` `(b, k)` of `queries @ keys.T`, one block of `block_size` keys at a time. int8 keys
    are scored against int8 queries with the key scales folded in (`quantize_queries`): int32 scores in units of
    each query's own scale, which rank that query's keys."""
    int8_kernel = int8_matmul(scan_keys.device.type, scan_keys.shape[1]) if scales is not None else None
    if scales is not None:
        queries = quantize_queries(queries, scales)  # (b, d) int8
        if int8_kernel is None:  # dequantized blocks: slower, the same ranking
            queries = queries.float()
    else:
        queries = queries.to(scan_keys.dtype).contiguous()  # (b, d)
    best_scores = best_ids = None
    for start in range(0, len(scan_keys), block_size):
        keys = scan_keys[start : start + block_size]  # (block, d)
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
