"""ENAT: a NAT with a visible-only encoder, a mask-query decoder and temporal feature reuse.

Ni et al., "ENAT: Rethinking Spatial-temporal Interactions in Token-based Image Synthesis",
NeurIPS 2024, arXiv 2411.06959 (official code ``LeapLabTHU/ENAT`` at 550f22c, ``libs/models.py``,
``libs/multiway.py``, ``train.py``). It changes the MaskGIT baseline
(:mod:`genforge.models.maskgit`, whose embedding, label table, adaLN-Zero block and MLM head it
shares) in two ways.

Spatial: disentangled encoder / decoder (Sec. 3.2).
- The encoder gathers the **visible tokens only** (a boolean gather; the mask count must be
  equal in every batch row, as officially asserted) and they self-attend: the encoder never
  sees [MASK]. Its key/value projection is Multiway branch B (``kv_self``).
- The decoder's queries are the mask tokens only; its keys/values are concat(encoded visible,
  current mask states). The visible part has its own adaLN shift/scale and projection
  (Multiway branch A, ``kv_context``); the visible features stay fixed across decoder layers.
- Outputs are scattered back to the L positions as ``feat`` (before the final LN, kept for
  reuse), then the final LN and the MLM head give the logits.

Temporal: reuse across sampling steps (Sec. 3.3).
- The previous step's state, kept per CFG branch in an explicit :class:`ReuseCache`
  (``{feat, masked}``, the official ``prev_dict``). The current masked set must be a subset of
  the previous one.
- Delta = tokens visible now but masked before (the newly decoded, "critical" tokens). **Only
  Delta goes through the encoder**, attending to concat(PrevProj(previous visible features),
  Delta): previous features (detached) pass once through ``PrevProj`` (residual LN + MLP) and
  serve as the kv context (branch A) of every encoder block.
- Visible set = encoded Delta and projected previous features (not recomputed); then the decoder.

Training (``train.py`` ``LSimple``), :func:`enat_training_loss`: one Beta(12, 3) mask ratio per
batch; with probability 0.5 a "previous step" that also masks a U(0, 1) fraction of the visible
tokens is run through the EMA model (no grad) and the online model trains with that cache.

Converter: :func:`load_official_enat` maps the official ``DiT`` state dict (``blocks.i`` with
``attn.kv.A``/``attn.kv.B``, ``adaLN_modulation.1``, ``x_embedder``, ``y_embedder``,
``mlm_layer``) onto :class:`ENATModel` strictly. The official model also holds
``prev_embedder`` (an MLP its forward never calls); the converter requires and drops it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from genforge.core.state_dict import load_state_dict_strict, read_state_dict
from genforge.models.maskgit import (AdaLNBlock, LabelEmbedding, MlmHead, Mlp, TokenEmbedding, TokenNetwork,
                                     check_labels, check_token_ids, init_adaln_zero, masked_token_loss,
                                     random_masking)


@dataclass
class ReuseCache:
    """One CFG branch's state from the previous step (official ``prev_dict``).

    ``feat`` (B, L, D): the pre-norm features of every position; ``masked`` (B, L): which
    positions were [MASK] in that step's input. Empty (both None) before the first step.
    """

    feat: torch.Tensor | None = None
    masked: torch.Tensor | None = None

    @property
    def empty(self) -> bool:
        return self.feat is None


@dataclass
class ENATOutput(BaseOutput):
    """``logits`` (B, L, K); ``cache``: this step's :class:`ReuseCache` for the next step."""

    logits: torch.Tensor
    cache: ReuseCache


class PrevProj(nn.Module):
    """x + MLP(LN(x)): the projection of the previous step's features (official ``PrevProj``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


def gather_rows(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x (B, L, D) at ``keep`` (B, L), the same count in every row -> (B, n, D) in position order."""
    return x[keep].reshape(x.shape[0], -1, x.shape[-1])


def equal_count(masked: torch.Tensor, what: str) -> int:
    """The per-row count of ``masked`` (B, L); ValueError if rows differ."""
    counts = masked.sum(dim=1)
    if counts.numel() and not bool((counts == counts[0]).all()):
        raise ValueError(f"ENAT needs the same number of {what} in every batch row (its encoder gathers the "
                         f"visible tokens into one (B, n, D) tensor); got counts {counts.tolist()}")
    return int(counts[0]) if counts.numel() else 0


