import torch
from torch import nn


def supervised_contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 2020, L_out), used to train the teacher's projection head:

        L = mean_{i with positives} [ −1/|P(i)| Σ_{p ∈ P(i)} log( exp(z_i·z_p/τ) / Σ_{a ≠ i} exp(z_i·z_a/τ) ) ]

    where P(i) are the other examples of the batch with the same label as i. Anchors without a positive in the
    batch do not contribute.

    Args:
        embeddings (`torch.Tensor` of shape `(B, d)`): L2-normalised projections z.
        labels (`torch.Tensor` of shape `(B,)`): class ids.
        temperature (`float`): τ.
    """
    batch_size = embeddings.shape[0]
    self_mask = torch.eye(batch_size, dtype=torch.bool, device=embeddings.device)  # (B, B)
    logits = embeddings.float() @ embeddings.float().T / temperature  # (B, B)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_probs = torch.log_softmax(logits, dim=-1).masked_fill(self_mask, 0.0)  # (B, B); log p(a | i), a ≠ i
    positives = (labels.unsqueeze(0) == labels.unsqueeze(1)) & ~self_mask  # (B, B)
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
