"""`hf-reaugkd export` and the ONNX runtime: one graph with the knowledge base inside, served without PyTorch."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import SENTENCES, run_fresh_python, tiny_student

from hf_reaugkd import cli, editing
from hf_reaugkd.errors import InputError
from hf_reaugkd.onnx_export import export_onnx
from hf_reaugkd.onnx_pipeline import ONNXTextClassificationPipeline, StaleGraphError
from hf_reaugkd.pipeline_reaugkd import ReAugKDTextClassificationPipeline

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TEXTS = [*SENTENCES, "music and the story were long", "loved the scene", "hated it"]  # 8: not the traced batch of 3


def save(model, tokenizer, directory, texts=True):
    if texts:
        model.knowledge_base.set_texts([f"row {i}" for i in range(model.knowledge_base.size)])
        model.config.kb_has_texts = True
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_tokenizer):
    """A tiny student with stored texts, exported by the CLI in fp32 and int8."""
    model = tiny_student(kb_size=60, knn_k=4, retrieval_weight=0.6)
    directory = save(model, tiny_tokenizer, tmp_path_factory.mktemp("exported") / "model")
    cli.main(["export", str(directory), "--quantize", "int8", "--max_knn_k", "8"])
    return model, directory


def torch_pipeline(model, tokenizer):
    return ReAugKDTextClassificationPipeline(model=model, tokenizer=tokenizer)


def assert_same_results(found, expected, atol):
    """Same structure, labels, texts and neighbour ids; probabilities within `atol`."""
    if isinstance(expected, dict):
        assert sorted(found) == sorted(expected)
        for key in expected:
            assert_same_results(found[key], expected[key], atol)
    elif isinstance(expected, list):
        assert len(found) == len(expected)
        for item, reference in zip(found, expected, strict=True):
            assert_same_results(item, reference, atol)
    elif isinstance(expected, float):
        assert found == pytest.approx(expected, abs=atol)
    else:
        assert found == expected


@pytest.mark.parametrize(
    "call",
    [
        {},
        {"top_k": None},
        {"top_k": 2, "neighbors": 3},
        {"neighbors": 4, "knn_k": 7, "retrieval_weight": 1.0},
        {"neighbors": 2, "retrieval_weight": 0.0},
    ],
)
def test_fp32_graph_gives_the_pytorch_pipeline_output(exported, tiny_tokenizer, call):
    model, directory = exported
    onnx_pipeline = ONNXTextClassificationPipeline(directory)
    expected = torch_pipeline(model, tiny_tokenizer)(TEXTS, **call)
    assert_same_results(onnx_pipeline(TEXTS, batch_size=8, **call), expected, atol=1e-5)
    assert_same_results(onnx_pipeline(TEXTS[0], **call), torch_pipeline(model, tiny_tokenizer)(TEXTS[0], **call), 1e-5)


def test_int8_graph_finds_the_exact_neighbours_of_its_own_query(exported):
    """The int8 graph scans int8 keys, then re-scores its candidates from the fp32 keys: its neighbours are the exact
    top-k of the query it computed, with exact similarities, and its probabilities stay close to the fp32 graph's."""
    model, directory = exported
    fp32 = ONNXTextClassificationPipeline(directory).run(TEXTS, knn_k=8)
    int8 = ONNXTextClassificationPipeline(directory, quantized=True).run(TEXTS, knn_k=8)
    query = torch.from_numpy(int8["query_embedding"])  # (B, d), from the int8 encoder
    exact = (query @ model.knowledge_base.keys.T).topk(8, dim=1)  # (B, 8)
    np.testing.assert_array_equal(int8["neighbor_ids"], exact.indices.numpy())
    np.testing.assert_allclose(int8["neighbor_similarities"], exact.values.numpy(), atol=1e-5)
    assert not np.array_equal(int8["query_embedding"], fp32["query_embedding"])  # the encoder is quantized
    assert np.abs(int8["probabilities"] - fp32["probabilities"]).max() < 0.05


