"""The MaskGIT-style non-autoregressive transformer (NAT) baseline that ENAT is measured against.

Chang et al., "MaskGIT: Masked Generative Image Transformer", CVPR 2022, arXiv 2202.04200, in
the form ENAT (arXiv 2411.06959, Sec. 3) takes as its starting point and the official ENAT code
(``LeapLabTHU/ENAT`` at 550f22c, ``libs/modules.py``, ``libs/nat_misc.py``) builds on:

- tokens: a grid of L VQ code ids in [0, K); id K is [MASK] (vocabulary K + 1);
- embedding (official ``BertEmbeddings``): word + learned position, LayerNorm (eps 1e-6),
  dropout 0.1;
- **one transformer over all L tokens, [MASK] included**, of adaLN-Zero blocks (DiT, Peebles &
  Xie 2023, arXiv 2212.09748) conditioned on the class embedding only (no timestep: the mask
  ratio is implicit), tanh-GELU MLP, attention through :func:`genforge.core.attention.attention`;
- MLM head tied to the word embeddings (official ``MlmLayer``): Linear -> GELU -> LN -> . E^T + b,
  logits cut to the K codes; the tied table is detached in the head, as officially;
- loss (official ``NATSchedule.loss``): cross-entropy on masked positions only, label smoothing 0.1;
- iterative decoding (official ``NATSchedule.generate``), :func:`iterative_decode`: T steps from
  all-[MASK]; at step s (ratio r = (s+1)/T), logits = l_c + w_s (l_c - l_u) with w_s = (s/T) w
  (the guidance ramp; 0 on the first step), sample masked positions from
  Categorical(log_softmax / tau_s) with tau_s = max(samp_temp (1 - r), 1e-3); confidence =
  log p(sampled) (+inf where already visible) + tau_m Gumbel with tau_m = mask_temp (1 - r);
  re-mask the floor(L cos(pi/2 r)) least confident tokens (cosine schedule).

The embedding, label table, block and head are shared with :mod:`genforge.models.enat`, which
replaces the single all-token transformer by a visible-only encoder and a mask-query decoder.
Our choice (no official MaskGIT code in the ENAT repository): the baseline's blocks are ENAT's
adaLN-Zero blocks with one key/value projection and six modulations, so that "same width and
depth" compares the two layouts and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from einops import rearrange
from torch import nn

from genforge.core.attention import attention

LABEL_SMOOTHING = 0.1
GUIDANCE_RAMPS = ("linear", "constant")
MASK_SCHEDULES = ("cosine", "linear")


def check_token_ids(ids: torch.Tensor, codebook_size: int, num_tokens: int, *, allow_mask: bool = True) -> None:
    """ValueError unless ``ids`` is (B, num_tokens) integer with values in [0, K] ([0, K) without the mask)."""
    if ids.dtype not in (torch.int64, torch.int32) or ids.ndim != 2 or ids.shape[1] != num_tokens:
        raise ValueError(f"token ids must be an integer tensor of shape (B, {num_tokens}); "
                         f"got {tuple(ids.shape)} {ids.dtype}")
    high = codebook_size if allow_mask else codebook_size - 1
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > high):
        raise ValueError(f"token ids must lie in [0, {high}] (codebook of {codebook_size}"
                         f"{', id ' + str(codebook_size) + ' = [MASK]' if allow_mask else ''}); "
                         f"got values in [{int(ids.min())}, {int(ids.max())}]")


def check_labels(labels: torch.Tensor, num_classes: int, batch: int) -> None:
    """ValueError unless ``labels`` is (batch,) with values in [0, num_classes] (num_classes = null)."""
    if labels.shape != (batch,) or (labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > num_classes)):
        raise ValueError(f"class labels must be ({batch},) in [0, {num_classes}] ({num_classes} = unconditional); "
                         f"got shape {tuple(labels.shape)} values {labels.tolist()[:8]}")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, with (B, D) conditioning broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TokenEmbedding(nn.Module):
    """Word + learned position embedding, LayerNorm, dropout (official ``BertEmbeddings``)."""

    def __init__(self, vocab_size: int, dim: int, num_tokens: int, dropout: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(num_tokens, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.word_embeddings.weight, std=0.02)
        nn.init.normal_(self.position_embeddings.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(ids) + self.position_embeddings.weight[: ids.shape[1]]  # (B, L, D)
        return self.dropout(self.norm(x))


class LabelEmbedding(nn.Module):
    """Class table with a null row; in training each label becomes the null class with
    probability ``dropout`` (official ``LabelEmbedder``: the second label-drop mechanism)."""

    def __init__(self, num_classes: int, dim: int, dropout: float):
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.embedding_table = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.embedding_table.weight, std=0.02)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class Mlp(nn.Module):
    """fc1 -> tanh-GELU -> fc2 (timm ``Mlp`` as DiT configures it)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNBlock(nn.Module):
    """adaLN-Zero transformer block whose keys/values may include a separately modulated context.

    Queries are the block's own tokens x (B, N, D). Without ``context`` the block is DiT's
    self-attention block (6 modulations, one kv projection ``kv_self``). With
    ``multiway=True`` (ENAT, official ``DiTBlock`` + ``MultiwayNetwork``) it has 8 modulations:
    a context c (B, M, D) is normed with its own shift/scale and projected by ``kv_context``
    (Multiway branch A), x by ``kv_self`` (branch B), and the queries attend to
    concat(context, x). The context itself is not updated.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, multiway: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.multiway = num_heads, multiway
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv_self = nn.Linear(dim, 2 * dim)
        self.kv_context = nn.Linear(dim, 2 * dim) if multiway else None
        self.proj = nn.Linear(dim, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.modulation = nn.Linear(dim, (8 if multiway else 6) * dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        mods = self.modulation(F.silu(cond)).chunk(8 if self.multiway else 6, dim=1)
        if self.multiway:
            shift, scale, shift_ctx, scale_ctx, gate, shift_mlp, scale_mlp, gate_mlp = mods
        else:
            shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mods
            if context is not None:
                raise ValueError("a block without multiway projections takes no context")
        h = modulate(self.norm1(x), shift, scale)  # (B, N, D)
        kv = self.kv_self(h)  # (B, N, 2D)
        if context is not None and context.shape[1]:
            kv = torch.cat([self.kv_context(modulate(self.norm1(context), shift_ctx, scale_ctx)), kv], dim=1)
        k, v = rearrange(kv, "b m (two h d) -> two b h m d", two=2, h=self.num_heads)
        q = rearrange(self.q(h), "b n (h d) -> b h n d", h=self.num_heads)
        out = rearrange(attention(q, k, v), "b h n d -> b n (h d)")
        x = x + gate.unsqueeze(1) * self.proj(out)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class MlmHead(nn.Module):
    """Linear -> GELU -> LN -> . E^T + bias, E the (detached) word embeddings (official ``MlmLayer``)."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return self.ln(F.gelu(self.fc(x))) @ word_embeddings.detach().t() + self.bias


