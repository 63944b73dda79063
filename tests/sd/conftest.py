"""Tiny Stable Diffusion UNets built from code (no downloads) for the A-SDM / BK-SDM tests."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from genforge.sd.configs import UNET_CONFIGS


def _build_unet(config: dict, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config)
    unet.set_default_attn_processor()
    return unet


def _unet_inputs(config: dict, batch: int = 2, tokens: int = 7, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    size = config["sample_size"]
    return (torch.randn(batch, config["in_channels"], size, size, generator=generator),
            torch.tensor([20, 700][:batch]),
            torch.randn(batch, tokens, config["cross_attention_dim"], generator=generator))


@pytest.fixture
def build_unet():
    """``build_unet(config, seed=0)``: a seeded UNet2DConditionModel with the default attention processor."""
    return _build_unet


@pytest.fixture
def unet_inputs():
    """``unet_inputs(config, batch=2)``: (latents, timesteps, text embeddings) for a UNet of ``config``."""
    return _unet_inputs


@pytest.fixture
def teacher() -> UNet2DConditionModel:
    """A seeded ``sd-like-tiny`` teacher."""
    return _build_unet(UNET_CONFIGS["sd-like-tiny"])
