"""The `Method` base class: what a method plugs into the one training loop.

A method says what its network is, what data it trains on and what one training step
computes; the loop (genforge.train.loop) owns everything else: devices, mixed precision,
gradient accumulation, the optimizer, EMA, checkpoints, logging. Subclass `Method`,
override the hooks below and register the class with `@register_method("name")`.

The loop calls, in order: `validate_model_config` (also at recipe load time),
`build_model`, `parameter_groups`, `train_dataset`, then `training_step` once per
micro-batch, `on_checkpoint` after each checkpoint and `on_train_end` once with the EMA weights. `training_step` must draw its
randomness (noise, timesteps, masks) from torch's global RNG: the loop seeds it and
restores it on resume, which is what makes a resumed run bitwise-identical.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from genforge.config import Recipe

__all__ = ["Method"]


class Method:
    """Base class of trainable methods; `name` is set by `register_method`."""

    name: str = ""
    find_unused_parameters: bool = False
    """True when some trained parameters may get no gradient in a step (mixture-of-experts
    routing, a branch its batch did not reach): multi-process runs then tell DDP to look for them."""

    ema_model: torch.nn.Module | None = None
    """The loop's live EMA copy of the model (set before the first step; no grad), for steps
    that query it, as ENAT's simulated previous step does."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def validate_model_config(self, model_cfg: dict) -> None:
        """Raise ConfigError naming bad keys of the recipe's free-form `model:` section.

        The default accepts anything; methods should check keys with
        `genforge.config.check_known_keys` and values as their constructors need.
        """

    def build_model(self) -> torch.nn.Module:
        """The network to train (a diffusers ModelMixin for generators)."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_model()")

    def train_dataset(self) -> torch.utils.data.Dataset:
        """The map-style dataset to train on; items are collated by torch's default collate."""
        raise NotImplementedError(f"{type(self).__name__} must implement train_dataset()")

    def parameter_groups(self, model: torch.nn.Module) -> list[dict] | None:
        """Optimizer parameter groups (e.g. a no-weight-decay group); None = all parameters."""
        return None

    def training_step(self, model: torch.nn.Module, batch) -> tuple[Tensor, dict]:
        """Loss of one micro-batch (a mean over its samples) and scalars to log."""
        raise NotImplementedError(f"{type(self).__name__} must implement training_step()")

    def on_checkpoint(self, ema_model: torch.nn.Module, output_dir: Path, step: int) -> None:
        """Called on the main process after each checkpoint with the EMA weights (sample grids);
        it must not draw from the global RNG, or a resumed run would differ."""

    def on_train_end(self, ema_model: torch.nn.Module, accelerator, output_dir: Path) -> dict:
        """Sample / evaluate with the EMA model; the returned metrics go to metrics.json."""
        return {}
