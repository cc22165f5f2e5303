import torch
from torch import nn


def own_key_loss(
    student_queries: torch.Tensor, teacher_keys: torch.Tensor, own_key_ids: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Own-key InfoNCE: each student query should find its *own* teacher key first among the keys it is shown,

        L = −mean_i log( exp(s_i · k_{o(i)} / τ) / Σ_j exp(s_i · k_j / τ) )

    where o(i) is the position of example i's key in its key set. The relational loss matches the student's
    similarity *distribution* to the teacher's; with a SupCon head whose classes are tight clusters that target is
    nearly flat over the same-class keys, so it teaches the class, not the example's place in it. This loss asks
    for the place: it is what a KB query needs to land on the neighbours the teacher's own key would find. An exact
    duplicate of the own key (a repeated text) counts as a negative too, so that example's loss cannot fall below
    ln 2. No T² factor: it is not a softened-label loss.

    Args:
        student_queries (`torch.Tensor` of shape `(B, d)`): L2-normalised student projections z^s.
        teacher_keys (`torch.Tensor` of shape `(M, d)` or `(B, M, d)`): the keys, shared by the batch (its teacher
            keys, or all processes' batches under DDP) or one set per example (e.g. those plus the example's own
            knowledge-base neighbours as harder negatives).
        own_key_ids (`torch.LongTensor` of shape `(B,)`): where each example's own key is among its keys.
        temperature (`float`): τ.
    """
    keys = teacher_keys.float()
    equation = "bd,md->bm" if keys.ndim == 2 else "bd,bmd->bm"
    logits = torch.einsum(equation, student_queries.float(), keys) / temperature  # (B, M)
    return nn.functional.cross_entropy(logits, own_key_ids)  # mean over the B queries


def own_key_cosine_loss(student_queries: torch.Tensor, own_keys: torch.Tensor) -> torch.Tensor:
    """Own-key cosine loss: each student query should *be* its own teacher key,

        L = mean_i (1 − s_i · k_i)

    The InfoNCE form above does not ask for that where the teacher's classes have collapsed: same-class keys are
    then near-identical negatives (cosine ≈ 0.98 in benchmarks/key_space.py), and its best query is the direction
    that separates the own key from them, nearly orthogonal to the key (cosine 0.29 in the two-key example of
    tests/test_losses.py). Trained students show it: cosine 0.44 with their own key, almost none of its neighbours
    shared. This loss is zero only on the key itself.

    Args:
        student_queries (`torch.Tensor` of shape `(B, d)`): L2-normalised student projections z^s.
        own_keys (`torch.Tensor` of shape `(B, d)`): each example's own (normalised) teacher key.
    """
    return (1 - (student_queries.float() * own_keys.float()).sum(-1)).mean()


class OwnKeyLoss(nn.Module):
    """`nn.Module` form of `own_key_loss`; without keys, the batch's own teacher keys (row i's key is key i)."""

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature

    def forward(
        self,
        student_queries: torch.Tensor,
        teacher_keys: torch.Tensor,
        own_key_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if own_key_ids is None:
            own_key_ids = torch.arange(len(student_queries), device=student_queries.device)  # (B,)
        return own_key_loss(student_queries, teacher_keys, own_key_ids, self.temperature)

    def get_config_dict(self) -> dict:
        return {"temperature": self.temperature}


class OwnKeyCosineLoss(nn.Module):
    """`nn.Module` form of `own_key_cosine_loss`."""

    def forward(self, student_queries: torch.Tensor, own_keys: torch.Tensor) -> torch.Tensor:
        return own_key_cosine_loss(student_queries, own_keys)

    def get_config_dict(self) -> dict:
        return {}
