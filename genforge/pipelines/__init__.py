"""Samplers: diffusers DiffusionPipeline subclasses, one per generator."""

from genforge.pipelines.dimr import DiMRPipeline

__all__ = ["DiMRPipeline"]