class ENATModel(TokenNetwork, ModelMixin, ConfigMixin):
    """ENAT's disentangled network; ENAT-L is ``width=1024, encoder_depth=22, decoder_depth=2,
    num_heads=16`` with ``num_tokens=256`` (256 px) or 1024 (512 px)."""

    @register_to_config
    def __init__(self, codebook_size: int = 1024, num_tokens: int = 256, num_classes: int = 1000, width: int = 1024,
                 encoder_depth: int = 22, decoder_depth: int = 2, num_heads: int = 16, mlp_ratio: float = 4.0,
                 dropout: float = 0.1, class_dropout: float = 0.1):
        super().__init__()
        self.embed = TokenEmbedding(codebook_size + 1, width, num_tokens, dropout)
        self.label_embed = LabelEmbedding(num_classes, width, class_dropout)
        self.prev_proj = PrevProj(width)
        self.encoder_blocks = nn.ModuleList(AdaLNBlock(width, num_heads, mlp_ratio, True) for _ in range(encoder_depth))
        self.decoder_blocks = nn.ModuleList(AdaLNBlock(width, num_heads, mlp_ratio, True) for _ in range(decoder_depth))
        self.norm = nn.LayerNorm(width)
        self.head = MlmHead(width, codebook_size + 1)
        init_adaln_zero(self, [*self.encoder_blocks, *self.decoder_blocks])

    def encode(self, x: torch.Tensor, cond: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder over the gathered visible tokens x (B, n, D); ``context``: projected previous features."""
        if x.shape[1] == 0:
            return x
        for block in self.encoder_blocks:
            x = block(x, cond, context)
        return x

    def decode(self, queries: torch.Tensor, cond: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Decoder: mask-token queries (B, m, D) attend to concat(visible (fixed), their own states)."""
        if queries.shape[1] == 0:
            return queries
        for block in self.decoder_blocks:
            queries = block(queries, cond, visible)
        return queries

    def forward(self, ids: torch.Tensor, class_labels: torch.Tensor, cache: ReuseCache | None = None) -> ENATOutput:
        """ids (B, L) in [0, K] (K = [MASK]), class_labels (B,); ``cache`` from the previous step
        (None or empty: encode every visible token)."""
        config = self.config
        check_token_ids(ids, config.codebook_size, config.num_tokens)
        check_labels(class_labels, config.num_classes, ids.shape[0])
        masked = ids == self.mask_id  # (B, L)
        equal_count(masked, "[MASK] tokens")
        x, cond = self.embed(ids), self.label_embed(class_labels)  # (B, L, D), (B, D)
        if cache is None or cache.empty:
            visible = self.encode(gather_rows(x, ~masked), cond)  # (B, L - m, D)
        else:
            visible = self._encode_with_reuse(x, masked, cond, cache)
        decoded = self.decode(gather_rows(x, masked), cond, visible)  # (B, m, D)
        feat = torch.empty_like(x)
        feat[~masked] = visible.reshape(-1, x.shape[-1]).to(feat.dtype)
        feat[masked] = decoded.reshape(-1, x.shape[-1]).to(feat.dtype)
        logits = self.head(self.norm(feat), self.embed.word_embeddings.weight)[..., : config.codebook_size]
        return ENATOutput(logits=logits, cache=ReuseCache(feat=feat, masked=masked))

    def _encode_with_reuse(self, x: torch.Tensor, masked: torch.Tensor, cond: torch.Tensor,
                           cache: ReuseCache) -> torch.Tensor:
        """Encode only Delta (visible now, masked before) against the projected previous features."""
        if cache.masked.shape != masked.shape or cache.feat.shape != x.shape:
            raise ValueError(f"reuse cache of shapes feat {tuple(cache.feat.shape)}, masked "
                             f"{tuple(cache.masked.shape)} "
                             f"does not fit this step's input {tuple(masked.shape)}")
        if bool((masked & ~cache.masked).any()):
            raise ValueError("the masked set must be a subset of the previous step's masked set (a revealed token "
                             "was masked again); reset the ReuseCache to start a new decoding")
        was_visible = ~cache.masked
        previous = self.prev_proj(gather_rows(cache.feat.detach(), was_visible)).to(x.dtype)  # (B, v_prev, D)
        delta = ~masked & cache.masked
        equal_count(delta, "newly revealed tokens")
        encoded = self.encode(gather_rows(x, delta), cond, context=previous)  # (B, |Delta|, D)
        full = torch.empty_like(x)
        full[delta] = encoded.reshape(-1, x.shape[-1])
        full[was_visible] = previous.reshape(-1, x.shape[-1])
        return gather_rows(full, ~masked)


def enat_training_loss(model: ENATModel, ema_model: ENATModel | None, tokens: torch.Tensor, labels: torch.Tensor,
                       reuse_prob: float = 0.5, beta: tuple[float, float] = (12.0, 3.0)) -> torch.Tensor:
    """ENAT's training loss (official ``LSimple``); randomness from torch's global RNG.

    One Beta(a, b) mask ratio for the batch; with probability ``reuse_prob`` a previous step is
    simulated: round(U(0,1) * #visible) further visible tokens are masked at random, the EMA
    model (no grad; the online model if ``ema_model`` is None) encodes that input, and its
    :class:`ReuseCache` conditions the online model. Loss: masked-token CE with smoothing 0.1.
    """
    mask_id = getattr(model, "module", model).config.codebook_size  # DDP-wrapped or not
    ids = random_masking(tokens, mask_id, beta)
    masked = ids == mask_id
    cache = None
    if torch.rand(()).item() < reuse_prob:
        visible = int((~masked[0]).sum())
        extra = round(visible * torch.rand(()).item())
        score = torch.rand(masked.shape, device=ids.device).masked_fill(masked, float("inf"))
        prev_mask = torch.zeros_like(masked).scatter_(1, score.argsort(dim=1)[:, :extra], True)
        with torch.no_grad():
            teacher = ema_model if ema_model is not None else model
            cache = teacher(torch.where(prev_mask, mask_id, ids), labels).cache
    logits = model(ids, labels, cache=cache).logits
    return masked_token_loss(logits, tokens, masked)


def official_to_genforge_key(key: str, encoder_depth: int) -> str | None:
    """An official ENAT ``DiT`` state-dict key -> ours (None for the unused ``prev_embedder``)."""
    if key.startswith("prev_embedder."):
        return None
    renames = (("x_embedder.LayerNorm.", "embed.norm."), ("x_embedder.", "embed."), ("y_embedder.", "label_embed."),
               ("mlm_layer.", "head."))
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old):]
    if key.startswith("blocks."):
        _, index, rest = key.split(".", 2)
        index = int(index)
        prefix = f"encoder_blocks.{index}." if index < encoder_depth else f"decoder_blocks.{index - encoder_depth}."
        rest = (rest.replace("attn.kv.A.", "kv_context.").replace("attn.kv.B.", "kv_self.")
                .replace("attn.q.", "q.").replace("attn.proj.", "proj.").replace("adaLN_modulation.1.", "modulation."))
        return prefix + rest
    return key


def convert_official_state_dict(state: dict[str, torch.Tensor], encoder_depth: int) -> dict[str, torch.Tensor]:
    """Rename an official ENAT state dict to :class:`ENATModel`'s keys (``mlm_layer.bias`` (1, 1, V) -> (V,))."""
    if not any(key.startswith("prev_embedder.") for key in state):
        raise ValueError("not an official ENAT state dict: no prev_embedder.* keys (the official DiT has them)")
    out = {}
    for key, value in state.items():
        new = official_to_genforge_key(key, encoder_depth)
        if new is not None:
            out[new] = value.reshape(-1) if new == "head.bias" else value
    return out


def load_official_enat(path, **config) -> ENATModel:
    """An :class:`ENATModel` (``config`` as its constructor; ENAT-L by default) from an official
    checkpoint file (safetensors or a torch file read with ``weights_only=True``), loaded strictly."""
    model = ENATModel(**config)
    state = convert_official_state_dict(read_state_dict(path), model.config.encoder_depth)
    load_state_dict_strict(model, state, what=f"official ENAT checkpoint {path}")
    return model