def init_adaln_zero(model: nn.Module, blocks) -> None:
    """DiT initialisation as ENAT's ``initialize_weights``: xavier-uniform Linear weights, zero
    biases, then zero adaLN modulations (each block starts as the identity)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    for block in blocks:
        nn.init.zeros_(block.modulation.weight)
        nn.init.zeros_(block.modulation.bias)


@dataclass
class NATOutput(BaseOutput):
    """``logits`` (B, L, K) over the codebook for every position."""

    logits: torch.Tensor


class TokenNetwork:
    """``mask_id`` (= K) and ``null_class`` of a token network whose config has ``codebook_size`` and
    ``num_classes`` (the NAT baseline, ENAT, the aMUSEd wrapper)."""

    @property
    def mask_id(self) -> int:
        return self.config.codebook_size

    @property
    def null_class(self) -> int:
        return self.config.num_classes


class MaskGITModel(TokenNetwork, ModelMixin, ConfigMixin):
    """The NAT baseline: every token, [MASK] included, through every block."""

    @register_to_config
    def __init__(self, codebook_size: int = 1024, num_tokens: int = 256, num_classes: int = 1000, width: int = 1024,
                 depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0, dropout: float = 0.1,
                 class_dropout: float = 0.1):
        super().__init__()
        self.embed = TokenEmbedding(codebook_size + 1, width, num_tokens, dropout)
        self.label_embed = LabelEmbedding(num_classes, width, class_dropout)
        self.blocks = nn.ModuleList(AdaLNBlock(width, num_heads, mlp_ratio, multiway=False) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = MlmHead(width, codebook_size + 1)
        init_adaln_zero(self, self.blocks)

    def forward(self, ids: torch.Tensor, class_labels: torch.Tensor) -> NATOutput:
        """ids (B, L) in [0, K] (K = [MASK]), class_labels (B,) -> logits (B, L, K)."""
        check_token_ids(ids, self.config.codebook_size, self.config.num_tokens)
        check_labels(class_labels, self.config.num_classes, ids.shape[0])
        x, cond = self.embed(ids), self.label_embed(class_labels)  # (B, L, D), (B, D)
        for block in self.blocks:
            x = block(x, cond)
        logits = self.head(self.norm(x), self.embed.word_embeddings.weight)
        return NATOutput(logits=logits[..., : self.config.codebook_size])


def masked_token_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor,
                      label_smoothing: float = LABEL_SMOOTHING) -> torch.Tensor:
    """Cross-entropy with label smoothing, averaged over masked positions only (official
    ``NATSchedule.loss``: visible positions get ``ignore_index``)."""
    labels = torch.where(masked, targets, torch.full_like(targets, -1))
    return F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-1, label_smoothing=label_smoothing)


def random_masking(tokens: torch.Tensor, mask_id: int, beta: tuple[float, float] = (12.0, 3.0)) -> torch.Tensor:
    """Training input (official ``NATSchedule.sample``): ONE ratio r ~ Beta(a, b) for the batch,
    round(L r) clamped to [1, L - 1] masked positions per row, at random places; returns the
    masked ids. Draws from torch's global RNG."""
    batch, length = tokens.shape
    ratio = torch.distributions.Beta(*beta).sample(()).item()
    count = min(max(round(length * ratio), 1), length - 1)
    order = torch.rand(batch, length, device=tokens.device).argsort(dim=-1)
    return torch.where(order < count, torch.full_like(tokens, mask_id), tokens)


