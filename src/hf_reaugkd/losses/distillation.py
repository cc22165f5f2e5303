import torch
from torch import nn

from ..settings_reaugkd import MULTI_LABEL, REGRESSION, SINGLE_LABEL


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, problem_type: str = SINGLE_LABEL
) -> torch.Tensor:
    """Soft-label KD: `T² · mean_i KL(softmax(t_i / T) || softmax(s_i / T))`.

    The T² factor keeps the gradient scale independent of T (Hinton et al., 2015), so the KD weight means the
    same thing at any temperature. Multi-label: binary cross-entropy of the student's per-label logits against the
    teacher's probabilities `sigmoid(t_i)`, averaged over labels; regression: the squared error to the teacher's
    prediction. Neither has a temperature: T softens a softmax over classes.

    Args:
        student_logits (`torch.Tensor` of shape `(B, C)`)
        teacher_logits (`torch.Tensor` of shape `(B, C)`)
        temperature (`float`): T.
        problem_type (`str`): `settings_reaugkd.PROBLEM_TYPES`.
    """
    if problem_type == REGRESSION:
        return nn.functional.mse_loss(student_logits.float(), teacher_logits.float())
    if problem_type == MULTI_LABEL:
        targets = torch.sigmoid(teacher_logits.float())  # (B, C)
        return nn.functional.binary_cross_entropy_with_logits(student_logits.float(), targets)
    teacher_probs = torch.softmax(teacher_logits.float() / temperature, dim=-1)  # (B, C)
    student_log_probs = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, C)
    kl = nn.functional.kl_div(student_log_probs, teacher_probs, reduction="batchmean")
    return temperature**2 * kl


class DistillationLoss(nn.Module):
    """`nn.Module` form of `distillation_loss` (T² · KL to the teacher's temperature-T soft labels)."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return distillation_loss(student_logits, teacher_logits, self.temperature)

    def get_config_dict(self) -> dict:
        return {"temperature": self.temperature}
