"""The peer a user would pick for masked-token generation: diffusers' aMUSEd U-ViT, class-conditioned.

Patil et al., "aMUSEd: An Open MUSE Reproduction", 2024, arXiv 2401.01808; network
``diffusers.UVit2DModel`` (conv embedding, res/attention down block, transformer layers with
cross-attention and adaptive norm on a pooled condition, up block, conv MLM head), sampled with
``diffusers.AmusedScheduler``. aMUSEd is text-conditioned; our choice for class-conditional
digits: a learned class table gives the one-token cross-attention context and another gives
the pooled condition (both with a null class for CFG and the same label dropout as the NAT
models), and the five micro-conditions aMUSEd embeds (image size, crop, aesthetic score) are zeros.
Everything else is diffusers' class as is; ``num_tokens`` must be a square grid.
"""

from __future__ import annotations

import math

import torch
from diffusers import UVit2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from genforge.models.maskgit import LabelEmbedding, NATOutput, TokenNetwork, check_labels, check_token_ids

MICRO_CONDITIONS = 5


class AmusedClassModel(TokenNetwork, ModelMixin, ConfigMixin):
    """``UVit2DModel`` with class tables in place of its text encoder; forward as the NAT models:
    ids (B, L) in [0, K] (K = [MASK]), labels (B,) -> logits (B, L, K)."""

    @register_to_config
    def __init__(self, codebook_size: int = 1024, num_tokens: int = 256, num_classes: int = 1000,
                 hidden_size: int = 1024, block_out_channels: int = 768, num_res_blocks: int = 3,
                 block_num_heads: int = 12, num_hidden_layers: int = 22, num_attention_heads: int = 16,
                 intermediate_size: int = 2816, cond_dim: int = 64, micro_cond_encode_dim: int = 16,
                 class_dropout: float = 0.1):
        super().__init__()
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"num_tokens={num_tokens} is not a square token grid")
        self.transformer = UVit2DModel(
            hidden_size=hidden_size, cond_embed_dim=cond_dim, micro_cond_encode_dim=micro_cond_encode_dim,
            micro_cond_embed_dim=MICRO_CONDITIONS * micro_cond_encode_dim, encoder_hidden_size=cond_dim,
            vocab_size=codebook_size + 1, codebook_size=codebook_size, in_channels=block_out_channels,
            block_out_channels=block_out_channels, num_res_blocks=num_res_blocks, block_num_heads=block_num_heads,
            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size, sample_size=side)
        self.context_embed = LabelEmbedding(num_classes, cond_dim, 0.0)
        self.pooled_embed = LabelEmbedding(num_classes, cond_dim, 0.0)
        self.class_dropout = class_dropout

    def forward(self, ids: torch.Tensor, class_labels: torch.Tensor) -> NATOutput:
        config = self.config
        check_token_ids(ids, config.codebook_size, config.num_tokens)
        check_labels(class_labels, config.num_classes, ids.shape[0])
        if self.training and self.class_dropout > 0:
            drop = torch.rand(class_labels.shape[0], device=ids.device) < self.class_dropout
            class_labels = torch.where(drop, config.num_classes, class_labels)
        side = math.isqrt(config.num_tokens)
        micro = torch.zeros(ids.shape[0], MICRO_CONDITIONS, device=ids.device)
        logits = self.transformer(ids.view(-1, side, side), self.context_embed(class_labels)[:, None],
                                  self.pooled_embed(class_labels), micro)  # (B, K, h, w)
        return NATOutput(logits=logits.flatten(2).transpose(1, 2))
