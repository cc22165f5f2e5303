import copy
import json
import math

import pytest
import torch
from conftest import ID2LABEL, SENTENCES, dropout_free_student, tiny_student
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForSequenceClassification, pipeline

from hf_reaugkd import KnowledgeBase, ReAugKDForSequenceClassification, ReAugKDModel
from hf_reaugkd.modeling_reaugkd import (
    gated_retrieval_weight,
    mix_probabilities,
    neighbor_label_distribution,
    retrieval_gate_features,
)
from hf_reaugkd.pipeline_reaugkd import ReAugKDTextClassificationPipeline


@pytest.fixture
def batch(tiny_tokenizer):
    return tiny_tokenizer(SENTENCES, padding=True, return_tensors="pt")


# A knowledge base laid out by hand around the query of SENTENCES[0] (see `hand_built_student`):
COSINES = (0.3, 0.9, -0.5, 0.6)  # cosine similarity of KB row j to the query
NEIGHBOR_ORDER = (1, 3, 0, 2)  # the rows by decreasing cosine
SOFT_LABELS = ((0.1, 0.1, 0.8), (0.7, 0.2, 0.1), (0.0, 0.0, 1.0), (0.2, 0.6, 0.2))  # (N=4, C=3)
STUDENT_PROBS = (1 / 8, 2 / 8, 5 / 8)  # what the student classifier predicts for any input


def hand_built_student(tiny_tokenizer, **config_kwargs):
    """A student whose predictions can be written down with plain floats: its classifier always says
    STUDENT_PROBS, and its KB has one key at each of COSINES to the query of SENTENCES[0]. Returns the model
    and a batch holding that sentence twice (two rows, so that the loss is a mean over rows)."""
    model = tiny_student(kb_size=0, **config_kwargs)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor(STUDENT_PROBS).log())
    batch = tiny_tokenizer([SENTENCES[0]] * 2, return_tensors="pt")
    with torch.no_grad():
        query = model(**batch, retrieval_weight=0.0).query_embedding[0]  # (d,), unit norm
    generator = torch.Generator().manual_seed(0)
    keys = []
    for cos in COSINES:
        other = torch.randn(query.shape, generator=generator)
        other = torch.nn.functional.normalize(other - (other @ query) * query, dim=0)  # unit, ⟂ query
        keys.append(cos * query + math.sqrt(1 - cos**2) * other)  # unit, at cosine `cos` to the query
    model.set_knowledge_base(KnowledgeBase.build(torch.stack(keys), torch.tensor(SOFT_LABELS)))
    return model, batch


def hand_mixture(k: int, tau: float, beta: float):
    """(neighbour rows, weights e^{s_j/τ} / Σ e^{s/τ}, retrieved Σ w_j y_j, β · retrieved + (1 − β) · student)."""
    rows = NEIGHBOR_ORDER[:k]
    exps = [math.exp(COSINES[j] / tau) for j in rows]
    weights = [e / sum(exps) for e in exps]
    retrieved = [sum(w * SOFT_LABELS[j][c] for w, j in zip(weights, rows, strict=True)) for c in range(3)]
    mixed = [beta * r + (1 - beta) * p for r, p in zip(retrieved, STUDENT_PROBS, strict=True)]
    return list(rows), weights, retrieved, mixed


def test_hand_mixture_worked_example():
    """The helper against numbers worked out by hand, for k = 3, τ = 0.5, β = 0.3:
    scores (0.9, 0.6, 0.3) → e^1.8, e^1.2, e^0.6 ≈ 6.050, 3.320, 1.822 (Σ ≈ 11.192) → w ≈ (0.5405, 0.2967, 0.1628);
    retrieved = 0.5405 (0.7, 0.2, 0.1) + 0.2967 (0.2, 0.6, 0.2) + 0.1628 (0.1, 0.1, 0.8) ≈ (0.4540, 0.3024, 0.2436);
    mixed = 0.3 · retrieved + 0.7 · (0.125, 0.25, 0.625) ≈ (0.2237, 0.2657, 0.5106)."""
    rows, weights, retrieved, mixed = hand_mixture(3, 0.5, 0.3)
    assert rows == [1, 3, 0]
    assert weights == pytest.approx([0.5405, 0.2967, 0.1628], abs=1e-4)
    assert retrieved == pytest.approx([0.4540, 0.3024, 0.2436], abs=1e-4)
    assert mixed == pytest.approx([0.2237, 0.2657, 0.5106], abs=1e-4)


