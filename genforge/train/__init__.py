"""The one Accelerate training loop and what methods plug into it.

Methods subclass `Method`, register with `@register_method("name")`, and are trained by
`train(recipe)` (or `python -m genforge.train RECIPE`). See loop.py for the loop,
checkpoint.py for the atomic checkpoint format, ema.py for the EMA rule.
"""

from genforge.train.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from genforge.train.ema import EMA
from genforge.train.loop import TrainResult, train
from genforge.train.method import Method
from genforge.train.registry import RegistryError, available_methods, get_method, register_method

__all__ = [
    "CheckpointError", "EMA", "Method", "RegistryError", "TrainResult", "available_methods",
    "get_method", "latest_checkpoint", "list_checkpoints", "register_method", "train",
]