def masked_count(step: int, steps: int, num_tokens: int, schedule: str = "cosine") -> int:
    """Tokens still masked after step s of T: floor(L cos(pi/2 (s+1)/T)) (the official cosine
    schedule) or floor(L (1 - (s+1)/T)) (``linear``)."""
    if schedule not in MASK_SCHEDULES:
        raise ValueError(f"masking schedule must be one of {MASK_SCHEDULES}; got {schedule!r}")
    ratio = (step + 1) / steps
    return math.floor(num_tokens * (math.cos(math.pi / 2 * ratio) if schedule == "cosine" else 1 - ratio))


def guidance_weight(step: int, steps: int, scale: float, ramp: str) -> float:
    """CFG weight w_s of step s: (s/T) w for the official linear ramp, w for ``constant``."""
    if ramp not in GUIDANCE_RAMPS:
        raise ValueError(f"guidance ramp must be one of {GUIDANCE_RAMPS}; got {ramp!r}")
    return scale * step / steps if ramp == "linear" else scale


def check_decoding(steps: int, mask_temp: float, samp_temp: float, guidance_scale: float) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1; got {steps!r}")
    for name, value in (("mask_temp", mask_temp), ("samp_temp", samp_temp), ("guidance_scale", guidance_scale)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0; got {value}")


def gumbel(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Standard Gumbel noise -log(-log u), u ~ U(0, 1), drawn from ``generator``."""
    u = torch.rand(shape, generator=generator, device=device).clamp_(1e-20, 1.0)
    return -torch.log((-torch.log(u)).clamp_min(1e-20))


def decode_step(ids: torch.Tensor, logits: torch.Tensor, step: int, steps: int, mask_id: int, mask_temp: float,
                samp_temp: float, generator: torch.Generator | None, schedule: str = "cosine"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One MaskGIT step from guided logits (B, L, K): sample masked positions, re-mask the least
    confident. Returns (new ids with [MASK] where re-masked, sampled ids with none)."""
    ratio = (step + 1) / steps
    tau_m, tau_s = mask_temp * (1 - ratio), max(samp_temp * (1 - ratio), 1e-3)
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, L, K)
    is_mask = ids == mask_id
    probs = torch.softmax(logp / tau_s, dim=-1).flatten(0, 1)
    drawn = torch.multinomial(probs, 1, generator=generator).view_as(ids)
    sampled = torch.where(is_mask, drawn, ids)
    chosen = torch.gather(logp, -1, sampled.unsqueeze(-1)).squeeze(-1)
    confidence = torch.where(is_mask, chosen, torch.full_like(chosen, math.inf))
    confidence = confidence + tau_m * gumbel(confidence.shape, generator, confidence.device)
    remask = torch.zeros_like(is_mask)
    order = confidence.argsort(dim=-1)[:, : masked_count(step, steps, ids.shape[1], schedule)]
    remask.scatter_(1, order, True)
    return torch.where(remask, torch.full_like(ids, mask_id), sampled), sampled


def iterative_decode(predict: Callable[[torch.Tensor, int, bool], tuple[torch.Tensor, torch.Tensor | None]],
                     batch: int, num_tokens: int, mask_id: int, *, steps: int = 8, guidance_scale: float = 0.0,
                     guidance_ramp: str = "linear", mask_temp: float = 1.5, samp_temp: float = 6.0,
                     generator: torch.Generator | None = None, schedule: str = "cosine", device="cpu",
                     callback: Callable[[int, torch.Tensor, float], None] | None = None) -> torch.Tensor:
    """T steps of MaskGIT decoding from all-[MASK] (official ``NATSchedule.generate``); returns (B, L) ids.

    ``predict(ids, step, guided)`` returns (conditional logits, null-class logits or None when
    ``guided`` is False). CFG: l = l_c + w_s (l_c - l_u), the official convention (w = 0 is no
    guidance; diffusers' scale is 1 + w). ``callback(step, ids, w_s)`` sees the ids after each step.
    """
    check_decoding(steps, mask_temp, samp_temp, guidance_scale)
    masked_count(0, steps, num_tokens, schedule)  # checks the schedule's name before any work
    guidance_weight(0, steps, guidance_scale, guidance_ramp)  # and the ramp's
    ids = torch.full((batch, num_tokens), mask_id, dtype=torch.long, device=device)
    sampled = ids
    for step in range(steps):
        weight = guidance_weight(step, steps, guidance_scale, guidance_ramp)
        cond, uncond = predict(ids, step, guidance_scale > 0)
        logits = cond if uncond is None else cond + weight * (cond - uncond)
        ids, sampled = decode_step(ids, logits, step, steps, mask_id, mask_temp, samp_temp, generator, schedule)
        if callback is not None:
            callback(step, ids, weight)
    return sampled
