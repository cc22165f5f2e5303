"""Evaluation reports what the shipped model predicts: streamed predictions against `forward`, the choice of k and β,
and the metrics against hand-worked examples."""

import numpy as np
import pytest
import torch
from conftest import WORDS, random_kb, tiny_student
from datasets import Dataset

from hf_reaugkd.evaluation import (
    Predictions,
    classification_metrics,
    evaluate_student,
    fit_retrieval_gate,
    gated_mixture,
    knn_accuracy,
    predict,
    select_retrieval_gate,
    select_retrieval_settings,
    split_metrics,
    student_keyed_knowledge_base,
)
from hf_reaugkd.modeling_reaugkd import mix_probabilities

TAU = 0.3


@pytest.fixture
def tokenized(tiny_tokenizer):
    """8 sentences of different lengths (batches of 3 are padded differently from the whole set)."""
    texts = [" ".join(WORDS[(5 * i + j) % len(WORDS)] for j in range(1 + i % 5)) for i in range(8)]
    encoded = tiny_tokenizer(texts)
    return Dataset.from_dict({**encoded, "labels": [i % 3 for i in range(8)]}), texts


@pytest.mark.parametrize(("k", "beta"), [(1, 0.5), (4, 0.3), (4, 1.0), (1, 0.0)])
def test_predict_then_mix_equals_the_models_forward(tiny_tokenizer, tokenized, k, beta):
    dataset, texts = tokenized
    model = tiny_student(kb_size=40)
    predictions = predict(model, dataset, tiny_tokenizer, knn_ks=[1, 4], retrieval_temperature=TAU, batch_size=3)
    assert predictions.student_probs.shape == (8, 3) and set(predictions.retrieved) == {1, 4}
    assert predictions.labels.tolist() == [i % 3 for i in range(8)]
    inputs = tiny_tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs, knn_k=k, retrieval_weight=beta, retrieval_temperature=TAU)
        plain = model(**inputs, retrieval_weight=0.0)
    mixed = mix_probabilities(predictions.student_probs, predictions.retrieved[k], beta)
    torch.testing.assert_close(mixed, expected.logits.exp(), atol=1e-5, rtol=0)
    torch.testing.assert_close(predictions.student_probs, plain.logits.exp(), atol=1e-5, rtol=0)
    if beta > 0:
        torch.testing.assert_close(predictions.retrieved[k], expected.retrieved_probs, atol=1e-5, rtol=0)


def test_predictions_depend_on_k_and_temperature(tiny_tokenizer, tokenized):
    """Guards the test above against a KB where every setting gives the same numbers."""
    dataset, _ = tokenized
    model = tiny_student(kb_size=40)
    sharp = predict(model, dataset, tiny_tokenizer, knn_ks=[1, 4], retrieval_temperature=TAU, batch_size=3)
    flat = predict(model, dataset, tiny_tokenizer, knn_ks=[4], retrieval_temperature=10.0, batch_size=8)
    assert (sharp.retrieved[1] - sharp.retrieved[4]).abs().max() > 1e-2
    assert (sharp.retrieved[4] - flat.retrieved[4]).abs().max() > 1e-2
    torch.testing.assert_close(sharp.student_probs, flat.student_probs, atol=1e-5, rtol=0)


def one_hot_probs(predicted: list[int], num_labels: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predicted), num_labels).float()


def test_classification_metrics_by_hand():
    # labels 0 0 1 1 2 2, predictions 0 1 1 1 2 0: 4 of 6 right.
    # class 0: tp 1, fp 1, fn 1 → F1 2/4; class 1: tp 2, fp 1, fn 0 → 4/5; class 2: tp 1, fp 0, fn 1 → 2/3
    metrics = classification_metrics(one_hot_probs([0, 1, 1, 1, 2, 0], 3), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    # a class only predicted counts with F1 0; a class in neither labels nor predictions does not count:
    # class 0: tp 1, fn 1 → 2/3; class 3: tp 0 → 0
    metrics = classification_metrics(one_hot_probs([0, 3], 5), torch.tensor([0, 0]))
    assert metrics == pytest.approx({"accuracy": 0.5, "macro_f1": 1 / 3})
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])  # argmax 1, 0
    assert classification_metrics(probs, torch.tensor([1, 0])) == pytest.approx({"accuracy": 1.0, "macro_f1": 1.0})


LABELS = torch.tensor([0, 1, 1, 0])
STUDENT = torch.tensor([[0.6, 0.4], [0.6, 0.4], [0.4, 0.6], [0.4, 0.6]])  # right on rows 0 and 2: accuracy 0.5


