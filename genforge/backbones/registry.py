"""Registering genforge backbones with timm, and loading official checkpoints into them.

``register_gf_model`` is timm's ``register_model`` with two guards timm does not have: the
name must carry the ``gf_`` prefix, and a name timm already knows is an error (timm itself
only warns and silently replaces the model). Each family module registers a converter for
its official checkpoint layout with ``register_official_converter``; ``load_official``
builds the timm model, converts the file and loads it strictly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import timm
import torch
from timm.models import register_model

from genforge.core.state_dict import StateDictError, load_state_dict_strict, read_state_dict

__all__ = ["GF_PREFIX", "load_official", "official_converter_for", "register_gf_model",
           "register_official_converter"]

GF_PREFIX = "gf_"

Converter = Callable[[dict[str, torch.Tensor], torch.nn.Module], dict[str, torch.Tensor]]
_CONVERTERS: dict[str, Converter] = {}


def register_gf_model(fn):
    """``@register_gf_model`` on a ``gf_<name>(pretrained=False, **kwargs)`` model function."""
    name = fn.__name__
    if not name.startswith(GF_PREFIX):
        raise ValueError(f"genforge backbone {name!r} must be named with the {GF_PREFIX!r} prefix")
    if timm.is_model(name):
        raise ValueError(f"timm already has a model named {name!r}; refusing to replace it")
    return register_model(fn)


def register_official_converter(family_prefix: str):
    """Register ``convert(official_state, model) -> state`` for models named ``family_prefix*``."""
    def decorate(fn: Converter) -> Converter:
        if not family_prefix.startswith(GF_PREFIX):
            raise ValueError(f"converter prefix {family_prefix!r} must start with {GF_PREFIX!r}")
        if family_prefix in _CONVERTERS:
            raise ValueError(f"an official converter for {family_prefix!r} is already registered")
        _CONVERTERS[family_prefix] = fn
        return fn
    return decorate


def official_converter_for(model_name: str) -> Converter:
    """The converter whose family prefix is the longest match of ``model_name``."""
    matches = [p for p in _CONVERTERS if model_name.startswith(p)]
    if not matches:
        raise ValueError(f"no official-checkpoint converter for {model_name!r}; "
                         f"families with one: {sorted(_CONVERTERS)}")
    return _CONVERTERS[max(matches, key=len)]


def load_official(model_name: str, checkpoint: str | Path | dict, **create_kwargs) -> torch.nn.Module:
    """``timm.create_model(model_name, **create_kwargs)`` with an official checkpoint loaded strictly.

    ``checkpoint`` is a path (safetensors, or a torch file read with ``weights_only=True``,
    possibly nested under ``"model"``/``"state_dict"``) or an already-read state dict. Every
    converted key must be used and every model key filled with the same shape; otherwise
    a :class:`~genforge.core.state_dict.StateDictError` names the differences.
    """
    if not timm.is_model(model_name):
        raise ValueError(f"unknown model {model_name!r}; genforge backbones: {timm.list_models(GF_PREFIX + '*')}")
    convert = official_converter_for(model_name)
    state = checkpoint if isinstance(checkpoint, dict) else read_state_dict(checkpoint)
    model = timm.create_model(model_name, **create_kwargs)
    load_state_dict_strict(model, convert(dict(state), model), what=f"official {model_name} checkpoint",
                           error=StateDictError)
    return model
