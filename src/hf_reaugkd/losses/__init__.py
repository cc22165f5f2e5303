"""Distillation losses, one per file, each a pure function plus an `nn.Module` wrapper."""

from .distillation import DistillationLoss, distillation_loss
from .own_key import OwnKeyCosineLoss, OwnKeyLoss, own_key_cosine_loss, own_key_loss
from .relational import RelationalLoss, relational_loss
from .supervised_contrastive import SupervisedContrastiveLoss, pair_weights, supervised_contrastive_loss

__all__ = [
    "DistillationLoss",
    "OwnKeyCosineLoss",
    "OwnKeyLoss",
    "RelationalLoss",
    "SupervisedContrastiveLoss",
    "distillation_loss",
    "own_key_cosine_loss",
    "own_key_loss",
    "pair_weights",
    "relational_loss",
    "supervised_contrastive_loss",
]
