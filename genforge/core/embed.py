"""Class-label conditioning of class-conditional denoisers, with classifier-free guidance.

Classifier-free guidance (Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022, arXiv
2207.12598) trains one network as the conditional and the unconditional model: a label is
replaced by an extra "null" class with probability p during training (:func:`drop_labels`), and
sampling asks for the null class to get the unconditional prediction (:func:`null_class_of`
says which index that is for each network family).

Timestep, patch and 2-D position embeddings are diffusers' own
(``diffusers.models.embeddings``: ``get_timestep_embedding`` / ``Timesteps`` /
``TimestepEmbedding``, ``PatchEmbed``, ``get_2d_sincos_pos_embed``). With
``flip_sin_to_cos=True, downscale_freq_shift=0`` the timestep features are exactly ADM's and
DiT's [cos(t f_i), sin(t f_i)], f_i = 10000^(-i / half), and the 2-D sin-cos table is exactly
MAE's and DiT's (tests/core/test_embed.py checks both against the formulas). DiMR needs none
of them: time enters it only through its TD-norms and its positions are learned.
"""

from __future__ import annotations

import torch


def null_class_of(model) -> int:
    """The unconditional (null) class index of a class-conditional network.

    DiMR (and any network with a ``null_class`` property) says it; diffusers'
    ``UNet2DModel`` uses the last row of its ``num_class_embeds`` table; diffusers'
    ``DiTTransformer2DModel`` has ``num_embeds_ada_norm`` classes and the null class after them.
    """
    if hasattr(model, "null_class"):
        return int(model.null_class)
    config = getattr(model, "config", None)
    if getattr(config, "num_class_embeds", None) is not None:
        return int(config.num_class_embeds) - 1
    if getattr(config, "num_embeds_ada_norm", None) is not None:
        return int(config.num_embeds_ada_norm)
    raise ValueError(f"{type(model).__name__} is not class-conditional (no null class)")


def batch_conditions(timestep: torch.Tensor | float | int, class_labels: torch.Tensor | None, batch: int,
                     null_index: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-conditional denoiser's (timestep, labels) as (B,) tensors.

    A scalar timestep is repeated over the batch (diffusers schedulers pass one ``t`` per
    step); missing labels mean the unconditional (null) class.
    """
    timestep = torch.as_tensor(timestep, device=device)
    if timestep.dim() == 0:
        timestep = timestep.expand(batch)
    if class_labels is None:
        class_labels = torch.full((batch,), null_index, device=device, dtype=torch.long)
    return timestep, class_labels


def drop_labels(labels: torch.Tensor, prob: float, null_index: int) -> torch.Tensor:
    """Replace each label by ``null_index`` independently with probability ``prob`` (torch's
    global RNG), for classifier-free guidance training."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"label drop probability must be in [0, 1]; got {prob}")
    drop = torch.rand(labels.shape, device=labels.device) < prob
    return torch.where(drop, torch.full_like(labels, null_index), labels)
