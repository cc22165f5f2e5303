import torch
from torch import nn

from ..settings_reaugkd import MULTI_LABEL, REGRESSION

# Regression targets: the Gaussian kernel's width over target distances, as a share of the targets' spread (their std).
# Two texts a quarter of a standard deviation apart count 0.6 of a positive, one standard deviation apart 0.0003.
REGRESSION_BANDWIDTH = 0.25


def pair_weights(labels: torch.Tensor, problem_type: str, bandwidth: float = 1.0) -> torch.Tensor:
    """How much each pair of a batch counts as a positive `(B, B)`, in [0, 1], from its labels:

    - single-label (`labels` `(B,)` class ids): 1 for the same class, else 0 (SupCon's positives);
    - multi-label (`(B, C)` 0/1): the Jaccard overlap of the two label sets (two rows without any label: 1), so a
      pair sharing one of two labels is half a positive, and pairs sharing none are negatives;
    - regression (`(B,)` numbers): `exp(−(y_i − y_j)² / 2h²)` with `h = bandwidth`. Retrieval predicts a query's
      number by the similarity-weighted mean of its neighbours' numbers, which is right only where keys that are
      close have numbers that are close: the kernel pulls texts together by how near their targets are, with no
      arbitrary binning into classes.
    """
    if problem_type == REGRESSION:
        distances = labels.float().unsqueeze(0) - labels.float().unsqueeze(1)  # (B, B)
        return torch.exp(-(distances**2) / (2 * bandwidth**2))
    if problem_type == MULTI_LABEL:
        labels = labels.float()
        shared = labels @ labels.T  # (B, B)
        union = labels.sum(-1, keepdim=True) + labels.sum(-1).unsqueeze(0) - shared  # (B, B)
        return torch.where(union > 0, shared / union.clamp_min(1), torch.ones_like(shared))
    return (labels.unsqueeze(0) == labels.unsqueeze(1)).float()


def supervised_contrastive_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, temperature: float, positives: torch.Tensor | None = None
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 2020, L_out), used to train the teacher's projection head:

        L = mean_{i with positives} [ −1/Σ_p w_ip Σ_{p ≠ i} w_ip log( exp(z_i·z_p/τ) / Σ_{a ≠ i} exp(z_i·z_a/τ) ) ]

    where w_ip is 1 for the other examples of the batch with the same label as i and 0 for the rest, or the graded
    weights `positives` `(B, B)` of `pair_weights` (multi-label overlap, regression target distance). Anchors
    without a positive in the batch do not contribute.

    Args:
        embeddings (`torch.Tensor` of shape `(B, d)`): L2-normalised projections z.
        labels (`torch.Tensor` of shape `(B,)`): class ids (ignored when `positives` is given).
        temperature (`float`): τ.
        positives (`torch.Tensor` of shape `(B, B)`, *optional*): each pair's weight as a positive, in [0, 1].
    """
    batch_size = embeddings.shape[0]
    self_mask = torch.eye(batch_size, dtype=torch.bool, device=embeddings.device)  # (B, B)
    logits = embeddings.float() @ embeddings.float().T / temperature  # (B, B)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_probs = torch.log_softmax(logits, dim=-1).masked_fill(self_mask, 0.0)  # (B, B); log p(a | i), a ≠ i
    if positives is None:
        positives = (labels.unsqueeze(0) == labels.unsqueeze(1)).float()  # (B, B)
    positives = positives.float().masked_fill(self_mask, 0.0)  # (B, B)
    num_positives = positives.sum(dim=1)  # (B,)
    has_positive = num_positives > 0
    if not has_positive.any():
        return embeddings.sum() * 0.0  # no pair to pull together; keep the graph for DDP
    mean_log_prob = (log_probs * positives).sum(dim=1)[has_positive] / num_positives[has_positive]
    return -mean_log_prob.mean()


class SupervisedContrastiveLoss(nn.Module):
    """`nn.Module` form of `supervised_contrastive_loss`."""

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return supervised_contrastive_loss(embeddings, labels, self.temperature)

    def get_config_dict(self) -> dict:
        return {"temperature": self.temperature}
