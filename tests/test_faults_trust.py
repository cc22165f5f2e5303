"""What the runtimes trust: an ONNX graph serves only the folder it was exported from, and reads it as one snapshot;
a checkpoint's paths, label count, weights and texts are checked before they are used; both runtimes accept the same
arguments and cap a text before tokenizing it."""

import json
import shutil
import threading

import numpy as np
import onnx
import pytest
from conftest import SENTENCES, tiny_student
from safetensors.torch import load_file, save_file
from test_onnx import save, torch_pipeline

from hf_reaugkd import ReAugKDForSequenceClassification, editing, onnx_pipeline
from hf_reaugkd.errors import InputError
from hf_reaugkd.kb_texts import TEXTS_FILE, encode_texts
from hf_reaugkd.onnx_export import export_onnx
from hf_reaugkd.onnx_pipeline import ONNXTextClassificationPipeline, StaleGraphError, read_served_folder
from hf_reaugkd.settings_reaugkd import MAX_TEXT_CHARS

pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_tokenizer):
    """A tiny student with stored texts, exported in fp32 and int8."""
    model = tiny_student(kb_size=60, knn_k=4, retrieval_weight=0.6)
    directory = save(model, tiny_tokenizer, tmp_path_factory.mktemp("trust") / "model")
    editing.export(directory, "int8", None, 64)
    return model, directory


@pytest.fixture
def folder(exported, tmp_path):
    """A copy of the exported folder to tamper with."""
    return shutil.copytree(exported[1], tmp_path / "model")


@pytest.fixture(scope="module")
def exported_fp32(tmp_path_factory, tiny_tokenizer):
    """The same student exported in fp32 only: each edit exports again, and the int8 graph doubles that."""
    model = tiny_student(kb_size=60, knn_k=4, retrieval_weight=0.6)
    directory = save(model, tiny_tokenizer, tmp_path_factory.mktemp("trust_fp32") / "model")
    editing.export(directory)
    return directory


@pytest.fixture
def edited_folder(exported_fp32, tmp_path):
    """A copy of the fp32-only export to edit."""
    return shutil.copytree(exported_fp32, tmp_path / "model")


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_weights(folder, name, change):
    tensors = load_file(folder / "model.safetensors")
    tensors[name] = change(tensors[name])
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


# 3. The graph is bound to everything it serves -----------------------------------------------------------------------


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize(
    "tamper",
    [
        lambda folder: edit_json(folder / "config.json", retrieval_weight=0.1),
        lambda folder: edit_weights(folder, "classifier.weight", lambda w: w * 2),
        lambda folder: edit_weights(folder, "reaugkd.encoder.embeddings.word_embeddings.weight", lambda w: w + 1e-3),
        lambda folder: (folder / "tokenizer.json").write_text(
            (folder / "tokenizer.json").read_text().replace("fun", "fum")
        ),
    ],
    ids=["retrieval_weight in config.json", "classifier weights", "encoder weights", "tokenizer"],
)
def test_a_folder_changed_after_its_export_is_refused(folder, tamper, quantized):
    """These changed the PyTorch answer while the graph went on serving the old one, with no error."""
    ONNXTextClassificationPipeline(folder, quantized=quantized)
    tamper(folder)
    with pytest.raises(StaleGraphError, match=r"exported from other weights.*Re-export it"):
        ONNXTextClassificationPipeline(folder, quantized=quantized)


def test_settings_that_change_no_answer_keep_the_graph(folder):
    edit_json(folder / "config.json", hnsw_ef_search=64, query_mean=[0.0] * 16)
    ONNXTextClassificationPipeline(folder)


def test_a_graph_whose_knowledge_base_was_altered_is_refused(folder):
    """The graph predicted with its own rows and explained with the folder's; its metadata was intact."""
    graph = onnx.load(folder / "onnx" / "model.onnx")
    for initializer in graph.graph.initializer:
        array = onnx.numpy_helper.to_array(initializer)
        if array.ndim == 2 and array.shape[0] == 60 and array.shape[1] == 3:  # the soft labels (N, C)
            initializer.CopyFrom(onnx.numpy_helper.from_array(array[::-1].copy(), initializer.name))
            break
    else:
        pytest.fail("no soft-label initializer found")
    onnx.save(graph, folder / "onnx" / "model.onnx")
    with pytest.raises(StaleGraphError, match="not the graph that was exported"):
        ONNXTextClassificationPipeline(folder)


# 4. The same text twice: ties may come out in any order ---------------------------------------------------------------


