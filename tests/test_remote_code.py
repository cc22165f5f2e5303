"""Saved checkpoints load through the Auto classes and `pipeline` in a fresh process without hf-reaugkd."""

import pytest
import torch
from conftest import SENTENCES, run_fresh_python, tiny_student

LOAD_AND_PREDICT = """
    import json, sys
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer, pipeline

    try:
        import hf_reaugkd  # noqa: F401
        sys.exit("hf_reaugkd must not be importable here")
    except ImportError:
        pass
    try:
        import faiss  # noqa: F401
        has_faiss = True
    except ImportError:
        has_faiss = False

    results = {{"has_faiss": has_faiss}}
    for name in {names!r}:
        path = {root!r} + "/" + name
        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        classifier = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True).eval()
        base = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        inputs = tokenizer({sentences!r}, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = classifier(**inputs).logits
            retrieved = base(**inputs).retrieved_probs
        scores = pipeline("text-classification", model=path, trust_remote_code=True, top_k=None)({sentences!r})
        results[name] = {{
            "config_class": type(config).__name__,
            "classifier_module": type(classifier).__module__,
            "base_class": type(base).__name__,
            "index_type": config.index_type,
            "logits": logits.tolist(),
            "retrieved": retrieved.tolist(),
            "pipeline": [{{s["label"]: s["score"] for s in row}} for row in scores],
        }}
    print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def saved_students(tmp_path_factory, tiny_tokenizer):
    """Students with a flat and with a trained (HNSW, IVF) index, saved with their tokenizer, and their outputs."""
    root = tmp_path_factory.mktemp("students")
    expected = {}
    inputs = tiny_tokenizer(SENTENCES, padding=True, return_tensors="pt")
    for index_type in ("flat", "hnsw", "ivf"):
        model = tiny_student(kb_size=64, index_type=index_type, knn_k=8)
        model.save_pretrained(root / index_type)
        tiny_tokenizer.save_pretrained(root / index_type)
        with torch.no_grad():
            out = model(**inputs)
        expected[index_type] = (out.logits, out.retrieved_probs, model.config.id2label)
    return root, expected


@pytest.mark.parametrize("block", [("hf_reaugkd",), ("hf_reaugkd", "faiss")], ids=["with-faiss", "without-faiss"])
def test_fresh_process_round_trip(saved_students, tmp_path, block):
    root, expected = saved_students
    code = LOAD_AND_PREDICT.format(names=list(expected), root=str(root), sentences=SENTENCES)
    results = run_fresh_python(code, tmp_path, block=block)
    assert results["has_faiss"] == ("faiss" not in block)
    for index_type, (logits, retrieved, id2label) in expected.items():
        got = results[index_type]
        assert got["config_class"] == "ReAugKDConfig" and got["base_class"] == "ReAugKDModel"
        assert got["classifier_module"].startswith("transformers_modules.")  # the saved remote code, not the package
        assert got["index_type"] == index_type
        assert (torch.tensor(got["logits"]) - logits).abs().max() <= 1e-5
        assert (torch.tensor(got["retrieved"]) - retrieved).abs().max() <= 1e-5
        probs = logits.softmax(-1)
        pipeline_probs = torch.tensor([[row[id2label[i]] for i in range(len(id2label))] for row in got["pipeline"]])
        assert (pipeline_probs - probs).abs().max() <= 1e-5


def test_fresh_process_pipeline_truncates_and_explains_with_neighbours(tmp_path, tiny_tokenizer):
    """The pipeline that travels with the checkpoint: a text far longer than the encoder's positions is truncated
    (no size mismatch), per-call settings reach the model, and `neighbors=K` lists the K best of the neighbours
    that drove the prediction, with the same ids, weights and distributions as the model's own outputs."""
    model = tiny_student(kb_size=40, knn_k=4, retrieval_weight=0.5)
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    with torch.no_grad():
        out = model(**tiny_tokenizer([SENTENCES[0]], return_tensors="pt"), knn_k=4, output_neighbors=True)
    got = run_fresh_python(
        f"""
        import json
        from transformers import pipeline
        classifier = pipeline("text-classification", model={str(tmp_path / "m")!r}, trust_remote_code=True)
        long = classifier(" ".join(["good movie"] * 2000))
        explained = classifier({SENTENCES[0]!r}, neighbors=2)
        plain = classifier({SENTENCES[0]!r}, neighbors=2, retrieval_weight=0.0)
        print(json.dumps([type(classifier).__name__, long, explained, plain]))
        """,
        tmp_path,
    )
    name, long, [explained], [plain] = got
    assert name == "ReAugKDTextClassificationPipeline" and long[0]["label"] in ("negative", "neutral", "positive")
    id2label = model.config.id2label
    mixed = out.logits.exp()[0]
    assert explained["label"] == id2label[int(mixed.argmax())]
    assert explained["score"] == pytest.approx(float(mixed.max()), abs=1e-5)
    assert [row["id"] for row in explained["neighbors"]] == out.neighbor_ids[0, :2].tolist()
    for row, weight, similarity in zip(
        explained["neighbors"], out.neighbor_weights[0], out.neighbor_scores[0], strict=False
    ):
        soft_label = model.knowledge_base.values[row["id"]]
        assert row["weight"] == pytest.approx(float(weight), abs=1e-5)
        assert row["similarity"] == pytest.approx(float(similarity), abs=1e-5)
        assert row["label"] == id2label[int(soft_label.argmax())]
        assert [row["label_distribution"][id2label[i]] for i in range(3)] == pytest.approx(soft_label.tolist())
    retrieved = [explained["retrieved_scores"][id2label[i]] for i in range(3)]
    assert retrieved == pytest.approx(out.retrieved_probs[0].tolist(), abs=1e-5)
    student = out.student_logits[0].softmax(-1)
    assert [explained["student_scores"][id2label[i]] for i in range(3)] == pytest.approx(student.tolist(), abs=1e-5)
    # retrieval_weight=0 per call: the plain student's prediction, still explained by the same neighbours
    assert plain["score"] == pytest.approx(float(student.max()), abs=1e-5)
    assert [row["id"] for row in plain["neighbors"]] == [row["id"] for row in explained["neighbors"]]
