"""Distillation losses shared by the knowledge-transfer methods.

- Soft cross-entropy, the MEAL V2 similarity loss (Shen & Savvides, arXiv 2009.08453, Sec. 3):
      L_KD = (1/B) * sum_b ( -sum_c p_T[b, c] * log softmax(z_S[b])[c] ).
  It equals KL(p_T || p_S) plus the teacher entropy (a constant), so dL_KD/dz_S = (p_S - p_T)/B.
- Classic knowledge distillation (Hinton, Vinyals & Dean, arXiv 1503.02531, Sec. 2):
      L_KD^T = T^2 * KL(p_T^T || p_S^T),   p^T = softmax(z / T),
  averaged over the batch ("batchmean"); the T^2 keeps the soft-target gradients on the same
  scale as the hard-label ones when T changes. The combined objective is
      L = (1 - alpha) * CE(z_S, y) + alpha * L_KD^T.
  Note that torchdistill's ``KDLoss`` puts ``alpha`` on the hard-label term instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_pair(
    student_logits: torch.Tensor, other: torch.Tensor, other_name: str
) -> None:
    if student_logits.dim() != 2 or student_logits.shape != other.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and {other_name} "
            f"{tuple(other.shape)} must both be (batch, num_classes) with the same shape"
        )


def soft_cross_entropy(
    student_logits: torch.Tensor, target_probs: torch.Tensor
) -> torch.Tensor:
    """mean_b( -sum_c p_T[b, c] * log_softmax(z_S[b])[c] ); inputs (B, C), output a scalar."""
    _check_pair(student_logits, target_probs, "target_probs")
    log_p_s = F.log_softmax(student_logits.float(), dim=-1)
    return -(target_probs.float() * log_p_s).sum(dim=-1).mean()


def kd_kl_loss(
    student_logits: torch.Tensor,
    *,
    temperature: float,
    teacher_logits: torch.Tensor | None = None,
    teacher_probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """T^2 * KL(p_T^T || p_S^T), batchmean.

    Give exactly one of ``teacher_logits`` (softened here with T) or ``teacher_probs``
    (already softened at T, e.g. from ``TeacherEnsemble(temperature=T)``).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if (teacher_logits is None) == (teacher_probs is None):
        raise ValueError("give exactly one of teacher_logits or teacher_probs")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if teacher_logits is not None:
        _check_pair(student_logits, teacher_logits, "teacher_logits")
        log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    else:
        _check_pair(student_logits, teacher_probs, "teacher_probs")
        p_t = teacher_probs.float()
        # xlogy gives 0 * log 0 = 0 for classes a sparse target leaves at zero
        kl = (torch.xlogy(p_t, p_t) - p_t * log_p_s).sum(dim=-1)
    return temperature**2 * kl.mean()
