"""The shared core: attention, time-conditioned norms, class conditioning and blocks (torch/einops only),
and atomic file writes (``io``, the standard library only).

The attention entry point is ``genforge.core.attention.attention``; it is not re-exported
here because the name would shadow its module.
"""

from genforge.core.attention import MultiHeadAttention, attention_backend, naive_attention
from genforge.core.blocks import ConvNeXtBlock, GatedMLP, TransformerBlock
from genforge.core.embed import drop_labels, null_class_of
from genforge.core.norm import TDLayerNorm, TDRMSNorm, TimeDependentParameter, make_norm

__all__ = [
    "ConvNeXtBlock", "GatedMLP", "MultiHeadAttention", "TDLayerNorm", "TDRMSNorm", "TimeDependentParameter",
    "TransformerBlock", "attention_backend", "drop_labels", "make_norm", "naive_attention", "null_class_of",
]
