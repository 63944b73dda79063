"""The DiT baseline: diffusers' ``DiTTransformer2DModel``, trained from DiT's initialisation.

Peebles & Xie, "Scalable Diffusion Models with Transformers", arXiv 2212.09748 (official code:
facebookresearch/DiT). The network is diffusers' :class:`~diffusers.DiTTransformer2DModel`, the
model a diffusers user would pick: patchify, fixed 2-D sin-cos positions, N transformer blocks
whose norms are modulated by c = TimestepEmbed(t) + LabelEmbed(y) through adaLN-Zero (Sec. 3.2),
a final adaLN + linear layer and unpatchify. Here it works in pixel space and predicts epsilon
only (``out_channels`` = ``in_channels``, no learned sigma). ``num_embeds_ada_norm`` is the
number of classes; each label table has one more row, the null class ``num_embeds_ada_norm``
that classifier-free guidance uses. It is the baseline DiMR's TD-norms and multi-resolution
cascade are measured against (DiMR, arXiv 2406.09416, Sec. 4).

Where diffusers' model differs from the official DiT (kept as diffusers has it):

- every block has its own timestep MLP and label table (the official DiT shares one; diffusers'
  converter copies it into every block), so with C classes a block of width d costs
  19 d^2 + (274 + C) d parameters instead of the official 18 d^2 + 15 d plus one shared
  embedder: the ``digits`` config (4 blocks of width 116) has 1,181,925 parameters, 1.1% fewer
  than DiMR's ``digits`` (1,194,690);
- the timestep features use ``downscale_freq_shift=1`` (frequencies 10000^(-i / (half - 1)));
  the official DiT divides by half.

What :func:`dit_baseline` adds, because diffusers builds the network only to load checkpoints:

- the official ``initialize_weights``: xavier-uniform Linears with zero biases, the patch
  projection xavier-initialised as a Linear, N(0, 0.02) label tables and timestep-MLP weights,
  and zero adaLN modulations and output layer, so every block starts as the identity (the
  "Zero" of adaLN-Zero) and the network starts by predicting 0; diffusers leaves torch's
  default initialisation;
- one label drop per sample: diffusers' label tables replace labels by the null class with
  p = 0.1 in train mode, independently in every block. That is switched off (the null row
  stays), so the training method drops each sample's label once, with the recipe's
  ``class_dropout``, as the official DiT does.
"""

from __future__ import annotations

from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding
from torch import nn

DIT_CONFIGS: dict[str, dict] = {
    "tiny": {"in_channels": 4, "sample_size": 8, "num_embeds_ada_norm": 10, "patch_size": 2,
             "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2},
    "digits": {"in_channels": 1, "sample_size": 8, "num_embeds_ada_norm": 10, "patch_size": 1,
               "num_attention_heads": 4, "attention_head_dim": 29, "num_layers": 4},
    "mnist": {"in_channels": 1, "sample_size": 32, "num_embeds_ada_norm": 10, "patch_size": 2,
              "num_attention_heads": 4, "attention_head_dim": 31, "num_layers": 4},
    "XL/2": {"in_channels": 4, "sample_size": 32, "num_embeds_ada_norm": 1000, "patch_size": 2,
             "num_attention_heads": 16, "attention_head_dim": 72, "num_layers": 28},
}
"""Named configs: ``tiny`` (tests; diffusers' own test size), ``digits`` (8x8 digits, patch 1,
parameters matched to DiMR's ``digits``), ``mnist`` (32x32 MNIST-5k, patch 2, 1,341,560
parameters against DiMR's ``mnist`` 1,336,451) and ``XL/2`` (DiT-XL/2, epsilon only)."""


def dit_baseline(**config) -> DiTTransformer2DModel:
    """A ``DiTTransformer2DModel(**config)`` with DiT's initialisation and a single label drop."""
    model = DiTTransformer2DModel(**config)
    initialize_dit_weights(model)
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0  # the training method drops labels, once per sample
    return model


def initialize_dit_weights(model: DiTTransformer2DModel) -> None:
    """The official DiT ``initialize_weights``, on diffusers' module names."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    patch = model.pos_embed.proj.weight
    nn.init.xavier_uniform_(patch.data.view(patch.shape[0], -1))
    for block in model.transformer_blocks:
        embedder = block.norm1.emb
        nn.init.normal_(embedder.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(embedder.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(embedder.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
