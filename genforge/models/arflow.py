"""ARFlow: a DiT with a sequence axis whose images attend to earlier ones through a decayed state.

Hui et al., "ARFlow: Autoregressive Flow with Hybrid Linear Attention", arXiv 2501.16085
(official code: TheFllood/ARFlow at 6c1a5b5, ``models.py`` / ``models_infer.py`` and
``linearattention/gated_retnet_*.py``). The network takes a sequence of S images of one class,
each with its own time, and predicts the velocity of every image (Sec. 3):

- a shared patch embedding (conv, patch p) and the same fixed 2-D sin-cos position table for
  every image; c_s = TimestepEmbed(t_s) + LabelEmbed(y) per image (DiT's embedders, null class
  ``num_classes`` for classifier-free guidance);
- ``depth`` DiT blocks with adaLN-Zero modulation per image, whose attention is
  :class:`GateRetention` on the flattened (B, S*N, D) stream with one chunk per image of N
  tokens: softmax inside an image, and across images only the gated, decayed linear state
  (:func:`genforge.core.attention.chunk_hybrid_attention`, Sec. 3.2);
- DiT's final adaLN + linear layer (zero-initialised) and unpatchify. With ``learn_sigma`` the
  layer emits 2C channels as the official one does and only the first C (the velocity) are
  returned.

:class:`GateRetention`, per head of dimension d_h: q, k, v are bias-free projections, each
RMS-normalised without affine parameters over the whole hidden vector (the official
``RMSNorm(head_dim)`` normalises the last axis, which at that point is the hidden size, not a
head), k scaled by d_h^-1/2; log-gates g = logsigmoid(W_gt (x + c)) / 16, one per token and
head; the output o = RMSNorm_head(hybrid attention) goes through SiLU(W_g x) * o and W_o. The
official code runs the cross-image scan as a Triton kernel and the inner softmax under
``torch.compile``, on CUDA only; here both are torch (any device, float64 included).

Generation carries, per block, the state after the images seen so far in an explicit
:class:`ARFlowCache` that the caller owns (never on modules): ``model(x, t, y, cache=cache)``
runs the recurrent form (:func:`~genforge.core.attention.chunk_hybrid_attention_step`, one
image at a time) from the cached states and leaves the updated states in the cache, as the
official ``models_infer.py`` does with ``incremental_state["last_hidden_state"]``. Without a
cache the chunk-parallel form runs from a zero state (training).

Module names follow diffusers' embedders (``time_embed.linear_1`` ...) and short names of ours;
:mod:`genforge.models.convert_arflow` maps the official layout onto them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_2d_sincos_pos_embed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange
from timm.layers import Mlp
from torch import nn

from genforge.core.attention import chunk_hybrid_attention, chunk_hybrid_attention_step

ARFLOW_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
"""(depth, hidden size, heads) of the paper's sizes (DiT's); the official XL/2 uses 18 heads."""


def _paper_config(size: str, patch: int) -> dict:
    depth, hidden, heads = ARFLOW_SIZES[size]
    heads = 18 if (size, patch) == ("XL", 2) else heads
    return {"sample_size": 16, "patch_size": patch, "in_channels": 4, "hidden_size": hidden, "depth": depth,
            "num_heads": heads, "num_classes": 1000, "learn_sigma": True}


ARFLOW_CONFIGS: dict[str, dict] = {
    **{f"{size}/{patch}": _paper_config(size, patch) for size in ARFLOW_SIZES for patch in (2, 4, 8)},
    "tiny": {"sample_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 64, "depth": 2, "num_heads": 2,
             "num_classes": 10, "learn_sigma": True},
    "digits": {"sample_size": 8, "patch_size": 2, "in_channels": 1, "hidden_size": 120, "depth": 4,
               "num_heads": 4, "num_classes": 10, "learn_sigma": False},
}
"""Named configs. The paper's ``S/2`` ... ``XL/8`` at 128 px (16x16 SD-VAE latents, the
official default image size; only the fixed position table depends on it); ``tiny`` is the
spec's smallest CPU configuration; ``digits`` (8x8 digits, patch 2, 16 tokens per image, depth 4,
width 120: 1,178,404 parameters) has as many parameters as the SiT baseline on diffusers' DiT
(:data:`genforge.models.dit.DIT_CONFIGS` ``digits`` with patch 2, depth 4, width 116: 1,182,624; diffusers'
DiT blocks carry their own embedders, so equal depth and patch leave it 4 channels narrower)."""


def arflow_config(name: str, **overrides) -> dict:
    """A copy of the named config with ``overrides`` applied."""
    if name not in ARFLOW_CONFIGS:
        raise ValueError(f"unknown ARFlow config {name!r}; expected one of {sorted(ARFLOW_CONFIGS)}")
    return {**copy.deepcopy(ARFLOW_CONFIGS[name]), **overrides}


@dataclass
class ARFlowCache:
    """The per-block attention states carried across calls: ``states[l]`` is (B, H, d_h, d_h)
    or None before the first call. One row per sample; created empty for each batch."""

    states: list = field(default_factory=list)

    def state(self, block: int) -> torch.Tensor | None:
        return self.states[block] if block < len(self.states) else None

    def set_state(self, block: int, value: torch.Tensor) -> None:
        self.states.extend([None] * (block + 1 - len(self.states)))
        self.states[block] = value


class GateRetention(nn.Module):
    """ARFlow's hybrid attention layer (official ``GateRetention``, names kept)."""

    def __init__(self, dim: int, num_heads: int, chunk_size: int, norm_eps: float = 1e-6,
                 gate_logit_normalizer: float = 16.0):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim, self.chunk_size = num_heads, dim // num_heads, chunk_size
        self.eps, self.gate_logit_normalizer = norm_eps, gate_logit_normalizer
        self.q_proj, self.k_proj, self.v_proj, self.g_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.gt_proj = nn.Linear(dim, num_heads, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def _rms(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)

    def forward(self, x: torch.Tensor, c: torch.Tensor, cache: ARFlowCache | None = None,
                block: int = 0) -> torch.Tensor:
        """x, c: (B, S*N, D). Parallel form from a zero state, or, with ``cache``, the recurrent
        form one image at a time from ``cache.state(block)``, updating it."""
        heads = lambda t: rearrange(t, "b l (h d) -> b h l d", h=self.num_heads)  # noqa: E731
        q, k, v = (heads(self._rms(proj(x))) for proj in (self.q_proj, self.k_proj, self.v_proj))
        g = rearrange(F.logsigmoid(self.gt_proj(x + c).float()) / self.gate_logit_normalizer, "b l h -> b h l")
        if cache is None:
            o, _ = chunk_hybrid_attention(q, k, v, g, self.chunk_size)
        else:
            state, outs = cache.state(block), []
            for image in range(x.shape[1] // self.chunk_size):
                rows = slice(image * self.chunk_size, (image + 1) * self.chunk_size)
                out, state = chunk_hybrid_attention_step(q[:, :, rows], k[:, :, rows], v[:, :, rows],
                                                         g[:, :, rows], state=state)
                outs.append(out)
            cache.set_state(block, state)
            o = torch.cat(outs, dim=2)
        o = rearrange(self._rms(o), "b h l d -> b l (h d)")
        return self.out_proj((F.silu(self.g_proj(x).float()) * o).to(x.dtype))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN on (B, S, N, D) with one (B, S, D) shift and scale per image."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, :, None]) + shift[:, :, None]


class ARFlowBlock(nn.Module):
    """A DiT block (adaLN-Zero, one modulation per image) with :class:`GateRetention` attention."""

    def __init__(self, dim: int, num_heads: int, chunk_size: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = GateRetention(dim, num_heads, chunk_size)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.modulation = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, cache: ARFlowCache | None, index: int) -> torch.Tensor:
        b, s, n, d = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c)).chunk(6, dim=-1)
        flat = lambda t: t.reshape(b, s * n, d)  # noqa: E731
        tokens_c = flat(c[:, :, None].expand(b, s, n, d))
        attn = self.attn(flat(_modulate(x, shift1, scale1)), tokens_c, cache, index).reshape(b, s, n, d)
        x = x + gate1[:, :, None] * attn
        return x + gate2[:, :, None] * self.mlp(_modulate(x, shift2, scale2))


