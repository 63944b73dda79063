"""Distillation objectives: BK-SDM's three losses and A-SDM's semantic-aware supervision.

BK-SDM (arXiv 2305.15798, Eq. 1-4; official ``kd_train_text_to_image.py``):

    L = lambda_sd  * || eps - eps_s(z_t, y, t) ||^2                          (denoising)
      + lambda_out * || eps_t(z_t, y, t) - eps_s(z_t, y, t) ||^2             (output KD)
      + lambda_feat * sum_l || f_t^l(z_t, y, t) - f_s^l(z_t, y, t) ||^2      (feature KD)

each a mean-squared error, all lambda = 1 in the official runs; f^l are forward outputs of the
matched blocks (:func:`genforge.sd.prune.feature_layers`; the first element when a block returns
a tuple), the teacher's detached. The teacher is frozen and runs without autograd. Hooks sit on
the unwrapped modules, so an accelerate/DDP wrapper needs no ``module.`` prefix (the official
code adds one by hand).

A-SDM's semantic-aware supervision (SAS, arXiv 2312.15516) aligns teacher and student outputs "at
the semantic level"; the paper body is not public. Our choice: the cosine distance between a frozen
semantic encoder's embeddings of the two predicted clean samples
x0_hat = (z_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t), weighted by ``lambda_sas`` (0 = off).
The encoder is the caller's (a CLIP image tower on decoded x0_hat at SD scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FeatureRecorder", "LossWeights", "Distiller", "predicted_x0", "semantic_loss"]


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class FeatureRecorder:
    """Forward hooks that store the outputs of the named submodules of ``model`` in ``features``."""

    def __init__(self, model: nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        missing = [name for name in names if name not in modules]
        if missing:
            raise ValueError(f"no module named {missing} in {type(model).__name__} (feature KD layers)")
        self.features: dict[str, torch.Tensor] = {}
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in names]

    def _hook(self, name: str):
        def store(module, args, output):
            self.features[name] = _first(output)
        return store

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass(frozen=True)
class LossWeights:
    """lambda_sd, lambda_out, lambda_feat (BK-SDM: 1, 1, 1) and lambda_sas (A-SDM's SAS; ours, 0 = off)."""

    sd: float = 1.0
    out: float = 1.0
    feat: float = 1.0
    sas: float = 0.0


def predicted_x0(noisy: torch.Tensor, eps: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor):
    """x0_hat = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (DDPM, Ho et al. 2020, Eq. 15)."""
    abar = alphas_cumprod.to(noisy.device)[timesteps].float().view(-1, *([1] * (noisy.ndim - 1)))
    return (noisy.float() - (1 - abar).sqrt() * eps.float()) / abar.sqrt()


def semantic_loss(x0_student: torch.Tensor, x0_teacher: torch.Tensor, encoder: Callable) -> torch.Tensor:
    """Mean over the batch of 1 - cos(E(x0_s), E(x0_t)); E is frozen, the teacher side detached."""
    with torch.no_grad():
        target = encoder(x0_teacher).flatten(1)
    return (1 - F.cosine_similarity(encoder(x0_student).flatten(1), target, dim=1)).mean()


class Distiller:
    """BK-SDM's losses between a trainable student and a frozen teacher UNet.

    ``layers``: (teacher module, student module) pairs for the feature loss, named in the
    student given here; ``semantic``: the SAS encoder (needed when ``weights.sas > 0``) and
    ``alphas_cumprod`` the noise schedule it needs to form x0_hat.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, layers: list[tuple[str, str]],
                 weights: LossWeights = LossWeights(), semantic: Callable | None = None,
                 alphas_cumprod: torch.Tensor | None = None):
        if weights.sas > 0 and (semantic is None or alphas_cumprod is None):
            raise ValueError("semantic-aware supervision (weights.sas > 0) needs a semantic encoder and alphas_cumprod")
        teacher.requires_grad_(False).eval()
        self.student, self.teacher, self.layers, self.weights = student, teacher, layers, weights
        self.semantic, self.alphas_cumprod = semantic, alphas_cumprod
        self.teacher_features = FeatureRecorder(teacher, [t for t, _ in layers])
        self.student_features = FeatureRecorder(student, [s for _, s in layers])

    def losses(self, noisy, timesteps, encoder_hidden_states, target, model: nn.Module | None = None) -> dict:
        """The weighted total and each term. ``model`` runs the student's forward (default: the student;
        a DDP wrapper of it, or an incubation hybrid holding some of its modules). Feature terms cover
        the matched student modules that ran."""
        model = self.student if model is None else model
        self.student_features.features.clear()
        prediction = model(noisy, timesteps, encoder_hidden_states).sample.float()
        with torch.no_grad():
            teacher_prediction = self.teacher(noisy, timesteps, encoder_hidden_states).sample.float()
        terms = {"sd": F.mse_loss(prediction, target.float()), "out": F.mse_loss(prediction, teacher_prediction)}
        feats = self.student_features.features
        terms["feat"] = sum((F.mse_loss(feats[s].float(), self.teacher_features.features[t].detach().float())
                             for t, s in self.layers if s in feats), prediction.new_zeros(()))
        if self.weights.sas > 0:
            terms["sas"] = semantic_loss(predicted_x0(noisy, prediction, timesteps, self.alphas_cumprod),
                                         predicted_x0(noisy, teacher_prediction, timesteps, self.alphas_cumprod),
                                         self.semantic)
        terms["total"] = sum(getattr(self.weights, name) * value for name, value in terms.items())
        return terms

    def remove_hooks(self) -> None:
        self.teacher_features.remove()
        self.student_features.remove()
