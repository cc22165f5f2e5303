import json

import pytest
import torch
from conftest import ID2LABEL, SENTENCES, tiny_student
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForSequenceClassification, pipeline

from hf_reaugkd import KnowledgeBase, ReAugKDForSequenceClassification, ReAugKDModel


@pytest.fixture
def batch(tiny_tokenizer):
    return tiny_tokenizer(SENTENCES, padding=True, return_tensors="pt")


def test_beta_zero_is_the_plain_student(batch):
    model = tiny_student()
    with torch.no_grad():
        out = model(**batch, retrieval_weight=0.0)
        encoder_states = model.reaugkd.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (encoder_states * mask).sum(1) / mask.sum(1)
        expected = torch.log_softmax(model.classifier(pooled), dim=-1)
    assert out.retrieved_probs is None
    assert torch.equal(out.logits, torch.log_softmax(out.student_logits, dim=-1))
    torch.testing.assert_close(out.logits, expected)


def test_k1_beta1_with_own_embedding_returns_that_soft_label(batch):
    model = tiny_student(kb_size=0)
    with torch.no_grad():
        queries = model(**batch, retrieval_weight=0.0).query_embedding  # (B, d)
    soft_labels = torch.softmax(torch.randn(len(queries), 3), dim=-1)
    far_keys = -queries  # distractors pointing away from every query
    kb = KnowledgeBase.build(torch.cat([queries, far_keys]), torch.cat([soft_labels, soft_labels.flip(0)]))
    model.set_knowledge_base(kb)
    with torch.no_grad():
        out = model(**batch, knn_k=1, retrieval_weight=1.0, output_neighbors=True)
    assert torch.equal(out.neighbor_ids.flatten(), torch.arange(len(queries)))
    torch.testing.assert_close(out.logits.softmax(-1), soft_labels)


def test_retrieval_weights_are_a_distribution_and_k_is_clamped(batch):
    model = tiny_student(kb_size=6)
    with torch.no_grad():
        out = model(**batch, knn_k=100, output_neighbors=True)
    assert out.neighbor_ids.shape == (len(SENTENCES), 6)
    torch.testing.assert_close(out.neighbor_weights.sum(-1), torch.ones(len(SENTENCES)))
    torch.testing.assert_close(out.retrieved_probs.sum(-1), torch.ones(len(SENTENCES)))
    torch.testing.assert_close(out.logits.exp().sum(-1), torch.ones(len(SENTENCES)))


def test_mixing_follows_beta_and_per_call_overrides(batch):
    model = tiny_student(kb_size=40, knn_k=4, retrieval_weight=0.3, retrieval_temperature=0.5)
    with torch.no_grad():
        default = model(**batch, output_neighbors=True)
        student = default.student_logits.softmax(-1)
        torch.testing.assert_close(default.logits.exp(), 0.3 * default.retrieved_probs + 0.7 * student)
        assert default.neighbor_ids.shape[1] == 4
        torch.testing.assert_close(default.neighbor_weights, (default.neighbor_scores / 0.5).softmax(-1))
        sharp = model(**batch, knn_k=8, retrieval_temperature=0.01, retrieval_weight=0.9, output_neighbors=True)
    assert sharp.neighbor_ids.shape[1] == 8
    torch.testing.assert_close(sharp.neighbor_weights, (sharp.neighbor_scores / 0.01).softmax(-1))
    torch.testing.assert_close(sharp.logits.exp(), 0.9 * sharp.retrieved_probs + 0.1 * student)
    with pytest.raises(ValueError, match=r"retrieval_weight \(β\) must be in \[0, 1\], got 1.5"):
        model(**batch, retrieval_weight=1.5)


def test_batch_sizes_1_and_512_agree(tiny_tokenizer):
    model = tiny_student(kb_size=300, search_block_size=64)
    texts = [" ".join(SENTENCES[i % 5].split()[: 1 + i % 4]) for i in range(512)]
    inputs = tiny_tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        full = model(**inputs).logits
        singles = torch.cat([model(**tiny_tokenizer(texts[i], return_tensors="pt")).logits for i in range(0, 512, 37)])
    torch.testing.assert_close(full[::37], singles, atol=1e-5, rtol=1e-5)


def test_labels_give_nll_of_mixed_prediction(batch):
    model = tiny_student(kb_size=20)
    labels = torch.tensor([0, 1, 2, 0, 1])
    out = model(**batch, labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.nll_loss(out.logits, labels))


