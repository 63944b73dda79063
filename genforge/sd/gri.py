"""GRI attention: A-SDM's global-regional interactive attention (arXiv 2312.15516), as a diffusers processor.

A-SDM's abstract says only that GRI attention speeds up the attention layers; there is no
official code. Our reconstruction follows the two standard halves its name points to, applied
to a diffusers self-attention layer (``attn1`` of a transformer block) on an h x w token grid:

- regional (Twins-LSA / Swin, arXiv 2104.13840 / 2103.14030): softmax attention inside
  non-overlapping ``window`` x ``window`` windows;
- global (PVT / Twins-GSA spatial reduction, arXiv 2102.12122): every query attends to keys and
  values projected from the grid average-pooled by ``pool``;

    GRI(X) = W_o [ lambda * Attn_local(X) + (1 - lambda) * Attn(Q(X), K(P(X)), V(P(X))) ]

with the layer's own q/k/v/out projections (so a teacher's weights carry over unchanged) and
lambda = ``local_weight``. The cost per query falls from h*w keys to window^2 + h*w/pool^2.
Our choices: fusion by a fixed convex sum (no new parameters), average pooling. With one window
covering the grid and ``pool=1`` both halves are full attention, so GRI equals the layer's own
attention (tested).

The processor needs the grid size, which diffusers does not pass to processors:
:func:`apply_gri` registers a forward pre-hook on each ``Transformer2DModel`` that reads it
from the (B, C, h, w) input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from genforge.core.attention import attention

__all__ = ["GRIAttnProcessor", "apply_gri"]


class GRIAttnProcessor:
    """diffusers attention processor: local window attention + attention over pooled K/V, fused."""

    def __init__(self, window: int, pool: int, local_weight: float = 0.5):
        if window < 1 or pool < 1:
            raise ValueError(f"GRI needs window >= 1 and pool >= 1, got window={window}, pool={pool}")
        if not 0 <= local_weight <= 1:
            raise ValueError(f"GRI local_weight must be in [0, 1], got {local_weight}")
        self.window, self.pool, self.local_weight = window, pool, local_weight
        self.grid: tuple[int, int] | None = None

    def _heads(self, attn, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "b n (h d) -> b h n d", h=attn.heads)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("GRI attention is for self-attention without a mask; got encoder_hidden_states or "
                             "attention_mask (install it on attn1 layers only)")
        if attn.spatial_norm is not None or hidden_states.ndim != 3:
            raise ValueError("GRI attention expects (B, N, C) tokens from a Transformer2DModel block")
        height, width = self._grid(hidden_states.shape[1])
        residual = hidden_states
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        q, k, v = (self._heads(attn, f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))  # (B, H, N, d)
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        out = self.local_weight * self._local(q, k, v, height, width, attn.scale)
        out = out + (1 - self.local_weight) * self._global(attn, q, hidden_states, height, width)
        out = attn.to_out[1](attn.to_out[0](rearrange(out, "b h n d -> b n (h d)")))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _grid(self, tokens: int) -> tuple[int, int]:
        if self.grid is None or self.grid[0] * self.grid[1] != tokens:
            raise ValueError(f"GRI attention got {tokens} tokens but its grid is {self.grid}; install it with "
                             "genforge.sd.gri.apply_gri, which records the grid of each Transformer2DModel input")
        height, width = self.grid
        for size in (self.window, self.pool):
            if height % min(size, height) or width % min(size, width):
                raise ValueError(f"GRI window {self.window} and pool {self.pool} must divide the {height}x{width} grid")
        return height, width

    def _local(self, q, k, v, height, width, scale) -> torch.Tensor:
        """Attention inside non-overlapping windows (a window larger than the grid is clipped to it)."""
        wy, wx = min(self.window, height), min(self.window, width)
        split = "b h (ny wy nx wx) d -> (b ny nx) h (wy wx) d"
        q, k, v = (rearrange(t, split, wy=wy, wx=wx, ny=height // wy) for t in (q, k, v))
        out = attention(q, k, v, scale=scale)
        return rearrange(out, "(b ny nx) h (wy wx) d -> b h (ny wy nx wx) d", ny=height // wy, nx=width // wx, wy=wy)

    def _global(self, attn, q, hidden_states, height, width) -> torch.Tensor:
        """Every query attends to K/V projected from the average-pooled grid."""
        pool = min(self.pool, height, width)
        grid = rearrange(hidden_states, "b (y x) c -> b c y x", y=height)
        pooled = rearrange(F.avg_pool2d(grid, pool), "b c y x -> b (y x) c") if pool > 1 else hidden_states
        k, v = self._heads(attn, attn.to_k(pooled)), self._heads(attn, attn.to_v(pooled))
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        return attention(q, k, v, scale=attn.scale)


class _GridHook:
    """Forward pre-hook of a Transformer2DModel: tells its GRI processors the input's grid.

    An object (not a closure) so that ``copy.deepcopy`` of the UNet points the copy's hook at the
    copy's processors."""

    def __init__(self, processors: list[GRIAttnProcessor]):
        self.processors = processors

    def __call__(self, module, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        for processor in self.processors:
            processor.grid = tuple(hidden_states.shape[-2:])


def apply_gri(unet: nn.Module, stages: list[int], window: int, pool: int, local_weight: float = 0.5) -> int:
    """Install GRI processors in the self-attention (``attn1``) of ``down_blocks[i]`` and the mirrored
    ``up_blocks[n-1-i]`` for each stage i in ``stages``; returns how many layers were changed."""
    n = len(unet.down_blocks)
    count = 0
    for stage in stages:
        if not 0 <= stage < n:
            raise ValueError(f"GRI stage {stage} is out of range for a UNet with {n} stages")
        for block in (unet.down_blocks[stage], unet.up_blocks[n - 1 - stage]):
            for transformer in getattr(block, "attentions", None) or []:
                processors = []
                for transformer_block in transformer.transformer_blocks:
                    processors.append(GRIAttnProcessor(window, pool, local_weight))
                    transformer_block.attn1.set_processor(processors[-1])
                transformer.register_forward_pre_hook(_GridHook(processors), with_kwargs=True)
                count += len(processors)
    return count
