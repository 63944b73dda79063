"""Load checkpoints in the official DiMR state-dict layout (qihao067/DiMR, ``MRModel``).

The official network stores its modules under positional names (``input_layer.1``,
``upsample.0``, ``block1.query_key_value``, ``output_layer.2`` ...). Our :class:`DiMRModel`
holds the same tensors, with the same shapes and memory layouts, under descriptive names;
this module renames them and loads strictly: every official key must be used and every one
of ours filled, with equal shapes, or a :class:`ConversionError` lists what differs.

Usage::

    python -m genforge.models.convert_dimr nnet_ema.pth --config XL/2R --out dimr-xl-2r
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from genforge.core.state_dict import StateDictError, load_state_dict_strict, read_state_dict
from genforge.models.dimr import DiMRModel, dimr_config

# (official pattern, our replacement), applied to the part after "stages.{r}."
_RENAMES = [
    (r"^input_layer\.1\.", "patch_embed."),
    (r"^input_layer\.3\.position_embeddings\.", "pos_embed."),
    (r"^class_embeds\.", "class_embed."),
    (r"^upsample\.0\.", "cascade.norm_in."),
    (r"^upsample\.1\.kernel\.", "cascade.upsample.proj."),
    (r"^upsample\.2\.", "cascade.norm_out."),
    (r"^skip_denses\.", "skip_proj."),
    (r"^output_layer\.0\.", "head_norm."),
    (r"^output_layer\.2\.", "head_conv."),
    (r"^blocks\.(\d+)\.block1\.norm\.", r"blocks.\1.attn_norm."),
    (r"^blocks\.(\d+)\.block1\.query_key_value\.", r"blocks.\1.attn.qkv."),
    (r"^blocks\.(\d+)\.block1\.dense\.", r"blocks.\1.attn.proj."),
    (r"^blocks\.(\d+)\.block1\.1\.", r"blocks.\1.dwconv."),
    (r"^blocks\.(\d+)\.block2\.norm\.", r"blocks.\1.mlp_norm."),
    (r"^blocks\.(\d+)\.block2\.(w[012])\.", r"blocks.\1.mlp.\2."),
]
_STAGE_KEY = re.compile(r"^stages\.(\d+)\.(.+)$")


class ConversionError(StateDictError):
    """An official checkpoint that does not match the target configuration."""


def official_to_genforge_key(key: str) -> str:
    """Map one official ``MRModel`` key to our ``DiMRModel`` key."""
    match = _STAGE_KEY.match(key)
    if match is None:
        raise ConversionError(f"not an official DiMR key (expected 'stages.<r>.…'): {key!r}")
    stage, rest = match.groups()
    for pattern, replacement in _RENAMES:
        renamed, count = re.subn(pattern, replacement, rest)
        if count:
            return f"stages.{stage}.{renamed}"
    raise ConversionError(f"official DiMR key with no known counterpart: {key!r}")


def convert_official_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename every key of an official state dict (a DDP ``module.`` prefix is stripped)."""
    converted = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        converted[official_to_genforge_key(key)] = value
    return converted


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors file, or a torch file with ``weights_only=True`` (no code runs)."""
    try:
        return read_state_dict(path)
    except StateDictError as err:
        raise ConversionError(str(err)) from err


def load_official_dimr(checkpoint: str | Path | dict, config: str | dict = "XL/2R") -> DiMRModel:
    """Build a DiMRModel from a named or explicit config and load official weights strictly."""
    state = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    model = DiMRModel(**(dimr_config(config) if isinstance(config, str) else config))
    load_state_dict_strict(model, convert_official_state_dict(state),
                           what="official checkpoint", error=ConversionError)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert an official DiMR checkpoint to a diffusers-style directory.")
    parser.add_argument("checkpoint", help="official nnet / nnet_ema .pth (or .safetensors)")
    parser.add_argument("--config", default="XL/2R", help="named DiMR config (tiny, digits, XL/2R, G/2R)")
    parser.add_argument("--out", required=True, help="output directory for save_pretrained")
    args = parser.parse_args(argv)
    model = load_official_dimr(args.checkpoint, args.config)
    model.save_pretrained(args.out)
    print(f"wrote {args.out} ({model.num_parameters() / 1e6:.1f}M parameters)")


if __name__ == "__main__":
    main()
