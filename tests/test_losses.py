"""Each loss against values worked out by hand (see the comments)."""

import math

import pytest
import torch

from hf_reaugkd.losses import (
    DistillationLoss,
    OwnKeyCosineLoss,
    OwnKeyLoss,
    RelationalLoss,
    SupervisedContrastiveLoss,
    own_key_cosine_loss,
    own_key_loss,
)


def test_distillation_loss_hand_computed():
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    # teacher probs (0.75, 0.25), student (0.5, 0.5): KL(t || s) = 0.75 ln 1.5 + 0.25 ln 0.5 ≈ 0.131
    # (the reverse KL(s || t) = 0.5 ln(2/3) + 0.5 ln 2 ≈ 0.144 would not match)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert DistillationLoss(temperature=1.0)(student, teacher).item() == pytest.approx(kl, abs=1e-6)
    assert DistillationLoss()(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_distillation_loss_softens_both_sides_scales_by_t_squared_and_averages_rows():
    """At T = 2 both sides are divided by T (a student left at T = 1 would give a different KL), the KL is
    scaled by T² and averaged over the rows, not summed."""
    student = torch.tensor([[0.0, 2 * math.log(3.0)], [1.0, -1.0]])  # (2, C)
    teacher = torch.tensor([[2 * math.log(3.0), 0.0], [1.0, -1.0]])
    # row 0 at T = 2: teacher (ln 3, 0) → (3/4, 1/4); student (0, ln 3) → (1/4, 3/4)
    #   KL = 3/4 ln 3 + 1/4 ln(1/3) = ½ ln 3; row 1: student = teacher, KL = 0
    # T² · mean = 4 · (½ ln 3 + 0) / 2 = ln 3
    assert DistillationLoss(temperature=2.0)(student, teacher).item() == pytest.approx(math.log(3.0), abs=1e-6)


def test_relational_loss_hand_computed():
    """Three keys and a student that relates differently to them than the teacher: the value pins down the
    temperature, the batch mean and the KL direction (q = teacher's relations is the target)."""
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # (M=3, d=2)
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (B=2, d)
    student = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # row 0 differs from the teacher, row 1 equals it
    # row 0 at τ = 1: teacher logits t·k = (1, 0, −1), student logits s·k = (0, 1, 0)
    #   q = (e, 1, 1/e) / Zq, Zq = e + 1 + 1/e;  p = (1, e, 1) / Zp, Zp = e + 2
    #   ln q − ln p = (1, −1, −1) + ln Zp − ln Zq, so KL(q || p) = q1 − q2 − q3 + ln Zp − ln Zq ≈ 0.474
    # row 1: student = teacher, KL = 0; the loss is the mean over the 2 rows
    zq, zp = math.e + 1 + 1 / math.e, math.e + 2
    q = (math.e / zq, 1 / zq, 1 / math.e / zq)
    kl_qp = q[0] - q[1] - q[2] + math.log(zp) - math.log(zq)
    assert RelationalLoss(temperature=1.0)(student, teacher, keys).item() == pytest.approx(kl_qp / 2, abs=1e-6)

    # swapping the roles gives KL(p || q) = −p1 + p2 + p3 − ln Zp + ln Zq ≈ 0.432: the loss is not symmetric
    p = (1 / zp, math.e / zp, 1 / zp)
    kl_pq = -p[0] + p[1] + p[2] - math.log(zp) + math.log(zq)
    assert abs(kl_pq - kl_qp) > 0.04
    assert RelationalLoss(temperature=1.0)(teacher, student, keys).item() == pytest.approx(kl_pq / 2, abs=1e-6)

    # τ = 0.5 doubles every logit: teacher (2, 0, −2), student (0, 2, 0), so
    #   KL = 2 (q1 − q2 − q3) + ln Zp − ln Zq with Zq = e² + 1 + e⁻², Zp = e² + 2; no T² factor
    e2 = math.exp(2)
    zq, zp = e2 + 1 + 1 / e2, e2 + 2
    kl_sharp = 2 * (e2 - 1 - 1 / e2) / zq + math.log(zp) - math.log(zq)
    assert RelationalLoss(temperature=0.5)(student, teacher, keys).item() == pytest.approx(kl_sharp / 2, abs=1e-6)

    # a student equal to the teacher scores 0 against several keys, at any temperature
    for temperature in (1.0, 0.1):
        assert RelationalLoss(temperature)(teacher, teacher, keys).item() == pytest.approx(0.0, abs=1e-6)


def test_relational_loss_defaults_to_the_in_batch_teacher_keys():
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # also the keys
    student = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    # row 0: q = softmax(1, 0) = (b, a), p = softmax(0, 1) = (a, b): KL = b ln(b/a) + a ln(a/b) = (b − a) · 1
    # row 1: student = teacher, KL = 0; mean over the rows = (b − a) / 2
    a, b = 1 / (1 + math.e), math.e / (1 + math.e)
    assert RelationalLoss(temperature=1.0)(student, teacher).item() == pytest.approx((b - a) / 2, abs=1e-6)


def test_relational_loss_with_keys_per_example_is_the_rowwise_loss():
    generator = torch.Generator().manual_seed(0)
    student, teacher = (torch.nn.functional.normalize(torch.randn(4, 8, generator=generator), dim=-1) for _ in "st")
    keys = torch.nn.functional.normalize(torch.randn(4, 6, 8, generator=generator), dim=-1)  # (B, M, d)
    loss = RelationalLoss(temperature=0.5)
    rowwise = torch.stack([loss(student[i : i + 1], teacher[i : i + 1], keys[i]) for i in range(4)]).mean()
    assert loss(student, teacher, keys).item() == pytest.approx(rowwise.item(), rel=1e-5)
    # one shared key set, expanded per example, is the shared-key loss
    assert loss(student, teacher, keys[0].expand(4, -1, -1)).item() == pytest.approx(
        loss(student, teacher, keys[0]).item(), rel=1e-5
    )


def test_supervised_contrastive_loss_hand_computed():
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    # anchors 0 and 1 each have one positive (similarity 1) against one negative (similarity 0), the anchor
    # itself left out of the denominator: −log(e / (e + 1)) each; anchor 2 has no positive and is left out.
    expected = -math.log(math.e / (math.e + 1))
    assert SupervisedContrastiveLoss(temperature=1.0)(embeddings, labels).item() == pytest.approx(expected, abs=1e-6)
    # a lower temperature sharpens it: −log(e^10 / (e^10 + 1)) at τ = 0.1
    sharp = -math.log(math.exp(10) / (math.exp(10) + 1))
    assert SupervisedContrastiveLoss(temperature=0.1)(embeddings, labels).item() == pytest.approx(sharp, abs=1e-6)


def test_supervised_contrastive_loss_averages_log_probs_over_several_positives():
    """L_out: the mean of the positives' log-probabilities (not their sum, not the log of their mean)."""
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 0, 1])
    # anchor 0: others have similarities (1, 0, −1), D0 = e + 1 + 1/e; positives 1 and 2:
    #   −½ [(1 − ln D0) + (0 − ln D0)] = ln D0 − ½; anchor 1 is the same
    # anchor 2: others all at similarity 0, D2 = 3; positives 0 and 1: −½ [2 (0 − ln 3)] = ln 3
    # anchor 3 has no positive; the mean is over the 3 anchors with one
    d0 = math.e + 1 + 1 / math.e
    expected = (2 * (math.log(d0) - 0.5) + math.log(3.0)) / 3
    assert SupervisedContrastiveLoss(temperature=1.0)(embeddings, labels).item() == pytest.approx(expected, abs=1e-6)


