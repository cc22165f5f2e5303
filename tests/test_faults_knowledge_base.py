"""Faults in stored knowledge bases: tampered or corrupted FAISS indexes in checkpoints, and KBs that could be
built but never loaded.

Policy under test (see `knowledge_base.py`): invalid keys/soft labels and index bytes that are not a well-formed
index of the KB are refused with a ValueError before FAISS reads anything; a well-formed index whose bytes differ from
what was built, or whose content disagrees with the keys, is rebuilt from the keys with a warning, so predictions are
those of the uncorrupted model. Nothing is silently different.
"""

import hashlib
import json
import logging
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SENTENCES, random_kb, run_fresh_python, tiny_student
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_reaugkd import KnowledgeBase, ReAugKDConfig, ReAugKDForSequenceClassification, faiss_index
from hf_reaugkd.arguments import parse_args
from hf_reaugkd.errors import InputError

INDEX_KEY = "reaugkd.knowledge_base.index_bytes"
TESTS_DIR = Path(__file__).parent


@pytest.fixture
def batch(tiny_tokenizer):
    return tiny_tokenizer(SENTENCES, padding=True, return_tensors="pt")


def unit(n: int, dim: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def index_fields(data: bytes, index_type: str) -> dict[str, int]:
    """Byte offsets of a few fields of a serialized IndexHNSWFlat / IndexIVFFlat (faiss/impl/index_write.cpp),
    parsed here independently of the code under test."""
    fields = {"d": 4, "ntotal": 8, "is_trained": 32}
    if index_type == "hnsw":
        pos = 37
        for name, itemsize in [("probas", 8), ("cum", 4), ("levels", 4), ("offsets", 8), ("links", 4)]:
            fields[f"{name}_len"] = pos
            pos += 8 + struct.unpack_from("<Q", data, pos)[0] * itemsize
        fields["first_link"] = fields["links_len"] + 8
    else:
        dim, nlist = struct.unpack_from("<i", data, 4)[0], struct.unpack_from("<Q", data, 37)[0]
        ilar = 53 + 37 + 8 + 4 * nlist * dim + 1 + 8  # header, nlist, nprobe, quantizer, its centroids, direct map
        assert data[ilar : ilar + 4] == b"ilar" and data[ilar + 20 : ilar + 24] == b"full"
        fields["invlists_nlist"] = ilar + 4
        fields["first_list_size"] = ilar + 24 + 8
        fields["last_id"] = len(data) - 8  # the lists' vectors and ids end the index
    return fields


def rewrite_index(path: Path, edit, sha: str = "checksum") -> None:
    """Apply `edit(bytearray) -> bytearray` to the stored index bytes of the checkpoint at `path`.

    sha: "checksum" keeps the config's recorded SHA-256 (now stale), "legacy" removes it (a checkpoint saved before
    it existed), "forged" records the SHA-256 of the edited bytes (a tamperer who also edits config.json).
    """
    tensors = load_file(path / "model.safetensors")
    data = edit(bytearray(tensors[INDEX_KEY].numpy().tobytes()))
    tensors[INDEX_KEY] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["index_nbytes"] = len(data)
    if sha == "legacy":
        del config["index_sha256"]
    elif sha == "forged":
        config["index_sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (path / "config.json").write_text(json.dumps(config))


def put(fmt: str, offset: int, value):
    def edit(data: bytearray) -> bytearray:
        struct.pack_into(fmt, data, offset, value)
        return data

    return edit


def outputs(model, batch):
    with torch.no_grad():
        out = model(**batch, output_neighbors=True)
    return out.logits, out.neighbor_ids, model.knowledge_base.search(unit(64), 5)[1]


def assert_same_predictions(model, original, batch):
    for got, expected in zip(outputs(model, batch), outputs(original, batch), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def load_with_warnings(path: Path, caplog):
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        model = ReAugKDForSequenceClassification.from_pretrained(path).eval()
    return model, [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "FAISS" in r.getMessage()
    ]


def corrupt(name: str, data: bytearray, index_type: str) -> bytearray:
    """One corruption of a saved index (the cases of the issue)."""
    fields = index_fields(bytes(data), index_type)
    middle = len(data) // 2
    if name == "ntotal":
        return put("<q", fields["ntotal"], 51)(data)
    if name == "d":
        return put("<i", fields["d"], 17)(data)
    if name == "truncated":
        return data[:middle]
    if name == "is_trained":
        return put("<B", fields["is_trained"], 0)(data)
    if name in ("stored_id", "duplicate_id"):  # HNSW: a graph link; IVF: the id of the last stored vector
        value = 10**6 if name == "stored_id" else 0
        return (
            put("<i", fields["first_link"], value)(data)
            if index_type == "hnsw"
            else put("<q", fields["last_id"], value)(data)
        )
    if name == "64_bytes":
        data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
        return data
    raise AssertionError(name)


MALFORMED = ("ntotal", "d", "truncated")  # not a well-formed index of this KB: refused before FAISS reads it
CONTENT = ("is_trained", "stored_id", "duplicate_id", "64_bytes")  # well formed, wrong content: rebuilt


def expected_outcome(index_type: str, name: str, sha: str) -> str:
    if name in MALFORMED:
        # a forged checksum matches the edited bytes: they are then rebuilt, unread, rather than refused
        return "rebuilt" if sha == "forged" else "refused"
    if sha != "checksum" and index_type == "hnsw" and name == "duplicate_id":
        return "same"  # a link rewired to another valid node is a legal graph: same neighbours, nothing to report
    return "rebuilt"


@pytest.mark.parametrize("sha", ["checksum", "legacy", "forged"])
@pytest.mark.parametrize("corruption", MALFORMED + CONTENT)
@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_corrupted_index_is_refused_or_rebuilt_never_silently_different(
    tmp_path, batch, caplog, index_type, corruption, sha
):
    original = tiny_student(kb_size=50, index_type=index_type)
    original.save_pretrained(tmp_path)
    rewrite_index(tmp_path, lambda data: corrupt(corruption, data, index_type), sha)
    expected = expected_outcome(index_type, corruption, sha)
    if expected == "refused":
        with pytest.raises(
            ValueError, match=rf"invalid: The stored {index_type} FAISS index .* corrupt or truncated: "
        ):
            ReAugKDForSequenceClassification.from_pretrained(tmp_path)
        return
    model, warnings = load_with_warnings(tmp_path, caplog)
    assert_same_predictions(model, original, batch)
    if expected == "same":
        assert warnings == []
        return
    assert len(warnings) == 1, warnings
    assert "unusable" in warnings[0] and "Rebuilt it from the 50 stored keys" in warnings[0]
    if corruption in MALFORMED:
        assert "layout is not one these checks know" in warnings[0]
    elif sha == "checksum":
        assert "SHA-256" in warnings[0]
    # the rebuilt index is what the config records now, so saving and loading again is clean
    kb = model.knowledge_base
    assert model.config.index_nbytes == kb.index_bytes.numel()
    assert model.config.index_sha256 == hashlib.sha256(kb.index_bytes.numpy().tobytes()).hexdigest()
    model.save_pretrained(tmp_path / "resaved")
    again, warnings = load_with_warnings(tmp_path / "resaved", caplog)
    assert warnings == []
    assert_same_predictions(again, original, batch)


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_checkpoint_and_kb_file_record_the_index_checksum(tmp_path, index_type):
    model = tiny_student(kb_size=50, index_type=index_type)
    kb = model.knowledge_base
    digest = hashlib.sha256(kb.index_bytes.numpy().tobytes()).hexdigest()
    assert kb.index_sha256 == digest == model.config.index_sha256
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["index_sha256"] == digest
    kb.save(tmp_path / "kb.safetensors")
    with safe_open(tmp_path / "kb.safetensors", "pt") as f:
        assert f.metadata()["index_sha256"] == digest
    assert KnowledgeBase.load(tmp_path / "kb.safetensors").index_sha256 == digest
    assert tiny_student(kb_size=50).config.index_sha256 is None  # exact indexes store no bytes


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_checkpoint_saved_before_the_checksum_loads_and_records_it(tmp_path, batch, caplog, index_type):
    original = tiny_student(kb_size=50, index_type=index_type)
    original.save_pretrained(tmp_path)
    rewrite_index(tmp_path, lambda data: data, sha="legacy")
    assert "index_sha256" not in json.loads((tmp_path / "config.json").read_text())
    model, warnings = load_with_warnings(tmp_path, caplog)
    assert warnings == []
    assert_same_predictions(model, original, batch)
    assert model.config.index_sha256 == original.config.index_sha256  # verified, then recorded for the next save


def test_well_formed_index_of_other_keys_is_rebuilt(tmp_path, batch, caplog):
    """An attacker (or a botched merge) swaps in a valid IVF index of the same shape built over different keys."""
    original = tiny_student(kb_size=50, index_type="ivf")
    original.save_pretrained(tmp_path)
    foreign = random_kb(50, index_type="ivf", seed=5, ivf_nlist=8).index_bytes.numpy().tobytes()
    for sha in ("checksum", "forged"):
        rewrite_index(tmp_path, lambda data, foreign=foreign: bytearray(foreign), sha)
        model, warnings = load_with_warnings(tmp_path, caplog)
        assert len(warnings) == 1 and ("SHA-256" in warnings[0] or "differ from the keys" in warnings[0]), warnings
        assert_same_predictions(model, original, batch)


def test_bytes_with_a_matching_checksum_but_an_unknown_layout_are_rebuilt_not_refused(
    tmp_path, batch, caplog, monkeypatch
):
    """E.g. an index written by a FAISS version whose layout these checks do not know: it is exactly what was built,
    so it is not refused, but it is not read either."""
    original = tiny_student(kb_size=50, index_type="hnsw")
    original.save_pretrained(tmp_path)

    def unknown_layout(*args):
        raise faiss_index._MalformedIndexError("the HNSW links have a new type code")

    monkeypatch.setattr(faiss_index, "_check_index_layout", unknown_layout)
    monkeypatch.setattr(faiss_index, "_deserialize_index", lambda data: pytest.fail("malformed bytes were read"))
    model, warnings = load_with_warnings(tmp_path, caplog)
    assert len(warnings) == 1 and "layout is not one these checks know (the HNSW links have a new type" in warnings[0]
    assert_same_predictions(model, original, batch)


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (MemoryError("std::bad_alloc"), "MemoryError"),
        (
            RuntimeError("Error in read_index at index_read.cpp:1\nsecond line of the reason"),
            "second line of the reason",
        ),
    ],
)
def test_every_faiss_read_failure_becomes_a_value_error_with_the_whole_message(caplog, monkeypatch, error, text):
    kb = random_kb(50, index_type="ivf", ivf_nlist=8)

    def failing(data):
        raise error

    monkeypatch.setattr(faiss_index.faiss, "deserialize_index", failing)
    with pytest.raises(ValueError, match=f"(?s)FAISS index .* unusable: FAISS could not read it .*{text}"):
        kb.validate()
    with caplog.at_level(logging.WARNING):
        kb.validate(repair_index=True)  # rebuilt from the keys; the rebuilt index is cached, not read back
    assert text in caplog.text and "Rebuilt it from the 50 stored keys" in caplog.text


def test_strict_validate_raises_what_loading_repairs():
    kb = random_kb(50, index_type="hnsw")
    fields = index_fields(kb.index_bytes.numpy().tobytes(), "hnsw")
    kb.index_bytes[fields["is_trained"]] = 0
    with pytest.raises(ValueError, match="hnsw FAISS index .* unusable: its SHA-256 .* differs"):
        kb.validate()
    kb.index_sha256 = None  # as from an older file: the content check finds it
    with pytest.raises(ValueError, match="unusable: it is marked untrained"):
        kb.validate()


def test_search_after_the_index_bytes_change_checks_them_too(caplog):
    kb = random_kb(200, index_type="ivf", ivf_nlist=8)
    queries = unit(20)
    expected = kb.search(queries, 5)
    kb.index_bytes[len(kb.index_bytes) // 2 :] ^= 0x5A  # invalidates the cached index: the next search re-reads
    with caplog.at_level(logging.WARNING):
        got = kb.search(queries, 5)
    assert "unusable" in caplog.text
    assert torch.equal(got[1], expected[1])
    torch.testing.assert_close(got[0], expected[0])


def test_kb_file_with_a_corrupt_index_is_rebuilt_on_load(tmp_path, caplog):
    kb = random_kb(100, index_type="ivf", ivf_nlist=4)
    kb.index_bytes[-64:] ^= 0xFF  # the ids of the last inverted list
    kb.save(tmp_path / "kb.safetensors")
    with caplog.at_level(logging.WARNING):
        loaded = KnowledgeBase.load(tmp_path / "kb.safetensors")
    assert "SHA-256" in caplog.text
    queries = unit(8)
    assert torch.equal(loaded.search(queries, 3)[1], random_kb(100).search(queries, 3)[1])


def test_without_faiss_malformed_bytes_are_still_refused_and_search_is_exact(tmp_path, batch, monkeypatch):
    original = tiny_student(kb_size=50, index_type="ivf")
    original.save_pretrained(tmp_path / "ok")
    original.save_pretrained(tmp_path / "bad")
    rewrite_index(tmp_path / "bad", put("<q", 8, 7))
    monkeypatch.setattr(faiss_index, "faiss", None)
    with pytest.raises(ValueError, match="ntotal=7"):
        ReAugKDForSequenceClassification.from_pretrained(tmp_path / "bad")
    model = ReAugKDForSequenceClassification.from_pretrained(tmp_path / "ok").eval()
    assert torch.equal(outputs(model, batch)[1], outputs(original, batch)[1])


def test_config_rejects_a_malformed_checksum():
    with pytest.raises(Exception, match="index_sha256 must be 64 lowercase hex digits"):
        ReAugKDConfig(index_sha256="abc")  # strict config validation wraps the ValueError


@pytest.mark.parametrize("query_mean", [[0.1] * 7, [0.1] * 7 + [float("nan")]])
def test_config_rejects_a_query_mean_of_the_wrong_size_or_not_finite(query_mean):
    with pytest.raises(Exception, match="query_mean must be 8 finite numbers"):
        ReAugKDConfig(kb_dim=8, query_mean=query_mean)


@pytest.mark.parametrize(
    ("setting", "value"),
    [("hnsw_m", 1), ("hnsw_m", 10**9), ("ivf_nprobe", 0), ("ivf_nprobe", -1), ("hnsw_ef_search", 0),
     ("search_block_size", 0), ("index_nbytes", -1)],
)  # fmt: skip
def test_checkpoint_with_index_settings_out_of_range_is_refused_before_faiss_sees_them(tmp_path, setting, value):
    """FAISS asserts or crashes the process on some settings (hnsw_m 1 segfaulted while the index was rebuilt after a
    checksum mismatch); a checkpoint's config is untrusted, so loading refuses them with the setting's name."""
    tiny_student(kb_size=300, index_type="hnsw").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update({setting: value, "index_sha256": "0" * 64})  # a mismatched checksum asks for a rebuild
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match=rf"{setting} must be"):
        ReAugKDForSequenceClassification.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"{setting} must be"):
        KnowledgeBase(10, 4, 2, "hnsw", **{"index_nbytes": value} if setting == "index_nbytes" else {setting: value})