def test_the_same_text_added_twice_to_an_exported_folder_exports_again(edited_folder):
    """Identical keys tie, and ONNX Runtime and torch order ties differently: the re-export's parity check refused
    the edit ("same neighbour ids: False"), which is the README's way to correct a label."""
    folder = edited_folder
    config = json.loads((folder / "config.json").read_text())
    edit_json(folder / "config.json", query_mean=[0.0] * config["kb_dim"])
    editing.add_texts(folder, ["hello world"] * 3, ["positive", "negative", "positive"])
    editing.add_texts(folder, ["hello world"], ["negative"])
    model, _ = editing.load_student(folder)
    assert model.knowledge_base.size == 64
    found = ONNXTextClassificationPipeline(folder)(SENTENCES, top_k=None, neighbors=4)
    expected = torch_pipeline(model, editing.load_tokenizer(folder))(SENTENCES, top_k=None, neighbors=4)
    for ours, theirs in zip(found, expected, strict=True):
        assert [row["similarity"] for row in ours["neighbors"]] == pytest.approx(
            [row["similarity"] for row in theirs["neighbors"]], abs=1e-5
        )


# 5. A reload during an edit reads one consistent folder ---------------------------------------------------------------


def test_a_load_that_straddles_an_edit_reads_the_folder_again(edited_folder, monkeypatch):
    """The runtime read the graph and the knowledge base at separate moments: an edit between the two made a
    consistent folder look stale (5 of 1,994 reloads beside 20 edits). Here the edit lands between them, every time
    on the first read: the load reads again and serves the edited folder."""
    read = onnx_pipeline.read_served_folder
    edits = []

    def edit_then_read(model_dir):
        if not edits:
            edits.append(editing.add_texts(model_dir, ["an edit in between"], ["positive"]))
        return read(model_dir)

    monkeypatch.setattr(onnx_pipeline, "read_served_folder", edit_then_read)
    runtime = ONNXTextClassificationPipeline(edited_folder)
    assert runtime.kb_size == 61 and edits == [[60]]


def test_a_reader_reloading_beside_edits_sees_no_error(edited_folder):
    """A reader loads the runtime anew for every call while another thread edits the folder (2 edits here; the
    issue's 20 edits × 2,000 calls: benchmarks/concurrent_edits.py)."""
    folder, errors, calls, done = edited_folder, [], [0], threading.Event()

    def reader():
        while not done.is_set():
            try:
                result = ONNXTextClassificationPipeline(folder)(SENTENCES[0], neighbors=1)
                row = result[0]["neighbors"][0]
                assert row["text"] == f"row {row['id']}" or row["text"].startswith("added")
                calls[0] += 1
            except Exception as err:  # the assertion below shows it
                errors.append(err)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for edit in range(2):
            if edit % 2 == 0:
                editing.add_texts(folder, [f"added {edit}"], ["positive"])
            else:
                editing.remove_rows(folder, ids=[60])
    finally:
        done.set()
        thread.join(timeout=120)
    assert errors == [] and calls[0] > 0


# 6. Paths from a checkpoint stay in its folder ------------------------------------------------------------------------


@pytest.mark.parametrize("shard", ["../outside/model.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_an_index_naming_a_file_outside_the_folder_is_refused(folder, shard):
    weights = load_file(folder / "model.safetensors")
    outside = folder.parent / "outside"
    outside.mkdir(exist_ok=True)
    save_file(weights, outside / "model.safetensors", metadata={"format": "pt"})
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": dict.fromkeys(weights, shard)})
    )
    with pytest.raises(ValueError, match="must be file names in its own folder"):
        ONNXTextClassificationPipeline(folder)
    with pytest.raises(ValueError, match="must be file names in its own folder"):
        read_served_folder(folder)


# 7. A config cannot size an allocation before its check ---------------------------------------------------------------


def test_a_huge_label_count_is_refused_before_a_label_map_is_built(folder):
    """`"num_labels": 30000000` without id2label built a 30M-entry label map (3.3 GB and 93 s at 3M)."""
    config = json.loads((folder / "config.json").read_text())
    del config["id2label"], config["label2id"]
    config["num_labels"] = 30_000_000
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"num_labels must be an integer from 1 to 100,000, got 30000000"):
        ReAugKDForSequenceClassification.from_pretrained(folder)


# 8. Non-finite weights are refused at load, naming them ---------------------------------------------------------------