def test_supervised_contrastive_without_positives_is_zero_with_gradient():
    embeddings = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1).requires_grad_()
    loss = SupervisedContrastiveLoss()(embeddings, torch.tensor([0, 1, 2]))
    loss.backward()
    assert loss.item() == 0.0 and embeddings.grad is not None


def test_own_key_loss_hand_computed():
    """Three keys; query 0 sits on its own key, query 1 sits on key 1 while its own key is key 2."""
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # (M=3, d=2)
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (B=2, d)
    own = torch.tensor([0, 2])
    # τ = 1: row 0 logits (1, 0, −1), own key 0: −ln(e / (e + 1 + 1/e)) = ln(4.08616) − 1 = 0.407606
    #        row 1 logits (0, 1, 0), own key 2: −ln(1 / (1 + e + 1)) = ln(4.71828) = 1.551445
    #        mean over the 2 rows: 0.979525
    assert OwnKeyLoss(temperature=1.0)(queries, keys, own).item() == pytest.approx(0.979525, abs=1e-6)
    # τ = 0.5 doubles every logit: row 0 ln(e² + 1 + e⁻²) − 2 = 0.142932, row 1 ln(2 + e²) = 2.239545; mean 1.191238
    assert OwnKeyLoss(temperature=0.5)(queries, keys, own).item() == pytest.approx(1.191238, abs=1e-6)
    # query 1's own key being key 1 instead: row 1 logits (0, 1, 0), ln(1 + e + 1) − 1 = 0.551445; mean with row 0
    # (0.407606) 0.479525. Without ids, row i's own key is key i: the same value.
    assert own_key_loss(queries, keys, torch.tensor([0, 1]), 1.0).item() == pytest.approx(0.479525, abs=1e-6)
    assert OwnKeyLoss(temperature=1.0)(queries, keys).item() == pytest.approx(0.479525, abs=1e-6)