def test_index_settings_out_of_range_are_refused_on_the_command_line():
    with pytest.raises(InputError, match=r"--hnsw_m must be an integer in \[2, 256\], got 1"):
        parse_args(["--demo", "--hnsw_m", "1"])


REMOTE_CODE_LOAD = """
    import json, logging
    import torch
    from transformers import AutoModelForSequenceClassification

    messages = []
    class Capture(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())
    logging.getLogger().addHandler(Capture())
    queries = torch.nn.functional.normalize(torch.randn(64, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    results = {}
    for name in ("content", "malformed"):
        messages.clear()
        try:
            model = AutoModelForSequenceClassification.from_pretrained(ROOT + "/" + name, trust_remote_code=True)
            results[name] = {"module": type(model).__module__, "ids": model.knowledge_base.search(queries, 5)[1].tolist(),
                             "warnings": [m for m in messages if "FAISS" in m]}
        except ValueError as err:
            results[name] = {"error": str(err)}
    print(json.dumps(results))
"""


def test_remote_code_without_the_package_refuses_or_rebuilds_too(tmp_path):
    """The checks travel with the checkpoint: loaded as remote code in a fresh process where hf_reaugkd cannot be
    imported, a rewritten index is rebuilt (with a warning) and a malformed one refused."""
    original = tiny_student(kb_size=50, index_type="hnsw")
    expected = original.knowledge_base.search(unit(64), 5)[1].tolist()
    for name, corruption in (("content", "64_bytes"), ("malformed", "ntotal")):
        original.save_pretrained(tmp_path / name)
        rewrite_index(tmp_path / name, lambda data, corruption=corruption: corrupt(corruption, data, "hnsw"))
    results = run_fresh_python(REMOTE_CODE_LOAD.replace("ROOT", repr(str(tmp_path))), cwd=tmp_path)
    assert results["content"]["module"].startswith("transformers_modules")
    assert results["content"]["ids"] == expected
    assert len(results["content"]["warnings"]) == 1 and "SHA-256" in results["content"]["warnings"][0]
    assert "corrupt or truncated" in results["malformed"]["error"] and "ntotal=51" in results["malformed"]["error"]


