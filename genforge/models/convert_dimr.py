"""Load checkpoints in the official DiMR state-dict layout (qihao067/DiMR, ``MRModel``).

The official network stores its modules under positional names (``input_layer.1``,
``upsample.0``, ``block1.query_key_value``, ``output_layer.2`` ...). Our :class:`DiMRModel`
holds the same tensors, with the same shapes and memory layouts, under descriptive names;
this module renames them and loads strictly: every official key must be used and every one
of ours filled, with equal shapes, or a :class:`ConversionError` lists what differs.

The block norm is read from the checkpoint itself: the official ``norm_type="LN"`` (the
official default when a config names none) is a *time-dependent* LayerNorm and loads as our
``"TDLN"``; ``"TDRMSN"`` (the released configs) as our ``"TDRMSN"``. The official plain
``"RMSN"`` and ``"ADARMSN"`` are used by no released config and are refused by name.
:func:`official_config` translates an official ``model`` config (``configs/DiMR-*.py``) to
:class:`DiMRModel` arguments, non-square grids (``max_width``) included.

Usage (``--help`` lists the named configs)::

    python -m genforge.models.convert_dimr nnet_ema.pth --config XL/2R --out dimr-xl-2r
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from genforge.core.state_dict import StateDictError, load_state_dict_strict, read_state_dict
from genforge.models.dimr import DIMR_CONFIGS, DiMRModel, dimr_config

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
_BLOCK_NORM = re.compile(r"^stages\.\d+\.blocks\.\d+\.block2\.norm\.(.+)$")

OFFICIAL_NORM_TYPES = {"LN": "TDLN", "TDRMSN": "TDRMSN"}
"""Official ``norm_type`` -> ours. The official "LN" (``libs/core/sigmoid/module.py``
``LayerNorm``) holds its weight and bias as TimeDependentParameters: it is TD-LN."""
_NORM_PARAMETERS = {"weight.param0": "LN", "scale.param0": "TDRMSN", "scale": "RMSN", "linear.weight": "ADARMSN"}
_STAGE_RENAMES = {"num_attention_heads": "num_heads", "image_input_ratio": "input_ratio",
                  "input_feature_ratio": "patch_size", "dropout_prob": "dropout"}
_BLOCK_TYPES = {"TransformerBlock": "transformer", "ConvNeXtBlock": "convnext"}


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


def official_norm_type(state_dict: dict[str, torch.Tensor]) -> str:
    """The official ``norm_type`` a state dict was trained with, read from its block-norm keys."""
    found = set()
    for key in state_dict:
        match = _BLOCK_NORM.match(key.removeprefix("module."))
        if match:
            found.update(name for suffix, name in _NORM_PARAMETERS.items() if match.group(1) == suffix)
    if len(found) != 1:
        raise ConversionError(f"cannot tell the official norm_type from the block-norm keys (found {sorted(found)}; "
                              f"expected one of {list(_NORM_PARAMETERS.values())})")
    return found.pop()


def genforge_norm_type(official: str) -> str:
    """Our name for an official ``norm_type``: "LN" -> "TDLN", "TDRMSN" -> "TDRMSN"."""
    if official not in OFFICIAL_NORM_TYPES:
        raise ConversionError(f"official norm_type {official!r} is not supported (no released DiMR uses it); "
                              f"supported: {list(OFFICIAL_NORM_TYPES)}")
    return OFFICIAL_NORM_TYPES[official]


def official_config(model_args: dict, sample_size: int | list[int] | None = None) -> dict:
    """:class:`DiMRModel` arguments from an official ``model`` config given as a dict.

    Official names map to ours (``channels`` -> ``in_channels``, ``num_attention_heads`` ->
    ``num_heads``, ``input_feature_ratio`` -> ``patch_size``, ``image_input_ratio`` ->
    ``input_ratio``, ``dropout_prob`` -> ``dropout``); the official ``num_classes`` counts the
    null class, ours does not; ``norm_type`` defaults to "LN" as in the official ``MRModel``.
    ``sample_size`` defaults to the last stage's largest input grid.
    """
    if model_args.get("pe_type", "APE") != "APE" or "condition_dim" in model_args:
        raise ConversionError(f"official pe_type {model_args.get('pe_type')!r} / condition_dim "
                              f"{model_args.get('condition_dim')!r}: only the released class-conditional models "
                              f"(pe_type 'APE', no condition_dim) are supported")
    stages = []
    for index, official in enumerate(model_args["stage_configs"]):
        stage = {_STAGE_RENAMES.get(k, k): v for k, v in official.items()}
        if stage.get("block_type") not in _BLOCK_TYPES:
            raise ConversionError(f"stage {index}: official block_type {stage.get('block_type')!r} is not one of "
                                  f"{list(_BLOCK_TYPES)}")
        stage["block_type"] = _BLOCK_TYPES[stage["block_type"]]
        stages.append(stage)
    if sample_size is None:
        last = stages[-1]
        scale = last.get("input_ratio", 1) * last.get("patch_size", 1)
        height, width = last["max_height"] * scale, last.get("max_width", last["max_height"]) * scale
        sample_size = height if height == width else [height, width]
    return {"in_channels": model_args["channels"], "sample_size": sample_size,
            "num_classes": model_args["num_classes"] - 1, "stage_configs": stages,
            "norm_type": genforge_norm_type(model_args.get("norm_type", "LN")),
            "block_grad_to_lowres": model_args.get("block_grad_to_lowres", False)}


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors file, or a torch file with ``weights_only=True`` (no code runs)."""
    try:
        return read_state_dict(path)
    except StateDictError as err:
        raise ConversionError(str(err)) from err


def load_official_dimr(checkpoint: str | Path | dict, config: str | dict = "XL/2R") -> DiMRModel:
    """Build a DiMRModel from a named or explicit config and load official weights strictly.

    The block norm is the checkpoint's (see :func:`official_norm_type`); a config that names a
    different one is refused.
    """
    state = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    config = dimr_config(config) if isinstance(config, str) else dict(config)
    norm_type = genforge_norm_type(official_norm_type(state))
    if config.setdefault("norm_type", norm_type) != norm_type:
        raise ConversionError(f"the checkpoint's blocks use norm_type {norm_type!r} (ours), but the config asks "
                              f"for {config['norm_type']!r}")
    model = DiMRModel(**config)
    load_state_dict_strict(model, convert_official_state_dict(state),
                           what="official checkpoint", error=ConversionError)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m genforge.models.convert_dimr", description="Convert an official DiMR checkpoint to a diffusers-style directory.")
    parser.add_argument("checkpoint", help="official nnet / nnet_ema .pth (or .safetensors)")
    parser.add_argument("--config", default="XL/2R", choices=list(DIMR_CONFIGS),
                        help="named DiMR config (default XL/2R); the block norm (official LN = TD-LN, "
                             "or TDRMSN) is read from the checkpoint")
    parser.add_argument("--out", required=True, help="output directory for save_pretrained")
    args = parser.parse_args(argv)
    model = load_official_dimr(args.checkpoint, args.config)
    model.save_pretrained(args.out)
    print(f"wrote {args.out} ({model.num_parameters() / 1e6:.1f}M parameters)")


if __name__ == "__main__":
    main()