def test_selection_breaks_ties_towards_smaller_beta_then_smaller_k():
    """k = 1 and k = 3 are both perfect at β = 0.5 and β = 1 (row 1 at β = 0.5: (0.3, 0.7) and (0.35, 0.65));
    the choice is the smaller β and then the smaller k, whatever order the grid is given in."""
    retrieved = {
        3: torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.1, 0.9], [0.9, 0.1]]),
        1: torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]),
    }
    chosen = select_retrieval_settings(Predictions(STUDENT, retrieved, LABELS), betas=[1.0, 0.5, 0.0])
    assert (chosen["knn_k"], chosen["retrieval_weight"], chosen["accuracy"]) == (1, 0.5, 1.0)
    grid = {(row["knn_k"], row["retrieval_weight"]): row["accuracy"] for row in chosen["grid"]}
    assert grid == {(1, 0.0): 0.5, (1, 0.5): 1.0, (1, 1.0): 1.0, (3, 0.0): 0.5, (3, 0.5): 1.0, (3, 1.0): 1.0}


def test_selection_prefers_accuracy_over_the_tie_breaks():
    """Only k = 3 at β = 1 gets every row: at β = 0.5, row 1 mixes to (0.525, 0.475) for k = 3 and (0.8, 0.2) for
    k = 1 (whose neighbour is wrong), both wrong."""
    retrieved = {
        1: torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]),
        3: torch.tensor([[0.9, 0.1], [0.45, 0.55], [0.1, 0.9], [0.9, 0.1]]),
    }
    chosen = select_retrieval_settings(Predictions(STUDENT, retrieved, LABELS), betas=[0.0, 0.5, 1.0])
    assert (chosen["knn_k"], chosen["retrieval_weight"], chosen["accuracy"]) == (3, 1.0, 1.0)
    grid = {(row["knn_k"], row["retrieval_weight"]): row["accuracy"] for row in chosen["grid"]}
    assert grid == {(1, 0.0): 0.5, (1, 0.5): 0.75, (1, 1.0): 0.75, (3, 0.0): 0.5, (3, 0.5): 0.75, (3, 1.0): 1.0}


def test_knn_accuracy_of_queries_that_are_knowledge_base_keys():
    """With k = 1 a query equal to KB key i retrieves exactly soft label i, so the accuracy is that of those soft
    labels' argmax: here 3 of 5 labels are set to it."""
    kb = random_kb(40)
    rows = torch.tensor([3, 7, 11, 20, 25])
    argmax = kb.values[rows].argmax(dim=1)
    labels = argmax.clone()
    labels[[1, 4]] = (argmax[[1, 4]] + 1) % 3  # two wrong
    accuracy = knn_accuracy(kb, kb.keys[rows], labels, knn_ks=[1, 40], retrieval_temperature=0.1, batch_size=2)
    assert set(accuracy) == {1, 40}
    assert accuracy[1] == pytest.approx(3 / 5)
    # k = all 40 keys at a flat temperature: every query gets (nearly) the KB's mean soft label, one class for all
    everything = knn_accuracy(kb, kb.keys[rows], labels, knn_ks=[40], retrieval_temperature=1e6)[40]
    mean_class = kb.values.mean(dim=0).argmax()
    assert everything == pytest.approx((labels == mean_class).float().mean().item())


def test_student_keyed_knowledge_base_is_the_students_queries_with_the_teachers_values(tiny_tokenizer, tokenized):
    dataset, texts = tokenized
    model = tiny_student(kb_size=8, index_type="flat")
    own = student_keyed_knowledge_base(model, dataset, tiny_tokenizer, batch_size=3)
    with torch.no_grad():
        queries = model(
            **tiny_tokenizer(texts, padding=True, return_tensors="pt"), retrieval_weight=0.0
        ).query_embedding
    torch.testing.assert_close(own.keys, queries, atol=1e-5, rtol=0)
    torch.testing.assert_close(own.values, model.knowledge_base.values)
    assert own.index_type == "flat" and own.index_params == model.knowledge_base.index_params
    with pytest.raises(ValueError, match="Expected the knowledge base's 8 rows, got a dataset of 5"):
        student_keyed_knowledge_base(model, dataset.select(range(5)), tiny_tokenizer)