# --- memory and random mutations, in a fresh process under an address-space limit --------------------------------

SUBPROCESS = r"""
import hashlib, json, logging, os, resource, struct, sys, tempfile, time
from pathlib import Path
import numpy as np, torch
from conftest import SENTENCES, tiny_student
from safetensors.torch import load_file, save_file
from hf_reaugkd import ReAugKDForSequenceClassification

torch.set_num_threads(1)
plan = json.loads(sys.argv[1])
records = []
class Capture(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger("hf_reaugkd.knowledge_base").addHandler(Capture())
queries = torch.nn.functional.normalize(torch.randn(64, 16, generator=torch.Generator().manual_seed(1)), dim=-1)

def signature(model):
    with torch.no_grad():
        return model.knowledge_base.search(queries, 5)[1].tolist()

root = Path(tempfile.mkdtemp())
originals = {}
for index_type in ("hnsw", "ivf"):
    model = tiny_student(kb_size=50, index_type=index_type)
    model.save_pretrained(root / index_type)
    originals[index_type] = (load_file(root / index_type / "model.safetensors"),
                             json.loads((root / index_type / "config.json").read_text()), signature(model))
    signature(ReAugKDForSequenceClassification.from_pretrained(root / index_type))  # warm up threads and caches

def vm_size():
    return int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024

resource.setrlimit(resource.RLIMIT_AS, (vm_size() + plan["headroom"], resource.getrlimit(resource.RLIMIT_AS)[1]))
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
results = []
for case in plan["cases"]:
    tensors, config, expected = originals[case["index_type"]]
    data = bytearray(tensors["reaugkd.knowledge_base.index_bytes"].numpy().tobytes())
    for offset, fmt, value in case.get("puts", []):
        struct.pack_into(fmt, data, offset, value)
    for offset, mask in case.get("xors", []):
        data[offset] ^= mask
    path = root / "case"
    path.mkdir(exist_ok=True)
    save_file({**tensors, "reaugkd.knowledge_base.index_bytes": torch.frombuffer(bytes(data), dtype=torch.uint8)},
              path / "model.safetensors", metadata={"format": "pt"})
    case_config = dict(config)
    if case["sha"] == "legacy":
        del case_config["index_sha256"]
    (path / "config.json").write_text(json.dumps(case_config))
    records.clear()
    start = time.perf_counter()
    try:
        model = ReAugKDForSequenceClassification.from_pretrained(path)
        outcome = {"outcome": "loaded", "same": signature(model) == expected}
    except ValueError as err:
        outcome = {"outcome": "refused", "message": str(err)[:300]}
    except BaseException as err:
        outcome = {"outcome": "error", "message": f"{type(err).__name__}: {err}"[:300]}
    outcome.update(seconds=time.perf_counter() - start, warned=any("unusable" in r for r in records))
    results.append({**case, **outcome})
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"results": results, "peak_growth": peak - baseline}))
"""