@pytest.mark.parametrize(
    ("overrides", "k", "tau", "beta"),
    [
        ({}, 3, 0.5, 0.3),  # the config's k, τ_r and β
        ({"knn_k": 2}, 2, 0.5, 0.3),  # the 0.3-cosine row drops out and the weights renormalise
        ({"retrieval_temperature": 0.1}, 3, 0.1, 0.3),  # sharper weights
        ({"retrieval_weight": 0.8}, 3, 0.5, 0.8),  # more of the retrieved distribution
        ({"knn_k": 100}, 4, 0.5, 0.3),  # k clamped to the 4 KB rows
        ({"knn_k": 4, "retrieval_temperature": 2.0, "retrieval_weight": 1.0}, 4, 2.0, 1.0),  # retrieval only
    ],
)
def test_prediction_matches_the_hand_computed_mixture(tiny_tokenizer, overrides, k, tau, beta):
    """Neighbour order, softmax(s / τ_r) weights, retrieved distribution and β-mixture, each against plain-float
    values; every per-call override changes the expected prediction (checked first), so ignoring one fails."""
    model, batch = hand_built_student(tiny_tokenizer, knn_k=3, retrieval_weight=0.3, retrieval_temperature=0.5)
    rows, weights, retrieved, mixed = hand_mixture(k, tau, beta)
    if overrides:
        default = hand_mixture(3, 0.5, 0.3)[3]
        assert max(abs(a - b) for a, b in zip(mixed, default, strict=True)) > 1e-3
    with torch.no_grad():
        out = model(**batch, output_neighbors=True, **overrides)
    assert out.neighbor_ids.tolist() == [rows, rows]
    torch.testing.assert_close(out.neighbor_scores, torch.tensor([COSINES[j] for j in rows]).expand(2, -1))
    torch.testing.assert_close(out.neighbor_weights, torch.tensor(weights).expand(2, -1))
    torch.testing.assert_close(out.student_logits.softmax(-1), torch.tensor(STUDENT_PROBS).expand(2, -1))
    torch.testing.assert_close(out.retrieved_probs, torch.tensor(retrieved).expand(2, -1))
    torch.testing.assert_close(out.logits.exp(), torch.tensor(mixed).expand(2, -1))  # logits = log(mixed)
    torch.testing.assert_close(out.logits.softmax(-1), torch.tensor(mixed).expand(2, -1))  # what pipeline shows


def test_beta_zero_is_the_plain_student(tiny_tokenizer):
    """β = 0: the prediction is the student's own, although the KB would change it. Without `output_neighbors`
    the search is skipped; with it the neighbours come back (to explain) and the prediction stays the student's."""
    model, batch = hand_built_student(tiny_tokenizer, retrieval_weight=0.5)
    with torch.no_grad():
        plain = model(**batch, retrieval_weight=0.0)
        explained = model(**batch, retrieval_weight=0.0, output_neighbors=True)
        mixed = model(**batch, output_neighbors=True)
    assert plain.retrieved_probs is None and plain.neighbor_ids is None
    for out in (plain, explained):
        torch.testing.assert_close(out.logits.softmax(-1), torch.tensor(STUDENT_PROBS).expand(2, -1))
    assert torch.equal(explained.neighbor_ids, mixed.neighbor_ids)
    torch.testing.assert_close(explained.retrieved_probs, mixed.retrieved_probs)
    assert (mixed.logits.softmax(-1) - torch.tensor(STUDENT_PROBS)).abs().max() > 0.01


def test_student_logits_are_the_classifier_on_the_mean_of_the_unpadded_token_states(batch, tiny_tokenizer):
    """Mean pooling ignores padding: each row of a padded batch equals its sentence run alone, which equals the
    classifier applied to the plain mean of that sentence's token states; the query is a unit vector."""
    model = tiny_student()
    assert (batch["attention_mask"] == 0).any()  # the batch really is padded
    with torch.no_grad():
        out = model(**batch, retrieval_weight=0.0)
        for i, sentence in enumerate(SENTENCES):
            alone = tiny_tokenizer(sentence, return_tensors="pt")
            states = model.reaugkd.encoder(**alone).last_hidden_state  # (1, T_i, H), no padding
            expected = torch.log_softmax(model.classifier(states.mean(1)), dim=-1)  # (1, C)
            torch.testing.assert_close(out.logits[i : i + 1], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.query_embedding.norm(dim=-1), torch.ones(len(SENTENCES)))


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