def test_own_key_loss_with_keys_per_example_takes_extra_negatives():
    """Per-example key sets `(B, M, d)`: row 0 gets one extra negative, (0, 1), which it is orthogonal to."""
    keys = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]])  # (B=1, M=3, d=2)
    query = torch.tensor([[1.0, 0.0]])
    # logits (1, −1, 0), own key 0: ln(e + e⁻¹ + 1) − 1 = 0.407606 (the same numbers as above, in another order)
    assert own_key_loss(query, keys, torch.tensor([0]), 1.0).item() == pytest.approx(0.407606, abs=1e-6)
    # without the extra negative: ln(e + e⁻¹) − 1 = 0.126928
    assert own_key_loss(query, keys[:, :2], torch.tensor([0]), 1.0).item() == pytest.approx(0.126928, abs=1e-6)


def test_own_key_loss_is_lowest_when_the_query_is_its_own_key():
    generator = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=-1)  # (M, d)
    own = torch.arange(8)
    loss = OwnKeyLoss(temperature=0.1)
    on_own_key = loss(keys, keys, own)
    on_another_key = loss(keys.roll(1, dims=0), keys, own)  # query i = key i − 1
    on_a_random_point = loss(torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=-1), keys)
    assert on_own_key.item() < on_a_random_point.item() < on_another_key.item()
    for i in range(8):  # and row by row: the own key beats every other key as the query
        own_i = torch.tensor([i])
        best = own_key_loss(keys[[i]], keys, own_i, 0.1)
        assert all(best < own_key_loss(keys[[j]], keys, own_i, 0.1) for j in range(8) if j != i)


def test_own_key_cosine_loss_hand_computed():
    """Query 0 at 0.6 cosine from its own key, query 1 on it: (1 − 0.6 + 1 − 1) / 2 = 0.2."""
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    own_keys = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    assert own_key_cosine_loss(queries, own_keys).item() == pytest.approx(0.2, abs=1e-7)
    assert OwnKeyCosineLoss()(queries, -own_keys).item() == pytest.approx(1.8, abs=1e-7)  # (1.6 + 2) / 2


def test_infonce_best_query_points_away_from_a_collapsed_key_and_the_cosine_loss_best_query_is_the_key():
    """A collapsed class: the own key, a near-identical same-class key (cosine 0.98) and one of the other class.
    Over every unit query, InfoNCE is lowest for a query that separates the own key from its twin, nearly
    orthogonal to both (cosine 0.29 with the own key), so it does not ask the query to land on its key; the cosine
    loss is lowest on the key itself."""
    keys = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.2], [-1.0, 0.0]]), dim=-1)  # (3, d)
    angles = torch.linspace(-math.pi, math.pi, 3601)
    queries = torch.stack([angles.cos(), angles.sin()], dim=1)  # (3601, d): the unit circle, 0.1° apart
    own = torch.tensor([0])
    infonce = torch.stack([own_key_loss(q[None], keys, own, 0.1) for q in queries])  # (3601,)
    cosine = torch.stack([own_key_cosine_loss(q[None], keys[[0]]) for q in queries])
    assert (queries[infonce.argmin()] @ keys[0]).item() == pytest.approx(0.29, abs=0.01)
    assert (queries[cosine.argmin()] @ keys[0]).item() == pytest.approx(1.0, abs=1e-5)