def run_cases(cases: list[dict]) -> tuple[list[dict], int]:
    plan = {"cases": cases, "headroom": 2 << 30}  # 2 GiB over the process's size once warmed up
    result = subprocess.run(
        [sys.executable, "-c", SUBPROCESS, json.dumps(plan)],
        cwd=TESTS_DIR,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report["results"], report["peak_growth"]


def layout_offsets() -> dict[str, dict[str, int]]:
    return {
        index_type: index_fields(
            tiny_student(kb_size=50, index_type=index_type).knowledge_base.index_bytes.numpy().tobytes(), index_type
        )
        for index_type in ("hnsw", "ivf")
    }


def test_length_field_bombs_are_refused_quickly_in_little_memory():
    """A changed length field made FAISS allocate gigabytes (HNSW: 17.5 GB RSS; under an address-space limit a raw
    `MemoryError: std::bad_alloc`). Each is refused before FAISS reads it, with or without a recorded checksum, in a
    process limited to 2 GiB more address space than it had."""
    fields = layout_offsets()
    bombs = {
        "hnsw": [("links_len", "<Q", 5 * 10**8), ("links_len", "<Q", 2**40 - 1), ("offsets_len", "<Q", 10**9)],
        "ivf": [("invlists_nlist", "<Q", 10**9), ("first_list_size", "<Q", 10**8), ("ntotal", "<q", 10**12)],
    }
    cases = [
        {"index_type": t, "sha": sha, "puts": [[fields[t][name], fmt, value]], "name": name}
        for t, edits in bombs.items()
        for name, fmt, value in edits
        for sha in ("checksum", "legacy")
    ]
    results, peak_growth = run_cases(cases)
    for result in results:
        assert result["outcome"] == "refused", result
        assert "corrupt or truncated" in result["message"], result
        assert result["seconds"] < 60, result  # a hang guard, not a speed goal
    assert peak_growth < 500 * 2**20


def test_random_byte_mutations_never_change_neighbours_silently():
    """30 seeded mutations of 8 random bytes per index type, with the checksum recorded and without it (an older
    checkpoint): every load is refused with a ValueError or gives exactly the original neighbours -- after a
    warning whenever the checksum was recorded -- and stays fast and small."""
    sizes = {t: tiny_student(kb_size=50, index_type=t).config.index_nbytes for t in ("hnsw", "ivf")}
    cases = []
    for index_type, nbytes in sizes.items():
        for seed in range(30):
            generator = torch.Generator().manual_seed(seed)
            offsets = torch.randperm(nbytes, generator=generator)[:8].tolist()
            masks = torch.randint(1, 256, (8,), generator=generator).tolist()
            for sha in ("checksum", "legacy"):
                xors = [list(pair) for pair in zip(offsets, masks, strict=True)]
                cases.append({"index_type": index_type, "sha": sha, "xors": xors, "seed": seed})
    results, peak_growth = run_cases(cases)
    outcomes = {}
    for result in results:
        assert result["outcome"] in ("refused", "loaded"), result
        if result["outcome"] == "loaded":
            assert result["same"], result
            assert result["warned"] or result["sha"] == "legacy", result
        assert result["seconds"] < 60, result  # a hang guard, not a speed goal
        key = (result["sha"], result["outcome"], result["warned"])
        outcomes[key] = outcomes.get(key, 0) + 1
    assert outcomes.get(("checksum", "loaded", True), 0) > 0  # most mutations hit content: rebuilt
    assert peak_growth < 500 * 2**20


# --- item 3: what build/add/remove accept is exactly what load accepts ----------------------------------------------


def zero_norm_message() -> str:
    with pytest.raises(ValueError) as info:
        random_kb(10).add(torch.zeros(1, 16), torch.tensor([[1.0, 0.0, 0.0]]))
    return str(info.value)


def test_zero_norm_key_is_rejected_by_add_with_the_message_loading_gives(tmp_path):
    message = zero_norm_message()
    assert "1 knowledge-base keys cannot be normalised to unit length" in message and "row 10" in message
    with pytest.raises(ValueError, match="cannot be normalised"):
        KnowledgeBase.build(torch.zeros(3, 16), torch.full((3, 3), 1 / 3))
    # the same KB reaching a checkpoint or a KB file (save does not validate) is refused by loading, same words
    model = tiny_student(kb_size=0)
    model.set_knowledge_base(random_kb(11))
    model.knowledge_base.keys[10] = 0.0
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError) as info:
        ReAugKDForSequenceClassification.from_pretrained(tmp_path)
    assert str(info.value).endswith(f"is invalid: {message}")
    kb = random_kb(11)
    kb.keys[10] = 0.0
    kb.save(tmp_path / "kb.safetensors")
    with pytest.raises(ValueError) as info:
        KnowledgeBase.load(tmp_path / "kb.safetensors")
    assert str(info.value) == message


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e30])
def test_keys_that_cannot_be_normalised_are_rejected_at_build(scale):
    keys = torch.randn(4, 16)
    keys[2] = keys[2] * scale if scale else 0.0
    with pytest.raises(ValueError, match=r"cannot be normalised to unit length .* e.g. row 2"):
        KnowledgeBase.build(keys, torch.full((4, 3), 1 / 3))