def test_the_first_output_is_the_models_logits(exported, tiny_tokenizer):
    """Stock pipelines (optimum's, transformers.js's) read the graph's first output as `logits`: it is the PyTorch
    model's `logits`, the log of the mixed probabilities."""
    model, directory = exported
    runtime = ONNXTextClassificationPipeline(directory)
    assert runtime.session.get_outputs()[0].name == "logits"
    found = runtime.run(TEXTS, knn_k=4)
    with torch.no_grad():
        expected = model(**tiny_tokenizer(TEXTS, padding=True, return_tensors="pt"), knn_k=4).logits
    np.testing.assert_allclose(found["logits"], expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.exp(found["logits"]), found["probabilities"], atol=1e-6)


def test_int8_answers_do_not_depend_on_the_batch(exported):
    """With one activation scale per batch (ONNX Runtime's dynamic quantization), a text's int8 label and neighbours
    changed with the texts batched with it (48 of 50 labels, 18% of neighbour lists the same at batch 32). With one
    scale per row, batches of 1, 8 and 32 texts of different lengths give each text the same neighbours and the same
    probabilities, to fp32 rounding of the unquantized parts."""
    _, directory = exported
    runtime = ONNXTextClassificationPipeline(directory, quantized=True)
    texts = [
        " ".join(TEXTS[i % len(TEXTS)].split()[: 1 + i % 5] + TEXTS[(i * 3) % len(TEXTS)].split()) for i in range(40)
    ]
    by_batch = {}
    for batch in (1, 8, 32):
        runs = [runtime.run(texts[start : start + batch], knn_k=8) for start in range(0, len(texts), batch)]
        by_batch[batch] = {
            name: np.concatenate([run[name] for run in runs]) for name in ("probabilities", "neighbor_ids")
        }
    for batch in (8, 32):
        np.testing.assert_array_equal(by_batch[batch]["neighbor_ids"], by_batch[1]["neighbor_ids"])
        np.testing.assert_allclose(by_batch[batch]["probabilities"], by_batch[1]["probabilities"], atol=1e-6)


def test_runtime_refuses_a_graph_of_another_knowledge_base(exported, tiny_tokenizer, tmp_path):
    _, directory = exported
    other = tiny_student(kb_size=60, seed=3, knn_k=4)
    copy = save(other, tiny_tokenizer, tmp_path / "other")
    shutil.copytree(directory / "onnx", copy / "onnx")
    with pytest.raises(StaleGraphError, match=r"Re-export it with `hf-reaugkd export"):
        ONNXTextClassificationPipeline(copy)


def test_texts_are_part_of_what_the_graph_is_bound_to(exported, tmp_path):
    """Same keys and soft labels, other texts (an edit by a tool that left the graph): refused, not shown."""
    _, directory = exported
    copy = tmp_path / "model"
    shutil.copytree(directory, copy)
    model, _ = editing.load_student(copy)
    model.knowledge_base.set_texts([f"other row {i}" for i in range(model.knowledge_base.size)])
    model.save_pretrained(copy)
    with pytest.raises(StaleGraphError):
        ONNXTextClassificationPipeline(copy)


def test_runtime_refuses_out_of_range_settings(exported):
    _, directory = exported
    onnx_pipeline = ONNXTextClassificationPipeline(directory)
    for call, message in [
        ({"knn_k": 9}, r"more neighbours than this export serves \(8\).*--max_knn_k 9"),
        ({"knn_k": 0}, "knn_k must be an integer >= 1"),
        ({"top_k": "2"}, "top_k must be an integer >= 1"),
        ({"knn_k": True}, "knn_k"),
        ({"retrieval_weight": float("nan")}, r"\[0, 1\]"),
        ({"retrieval_weight": "0.5"}, r"\[0, 1\]"),
        ({"neighbors": 0}, "neighbors"),
        ({"neighbors": 1.5}, "neighbors"),
        ({"neighbors": "3"}, "neighbors"),
        ({"neighbors": []}, "neighbors"),
    ]:
        with pytest.raises(ValueError, match=message):
            onnx_pipeline("the movie", **call)


