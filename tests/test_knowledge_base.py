import logging

import pytest
import torch
from conftest import random_kb
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hf_reaugkd.knowledge_base as kb_module
from hf_reaugkd import KnowledgeBase, exact_search, faiss_index


def unit(n: int, d: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_torch_search_matches_brute_force_across_blocks():
    kb = random_kb(300)
    queries = unit(5)
    brute_scores, brute_ids = (queries @ kb.keys.T).topk(7, dim=1)
    for block in (7, 64, 300, 10_000):
        kb.index_params["search_block_size"] = block
        scores, ids = kb.search(queries, 7)
        assert torch.equal(ids, brute_ids)
        torch.testing.assert_close(scores, brute_scores)


@pytest.mark.parametrize(
    ("search_dtype", "dim"),
    [("float32", 16), ("bfloat16", 16), ("float16", 16), ("int8", 16), ("int8", 24)],
)
def test_reduced_precision_scan_returns_the_exact_neighbours_and_similarities(search_dtype, dim):
    kb = random_kb(2000, dim, search_dtype=search_dtype, search_block_size=256, search_query_block_size=3)
    queries = unit(7, dim)
    brute_scores, brute_ids = (queries @ kb.keys.T).topk(9, dim=1)
    scores, ids = kb.search(queries, 9)
    assert scores.dtype == torch.float32
    assert torch.equal(ids, brute_ids)
    torch.testing.assert_close(scores, brute_scores)


@pytest.mark.parametrize("search_dtype", ["bfloat16", "int8"])
def test_candidates_of_a_reduced_precision_scan_are_ranked_by_their_fp32_similarity(search_dtype):
    # Ten keys whose cosines to the query differ by 2e-4 steps: bfloat16 (8 significant bits; also the int8 scan's
    # output) rounds them all to the same value, so only the fp32 re-scoring can put them in order.
    query = torch.nn.functional.normalize(torch.ones(1, 16), dim=-1)
    other = torch.nn.functional.normalize(torch.arange(16.0) - 7.5, dim=0)  # orthogonal to the query
    cosines = 0.98 + 2e-4 * torch.tensor([3, 7, 0, 9, 1, 5, 8, 2, 6, 4], dtype=torch.float32)
    keys = cosines[:, None] * query + (1 - cosines[:, None] ** 2).sqrt() * other
    kb = KnowledgeBase.build(keys, torch.full((10, 3), 1 / 3), search_dtype=search_dtype)
    scores, ids = kb.search(query, 4)
    assert ids[0].tolist() == [3, 6, 1, 8]
    assert kb.search(query, 1)[1].item() == 3  # k = 1 still re-scores more than two candidates
    torch.testing.assert_close(scores[0], cosines[[3, 6, 1, 8]], atol=1e-6, rtol=0)


@pytest.mark.parametrize("stored", [torch.float16, torch.float64])
def test_keys_stored_in_another_dtype_are_scanned_in_float32_and_re_scored(stored):
    # A KB file may hold keys in another dtype (`load` keeps it): a float32 scan is then a copy to re-score from too.
    kb = random_kb(300, 32, search_dtype="float32")
    kb.keys = kb.keys.to(stored)
    queries = unit(4, 32)
    brute_scores, brute_ids = (queries.to(stored) @ kb.keys.T).topk(5, dim=1)
    scores, ids = kb.search(queries, 5)
    assert torch.equal(ids, brute_ids)
    torch.testing.assert_close(scores, brute_scores, check_dtype=False)


@pytest.mark.parametrize("search_dtype", ["float32", "bfloat16", "int8"])
def test_exact_search_takes_queries_that_are_not_contiguous(search_dtype):
    kb = random_kb(200, 32, search_dtype=search_dtype)
    queries = unit(5, 32).T.contiguous().T  # the same values, column-major
    assert not queries.is_contiguous()
    assert torch.equal(kb.search(queries, 3)[1], (queries @ kb.keys.T).topk(3, dim=1).indices)


@pytest.mark.parametrize("search_dtype", ["bfloat16", "int8", "auto"])
def test_scan_copy_follows_the_keys(search_dtype):
    # 500 keys: far more than the 33 candidates re-scored from the fp32 keys, so a stale copy would not find row 17.
    # One query and 32 at once: on CPU, "auto" scans a different copy of the keys for each.
    kb = random_kb(500, search_dtype=search_dtype)
    queries = unit(32)
    kb.search(queries[:1], 1)
    kb.search(queries, 1)
    kb.keys[17] = queries[0]  # an in-place edit: every reduced-precision copy must be remade
    assert kb.search(queries[:1], 1)[1].item() == 17
    assert kb.search(queries, 1)[1][0].item() == 17


def test_int8_keys_are_off_by_at_most_half_a_step_of_their_dimension():
    keys = unit(2000, 128)
    keys[:, 5] = 0.25  # a dimension equal in every key
    quantized, scales = exact_search.quantize_columns(keys, block_size=300)
    # keys - center ≈ quantized * scales: so differences between keys are off by at most one step per dimension
    steps = quantized.float()  # (N, d)
    error = ((steps[1:] - steps[:1]) * scales - (keys[1:] - keys[:1])).abs()  # (N - 1, d)
    assert (error <= scales * (1 + 1e-5)).all()
    assert quantized[:, 5].eq(0).all() and torch.isfinite(scales).all()
    used = torch.arange(128) != 5  # each other dimension spans the int8 range, both ways
    assert quantized.amax(dim=0)[used].eq(127).all() and quantized.amin(dim=0)[used].eq(-127).all()


def test_int8_scan_finds_the_exact_neighbours_of_keys_that_share_a_large_component():
    # Raw embeddings often share an offset on a few dimensions. Quantized around zero, that dimension's steps would be
    # wide, and through the query's own scale every other dimension's too: 164 of 800 true neighbours were missed.
    offset = torch.zeros(128)
    offset[0] = 0.95
    keys = torch.nn.functional.normalize(offset + (1 - 0.95**2) ** 0.5 * unit(10_000, 128), dim=-1)
    queries = torch.nn.functional.normalize(keys[:200] + 0.01 * unit(200, 128, seed=3), dim=-1)
    kb = KnowledgeBase.build(keys, torch.full((10_000, 2), 0.5), search_dtype="int8")
    assert torch.equal(kb.search(queries, 4)[1], (queries @ kb.keys.T).topk(4, dim=1).indices)


def test_int8_scan_scores_are_cosines_up_to_one_scale_and_offset_per_query():
    # Dimensions of very different spread, as in a trained head: the key scales must be folded into the queries.
    spread = torch.linspace(0.05, 3.0, 128)
    keys = torch.nn.functional.normalize(unit(2000, 128) * spread, dim=-1)
    queries = torch.nn.functional.normalize(unit(50, 128, seed=2) * spread, dim=-1)
    quantized, scales = exact_search.quantize_columns(keys, block_size=300)
    query_ints = exact_search.quantize_queries(queries, scales)  # (50, d) int8
    assert query_ints.dtype == torch.int8 and query_ints.abs().amax(dim=1).eq(127).all()
    scores = (query_ints.long() @ quantized.long().T).double()  # (50, N): what the int8 kernel computes
    cosines = (queries @ keys.T).double()  # (50, N)
    best, worst = cosines.argmax(dim=1, keepdim=True), cosines.argmin(dim=1, keepdim=True)  # (50, 1)
    score_range = scores.gather(1, best) - scores.gather(1, worst)  # (50, 1)
    cosine_range = cosines.gather(1, best) - cosines.gather(1, worst)  # (50, 1)
    # what ranks keys: each key's distance below the best key, in cosine units
    below_best = (scores.gather(1, best) - scores) * cosine_range / score_range  # (50, N)
    assert (below_best - (cosines.gather(1, best) - cosines)).abs().max() < 1e-2


def test_scan_copy_follows_keys_replaced_by_a_shorter_view():
    kb = random_kb(500, search_dtype="int8")
    query = unit(1)
    kb.search(query, 1)
    kb.keys, kb.values = kb.keys[:100], kb.values[:100]  # same storage and version, fewer rows
    assert torch.equal(kb.search(query, 3)[1], (query @ kb.keys.T).topk(3, dim=1).indices)


def test_a_knowledge_base_built_in_inference_mode_searches_outside_it():
    with torch.inference_mode():  # its buffers are inference tensors, without a version counter
        kb = random_kb(200, search_dtype="bfloat16")
    query = unit(1)
    assert torch.equal(kb.search(query, 3)[1], (query @ kb.keys.T).topk(3, dim=1).indices)


@pytest.fixture
def fresh_int8_probe():
    """Forget which int8 kernels were found usable, before and after the test (they are cached per process)."""
    exact_search.int8_matmul.cache_clear()
    exact_search._scan_dtype.cache_clear()
    yield
    exact_search.int8_matmul.cache_clear()
    exact_search._scan_dtype.cache_clear()


def broken_int8_matmul(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return torch.zeros(len(queries), keys.shape[1], dtype=torch.int32)


def exact_int8_matmul(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """An int8 matmul that is right on every CPU (torch's own is wrong under oneDNN's AVX2 kernels, which saturate)."""
    return (queries.long() @ keys.long()).int()


def test_an_int8_kernel_that_disagrees_with_an_integer_matmul_is_not_used(monkeypatch, fresh_int8_probe):
    monkeypatch.setattr(torch, "_int_mm", exact_int8_matmul)
    assert exact_search.int8_matmul("cpu", 32) is exact_int8_matmul
    exact_search.int8_matmul.cache_clear()
    monkeypatch.setattr(torch, "_int_mm", broken_int8_matmul)
    assert exact_search.int8_matmul("cpu", 32) is None
    kb = random_kb(300, 32, search_dtype="int8")  # so an explicit int8 scan dequantizes, and stays exact
    queries = unit(4, 32)
    assert torch.equal(kb.search(queries, 5)[1], (queries @ kb.keys.T).topk(5, dim=1).indices)


def test_auto_scans_int8_keys_for_any_batch_and_bf16_keys_without_the_int8_kernel(monkeypatch, fresh_int8_probe):
    """What "auto" picks on a CPU with native bf16, run on every CPU: where the hardware lacks it (AVX2 only) the
    probe is forced, and torch runs the same kernels, only slower."""
    monkeypatch.setattr(exact_search, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(torch, "_int_mm", exact_int8_matmul)
    kb = random_kb(300, 32)
    queries = unit(32, 32)
    for batch in (queries[:1], queries):  # one copy of the keys, whatever the batch size
        assert torch.equal(kb.search(batch, 5)[1], (batch @ kb.keys.T).topk(5, dim=1).indices)
        assert kb._exact_search._scan_keys[1][0].dtype == torch.int8
    monkeypatch.setattr(torch, "_int_mm", broken_int8_matmul)
    exact_search.int8_matmul.cache_clear()
    exact_search._scan_dtype.cache_clear()
    assert torch.equal(kb.search(queries, 5)[1], (queries @ kb.keys.T).topk(5, dim=1).indices)
    assert kb._exact_search._scan_keys[1][0].dtype == torch.bfloat16


def test_search_dtype_auto_and_unknown():
    assert exact_search.scan_dtype("auto", "cuda", 128) == torch.float16
    assert exact_search.scan_dtype("float32", "cpu", 128) == torch.float32
    assert exact_search.int8_matmul("cuda", 128) is None  # its CUDA kernel needs more than 16 query rows
    assert exact_search.int8_matmul("cpu", 140_000) is None  # 140,000 × 127² overflows the int32 scores
    with pytest.raises(ValueError, match="search_dtype must be one of .*, got 'int4'"):
        random_kb(5, search_dtype="int4")


def test_auto_index_type_is_exact_for_small_and_hnsw_for_large_knowledge_bases(monkeypatch):
    monkeypatch.setattr(kb_module, "AUTO_EXACT_MAX_SIZE", 100)
    assert random_kb(100, index_type="auto").index_type == "torch"
    assert random_kb(101, index_type="auto").index_type == "hnsw"
    monkeypatch.setattr(faiss_index, "faiss", None)
    assert random_kb(101, index_type="auto").index_type == "torch"


@pytest.mark.parametrize(
    ("index_type", "exhaustive"), [("torch", True), ("flat", True), ("hnsw", False), ("ivf", False)]
)
def test_only_approximate_indexes_may_miss_hits(index_type, exhaustive, monkeypatch):
    kb = random_kb(400, index_type=index_type, ivf_nlist=4)
    assert kb.exhaustive is exhaustive
    monkeypatch.setattr(faiss_index, "faiss", None)  # HNSW and IVF then search exactly in torch
    assert kb.exhaustive


def test_building_ivf_below_its_useful_size_warns_that_it_misses_neighbours(caplog, monkeypatch):
    def ivf_warnings(size: int) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            random_kb(size, index_type="ivf")
        return [r.getMessage() for r in caplog.records if "IVF index" in r.getMessage()]

    assert len(ivf_warnings(400)) == 1 and "over 400 keys" in ivf_warnings(400)[0]
    monkeypatch.setattr(kb_module, "IVF_MIN_SIZE", 400)
    assert ivf_warnings(400) == []


def test_ivf_nlist_zero_is_about_four_sqrt_n_and_round_trips(tmp_path):
    kb = random_kb(400, index_type="ivf", ivf_nlist=0)
    assert kb._get_faiss_index().nlist == 80
    kb.save(tmp_path / "kb.safetensors")
    loaded = KnowledgeBase.load(tmp_path / "kb.safetensors")  # layout checks expect the same nlist
    assert torch.equal(loaded.search(unit(3), 5)[1], kb.search(unit(3), 5)[1])


def test_keys_are_normalised_and_k_is_clamped():
    kb = random_kb(5)
    torch.testing.assert_close(kb.keys.norm(dim=1), torch.ones(5))
    scores, ids = kb.search(unit(2), 50)
    assert ids.shape == (2, 5) and sorted(ids[0].tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivf"])
def test_faiss_backends_agree_with_exact_search(index_type):
    exact = random_kb(2000, index_type="torch")
    approx = random_kb(2000, index_type=index_type, ivf_nlist=16, ivf_nprobe=16)
    queries = unit(20)
    _, exact_ids = exact.search(queries, 10)
    scores, ids = approx.search(queries, 10)
    recall = (
        sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, exact_ids, strict=True)) / exact_ids.numel()
    )
    assert recall >= (1.0 if index_type in ("flat", "ivf") else 0.95)
    assert (approx.index_bytes.numel() > 0) == (index_type in ("hnsw", "ivf"))
    assert torch.all(scores[:, :-1] >= scores[:, 1:])  # best first


@pytest.mark.parametrize("index_type", ["torch", "hnsw"])
def test_save_load_round_trip(tmp_path, index_type):
    kb = random_kb(100, index_type=index_type, hnsw_m=8)
    kb.save(tmp_path / "kb.safetensors")
    loaded = KnowledgeBase.load(tmp_path / "kb.safetensors")
    assert loaded.index_type == index_type and loaded.index_params["hnsw_m"] == 8
    assert torch.equal(loaded.keys, kb.keys) and torch.equal(loaded.values, kb.values)
    queries = unit(4)
    assert torch.equal(loaded.search(queries, 3)[1], kb.search(queries, 3)[1])


def test_add_and_remove_return_new_knowledge_bases():
    kb = random_kb(10, index_type="hnsw")
    extra_keys, extra_values = unit(3, seed=7), torch.tensor([[1.0, 0.0, 0.0]] * 3)
    grown = kb.add(extra_keys, extra_values)
    assert grown.size == 13 and kb.size == 10 and grown.index_type == "hnsw"
    assert torch.equal(grown.search(extra_keys, 1)[1].flatten(), torch.tensor([10, 11, 12]))
    shrunk = grown.remove([0, 12])
    assert shrunk.size == 11
    torch.testing.assert_close(shrunk.keys[-1], grown.keys[11])


@pytest.mark.parametrize(
    ("keys", "values", "message"),
    [
        (torch.randn(4, 8), torch.full((5, 2), 0.5), "4 keys vs 5 soft labels"),
        (torch.randn(4, 8), torch.full((4, 2), 0.7), "not probability distributions"),
        (torch.randn(4, 8), torch.tensor([[1.5, -0.5]] * 4), "not probability distributions"),
        (torch.tensor([[float("nan")] * 8] * 4), torch.full((4, 2), 0.5), "NaN or inf"),
        (torch.randn(0, 8), torch.zeros(0, 2), "empty"),
        (torch.randn(4, 8, 2), torch.full((4, 2), 0.5), r"\[N, d\]"),
    ],
)
def test_build_rejects_bad_entries(keys, values, message):
    with pytest.raises(ValueError, match=message):
        KnowledgeBase.build(keys, values)


def test_unknown_index_type_and_wrong_class_count():
    with pytest.raises(ValueError, match="Unknown index_type 'annoy'"):
        KnowledgeBase.build(torch.randn(4, 8), torch.full((4, 2), 0.5), "annoy")
    with pytest.raises(ValueError, match="2 classes, expected num_labels=3"):
        kb_module.validate_entries(torch.randn(4, 8), torch.full((4, 2), 0.5), num_labels=3)


def test_empty_knowledge_base_search_says_what_to_do():
    with pytest.raises(ValueError, match="knowledge base is empty.*retrieval_weight=0"):
        KnowledgeBase(0, 16, 3).search(unit(2), 4)


def test_corrupt_index_bytes_and_truncated_file(tmp_path):
    kb = random_kb(50, index_type="ivf", ivf_nlist=4)
    kb.index_bytes.copy_(
        torch.cat([kb.index_bytes[:100], torch.zeros(kb.index_bytes.numel() - 100, dtype=torch.uint8)])
    )
    with pytest.raises(ValueError, match="FAISS index .* corrupt or truncated"):
        kb.validate()
    good = random_kb(50)
    good.save(tmp_path / "kb.safetensors")
    data = (tmp_path / "kb.safetensors").read_bytes()
    (tmp_path / "kb.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="Could not read the knowledge base file"):
        KnowledgeBase.load(tmp_path / "kb.safetensors")


def test_without_faiss_building_says_so_and_search_falls_back_to_exact(monkeypatch):
    hnsw = random_kb(200, index_type="hnsw")
    exact_ids = random_kb(200).search(unit(3), 5)[1]
    monkeypatch.setattr(faiss_index, "faiss", None)
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        random_kb(10, index_type="flat")
    assert torch.equal(hnsw.search(unit(3), 5)[1], exact_ids)


def test_blocked_search_over_queries_and_keys_matches_brute_force():
    """Blocks of 7 keys × 5 queries (neither divides N=200 or B=37) give the brute-force top-k, scores and order."""
    kb = random_kb(200, search_block_size=7, search_query_block_size=5)
    assert kb.index_params["search_block_size"] == 7 and kb.index_params["search_query_block_size"] == 5
    queries = unit(37, seed=3)
    for k in (1, 6, 10, 14):
        brute_scores, brute_ids = (queries @ kb.keys.T).topk(k, dim=1)
        scores, ids = kb.search(queries, k)
        assert scores.shape == ids.shape == (37, k)
        assert torch.equal(ids, brute_ids), k
        torch.testing.assert_close(scores, brute_scores)


@pytest.mark.parametrize("k", [15, 50, 200])
def test_blocked_search_with_k_larger_than_two_blocks_matches_brute_force(k):
    """k above 2 × search_block_size: the running top-k holds fewer than k candidates after two blocks."""
    kb = random_kb(200, search_block_size=7, search_query_block_size=5)
    queries = unit(37, seed=3)
    brute_scores, brute_ids = (queries @ kb.keys.T).topk(k, dim=1)
    scores, ids = kb.search(queries, k)
    assert torch.equal(ids, brute_ids)
    torch.testing.assert_close(scores, brute_scores)


def test_empty_query_batch_returns_empty_results():
    kb = random_kb(20)
    scores, ids = kb.search(torch.zeros(0, 16), 4)
    assert scores.shape == ids.shape == (0, 4)
    assert ids.dtype == torch.long
    assert kb.search(torch.zeros(0, 16), 50)[1].shape == (0, 20)  # k is still clamped to the KB size


@pytest.mark.parametrize("cast", [lambda kb: kb.to(torch.bfloat16), lambda kb: kb.half(), lambda kb: kb.double()])
def test_dtype_casts_keep_keys_and_values_fp32_and_unchanged(cast):
    kb = random_kb(30, index_type="ivf", ivf_nlist=4)
    keys, values, index_bytes = kb.keys.clone(), kb.values.clone(), kb.index_bytes.clone()
    assert index_bytes.numel() > 0
    cast(kb)
    assert kb.keys.dtype == kb.values.dtype == torch.float32
    assert kb.index_bytes.dtype == torch.uint8
    assert torch.equal(kb.keys, keys) and torch.equal(kb.values, values) and torch.equal(kb.index_bytes, index_bytes)
    queries = unit(3)
    assert torch.equal(kb.search(queries.half(), 3)[1], (queries @ keys.T).topk(3, dim=1).indices)


def test_build_normalises_keys_without_touching_the_callers_tensors():
    keys = torch.tensor([[3.0, 4.0], [0.0, -2.0], [1.0, 1.0]])
    values = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]])
    keys_before, values_before = keys.clone(), values.clone()
    kb = KnowledgeBase.build(keys, values, search_block_size=2)  # normalised in two blocks
    s = 2**-0.5
    torch.testing.assert_close(kb.keys, torch.tensor([[0.6, 0.8], [0.0, -1.0], [s, s]]))
    assert torch.equal(keys, keys_before) and torch.equal(values, values_before)
    assert torch.equal(kb.values, values) and kb.values.data_ptr() != values.data_ptr()
    kb.keys.mul_(2)  # the KB's buffers are its own: the caller's tensor does not change either way
    assert torch.equal(keys, keys_before)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda tensors, metadata: metadata.pop("index_params"), r"missing \['index_params metadata'\]"),
        (lambda tensors, metadata: metadata.update(index_params='{"hnsw_M": 32}'), "invalid index settings"),
        (lambda tensors, metadata: metadata.update(index_params="{not json"), "invalid index settings"),
        (lambda tensors, metadata: tensors.update(keys=tensors["keys"].flatten()), r"expected keys \(N, d\)"),
    ],
)
def test_malformed_knowledge_base_file_is_refused_naming_the_file(tmp_path, edit, message):
    random_kb(20).save(tmp_path / "kb.safetensors")
    with safe_open(tmp_path / "kb.safetensors", "pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(tmp_path / "kb.safetensors")
    edit(tensors, metadata)
    save_file(tensors, tmp_path / "kb.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match=message) as error:
        KnowledgeBase.load(tmp_path / "kb.safetensors")
    assert str(tmp_path / "kb.safetensors") in str(error.value)