def test_add_names_expected_and_found_shapes():
    kb = random_kb(10)
    with pytest.raises(ValueError, match=r"New keys must be \[n, 16\] .*got \(1, 8\)"):
        kb.add(unit(1, dim=8), torch.tensor([[1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"New soft labels must be \[n, 3\] .*3 classes.*got \(1, 2\)"):
        kb.add(unit(1), torch.tensor([[1.0, 0.0]]))
    with pytest.raises(ValueError, match=r"New keys must be \[n, 16\] .*got \(16,\)"):
        kb.add(unit(1)[0], torch.tensor([[1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="New entries disagree: 1 keys vs 2 soft labels"):
        kb.add(unit(1), torch.tensor([[1.0, 0.0, 0.0]] * 2))
    assert kb.add(unit(2), torch.tensor([[1.0, 0.0, 0.0]] * 2)).size == 12


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([999], r"must be in \[0, 10\) .* e.g. \[999\]"),
        ([-1], r"must be in \[0, 10\) .* e.g. \[-1\]"),
        ([1.7], "must be integer row numbers, got dtype torch.float32"),
        ([2.0], "must be integer row numbers"),
        (torch.tensor([True, False]), "must be integer row numbers, got dtype torch.bool"),
        (list(range(10)) + [3], "remove all 10 entries and leave the knowledge base empty"),
    ],
)
def test_remove_rejects_bad_ids(ids, message):
    kb = random_kb(10, index_type="hnsw")
    with pytest.raises(ValueError, match=message):
        kb.remove(ids)
    assert kb.size == 10


def test_remove_accepts_repeats_tensors_and_nothing():
    kb = random_kb(10, index_type="ivf", ivf_nlist=4)
    shrunk = kb.remove([1, 1, 2])
    assert shrunk.size == 8
    torch.testing.assert_close(shrunk.keys, kb.keys[[0, *range(3, 10)]])
    assert kb.remove(torch.tensor([9], dtype=torch.int32)).size == 9
    assert kb.remove([]).size == 10
    shrunk.validate()  # the rebuilt index passes every load check