def test_evaluation_reports_the_student_keyed_baseline_through_the_models_own_retrieval(tiny_tokenizer, tokenized):
    """The baseline's numbers equal those of the same student serving the student-keyed knowledge base itself."""
    dataset, _ = tokenized
    model = tiny_student(kb_size=8)
    splits = {"validation": dataset, "test": dataset.select(range(6))}
    logits = {name: np.zeros((len(split), 3), dtype=np.float32) for name, split in splits.items()}
    teacher_keys = torch.nn.functional.normalize(
        torch.randn(8, 16, generator=torch.Generator().manual_seed(4)), dim=-1
    )
    args = (tiny_tokenizer, splits, logits, teacher_keys, [1, 4], [0.0, 0.5, 1.0], TAU, 3)
    plain = evaluate_student(model, *args)
    metrics = evaluate_student(model, *args, knowledge_base_texts=dataset)
    assert "student_retrieval_student_keys" not in plain["splits"]["test"] and "selection_student_keys" not in plain
    assert metrics["selection"] == plain["selection"] and metrics["validation_grid"] == plain["validation_grid"]
    for name, per_model in metrics["splits"].items():  # the teacher-keyed numbers are unchanged
        assert {k: v for k, v in per_model.items() if k != "student_retrieval_student_keys"} == plain["splits"][name]
    assert set(metrics["validation_knn_accuracy"]) == {"student_query", "teacher_query", "student_query_student_keys"}

    served = tiny_student(kb_size=8)
    served.set_knowledge_base(student_keyed_knowledge_base(model, dataset, tiny_tokenizer))
    chosen = metrics["selection_student_keys"]
    validation = predict(served, dataset, tiny_tokenizer, [1, 4], TAU, batch_size=3)
    assert chosen == {k: v for k, v in select_retrieval_settings(validation, [0.0, 0.5, 1.0]).items() if k != "grid"}
    knn = {k: classification_metrics(p, validation.labels)["accuracy"] for k, p in validation.retrieved.items()}
    assert metrics["validation_knn_accuracy"]["student_query_student_keys"] == knn
    test = predict(served, splits["test"], tiny_tokenizer, [1, 4], TAU, batch_size=3)
    mixed = mix_probabilities(test.student_probs, test.retrieved[chosen["knn_k"]], chosen["retrieval_weight"])
    assert metrics["splits"]["test"]["student_retrieval_student_keys"] == classification_metrics(mixed, test.labels)