def test_hnsw_student_exports_an_exact_scan_not_its_export_time_neighbours(tiny_tokenizer, tmp_path):
    """An HNSW knowledge base is searched exactly in the graph: on a batch of 8 (traced: 3), every row gets the exact
    top-k of its own query."""
    pytest.importorskip("faiss")
    model = tiny_student(kb_size=200, index_type="hnsw", knn_k=5)
    directory = save(model, tiny_tokenizer, tmp_path / "hnsw", texts=False)
    export_onnx(model, tiny_tokenizer, directory)
    found = ONNXTextClassificationPipeline(directory).run(TEXTS)
    with torch.no_grad():
        queries = model(
            **tiny_tokenizer(TEXTS, padding=True, return_tensors="pt"), retrieval_weight=0.0
        ).query_embedding
    exact = (queries @ model.knowledge_base.keys.T).topk(5, dim=1)  # (B, 5)
    np.testing.assert_array_equal(found["neighbor_ids"], exact.indices.numpy())
    np.testing.assert_allclose(found["neighbor_similarities"], exact.values.numpy(), atol=1e-5)
    assert len({tuple(row) for row in found["neighbor_ids"].tolist()}) > 1


def test_per_query_gate_is_the_default_and_a_given_beta_replaces_it(tiny_tokenizer, tmp_path):
    model = tiny_student(kb_size=60, knn_k=4, retrieval_gate=[2.0, 1.0, -1.0, 0.5, -0.3])
    directory = save(model, tiny_tokenizer, tmp_path / "gated", texts=False)
    export_onnx(model, tiny_tokenizer, directory)
    onnx_pipeline, reference = ONNXTextClassificationPipeline(directory), torch_pipeline(model, tiny_tokenizer)
    assert_same_results(onnx_pipeline(TEXTS, top_k=None), reference(TEXTS, top_k=None), atol=1e-5)
    assert_same_results(
        onnx_pipeline(TEXTS, top_k=None, retrieval_weight=0.3),
        reference(TEXTS, top_k=None, retrieval_weight=0.3),
        1e-5,
    )