def test_pipeline_with_in_memory_instance(tiny_tokenizer):
    model = tiny_student(kb_size=20)
    classifier = pipeline("text-classification", model=model, tokenizer=tiny_tokenizer, top_k=None)
    scores = classifier([SENTENCES[0]])[0]
    with torch.no_grad():
        probs = model(**tiny_tokenizer(SENTENCES[0], return_tensors="pt")).logits.softmax(-1)[0]
    by_label = {item["label"]: item["score"] for item in scores}
    assert set(by_label) == set(ID2LABEL.values())
    for i, label in ID2LABEL.items():
        assert by_label[label] == pytest.approx(probs[i].item(), abs=1e-6)


@pytest.mark.parametrize("index_type", ["torch", "flat", "hnsw", "ivf"])
def test_save_load_round_trip_in_process(tmp_path, batch, index_type):
    model = tiny_student(kb_size=64, index_type=index_type)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, ReAugKDForSequenceClassification) and isinstance(base, ReAugKDModel)
    assert loaded.config.index_type == index_type
    with torch.no_grad():
        expected = model(**batch, output_neighbors=True)
        torch.testing.assert_close(loaded(**batch).logits, expected.logits, atol=1e-5, rtol=0)
        base_out = base(**batch)
    assert torch.equal(base_out.neighbor_ids, expected.neighbor_ids)
    torch.testing.assert_close(base_out.retrieved_probs, expected.retrieved_probs)


def test_half_precision_load_keeps_the_knowledge_base_fp32(tmp_path):
    tiny_student(kb_size=10).save_pretrained(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.classifier.weight.dtype == torch.bfloat16
    assert model.knowledge_base.keys.dtype == torch.float32 and model.knowledge_base.index_bytes.dtype == torch.uint8


def test_checkpoint_holds_exactly_weights_keys_and_labels(tmp_path):
    model = tiny_student(kb_size=500)
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert set(stored) == set(model.state_dict())  # no tensor stored twice, no side copies
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kb = model.knowledge_base
    assert (
        sum(t.numel() * t.element_size() for t in stored.values())
        == param_bytes + 4 * kb.keys.numel() + 4 * kb.values.numel()
    )


def _rewrite_checkpoint(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_load_reports_kb_shapes_that_disagree_with_the_config(tmp_path):
    tiny_student(kb_size=50).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["kb_size"] = 60
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"knowledge_base.keys: config expects \[60, 16\], checkpoint has \[50, 16\]"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t["reaugkd.knowledge_base.values"].mul_(2), "not probability distributions"),
        (lambda t: t["reaugkd.knowledge_base.keys"][3].fill_(float("inf")), "NaN or inf"),
        (lambda t: t["reaugkd.knowledge_base.index_bytes"][40:].zero_(), "corrupt or truncated"),
    ],
)
def test_load_rejects_invalid_stored_knowledge_base(tmp_path, edit, message):
    tiny_student(kb_size=50, index_type="ivf").save_pretrained(tmp_path)
    _rewrite_checkpoint(tmp_path, edit)
    with pytest.raises(ValueError, match=f"knowledge base stored in .* is invalid: .*{message}"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path)


def test_truncated_checkpoint_raises(tmp_path):
    tiny_student(kb_size=50).save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match="(?i)safetensors|deserializ|incomplete|truncat"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path)


def test_set_knowledge_base_checks_dimensions():
    model = tiny_student(kb_size=0)
    with pytest.raises(ValueError, match="keys of dim 8 .* expects kb_dim=16"):
        model.set_knowledge_base(KnowledgeBase.build(torch.randn(4, 8), torch.full((4, 3), 1 / 3)))


def test_untrained_student_without_kb_predicts_with_beta_zero_and_explains_otherwise(batch):
    model = tiny_student(kb_size=0)
    assert model(**batch, retrieval_weight=0.0).logits.shape == (5, 3)
    with pytest.raises(ValueError, match="knowledge base is empty"):
        model(**batch)


@pytest.mark.slow
def test_100k_by_384_knowledge_base_round_trips(tmp_path, batch):
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(100_000, 384, generator=generator)
    values = torch.softmax(torch.randn(100_000, 3, generator=generator), dim=-1)
    model = ReAugKDForSequenceClassification.from_encoder(
        tiny_student(kb_size=0).reaugkd.encoder, ID2LABEL, knowledge_base=KnowledgeBase.build(keys, values)
    ).eval()
    model.save_pretrained(tmp_path)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kb_bytes = 100_000 * (384 + 3) * 4
    header = 8 + int.from_bytes((tmp_path / "model.safetensors").read_bytes()[:8], "little")
    assert (tmp_path / "model.safetensors").stat().st_size == header + param_bytes + kb_bytes
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.knowledge_base.keys, model.knowledge_base.keys)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)