@pytest.mark.parametrize("beta", [1.5, -0.1, float("nan"), "0.5", True])
def test_retrieval_weight_outside_0_1_is_rejected(batch, beta):
    with pytest.raises(ValueError, match=r"retrieval_weight \(β\) must be a number in \[0, 1\], got"):
        tiny_student()(**batch, retrieval_weight=beta)


TEMPERATURE = r"retrieval_temperature \(τ_r\) must be a finite number >= 1e-06"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"knn_k": 0}, "knn_k must be an integer >= 1"), ({"knn_k": -1}, "knn_k must be an integer >= 1"),
     ({"knn_k": 2.5}, "knn_k must be an integer >= 1"), ({"retrieval_temperature": 0.0}, TEMPERATURE),
     ({"retrieval_temperature": -1.0}, TEMPERATURE), ({"retrieval_temperature": 1e-40}, TEMPERATURE),
     ({"retrieval_temperature": float("inf")}, TEMPERATURE), ({"retrieval_temperature": float("nan")}, TEMPERATURE),
     ({"retrieval_temperature": "0.1"}, TEMPERATURE)],
)  # fmt: skip
def test_per_call_k_and_temperature_out_of_range_are_rejected(batch, overrides, message):
    """The config refuses these values, so the per-call overrides must too: k = -1 used to return N - 1 neighbours,
    τ_r = 0 the plain student's prediction, both silently, and τ_r = 1e-40 NaN scores."""
    with pytest.raises(ValueError, match=message):
        tiny_student()(**batch, retrieval_weight=1.0, **overrides)


def test_batch_sizes_1_and_512_agree(tiny_tokenizer):
    model = tiny_student(kb_size=300, search_block_size=64)
    texts = [" ".join(SENTENCES[i % 5].split()[: 1 + i % 4]) for i in range(512)]
    inputs = tiny_tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        full = model(**inputs).logits
        singles = torch.cat([model(**tiny_tokenizer(texts[i], return_tensors="pt")).logits for i in range(0, 512, 37)])
    torch.testing.assert_close(full[::37], singles, atol=1e-5, rtol=1e-5)


def test_labels_give_nll_of_mixed_prediction(tiny_tokenizer):
    """The loss is −log of the mixed probability of each row's label, averaged over rows (not the student's NLL)."""
    model, batch = hand_built_student(tiny_tokenizer, knn_k=3, retrieval_weight=0.3, retrieval_temperature=0.5)
    labels = torch.tensor([0, 2])
    mixed = hand_mixture(3, 0.5, 0.3)[3]  # ≈ (0.2237, 0.2657, 0.5106)
    with torch.no_grad():
        loss = model(**batch, labels=labels).loss
        student_loss = model(**batch, labels=labels, retrieval_weight=0.0).loss
    assert loss.item() == pytest.approx(-(math.log(mixed[0]) + math.log(mixed[2])) / 2, rel=1e-5)
    # β = 0: the student's own NLL, −(ln 1/8 + ln 5/8) / 2
    assert student_loss.item() == pytest.approx(-(math.log(1 / 8) + math.log(5 / 8)) / 2, rel=1e-5)


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


def test_custom_pipeline_scores_a_checkpoint_without_a_problem_type_as_single_label(tiny_tokenizer):
    model = tiny_student(kb_size=20)
    model.config.problem_type = None  # configs saved before regression and multi-label support
    classifier = ReAugKDTextClassificationPipeline(model=model, tokenizer=tiny_tokenizer, top_k=None)
    by_label = {item["label"]: item["score"] for item in classifier([SENTENCES[0]])[0]}
    with torch.no_grad():
        probs = model(**tiny_tokenizer(SENTENCES[0], return_tensors="pt")).logits.softmax(-1)[0]
    assert [by_label[ID2LABEL[i]] for i in range(len(probs))] == pytest.approx(probs.tolist(), abs=1e-6)
    assert sum(by_label.values()) == pytest.approx(1.0)  # the mixed distribution, not one sigmoid per label


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


