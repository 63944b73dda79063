"""Discriminative backbones timm lacks, registered into timm under a ``gf_`` prefix.

Importing ``genforge`` (or this package) registers every family, after which
``timm.create_model("gf_...")`` builds them like any timm model. ``load_official`` loads a
checkpoint in a family's official repository layout. The families timm already has
(DaViT, ConvFormer/CAFormer, PoolFormer, ECA-ResNet, HaloNet, ResNet-RS, NASNet, EvoNorm,
weight-standardised convs) are used through timm directly; README.md lists their names.

One module per family, each registering its models when imported here: ``bcn``
(Batch-Channel Normalisation ResNets), ``hornet``, ``ibnnet``, ``metaformer_extras``
(IdentityFormer, RandFormer), ``moat``, ``revcol``, ``rmt``, ``transnext``, ``unireplknet``.
The classifier on a diffusion model's features (``DiffusionClassifier``) is the diffusion
probe's network and lives with its method in ``genforge.methods.diffusion_probe``.
"""

from genforge.backbones import (  # noqa: F401  (each module registers its models)
    bcn, hornet, ibnnet, metaformer_extras, moat, revcol, rmt, transnext, unireplknet)
from genforge.backbones.registry import load_official, register_gf_model, register_official_converter

__all__ = ["load_official", "register_gf_model", "register_official_converter"]