def test_nan_weights_are_refused_at_load_and_export_naming_them(folder, tiny_tokenizer):
    """They served `[{'label': 'negative', 'score': nan}]`; the export refused them blaming the exporter."""
    edit_weights(folder, "classifier.weight", lambda w: w.index_fill(0, w.new_tensor([1], dtype=int), float("nan")))
    with pytest.raises(ValueError, match=r"hold NaN or infinite values in classifier\.weight.*corrupt"):
        ReAugKDForSequenceClassification.from_pretrained(folder)
    model = tiny_student(kb_size=20)
    model.classifier.bias.data[0] = float("inf")
    directory = save(model, tiny_tokenizer, folder.parent / "inf")
    with pytest.raises(InputError, match=r"NaN or infinite weights \(classifier\.bias\)"):
        export_onnx(model, tiny_tokenizer, directory)


# 9. The texts file must have one text per row in both runtimes --------------------------------------------------------


def test_a_texts_file_of_another_size_is_named_by_the_onnx_runtime(folder):
    """40 texts for 60 rows gave a bare IndexError at `neighbors=`. Here even an export record rewritten to match the
    texts (a tool that re-hashed the folder) does not get them served."""
    from safetensors.numpy import save_file as save_numpy

    save_numpy(encode_texts([f"row {i}" for i in range(40)]), folder / TEXTS_FILE)
    edit_json(folder / "onnx" / "export.json", served_sha256=read_served_folder(folder).sha256)
    with pytest.raises(ValueError, match=r"holds 40 texts for 60 knowledge-base rows"):
        ONNXTextClassificationPipeline(folder)


# 10. Both runtimes cap texts before tokenizing and accept the same arguments -----------------------------------------


def test_both_runtimes_cut_a_huge_text_before_tokenizing(exported, tiny_tokenizer, monkeypatch):
    model, directory = exported
    huge = "great fun " * (MAX_TEXT_CHARS // 5)  # 2 × the cap
    runtime = ONNXTextClassificationPipeline(directory)
    lengths = []
    tokenizer = runtime.tokenizer

    class Recording:
        def encode_batch(self, texts):
            lengths.extend(len(text) for text in texts)
            return tokenizer.encode_batch(texts)

    runtime.tokenizer = Recording()
    onnx_result = runtime(huge)
    classifier = torch_pipeline(model, tiny_tokenizer)
    call = type(classifier.tokenizer).__call__

    def recording_call(self, text, *args, **kwargs):
        lengths.append(len(text))
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(classifier.tokenizer), "__call__", recording_call)
    torch_result = classifier(huge)
    assert lengths == [MAX_TEXT_CHARS, MAX_TEXT_CHARS]
    assert onnx_result[0]["label"] == torch_result[0]["label"]


def test_kb_add_refuses_a_text_over_the_cap_naming_its_line(folder, tmp_path):
    rows = tmp_path / "rows.csv"
    rows.write_text(f"text,label\nfine,positive\n{'x' * (MAX_TEXT_CHARS + 1)},negative\n")
    before = (folder / "model.safetensors").read_bytes()
    with pytest.raises(InputError, match=r"line 3 of the rows file .* is 100,001 characters long; .* 100,000"):
        editing.add_rows(folder, rows)
    assert (folder / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("call", [{"knn_k": 100}, {"knn_k": 60, "top_k": 2}], ids=["k past the rows", "top_k"])
def test_both_runtimes_accept_the_same_arguments_and_agree(exported, tiny_tokenizer, call):
    """knn_k past the knowledge base's size was clamped by PyTorch and refused by ONNX."""
    model, directory = exported
    found = ONNXTextClassificationPipeline(directory)(SENTENCES, **call)
    expected = torch_pipeline(model, tiny_tokenizer)(SENTENCES, **call)
    for ours, theirs in zip(found, expected, strict=True):
        ours, theirs = (ours, theirs) if isinstance(ours, list) else ([ours], [theirs])
        assert [row["label"] for row in ours] == [row["label"] for row in theirs]
        np.testing.assert_allclose([row["score"] for row in ours], [row["score"] for row in theirs], atol=1e-5)


@pytest.mark.parametrize("top_k", ["2", 0, 1.5, True])
def test_both_runtimes_refuse_a_top_k_that_is_not_a_count(exported, tiny_tokenizer, top_k):
    """`top_k="2"` was ignored by one runtime and a TypeError in the other."""
    model, directory = exported
    for runtime in (ONNXTextClassificationPipeline(directory), torch_pipeline(model, tiny_tokenizer)):
        with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
            runtime("the movie", top_k=top_k)
