"""Load checkpoints in the official ARFlow state-dict layout (TheFllood/ARFlow, ``models.ARFlow``).

The official network and :class:`~genforge.models.arflow.ARFlowModel` hold the same tensors
with the same shapes; only the embedders and adaLN layers have other names (ours are diffusers'
``TimestepEmbedding`` names and plain Linears instead of ``Sequential(SiLU, Linear)``). This
module renames the official keys and loads strictly: every official key must be used and
every one of ours filled, with equal shapes, or a :class:`ConversionError` lists what differs.
The official checkpoints (``train.py`` saves ``{"model", "ema", "opt", "args"}``) are read with
``weights_only=True``; the ``ema`` weights are taken when present, as ``sample.py`` does.

The latent size is read from the checkpoint's ``pos_embed`` (N = (size / patch)^2 rows), so a
named config (``XL/2`` ...) loads 128 px and 256 px checkpoints alike.

Usage::

    python -m genforge.models.convert_arflow ARFlow-XL-2-256.pt --config XL/2 --out arflow-xl-2
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import torch

from genforge.core.state_dict import StateDictError, load_state_dict_strict, read_state_dict
from genforge.models.arflow import ARFLOW_CONFIGS, ARFlowModel, arflow_config

_RENAMES = [
    (r"^x_embedder\.proj\.", "patch_embed."),
    (r"^t_embedder\.mlp\.0\.", "time_embed.linear_1."),
    (r"^t_embedder\.mlp\.2\.", "time_embed.linear_2."),
    (r"^y_embedder\.embedding_table\.", "class_embed."),
    (r"^blocks\.(\d+)\.adaLN_modulation\.1\.", r"blocks.\1.modulation."),
    (r"^blocks\.(\d+)\.(attn|mlp)\.", r"blocks.\1.\2."),
    (r"^final_layer\.adaLN_modulation\.1\.", "final_modulation."),
    (r"^final_layer\.linear\.", "final_linear."),
    (r"^pos_embed$", "pos_embed"),
]


class ConversionError(StateDictError):
    """An official checkpoint that does not match the target configuration."""


def official_to_genforge_key(key: str) -> str:
    """Map one official ``ARFlow`` key to our ``ARFlowModel`` key."""
    for pattern, replacement in _RENAMES:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    raise ConversionError(f"official ARFlow key with no known counterpart: {key!r}")


def convert_official_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename every key of an official state dict (a DDP ``module.`` prefix is stripped)."""
    return {official_to_genforge_key(key.removeprefix("module.")): value for key, value in state_dict.items()}


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The EMA (else model) weights of an official checkpoint, read without running code."""
    try:
        return read_state_dict(path, nesting_keys=("ema", "model", "state_dict"))
    except StateDictError as err:
        raise ConversionError(str(err)) from err


def load_official_arflow(checkpoint: str | Path | dict, config: str | dict = "XL/2") -> ARFlowModel:
    """An :class:`ARFlowModel` of a named or explicit config with official weights loaded strictly."""
    state = convert_official_state_dict(checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint))
    config = arflow_config(config) if isinstance(config, str) else dict(config)
    if "pos_embed" not in state:
        raise ConversionError("official ARFlow checkpoint has no 'pos_embed'; is it an ARFlow state dict?")
    grid = math.isqrt(state["pos_embed"].shape[1])
    if grid * grid != state["pos_embed"].shape[1]:
        raise ConversionError(f"pos_embed has {state['pos_embed'].shape[1]} rows, not a square grid")
    config["sample_size"] = grid * config["patch_size"]
    model = ARFlowModel(**config)
    load_state_dict_strict(model, state, what="official ARFlow checkpoint", error=ConversionError)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m genforge.models.convert_arflow",
                                     description="Convert an official ARFlow checkpoint to a diffusers-style directory.")
    parser.add_argument("checkpoint", help="official .pt (train.py's {'model', 'ema', ...}) or .safetensors")
    parser.add_argument("--config", default="XL/2", choices=list(ARFLOW_CONFIGS), help="named ARFlow config")
    parser.add_argument("--out", required=True, help="output directory for save_pretrained")
    args = parser.parse_args(argv)
    model = load_official_arflow(args.checkpoint, args.config)
    model.save_pretrained(args.out)
    print(f"wrote {args.out} ({model.num_parameters() / 1e6:.1f}M parameters)")


if __name__ == "__main__":
    main()
