"""Exponential moving average (EMA) of a model's parameters.

After update t (t = 0, 1, ...) every shadow parameter is

    shadow <- d_t * shadow + (1 - d_t) * param,
    d_t = min(decay, (1 + t) / (10 + t))   with warm-up (as diffusers' EMAModel),
    d_t = decay                             without.

The warm-up lets early shadows follow the fast-moving weights instead of staying near
the random initialisation for ~1/(1-decay) steps. We keep our own small class rather than
diffusers' EMAModel so that the state is named tensors (saved as safetensors) plus three
plain numbers (loaded with weights_only=True), which makes resume exact and code-free.
Only floating-point parameters are averaged; buffers are left to the model.
"""

from __future__ import annotations

import torch

__all__ = ["EMA"]


class EMA:
    """EMA shadow copies of `model`'s floating-point parameters, keyed by parameter name."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters()
                       if p.dtype.is_floating_point}

    def current_decay(self) -> float:
        """The decay the next `update` will use."""
        if not self.warmup:
            return self.decay
        t = self.num_updates
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move every shadow towards the model's current parameter."""
        d = self.current_decay()
        params = dict(model.named_parameters())
        for name, shadow in self.shadow.items():
            shadow.lerp_(params[name].detach().to(shadow.dtype), 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Overwrite `model`'s parameters with the shadows (e.g. a copy used for sampling)."""
        params = dict(model.named_parameters())
        for name, shadow in self.shadow.items():
            params[name].copy_(shadow)

    def state_dict(self) -> dict:
        """`{"shadow": {name: tensor}, "num_updates", "decay", "warmup"}`."""
        return {"shadow": dict(self.shadow), "num_updates": self.num_updates,
                "decay": self.decay, "warmup": self.warmup}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`; parameter names and shapes must match exactly."""
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            missing = sorted(set(self.shadow) - set(shadow))
            extra = sorted(set(shadow) - set(self.shadow))
            raise ValueError(f"EMA state does not match the model: missing {missing}, "
                             f"unexpected {extra}")
        for name, tensor in shadow.items():
            if tensor.shape != self.shadow[name].shape:
                raise ValueError(f"EMA state for '{name}' has shape {tuple(tensor.shape)}, "
                                 f"the model has {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(tensor)
        self.num_updates = int(state["num_updates"])
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
