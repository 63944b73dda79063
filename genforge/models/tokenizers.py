"""The VQ tokenizers of the token generators (ENAT, MaskGIT, aMUSEd) behind one small interface.

A tokenizer maps images to code ids and back:

- ``encode_to_ids(images) -> (B, h*w)`` code ids (row-major grid), ``images`` (B, C, H, W) in [-1, 1];
- ``decode_ids(ids, grid) -> images`` (B, C, H, W) in [-1, 1] (unclamped), ``grid = (h, w)``;
- ``codebook_size`` and ``in_channels``.

Two networks implement it: :class:`~genforge.models.maskgit_vqgan.MaskGITVQGAN` (the official
MaskGIT tokenizer, converted by :func:`~genforge.models.maskgit_vqgan.load_official_vqgan`) itself,
and diffusers' ``VQModel`` (``lookup_from_codebook=True``, the tokenizer we train on digits)
through the thin adapter :class:`VQModelTokenizer`. Pipelines hold the network itself (so
``save_pretrained`` / ``from_pretrained`` store it under its own class) and call it through
:func:`as_tokenizer`; :func:`load_tokenizer` loads either from a ``save_pretrained`` directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import VQModel

from genforge.models.maskgit import check_token_ids
from genforge.models.maskgit_vqgan import MaskGITVQGAN

TOKENIZER_CLASSES: dict[str, type] = {"VQModel": VQModel, "MaskGITVQGAN": MaskGITVQGAN}
"""The tokenizer networks, by the ``_class_name`` their saved config.json records."""


class VQModelTokenizer:
    """diffusers' ``VQModel`` as a tokenizer: its encoder and nearest-code quantizer give the ids,
    ``decode(ids, force_not_quantize=True)`` looks the codes up and decodes them."""

    def __init__(self, vq: VQModel):
        if not vq.config.lookup_from_codebook:
            raise ValueError("a VQModel tokenizer needs lookup_from_codebook=True to decode code ids")
        self.vq = vq

    @property
    def codebook_size(self) -> int:
        return int(self.vq.config.num_vq_embeddings)

    @property
    def in_channels(self) -> int:
        return int(self.vq.config.in_channels)

    def encode_to_ids(self, images: torch.Tensor) -> torch.Tensor:
        _, _, (_, _, indices) = self.vq.quantize(self.vq.encode(images).latents)
        return indices.reshape(images.shape[0], -1)

    def decode_ids(self, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        height, width = grid
        check_token_ids(ids, self.codebook_size, height * width, allow_mask=False)
        shape = (ids.shape[0], height, width, self.vq.config.vq_embed_dim or self.vq.config.latent_channels)
        return self.vq.decode(ids, force_not_quantize=True, shape=shape).sample


def as_tokenizer(module):
    """``module`` behind the tokenizer interface (a ``VQModel`` through :class:`VQModelTokenizer`)."""
    if isinstance(module, VQModel):
        return VQModelTokenizer(module)
    if isinstance(module, MaskGITVQGAN):
        return module
    raise TypeError(f"{type(module).__name__} is not a tokenizer; expected one of {sorted(TOKENIZER_CLASSES)}")


def load_tokenizer(directory: str | Path):
    """The tokenizer network saved with ``save_pretrained`` in ``directory`` (a ``VQModel`` or a
    ``MaskGITVQGAN``, by the class its config.json names), in eval mode."""
    config = Path(directory) / "config.json"
    if not config.is_file():
        raise ValueError(f"{directory} is not a saved tokenizer directory (no config.json); save one with "
                         f"save_pretrained, e.g. load_official_vqgan('vqgan_jax_strongaug.ckpt').save_pretrained(DIR)")
    name = json.loads(config.read_text()).get("_class_name")
    if name not in TOKENIZER_CLASSES:
        raise ValueError(f"{directory} holds a {name!r}, not a tokenizer (one of {sorted(TOKENIZER_CLASSES)})")
    return TOKENIZER_CLASSES[name].from_pretrained(directory).eval()
