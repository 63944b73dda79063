"""The shared core: attention, time-conditioned norms, embeddings and blocks (torch/einops only),
and atomic file writes (``io``, the standard library only).

The attention entry point is ``genforge.core.attention.attention``; it is not re-exported
here because the name would shadow its module.
"""

from genforge.core.attention import MultiHeadAttention, attention_backend, naive_attention
from genforge.core.blocks import ConvNeXtBlock, DiTBlock, GatedMLP, TransformerBlock
from genforge.core.embed import (LabelEmbedding, PatchEmbed, TimestepEmbedding, drop_labels, sincos_2d_pos_embed,
                                 timestep_sinusoidal)
from genforge.core.norm import AdaLNZero, TDLayerNorm, TDRMSNorm, TimeDependentParameter, make_norm

__all__ = [
    "AdaLNZero", "ConvNeXtBlock", "DiTBlock", "GatedMLP", "LabelEmbedding", "MultiHeadAttention", "PatchEmbed",
    "TDLayerNorm", "TDRMSNorm", "TimeDependentParameter", "TimestepEmbedding", "TransformerBlock",
    "attention_backend", "drop_labels", "make_norm", "naive_attention", "sincos_2d_pos_embed", "timestep_sinusoidal",
]