def test_a_config_sizing_the_knowledge_base_beyond_its_weights_is_refused_before_allocating(tmp_path):
    """An untrusted config's kb_size decides what loading allocates: 2**40 rows (64 TiB) with 50 stored must be
    refused from the weights file's header, and missing tensors named, not allocated and filled with zeros."""
    tiny_student(kb_size=50).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "kb_size": 2**40}))
    with pytest.raises(
        ValueError, match=r"knowledge_base.keys: config expects \[1099511627776, 16\], checkpoint has \[50"
    ):
        AutoModelForSequenceClassification.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    _rewrite_checkpoint(tmp_path, lambda t: [t.pop(n) for n in list(t) if "knowledge_base" in n])
    with pytest.raises(ValueError, match=r"knowledge_base.keys: config expects \[50, 16\], checkpoint has none"):
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


def test_misspelled_keyword_is_rejected(batch):
    with pytest.raises(TypeError, match="retrival_weight"):
        tiny_student()(**batch, retrival_weight=0)


def test_return_dict_false_gives_a_tuple_led_by_logits_or_loss(batch):
    model = tiny_student()
    labels = torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        as_dict = model(**batch, labels=labels)
        plain = model(**batch, return_dict=False)
        with_loss = model(**batch, labels=labels, return_dict=False)
    assert isinstance(plain, tuple) and isinstance(with_loss, tuple)
    assert plain[0].shape == (5, 3)
    torch.testing.assert_close(plain[0], as_dict.logits)
    assert with_loss[0].ndim == 0
    torch.testing.assert_close(with_loss[0], as_dict.loss)
    torch.testing.assert_close(with_loss[1], as_dict.logits)


def test_output_hidden_states_are_the_encoders(batch):
    model = tiny_student()
    num_layers, hidden = model.config.encoder_config.num_hidden_layers, model.config.encoder_config.hidden_size
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        encoder = model.reaugkd.encoder(**batch, output_hidden_states=True).hidden_states
        default = model(**batch)
    assert default.hidden_states is None
    assert len(out.hidden_states) == num_layers + 1 == len(encoder)
    for got, expected in zip(out.hidden_states, encoder, strict=True):
        assert got.shape == (*batch["input_ids"].shape, hidden)
        torch.testing.assert_close(got, expected)


def test_bf16_model_keeps_fp32_knowledge_base_and_finds_the_same_neighbours(batch):
    model = tiny_student(kb_size=50)
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert half.classifier.weight.dtype == torch.bfloat16
    assert half.reaugkd.encoder.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    kb = half.knowledge_base
    assert kb.keys.dtype == kb.values.dtype == torch.float32 and kb.index_bytes.dtype == torch.uint8
    assert torch.equal(kb.keys, model.knowledge_base.keys) and torch.equal(kb.values, model.knowledge_base.values)
    with torch.no_grad():
        expected = model(**batch, knn_k=2, output_neighbors=True)
        got = half(**batch, knn_k=2, output_neighbors=True)
    assert got.query_embedding.dtype == torch.bfloat16
    assert torch.equal(got.neighbor_ids, expected.neighbor_ids)
    assert torch.isfinite(got.logits).all()
    torch.testing.assert_close(got.logits.float().exp(), expected.logits.exp(), atol=2e-2, rtol=0)


@pytest.mark.parametrize("enable", ["gradient_checkpointing_enable", "activation_checkpointing_enable"])
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_checkpointed_training_step_gives_the_same_gradients(tiny_tokenizer, enable):
    inputs = tiny_tokenizer(SENTENCES, padding=True, return_tensors="pt")
    labels = torch.tensor([0, 1, 2, 1, 0])
    plain, checkpointed = dropout_free_student(), dropout_free_student()
    getattr(checkpointed, enable)()
    assert checkpointed.is_activation_checkpointing and not plain.is_activation_checkpointing
    calls = []
    # a module inside a checkpointed layer runs again when the backward pass recomputes the layer
    checkpointed.reaugkd.encoder.encoder.layer[0].intermediate.register_forward_hook(lambda *args: calls.append(1))
    grads = []
    for model in (plain, checkpointed):
        model.train()
        model.zero_grad()
        model(**inputs, labels=labels, retrieval_weight=0.0).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    assert len(calls) == 2  # forward + recompute: checkpointing really was on
    # the same parameters get gradients (not the unused BERT pooler, nor the projection at β = 0) ...
    assert {name for name, grad in grads[0].items() if grad is None} == {
        name for name, grad in grads[1].items() if grad is None
    }
    assert all(grads[0][name] is not None for name in grads[0] if name.startswith("reaugkd.encoder.encoder."))
    # ... and the same ones
    for name, grad in grads[0].items():
        if grad is not None:
            torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=0, msg=name)
    assert grads[0]["reaugkd.encoder.encoder.layer.0.attention.self.query.weight"].abs().max() > 0


