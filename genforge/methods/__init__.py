"""Trainable methods; importing this package registers them with the training loop."""

from genforge.methods import diffusion

__all__ = ["diffusion"]