class ARFlowModel(ModelMixin, ConfigMixin):
    """``model(x (B, S, C, H, W), t (B, S) in [0, 1], class_labels (B,), cache=None)`` ->
    ``.sample`` velocities (B, S, C, H, W). t = 0 is noise and t = 1 data (SiT convention)."""

    @register_to_config
    def __init__(self, sample_size: int = 8, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 64,
                 depth: int = 2, num_heads: int = 2, mlp_ratio: float = 4.0, num_classes: int = 10,
                 learn_sigma: bool = False):
        super().__init__()
        if sample_size % patch_size != 0:
            raise ValueError(f"sample_size {sample_size} is not a multiple of patch_size {patch_size}")
        grid = sample_size // patch_size
        self.out_channels = in_channels * (2 if learn_sigma else 1)
        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        pos = get_2d_sincos_pos_embed(hidden_size, grid, base_size=grid, output_type="pt")  # MAE's table
        self.register_buffer("pos_embed", pos.float()[None], persistent=True)  # (1, N, D)
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(256, hidden_size)
        self.class_embed = nn.Embedding(num_classes + 1, hidden_size)  # last row: the null class
        self.blocks = nn.ModuleList(ARFlowBlock(hidden_size, num_heads, grid * grid, mlp_ratio) for _ in range(depth))
        self.final_modulation = nn.Linear(hidden_size, 2 * hidden_size)
        self.final_linear = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def initialize_weights(self) -> None:
        """The official (DiT) initialisation: xavier Linears, zero adaLN and output layers."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.data.view(self.patch_embed.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.class_embed.weight, std=0.02)
        nn.init.normal_(self.time_embed.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_embed.linear_2.weight, std=0.02)
        for layer in [block.modulation for block in self.blocks] + [self.final_modulation, self.final_linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _check(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> None:
        cfg = self.config
        expected = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if x.ndim != 5 or tuple(x.shape[2:]) != expected:
            raise ValueError(f"ARFlowModel expects x of shape (B, S, {', '.join(map(str, expected))}), "
                             f"got {tuple(x.shape)}")
        if tuple(t.shape) != tuple(x.shape[:2]):
            raise ValueError(f"t must have shape (B, S) = {tuple(x.shape[:2])}, got {tuple(t.shape)}")
        if tuple(labels.shape) != (x.shape[0],):
            raise ValueError(f"class_labels must have shape (B,) = ({x.shape[0]},), got {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > cfg.num_classes):
            raise ValueError(f"class_labels must lie in [0, {cfg.num_classes}] ({cfg.num_classes} = null class), "
                             f"got values in [{int(labels.min())}, {int(labels.max())}]")

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor,
                cache: ARFlowCache | None = None, return_dict: bool = True):
        self._check(x, t, class_labels)
        b, s = x.shape[:2]
        p, grid = self.config.patch_size, self.config.sample_size // self.config.patch_size
        tokens = rearrange(self.patch_embed(x.flatten(0, 1)), "(b s) d h w -> b s (h w) d", b=b)
        h = tokens + self.pos_embed[:, None].to(tokens.dtype)
        temb = self.time_embed(self.time_proj(t.flatten()).to(h.dtype)).reshape(b, s, -1)
        c = temb + self.class_embed(class_labels)[:, None]
        for index, block in enumerate(self.blocks):
            h = block(h, c, cache, index)
        shift, scale = self.final_modulation(F.silu(c)).chunk(2, dim=-1)
        out = self.final_linear(_modulate(h, shift, scale))
        out = rearrange(out, "b s (gh gw) (p q c) -> b s c (gh p) (gw q)", gh=grid, p=p, q=p)
        out = out[:, :, : self.config.in_channels]
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)