def test_missing_hits_fall_back_to_the_student_and_partial_hits_renormalise(tiny_tokenizer, monkeypatch):
    """An approximate index that finds nothing for row 0 (all -1) and two of three for row 1: row 0 is the plain
    student whatever β, row 1 mixes over its two neighbours only, row 2 (all found) is the usual mixture."""
    model, _ = hand_built_student(tiny_tokenizer, knn_k=3, retrieval_weight=0.3, retrieval_temperature=0.5)
    batch = tiny_tokenizer([SENTENCES[0]] * 3, return_tensors="pt")
    inf = float("inf")
    ids = torch.tensor([[-1, -1, -1], [1, 3, -1], [1, 3, 0]])
    scores = torch.tensor([[-inf, -inf, -inf], [0.9, 0.6, -inf], [0.9, 0.6, 0.3]])

    def search(queries, k):
        assert k == 3 and len(queries) == 3
        return scores.clone(), ids.clone()

    monkeypatch.setattr(model.knowledge_base, "search", search)
    monkeypatch.setattr(model.knowledge_base, "index_type", "hnsw")  # an index that may miss: not exhaustive
    for beta in (0.3, 1.0):
        with torch.no_grad():
            out = model(**batch, labels=torch.tensor([0, 1, 2]), retrieval_weight=beta, output_neighbors=True)
        for tensor in (out.logits, out.retrieved_probs, out.neighbor_weights, out.loss):
            assert not torch.isnan(tensor).any()
        assert torch.isfinite(out.loss)
        _, two_weights, two_retrieved, two_mixed = hand_mixture(2, 0.5, beta)
        _, three_weights, _, three_mixed = hand_mixture(3, 0.5, beta)
        probs = out.logits.exp()
        torch.testing.assert_close(probs[0], torch.tensor(STUDENT_PROBS))
        torch.testing.assert_close(probs[1], torch.tensor(two_mixed))
        torch.testing.assert_close(probs[2], torch.tensor(three_mixed))
        torch.testing.assert_close(out.retrieved_probs[0], torch.zeros(3))
        torch.testing.assert_close(out.retrieved_probs[1], torch.tensor(two_retrieved))
        torch.testing.assert_close(out.neighbor_weights[0], torch.zeros(3))
        torch.testing.assert_close(out.neighbor_weights[1], torch.tensor([*two_weights, 0.0]))
        torch.testing.assert_close(out.neighbor_weights[2], torch.tensor(three_weights))


def test_neighbor_label_distribution_by_hand():
    """τ = 0.5 and scores (0.5 ln 3, 0) give e^{s/τ} = (3, 1), weights (3/4, 1/4). A -1 id gets weight 0 whatever its
    score, and a row without any hit gets all-zero weights and an all-zero distribution (not NaN)."""
    soft_labels = torch.tensor([[1.0, 0.0], [0.2, 0.8], [0.5, 0.5]])
    inf = float("inf")
    scores = torch.tensor([[0.5 * math.log(3), 0.0], [0.1, -inf], [0.0, 5.0], [-inf, -inf]])
    ids = torch.tensor([[0, 1], [2, -1], [1, -1], [-1, -1]])
    retrieved, weights = neighbor_label_distribution(scores, ids, soft_labels, 0.5)
    expected_weights = torch.tensor([[0.75, 0.25], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    # row 0: 0.75 (1, 0) + 0.25 (0.2, 0.8) = (0.8, 0.2)
    expected = torch.tensor([[0.8, 0.2], [0.5, 0.5], [0.2, 0.8], [0.0, 0.0]])
    torch.testing.assert_close(weights, expected_weights)
    torch.testing.assert_close(retrieved, expected)
    # τ = 1: weights e^{s} / Σ: scores (ln 4, 0) → (0.8, 0.2); retrieved 0.8 (0.5, 0.5) + 0.2 (1, 0) = (0.6, 0.4),
    # also without the masking of missing hits (all_found: what an exhaustive search's forward takes)
    for all_found in (False, True):
        retrieved, weights = neighbor_label_distribution(
            torch.tensor([[math.log(4), 0.0]]), torch.tensor([[2, 0]]), soft_labels, 1.0, all_found=all_found
        )
        torch.testing.assert_close(weights, torch.tensor([[0.8, 0.2]]))
        torch.testing.assert_close(retrieved, torch.tensor([[0.6, 0.4]]))


def test_mix_probabilities_by_hand():
    student = torch.tensor([[0.5, 0.5], [0.1, 0.9], [0.3, 0.7]])
    retrieved = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.2, 0.8]])
    top_similarity = torch.tensor([0.9, float("-inf"), 0.4])  # row 1: nothing retrieved
    # β = 0.25: 0.25 (1, 0) + 0.75 (0.5, 0.5) = (0.625, 0.375); row 1 stays the student; 0.25 (0.2, 0.8) + 0.75
    # (0.3, 0.7) = (0.275, 0.725)
    torch.testing.assert_close(
        mix_probabilities(student, retrieved, 0.25, top_similarity),
        torch.tensor([[0.625, 0.375], [0.1, 0.9], [0.275, 0.725]]),
    )
    torch.testing.assert_close(
        mix_probabilities(student, retrieved, 1.0, top_similarity), torch.tensor([[1.0, 0.0], [0.1, 0.9], [0.2, 0.8]])
    )
    torch.testing.assert_close(mix_probabilities(student, retrieved, 0.0, top_similarity), student)
    # every query found its neighbours (no top similarity given: an exhaustive search): the plain interpolation
    found = [0, 2]
    torch.testing.assert_close(
        mix_probabilities(student[found], retrieved[found], 0.25), torch.tensor([[0.625, 0.375], [0.275, 0.725]])
    )


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


