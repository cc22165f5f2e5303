import torch
from torch import nn


def relational_loss(
    student_queries: torch.Tensor,
    teacher_queries: torch.Tensor,
    teacher_keys: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """ReAugKD's relational alignment: `mean_i KL(q_i || p_i)` with

        q_ij = softmax_j(t_i · k_j / τ)   (how the teacher relates example i to the keys)
        p_ij = softmax_j(s_i · k_j / τ)   (how the student's query relates to the same teacher keys)

    Minimising it places the student's query where the teacher's own key would retrieve the same neighbours,
    which is what inference-time retrieval from the teacher's knowledge base needs. No T² factor: it is not a
    softened-label loss.

    Args:
        student_queries (`torch.Tensor` of shape `(B, d)`): L2-normalised student projections z^s.
        teacher_queries (`torch.Tensor` of shape `(B, d)`): the teacher keys of the same B examples, z^t.
        teacher_keys (`torch.Tensor` of shape `(M, d)` or `(B, M, d)`): the keys to relate to: shared by the
            batch (its teacher keys, M = B, or all processes' batches under DDP), or one set per example (e.g.
            the batch's keys plus each example's own knowledge-base neighbours).
        temperature (`float`): τ.
    """
    keys = teacher_keys.float()
    equation = "bd,md->bm" if keys.ndim == 2 else "bd,bmd->bm"
    teacher_logits = torch.einsum(equation, teacher_queries.float(), keys) / temperature  # (B, M)
    student_logits = torch.einsum(equation, student_queries.float(), keys) / temperature  # (B, M)
    teacher_probs = torch.softmax(teacher_logits, dim=-1)  # (B, M)
    student_log_probs = torch.log_softmax(student_logits, dim=-1)  # (B, M)
    return nn.functional.kl_div(student_log_probs, teacher_probs, reduction="batchmean")


class RelationalLoss(nn.Module):
    """`nn.Module` form of `relational_loss`."""

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature

    def forward(
        self, student_queries: torch.Tensor, teacher_queries: torch.Tensor, teacher_keys: torch.Tensor | None = None
    ) -> torch.Tensor:
        keys = teacher_queries if teacher_keys is None else teacher_keys
        return relational_loss(student_queries, teacher_queries, keys, self.temperature)

    def get_config_dict(self) -> dict:
        return {"temperature": self.temperature}
