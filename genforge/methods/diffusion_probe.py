"""Probe a trained diffusion model's features with a classifier head, as a training-loop method.

Mukhopadhyay et al., "Diffusion Models Beat GANs on Image Classification", arXiv 2307.08702:
images are noised to timestep t (x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps), one block's
activation of the frozen noise predictor is pooled, and only a linear or attention head is
trained on it with cross-entropy (:class:`genforge.backbones.diffusion_classifier.DiffusionClassifier`).
``layer: pixels`` trains the same head on raw pixels instead (:class:`PixelProbe`), the baseline
the features are measured against. Test accuracy and ECE are computed exactly as for the
``classifier`` method (:func:`genforge.methods.classification.finish_classifier`).

The recipe's ``model:`` section: ``pipeline`` (a saved DiMRPipeline directory, as
``genforge train recipes/dimr/digits.yaml`` writes to ``runs/dimr_digits/pipeline``; not needed
for pixels), ``layer`` (a module name of the pipeline's network, or ``pixels``), ``t``, ``head``
(``linear`` or ``attention``), ``pool_size`` (pooled grid side; default 1, for pixels every
pixel), ``channels_last`` (how to read a 4-D activation; default from the layer type) and
``label_smoothing``. The fixed noise eps is drawn from the recipe's seed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from genforge.backbones.diffusion_classifier import HEADS, DiffusionClassifier, PixelProbe
from genforge.config import ConfigError, check_known_keys
from genforge.methods.classification import ClassificationMethod, check_label_smoothing
from genforge.pipelines import DiMRPipeline, check_pipeline_directory, load_saved_pipeline
from genforge.train import register_method

__all__ = ["DiffusionProbeMethod"]

MODEL_DEFAULTS = {"pipeline": None, "layer": None, "t": 100, "head": "linear", "pool_size": 1,
                  "channels_last": None, "label_smoothing": 0.0}
PIXELS = "pixels"


@register_method("diffusion_probe")
class DiffusionProbeMethod(ClassificationMethod):
    """Cross-entropy training of a head on frozen diffusion features (or pixels)."""

    model_defaults = MODEL_DEFAULTS

    def validate_model_config(self, model_cfg: dict) -> None:
        source = self._source()
        check_known_keys(model_cfg, list(MODEL_DEFAULTS), "model", source)
        layer = model_cfg.get("layer")
        if not isinstance(layer, str) or not layer:
            raise ConfigError(f"{source}: model.layer must be a module name of the diffusion network or "
                              f"{PIXELS!r}, got {layer!r}")
        pipeline = model_cfg.get("pipeline")
        if layer != PIXELS:
            try:
                check_pipeline_directory(Path(str(pipeline)), DiMRPipeline)
            except ValueError as err:
                raise ConfigError(f"{source}: model.pipeline: {err}") from None
        t = model_cfg.get("t", MODEL_DEFAULTS["t"])
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ConfigError(f"{source}: model.t must be a non-negative int timestep, got {t!r}")
        head = model_cfg.get("head", MODEL_DEFAULTS["head"])
        if head not in HEADS:
            raise ConfigError(f"{source}: model.head {head!r} is not one of {list(HEADS)}")
        pool_size = model_cfg.get("pool_size", MODEL_DEFAULTS["pool_size"])
        if pool_size is not None and (isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1):
            raise ConfigError(f"{source}: model.pool_size must be a positive int or null, got {pool_size!r}")
        channels_last = model_cfg.get("channels_last")
        if channels_last is not None and not isinstance(channels_last, bool):
            raise ConfigError(f"{source}: model.channels_last must be true, false or null, got {channels_last!r}")
        check_label_smoothing(model_cfg.get("label_smoothing", 0.0), source)

    def _input_shape(self) -> tuple[int, int, int]:
        return self.train_set.channels, self.train_set.image_size, self.train_set.image_size

    def _pixel_probe(self) -> PixelProbe:
        pool = {"pool_size": self.recipe.model["pool_size"]} if "pool_size" in self.recipe.model else {}
        return PixelProbe(self._input_shape(), self.train_set.num_classes, head=self.options["head"], **pool)

    def _diffusion_classifier(self) -> DiffusionClassifier:
        try:
            pipe = load_saved_pipeline(self.options["pipeline"], DiMRPipeline)
        except ValueError as err:
            raise ConfigError(f"{self._source()}: model.pipeline: {err}") from None
        options = self.options
        try:
            model = DiffusionClassifier(pipe.model, self.train_set.num_classes, options["layer"], options["t"],
                                        head=options["head"], pool_size=options["pool_size"],
                                        scheduler=pipe.scheduler, noise_seed=self.recipe.seed,
                                        channels_last=options["channels_last"])
        except ValueError as err:
            raise ConfigError(f"{self._source()}: {err}") from None
        if model.input_shape != self._input_shape():
            raise ConfigError(f"{self._source()}: data gives {self._input_shape()} images but the pipeline's "
                              f"network expects {model.input_shape} (C, H, W)")
        return model

    def build_model(self) -> torch.nn.Module:
        return self._pixel_probe() if self.options["layer"] == PIXELS else self._diffusion_classifier()
