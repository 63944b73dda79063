"""Samplers: diffusers DiffusionPipeline subclasses, one per generator."""

import json
from pathlib import Path

from diffusers.utils import logging as diffusers_logging

from genforge.core.errors import one_line
from genforge.pipelines.dimr import DiMRPipeline

__all__ = ["DiMRPipeline", "check_pipeline_directory", "load_saved_pipeline"]


def check_pipeline_directory(directory, expected: type) -> None:
    """ValueError, in one line, unless ``directory`` holds a saved ``expected`` pipeline
    (its model_index.json names that class), so that a directory of another pipeline never
    reaches diffusers' loader and its internal messages."""
    index = Path(directory) / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{directory} is not a saved pipeline directory (no model_index.json)")
    try:
        saved = json.loads(index.read_text()).get("_class_name")
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{index} is not a pipeline index: {err}") from None
    if saved != expected.__name__:
        raise ValueError(f"{directory} holds a {saved}, not a {expected.__name__} (a genforge "
                         f"training run saves one to <output_dir>/pipeline)")


def load_saved_pipeline(directory, cls: type):
    """``cls.from_pretrained(directory)`` after :func:`check_pipeline_directory`; a damaged or
    misfitting weight file is a one-line ValueError naming the directory."""
    check_pipeline_directory(directory, cls)
    bar = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()  # a bar per component, for a few small files
    try:
        return cls.from_pretrained(directory)
    except Exception as err:  # noqa: BLE001 -- diffusers, safetensors and torch errors alike
        raise ValueError(f"cannot load the {cls.__name__} saved in {directory}: "
                         f"{one_line(err)}") from None
    finally:
        if bar:
            diffusers_logging.enable_progress_bar()