def test_retrieval_gate_features_by_hand():
    """top similarity 0.6; retrieved (0.75, 0.25): confidence 0.75, entropy −(0.75 ln 0.75 + 0.25 ln 0.25) / ln 2
    = 0.8113; student (0.5, 0.5): entropy 1. A query without hits (score −inf, all-zero retrieved) reads 0 for its
    similarity and retrieved features."""
    features = retrieval_gate_features(
        torch.tensor([0.6, float("-inf")]),
        torch.tensor([[0.75, 0.25], [0.0, 0.0]]),
        torch.tensor([[0.5, 0.5], [0.5, 0.5]]),
    )
    torch.testing.assert_close(
        features, torch.tensor([[0.6, 0.75, 0.8113, 1.0], [0.0, 0.0, 0.0, 1.0]]), atol=1e-4, rtol=0
    )


def test_gated_retrieval_weight_by_hand():
    """σ(1·0.9 + 0·0.8 + 0·0.5 − 1·0.2 + 0.5) = σ(1.2) = 0.76852."""
    beta = gated_retrieval_weight(torch.tensor([[0.9, 0.8, 0.5, 0.2]]), [1.0, 0.0, 0.0, -1.0, 0.5])
    assert beta.shape == (1, 1) and beta.item() == pytest.approx(0.76852, abs=1e-5)


def test_forward_mixes_with_the_per_query_gate_unless_a_weight_is_given(tiny_tokenizer, tmp_path):
    """The hand-built KB's nearest row is at cosine 0.9, so the gate [2, 0, 0, 0, −1] gives β = σ(2·0.9 − 1) = σ(0.8)
    = 0.68997 for the query; a per-call retrieval_weight replaces it."""
    model, batch = hand_built_student(tiny_tokenizer, knn_k=3, retrieval_temperature=0.5, retrieval_weight=0.3)
    model.config.retrieval_gate = [2.0, 0.0, 0.0, 0.0, -1.0]
    probs = model(**batch).logits.exp()[0]
    assert probs.tolist() == pytest.approx(hand_mixture(3, 0.5, 0.68997)[3], abs=1e-4)
    overridden = model(**batch, retrieval_weight=0.3).logits.exp()[0]
    assert overridden.tolist() == pytest.approx(hand_mixture(3, 0.5, 0.3)[3], abs=1e-4)
    model.save_pretrained(tmp_path)
    loaded = ReAugKDForSequenceClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.retrieval_gate == [2.0, 0.0, 0.0, 0.0, -1.0]
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


@pytest.mark.parametrize("gate", [[1.0, 2.0], [0.0, 0.0, 0.0, float("nan"), 0.0], [1e300, 0.0, 0.0, 0.0, 0.0]])
def test_malformed_retrieval_gate_is_rejected(gate):
    """1e300 is finite, but inf in fp32, and inf · 0 (a query's zero feature) is NaN."""
    with pytest.raises(Exception, match=r"retrieval_gate must be 5 numbers .* each within ±1e\+06"):
        tiny_student(kb_size=0, retrieval_gate=gate)