def test_kb_add_exports_again_with_the_recorded_settings(exported, tiny_tokenizer, tmp_path):
    """After `kb add` the folder's graphs (fp32 and int8, as exported) serve the new knowledge base: the runtime loads
    them, the fp32 graph answers as the edited PyTorch model does, and both find the added row as the text's nearest
    neighbour."""
    _, source = exported
    directory = tmp_path / "model"
    shutil.copytree(source, directory)
    config = json.loads((directory / "config.json").read_text())
    # this random student's knowledge base is random keys: give it queries with no common direction to take out, so a
    # gold row is keyed along its own query and is found by it (the keying itself: test_editing.py)
    config["query_mean"] = [0.0] * config["kb_dim"]
    (directory / "config.json").write_text(json.dumps(config))
    text = "awful boring awful"
    with (tmp_path / "rows.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["text", "label"], [text, "positive"]])
    (new_id,) = editing.add_rows(directory, tmp_path / "rows.csv")
    assert new_id == 60 and json.loads((directory / "config.json").read_text())["kb_size"] == 61
    reference = torch_pipeline(editing.load_student(directory)[0], tiny_tokenizer)(text, neighbors=8)
    assert_same_results(ONNXTextClassificationPipeline(directory)(text, neighbors=8), reference, atol=1e-5)
    for quantized in (False, True):
        result = ONNXTextClassificationPipeline(directory, quantized=quantized)(text, neighbors=8)
        assert result[0]["neighbors"][0]["id"] == new_id
        assert result[0]["neighbors"][0]["text"] == text


def test_untraceable_encoder_fails_with_one_line(tiny_tokenizer, tmp_path, monkeypatch):
    model = tiny_student(kb_size=20)
    directory = save(model, tiny_tokenizer, tmp_path / "model", texts=False)
    encoder = model.reaugkd.encoder
    original = encoder.forward

    def data_dependent(**kwargs):  # Python control flow on a tensor's value: no graph can hold it
        outputs = original(**kwargs)
        if outputs.last_hidden_state.sum() > 0:
            outputs.last_hidden_state = outputs.last_hidden_state * 2
        return outputs

    monkeypatch.setattr(encoder, "forward", data_dependent)
    with pytest.raises(InputError, match=r"^The ONNX exporter could not trace the BertModel encoder: [^\n]+$"):
        export_onnx(model, tiny_tokenizer, directory)
    assert not (directory / "onnx").exists()


def test_runtime_runs_where_torch_and_transformers_cannot_be_imported(exported, tmp_path):
    _, directory = exported
    expected = ONNXTextClassificationPipeline(directory)(TEXTS[:3], neighbors=2)
    found = run_fresh_python(
        f"""
        import json, sys
        from hf_reaugkd.onnx_pipeline import ONNXTextClassificationPipeline
        result = ONNXTextClassificationPipeline({str(directory)!r})({TEXTS[:3]!r}, neighbors=2)
        blocked = [name for name in ("torch", "transformers") if name in sys.modules]
        print(json.dumps({{"result": result, "imported": blocked}}))
        """,
        tmp_path,
        block=("torch", "transformers"),
    )
    assert found["imported"] == []
    assert found["result"] == expected


def test_missing_onnxruntime_names_the_extra(exported, tmp_path):
    _, directory = exported
    found = run_fresh_python(
        f"""
        import json
        from hf_reaugkd.onnx_pipeline import ONNXTextClassificationPipeline
        try:
            ONNXTextClassificationPipeline({str(directory)!r})
        except ImportError as err:
            print(json.dumps(str(err)))
        """,
        tmp_path,
        block=("onnxruntime",),
    )
    assert 'pip install "hf-reaugkd[onnx]"' in found


def test_kb_remove_without_the_exporter_drops_the_stale_graph_and_says_so(exported, tmp_path, monkeypatch, caplog):
    from hf_reaugkd import onnx_export

    _, source = exported
    directory = tmp_path / "model"
    shutil.copytree(source, directory)

    def missing():
        raise InputError('Exporting to ONNX needs onnx, onnxscript and onnxruntime: pip install "hf-reaugkd[export]"')

    monkeypatch.setattr(onnx_export, "_import_exporter", missing)
    editing.remove_rows(directory, ids=[0])
    assert not (directory / "onnx").exists()
    assert "Removed" in caplog.text and "hf-reaugkd export" in caplog.text
    assert json.loads((directory / "config.json").read_text())["kb_size"] == 59


def test_sentence_pairs_are_encoded_as_the_pytorch_pipeline_encodes_them(exported, tiny_tokenizer):
    model, directory = exported
    pairs = [{"text": "the movie was good", "text_pair": "a boring long plot"}, {"text": "awful", "text_pair": "fun"}]
    expected = torch_pipeline(model, tiny_tokenizer)(pairs, top_k=None, neighbors=2)
    assert_same_results(ONNXTextClassificationPipeline(directory)(pairs, top_k=None, neighbors=2), expected, 1e-5)


def test_a_loaded_runtime_keeps_explaining_its_own_rows_after_an_edit(exported, tmp_path):
    """The runtime reads the soft labels and texts with the graph: after `kb remove --ids 0` (the folder's rows shift
    by one and the graph is exported again) the loaded runtime still pairs each id with its own row. It used to
    refuse, as the folder no longer held what its graph was exported from."""
    _, directory = exported
    copy = tmp_path / "model"
    shutil.copytree(directory, copy)
    onnx_pipeline = ONNXTextClassificationPipeline(copy)
    before = onnx_pipeline(TEXTS, neighbors=3)
    editing.remove_rows(copy, ids=[0])
    assert onnx_pipeline(TEXTS, neighbors=3) == before
    assert all(row["text"] == f"row {row['id']}" for result in before for row in result["neighbors"])
