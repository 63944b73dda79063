"""Exponential moving average (EMA) of a model's parameters and buffers, on timm's ModelEmaV3.

After update t (t = 0, 1, ...) every floating-point tensor of the model's state dict
(parameters and buffers such as BatchNorm's running statistics) is averaged,

    ema <- d_t * ema + (1 - d_t) * model,
    d_t = min(decay, (1 + t) / (10 + t))   with warm-up (diffusers' EMAModel rule),
    d_t = decay                             without,

and every other buffer (BatchNorm's `num_batches_tracked`) is copied, as timm's
`ModelEmaV3` does. The averaging is `ModelEmaV3.apply_update_`; this class adds only the
warm-up rule above (timm's own warm-up is a power law) and an update counter, so the state
is one module's tensors (saved as safetensors) plus three plain numbers: resume is exact and
never unpickles. The EMA copy lives in `module`, in eval mode; scoring or saving it scores or
saves exactly the averaged weights and statistics.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_model, save_model
from timm.utils import ModelEmaV3

__all__ = ["EMA"]


class EMA:
    """An averaged copy (`module`) of `model`'s parameters and buffers."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        # No stochastic rounding: it draws from a private generator a checkpoint does not hold.
        self._timm = ModelEmaV3(model, decay=decay, stochastic_rounding=False)
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0

    @property
    def module(self) -> torch.nn.Module:
        """The averaged model (eval mode)."""
        return self._timm.module

    def current_decay(self) -> float:
        """The decay the next `update` will use."""
        if not self.warmup:
            return self.decay
        t = self.num_updates
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move every averaged tensor towards the model's current one."""
        self._timm.apply_update_(model, self.current_decay())
        self.num_updates += 1

    def counters(self) -> dict:
        """`{"num_updates", "decay", "warmup"}`: the EMA's state besides its tensors."""
        return {"num_updates": self.num_updates, "decay": self.decay, "warmup": self.warmup}

    def save(self, file) -> None:
        """Write the averaged tensors to a safetensors file."""
        save_model(self.module, str(file), force_contiguous=True)

    def load(self, file, counters: dict) -> None:
        """Restore from `save`'s file and `counters()`; names and shapes must match exactly."""
        missing, unexpected = load_model(self.module, str(file), strict=False)
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model: missing {sorted(missing)}, "
                             f"unexpected {sorted(unexpected)}")
        self.num_updates = int(counters["num_updates"])
        self.decay = float(counters["decay"])
        self.warmup = bool(counters["warmup"])
