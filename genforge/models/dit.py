"""A DiT-style single-resolution baseline with adaLN-Zero, built on genforge's core.

Peebles & Xie, "Scalable Diffusion Models with Transformers", arXiv 2212.09748: patchify,
fixed 2-D sin-cos positions, N transformer blocks whose norms are modulated by
c = TimestepEmbed(t) + LabelEmbed(y) through zero-initialised adaLN (Sec. 3.2), a final
adaLN + linear layer and unpatchify. Epsilon prediction only (no learned sigma). It is the
baseline DiMR's TD-LN and multi-resolution cascade are compared with (DiMR paper, Sec. 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from einops import rearrange
from torch import nn

from genforge.core.blocks import DiTBlock
from genforge.core.embed import PatchEmbed, TimestepEmbedding, batch_conditions, sincos_2d_pos_embed
from genforge.core.norm import AdaLNZero, modulate


@dataclass
class DiTOutput(BaseOutput):
    """``sample``: the epsilon prediction, shaped like the input."""

    sample: torch.Tensor


class DiTModel(ModelMixin, ConfigMixin):
    """DiT: forward(sample (B,C,H,W), timestep (B,), class_labels (B,)) -> DiTOutput."""

    @register_to_config
    def __init__(self, in_channels: int = 4, sample_size: int = 32, num_classes: int = 1000, patch_size: int = 2,
                 dim: int = 384, depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0):
        super().__init__()
        if sample_size % patch_size:
            raise ValueError(f"sample_size {sample_size} is not divisible by patch_size {patch_size}")
        grid = sample_size // patch_size
        self.patch_embed = PatchEmbed(in_channels, dim, patch_size)
        self.register_buffer("pos_embed", sincos_2d_pos_embed(dim, grid, grid)[None], persistent=False)
        self.time_embed = TimestepEmbedding(dim)
        self.class_embed = nn.Embedding(num_classes + 1, dim)
        self.blocks = nn.ModuleList(DiTBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_ada_ln = AdaLNZero(dim, dim, chunks=2)
        self.final_proj = nn.Linear(dim, patch_size * patch_size * in_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's init: xavier linears, N(0, 0.02) class table, zero output projection."""
        for module in self.modules():
            if isinstance(module, nn.Linear) and module is not self.final_proj:
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            block.ada_ln.reset_parameters()
        self.final_ada_ln.reset_parameters()
        nn.init.normal_(self.class_embed.weight, std=0.02)
        nn.init.zeros_(self.final_proj.weight)
        nn.init.zeros_(self.final_proj.bias)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                class_labels: torch.Tensor | None = None, return_dict: bool = True):
        batch, _, height, width = sample.shape
        timestep, class_labels = batch_conditions(timestep, class_labels, batch, self.null_class, sample.device)
        x = self.patch_embed(sample) + self.pos_embed  # (B, N, D)
        cond = self.time_embed(timestep.float()) + self.class_embed(class_labels)  # (B, D)
        for block in self.blocks:
            x = block(x, cond)
        shift, scale = self.final_ada_ln(cond)
        x = self.final_proj(modulate(self.final_norm(x), shift, scale))
        p = self.config.patch_size
        out = rearrange(x, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=height // p, p1=p, p2=p)
        return DiTOutput(sample=out) if return_dict else (out,)