def _predictions_where_only_close_neighbours_are_right(n: int, seed: int) -> Predictions:
    """Half the queries have a close nearest neighbour (cosine 0.9) whose vote is right (0.95), half a far one (0.3)
    whose vote is wrong (0.95 on the other class); the student is right on 70% of rows, always at 0.6. No fixed β can
    tell the halves apart (best: β = 0, 70%); a gate reading the similarity can (about 85%)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, (n,), generator=generator)
    close = torch.arange(n) % 2 == 0
    student_right = torch.rand(n, generator=generator) < 0.7
    student_class = torch.where(student_right, labels, 1 - labels)
    retrieved_class = torch.where(close, labels, 1 - labels)
    return _two_class_predictions(labels, student_class, retrieved_class, torch.where(close, 0.9, 0.3))


def _two_class_predictions(
    labels: torch.Tensor, student_class: torch.Tensor, retrieved_class: torch.Tensor, top_similarity: torch.Tensor
) -> Predictions:
    """The student at 0.6 on its class, the k = 4 retrieved vote at 0.95 on its class."""
    student_probs = torch.nn.functional.one_hot(student_class, 2).float() * 0.2 + 0.4  # (N, 2)
    retrieved = torch.nn.functional.one_hot(retrieved_class, 2).float() * 0.9 + 0.05  # (N, 2)
    return Predictions(student_probs, {4: retrieved}, labels, None, top_similarity)


def test_retrieval_gate_is_kept_when_it_beats_the_fixed_beta_on_held_out_halves():
    validation = _predictions_where_only_close_neighbours_are_right(400, seed=0)
    selection = select_retrieval_settings(validation, [0.0, 0.25, 0.5, 0.75, 1.0])
    assert selection["retrieval_weight"] == 0.0 and selection["accuracy"] < 0.75
    gate = select_retrieval_gate(validation, selection)
    assert gate["used"] and gate["validation_accuracy_crossfit"] > 0.8
    test = _predictions_where_only_close_neighbours_are_right(400, seed=1)
    metrics = split_metrics(test, np.zeros((400, 2)), 4, 0.0, gate["parameters"])
    assert metrics["student_retrieval_gated"]["accuracy"] > metrics["student_retrieval"]["accuracy"] + 0.1


def test_retrieval_gate_is_fitted_on_the_rows_where_retrieval_and_student_disagree():
    """Far neighbours (cosine 0.3) mostly agree with a right student, but where they disagree with it they are wrong;
    close ones (0.9) are right. Fitted on all rows, "retrieval is right" would read 2/3 at cosine 0.3 and let the far
    neighbours overrule the student; fitted on the disagreements, β(x) trusts only the close ones."""
    groups = [  # (rows, cosine, student right, retrieval right)
        (200, 0.3, True, True),
        (100, 0.3, True, False),
        (100, 0.9, False, True),
        (200, 0.9, True, True),
    ]
    labels = torch.zeros(600, dtype=torch.long)
    student_class = torch.cat([torch.full((n,), 0 if right else 1) for n, _, right, _ in groups])
    retrieved_class = torch.cat([torch.full((n,), 0 if right else 1) for n, _, _, right in groups])
    top_similarity = torch.cat([torch.full((n,), cosine) for n, cosine, _, _ in groups])
    predictions = _two_class_predictions(labels, student_class, retrieved_class, top_similarity)

    gate = fit_retrieval_gate(predictions, knn_k=4, retrieval_weight=0.5)
    mixed = gated_mixture(predictions, 4, gate)  # (600, 2)
    assert (mixed.argmax(-1) == labels).all()  # every row right: the student at 0.3, retrieval at 0.9
    best_fixed_beta = select_retrieval_settings(predictions, [b / 20 for b in range(21)])
    assert best_fixed_beta["accuracy"] < 0.9  # no single β gets both groups of disagreements right


def test_retrieval_gate_is_dropped_when_it_cannot_change_a_prediction():
    validation = _predictions_where_only_close_neighbours_are_right(200, seed=0)
    validation.retrieved[4] = validation.student_probs.clone()  # retrieval repeats the student: every β agrees
    selection = select_retrieval_settings(validation, [0.0, 0.5])
    gate = select_retrieval_gate(validation, selection)
    assert not gate["used"] and gate["validation_accuracy_crossfit"] == gate["validation_accuracy_fixed"]


def test_retrieval_gate_on_a_one_row_validation_split_is_not_used_and_does_not_crash():
    """`--max_eval_samples 1` is accepted; the cross-fitting must still have two halves (one empty) rather than fail
    after the whole training run."""
    validation = _predictions_where_only_close_neighbours_are_right(1, seed=0)
    selection = select_retrieval_settings(validation, [0.0, 0.5])
    gate = select_retrieval_gate(validation, selection)
    assert not gate["used"] and gate["validation_accuracy_crossfit"] <= gate["validation_accuracy_fixed"]


@pytest.mark.parametrize("gate", [None, [3.0, -2.0, 1.5, 0.5, -0.4]])
def test_evaluation_scores_the_prediction_forward_serves(tiny_tokenizer, gate):
    """The k/β grid and the gate are chosen on evaluation's mixtures: they must be the model's own outputs, fixed β
    and per-query gate alike (one `mix_retrieval` serves both)."""
    model = tiny_student(kb_size=40, knn_k=4, retrieval_weight=0.3, retrieval_gate=gate)
    texts = [" ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(2 + i % 4)) for i in range(12)]
    dataset = Dataset.from_dict({**tiny_tokenizer(texts), "labels": [i % 3 for i in range(12)]})
    predictions = predict(model, dataset, tiny_tokenizer, [4], model.config.retrieval_temperature, batch_size=5)
    with torch.no_grad():
        served = model(**tiny_tokenizer(texts, padding=True, return_tensors="pt")).logits.exp()  # (N, C)
    if gate is None:
        evaluated = mix_probabilities(predictions.student_probs, predictions.retrieved[4], 0.3)
    else:
        evaluated = gated_mixture(predictions, 4, gate)
    torch.testing.assert_close(evaluated, served, atol=1e-6, rtol=0)


def test_a_negative_beta_without_a_gate_is_refused():
    """β below 0 stands for the per-query gate (`GATE_SENTINEL`); without one it would extrapolate past the student."""
    from hf_reaugkd.modeling_reaugkd import mix_retrieval

    probs = torch.tensor([[0.7, 0.3]])
    with pytest.raises(ValueError, match="stands for a per-query gate"):
        mix_retrieval(probs, probs.flip(-1), torch.tensor([0.9]), -1.0)
