"""A frozen ensemble of teachers that returns the mean of their softmaxes.

Shared by MEAL V2 (Shen & Savvides, arXiv 2009.08453) and dataset reinforcement (Faghri et
al., ICCV 2023, arXiv 2303.08983). Both use the same target: every teacher k sees the same
batch x and the ensemble returns

    p_T = (1/K) * sum_k softmax(z_k / T)          (mean of softmaxes, T = 1 in both papers)

which is *not* softmax(mean_k z_k). MEAL V2 also needs the mean raw logits

    z̄_T = (1/K) * sum_k z_k

as the "real" sample given to its discriminator. The teachers are frozen: eval mode (kept by
``train()``), ``requires_grad=False`` and every forward pass runs under ``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _teacher_name(index: int, teacher: nn.Module) -> str:
    return f"teacher {index} ({type(teacher).__name__})"


class TeacherEnsemble(nn.Module):
    """Frozen teachers averaged in probability space.

    Args:
        teachers: the teacher networks; each maps a batch (B, ...) to logits (B, C) with the
            same C.
        temperature: T in softmax(z_k / T); must be positive.
        sample_input: an optional batch used for a dummy forward pass that checks the class
            counts of teachers without an integer ``num_classes`` attribute. Class counts are
            also checked on every forward pass.
    """

    def __init__(
        self,
        teachers: Sequence[nn.Module],
        temperature: float = 1.0,
        sample_input: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if len(teachers) == 0:
            raise ValueError(
                "TeacherEnsemble needs at least one teacher, got an empty list"
            )
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.teachers = nn.ModuleList(teachers)
        self.temperature = float(temperature)
        for p in self.teachers.parameters():
            p.requires_grad_(False)
        self.teachers.eval()

        declared = [getattr(t, "num_classes", None) for t in self.teachers]
        self.num_classes: int | None = None
        if all(isinstance(c, int) for c in declared):
            self._check_class_counts(declared)
            self.num_classes = declared[0]
        if sample_input is not None:
            self.num_classes = self._stack_logits(sample_input).shape[-1]

    def _check_class_counts(self, counts: Sequence[int]) -> None:
        if len(set(counts)) > 1:
            listed = ", ".join(
                f"{_teacher_name(i, t)}: {c} classes"
                for i, (t, c) in enumerate(zip(self.teachers, counts))
            )
            raise ValueError(
                f"all teachers must predict the same number of classes; got {listed}"
            )

    def train(self, mode: bool = True) -> TeacherEnsemble:
        """Set the module's mode; the teachers stay in eval mode whatever ``mode`` is."""
        super().train(mode)
        self.teachers.eval()
        return self

    @torch.no_grad()
    def _stack_logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = [t(x) for t in self.teachers]
        for i, (t, z) in enumerate(zip(self.teachers, logits)):
            if z.dim() != 2:
                raise ValueError(
                    f"{_teacher_name(i, t)} returned logits of shape {tuple(z.shape)}; "
                    "expected (batch, num_classes)"
                )
        self._check_class_counts([z.shape[-1] for z in logits])
        return torch.stack(logits)  # (K, B, C)

    def probs_and_mean_logits(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of every teacher: (p_T, z̄_T), both (B, C), neither carrying gradients."""
        z = self._stack_logits(x)  # (K, B, C)
        probs = torch.softmax(z.float() / self.temperature, dim=-1).mean(dim=0)
        return probs, z.mean(dim=0)

    def mean_logits(self, x: torch.Tensor) -> torch.Tensor:
        """z̄_T = mean_k z_k, shape (B, C)."""
        return self._stack_logits(x).mean(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """p_T = mean_k softmax(z_k / T), shape (B, C); rows sum to 1."""
        return self.probs_and_mean_logits(x)[0]
