"""Each loss against values worked out by hand (see the comments)."""

import math

import pytest
import torch

from hf_reaugkd.losses import DistillationLoss, RelationalLoss, SupervisedContrastiveLoss


def test_distillation_loss_hand_computed():
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    # teacher probs (0.75, 0.25), student (0.5, 0.5): KL = 0.75 ln 1.5 + 0.25 ln 0.5
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert DistillationLoss(temperature=1.0)(student, teacher).item() == pytest.approx(kl, abs=1e-6)
    # at T = 2 the teacher logits (2 ln 3, 0) soften to the same (0.75, 0.25); T² = 4 scales the KL
    teacher_t2 = torch.tensor([[2 * math.log(3.0), 0.0]])
    assert DistillationLoss(temperature=2.0)(student, teacher_t2).item() == pytest.approx(4 * kl, abs=1e-6)
    assert DistillationLoss()(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_relational_loss_hand_computed():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    student, teacher = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # q = softmax(0, 1) = (a, b), p = softmax(1, 0) = (b, a): KL(q||p) = (b − a) · ln(b / a) = (b − a) · 1
    a, b = 1 / (1 + math.e), math.e / (1 + math.e)
    assert RelationalLoss(temperature=1.0)(student, teacher, keys).item() == pytest.approx(b - a, abs=1e-6)
    # a student query equal to the teacher's has nothing to learn; in-batch keys are the default
    assert RelationalLoss()(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


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
    # anchors 0 and 1 each have one positive (similarity 1) against one negative (similarity 0):
    # −log(e / (e + 1)) each; anchor 2 has no positive and is left out.
    expected = -math.log(math.e / (math.e + 1))
    assert SupervisedContrastiveLoss(temperature=1.0)(embeddings, labels).item() == pytest.approx(expected, abs=1e-6)
    # a lower temperature sharpens it: −log(e^10 / (e^10 + 1)) at τ = 0.1
    sharp = -math.log(math.exp(10) / (math.exp(10) + 1))
    assert SupervisedContrastiveLoss(temperature=0.1)(embeddings, labels).item() == pytest.approx(sharp, abs=1e-6)


def test_supervised_contrastive_without_positives_is_zero_with_gradient():
    embeddings = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1).requires_grad_()
    loss = SupervisedContrastiveLoss()(embeddings, torch.tensor([0, 1, 2]))
    loss.backward()
    assert loss.item() == 0.0 and embeddings.grad is not None
