"""ImageReward-v1.0 (Xu et al. 2023, arXiv 2304.05977) as a ReNO reward (arXiv 2406.04312).

ReNO's ``ImageRewardLoss.score_diff`` (ExplainableML/ReNO ``rewards/imagereward.py``), on the
official model (THUDM/ImageReward ``ImageReward.score_gard``):

    e   = BLIP ViT-L/16 (image)                                  # (B, 197, 1024)
    h   = BLIP BERT text encoder (prompt, max_len 35, cross-attending to e)[:, 0]   # CLS, (B, 768)
    r   = (mlp(h) - 0.16717362830052426) / 1.0333394966054072
    L   = 2 - r

The ``image-reward`` package is not used: it pins timm 0.6.13 (which clashes with open_clip's
timm >= 1.0.17) and fairscale, and downloads ``med_config.json`` and the ``bert-base-uncased``
tokenizer at load time. Instead its BLIP forward is run by transformers' port of the same
modules (``BlipVisionModel`` = BLIP's ViT with its final norm, ``BlipTextModel`` with
cross-attention = BLIP's ``med.BertModel`` in multimodal mode), on the official state dict,
whose keys :func:`split_official_state` maps. Files at ``path``: ``ImageReward.pt``,
``med_config.json`` and ``tokenizer/`` (the ``bert-base-uncased`` vocabulary; BLIP adds the
``[DEC]`` and ``[ENC]`` tokens itself, giving its 30,524-entry vocabulary).
"""

from __future__ import annotations

import json
import re

import torch

from genforge.core.state_dict import load_state_dict_strict, read_state_dict
from genforge.rewards.base import CLIP_MEAN, CLIP_STD, Reward, RewardMLP, register_reward, require_files

__all__ = ["IMAGEREWARD_MEAN", "IMAGEREWARD_STD", "ImageReward", "VIT_LARGE", "split_official_state"]

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35
VIT_LARGE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu")
"""BLIP's ``create_vit("large", 224)``: the vision tower ImageReward-v1.0 uses."""

_VIT_RENAMES = [  # BLIP/timm ViT name -> transformers BlipVisionModel name
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def _vit_name(key: str) -> str:
    for pattern, new in _VIT_RENAMES:
        renamed, n = re.subn(pattern, new, key)
        if n:
            return renamed
    return key


def split_official_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """The official ``ImageReward.pt`` state dict as (vision, text, mlp) state dicts of
    ``BlipVisionModel``, ``BlipTextModel`` and :class:`RewardMLP`. The BLIP text encoder's
    ``position_ids`` buffer and the unused ``blip.vision_proj`` / ``blip.text_proj`` (ITC
    heads, not part of the score) are dropped."""
    vision, text, mlp = {}, {}, {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            vision[_vit_name(key.removeprefix("blip.visual_encoder."))] = value
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            text[key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            mlp[key.removeprefix("mlp.")] = value
    return vision, text, mlp


class ImageReward(Reward):
    """2 - ImageReward score, differentiable in the image."""

    offset = 2.0

    def __init__(self, vision, text, mlp: RewardMLP, tokenizer) -> None:
        super().__init__(int(vision.config.image_size), CLIP_MEAN, CLIP_STD)
        self.vision, self.text, self.mlp, self.tokenizer = vision, text, mlp, tokenizer
        self.freeze()

    def score_inputs(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                                return_tensors="pt").to(self.device)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state  # (B, 1 + patches, D_vision)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        hidden = self.text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                           encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask).last_hidden_state
        return (self.mlp(hidden[:, 0]) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def blip_tokenizer(directory):
    """BLIP's ``init_tokenizer``: BERT's tokenizer plus the ``[DEC]`` bos and ``[ENC]`` tokens."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(directory, local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def build(med_config: dict, vision_config: dict | None = None):
    """Random-initialised (vision, text, mlp) of ImageReward's architecture: ``vision_config``
    (default :data:`VIT_LARGE`) and the BERT ``med_config`` with cross-attention to the image."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    vision = BlipVisionModel(BlipVisionConfig(**(vision_config or VIT_LARGE)))
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "layer_norm_eps", "hidden_act", "pad_token_id")
    text_config = BlipTextConfig(**{k: med_config[k] for k in keys if k in med_config}, is_decoder=True,
                                 encoder_hidden_size=vision.config.hidden_size)
    return vision, BlipTextModel(text_config, add_pooling_layer=False), RewardMLP(text_config.hidden_size)


def load_imagereward(path, vision_config: dict | None = None) -> ImageReward:
    """ImageReward-v1.0 from ``path/ImageReward.pt``, ``path/med_config.json`` and
    ``path/tokenizer/vocab.txt`` (BLIP ViT-L unless ``vision_config`` says otherwise)."""
    path = require_files(path, "ImageReward.pt|ImageReward.safetensors", "med_config.json", "tokenizer/vocab.txt",
                         what="ImageReward")
    vision, text, mlp = build(json.loads((path / "med_config.json").read_text()), vision_config)
    weights = path / "ImageReward.pt" if (path / "ImageReward.pt").is_file() else path / "ImageReward.safetensors"
    parts = split_official_state(read_state_dict(weights, strip_prefixes=()))
    for module, state, what in zip((vision, text, mlp), parts, ("visual encoder", "text encoder", "mlp")):
        load_state_dict_strict(module, state, what=f"ImageReward {what} in {weights}")
    return ImageReward(vision, text, mlp, blip_tokenizer(path / "tokenizer"))


register_reward("imagereward", load_imagereward)
