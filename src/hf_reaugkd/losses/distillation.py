import torch
from torch import nn


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft-label KD: `T² · mean_i KL(softmax(t_i / T) || softmax(s_i / T))`.

    The T² factor keeps the gradient scale independent of T (Hinton et al., 2015), so the KD weight means the
    same thing at any temperature.

    Args:
        student_logits (`torch.Tensor` of shape `(B, C)`)
        teacher_logits (`torch.Tensor` of shape `(B, C)`)
        temperature (`float`): T.
    """
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
