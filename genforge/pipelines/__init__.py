"""Samplers: diffusers DiffusionPipeline subclasses, and loading a saved one by its class name.

A training run saves the pipeline that fits its network to ``<output_dir>/pipeline``:
:class:`DiMRPipeline` for DiMR, :class:`ARFlowPipeline` for ARFlow, :class:`SiTPipeline` for
its SiT baseline, :class:`ClassConditionalPipeline` for any other class-conditional denoiser
(the DiT and UNet2DModel baselines). ``model_index.json`` names the
class, and :func:`load_saved_pipeline` loads it through :data:`PIPELINES`, the explicit map of
the pipeline classes genforge knows.
"""

import json
from pathlib import Path

from diffusers.utils import logging as diffusers_logging

from genforge.core.errors import one_line
from genforge.pipelines.arflow import ARFlowPipeline, SiTPipeline
from genforge.pipelines.class_conditional import ClassConditionalPipeline
from genforge.pipelines.dimr import DiMRPipeline
from genforge.pipelines.enat import AmusedClassPipeline, ENATPipeline, MaskGITPipeline

__all__ = ["PIPELINES", "ARFlowPipeline", "AmusedClassPipeline", "ClassConditionalPipeline", "DiMRPipeline",
           "ENATPipeline", "MaskGITPipeline", "SiTPipeline", "check_pipeline_directory", "load_saved_pipeline"]

PIPELINES: dict[str, type] = {cls.__name__: cls for cls in (
    DiMRPipeline, ClassConditionalPipeline, ARFlowPipeline, SiTPipeline, ENATPipeline, MaskGITPipeline,
    AmusedClassPipeline)}
"""The genforge pipeline classes, by the ``_class_name`` a saved ``model_index.json`` records."""


def check_pipeline_directory(directory, expected: type | tuple[type, ...] = tuple(PIPELINES.values())) -> type:
    """The pipeline class saved in ``directory``; a one-line ValueError unless its
    model_index.json names one of ``expected`` (by default any genforge pipeline), so that a
    directory of another pipeline never reaches diffusers' loader and its internal messages."""
    expected = expected if isinstance(expected, tuple) else (expected,)
    index = Path(directory) / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{directory} is not a saved pipeline directory (no model_index.json)")
    try:
        saved = json.loads(index.read_text()).get("_class_name")
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{index} is not a pipeline index: {err}") from None
    known = {cls.__name__: cls for cls in expected}
    if saved not in known:
        raise ValueError(f"{directory} holds a {saved}, not a {' or a '.join(known)} (a genforge "
                         f"training run saves one to <output_dir>/pipeline)")
    return known[saved]


def load_saved_pipeline(directory, cls: type | None = None):
    """The pipeline saved in ``directory``: of class ``cls``, or by default of whichever genforge
    class its model_index.json names (:func:`check_pipeline_directory` first); a damaged or
    misfitting weight file is a one-line ValueError naming the directory."""
    cls = check_pipeline_directory(directory) if cls is None else check_pipeline_directory(directory, cls)
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
