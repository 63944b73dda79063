"""Classify images with the frozen features of a trained diffusion noise predictor, as a
training-loop method (``diffusion_probe``).

Mukhopadhyay et al., "Diffusion Models Beat GANs on Image Classification", arXiv 2307.08702.
An unconditional (here: null-class) epsilon-prediction network trained for generation is used
as a frozen feature extractor (Sec. 3):

1. noise the clean image to a chosen timestep t with the forward process of DDPM
   (Ho et al. 2020, Eq. 4): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, with one fixed-seed
   eps so that an image always gets the same features;
2. run the network once on (x_t, t) and read the activation of one block (the paper scans
   blocks and t; mid-network blocks at small t work best);
3. average-pool the map to a small grid (the paper's pooling size) and train only a head on
   it: a linear probe, or the paper's attention head, where a learned query attends over the
   projected spatial tokens (scaled dot-product attention, Vaswani et al. 2017, Eq. 1) and a
   linear layer maps the attended vector to logits.

:class:`PixelProbe` trains the same heads on raw pixels, the baseline the features are
compared with. Both return features as pooled tokens ``(B, P, D)`` with ``P = pool_size**2``.
Test accuracy and ECE are computed exactly as for the ``classifier`` method
(:func:`genforge.methods.classification.finish_classifier`).

The recipe's ``model:`` section: ``pipeline`` (a saved DiMRPipeline directory, as
``genforge train recipes/dimr/digits.yaml`` writes to ``runs/dimr_digits/pipeline``; not needed
for pixels), ``layer`` (a module name of the pipeline's network, or ``pixels``), ``t``, ``head``
(``linear`` or ``attention``), ``pool_size`` (pooled grid side; default 1, for pixels every
pixel), ``channels_last`` (how to read a 4-D activation; default from the layer type) and
``label_smoothing``. The fixed noise eps is drawn from the recipe's seed.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from einops import rearrange
from torch import nn

from genforge.config import ConfigError, check_known_keys
from genforge.core.attention import attention
from genforge.core.blocks import ConvNeXtBlock
from genforge.core.embed import null_class_of
from genforge.methods.classification import ClassificationMethod, check_label_smoothing
from genforge.pipelines import DiMRPipeline, check_pipeline_directory, load_saved_pipeline
from genforge.train import register_method

__all__ = ["AttentionHead", "DiffusionClassifier", "DiffusionProbeMethod", "LinearHead", "PixelProbe",
           "default_scheduler", "pool_tokens"]

HEADS = ("linear", "attention")
CHANNELS_LAST_MODULES = (ConvNeXtBlock,)
"""Modules whose 4-D output is channel-last (B, H, W, D); every other 4-D output is (B, C, H, W)."""


def default_scheduler() -> DDPMScheduler:
    """The noise schedule the digits diffusion recipes train with (DDPM's linear betas)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon",
                         clip_sample=False)


def _grid(h: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A layer output as a channel-first map (B, D, h, w); sequences become (B, D, 1, N)."""
    if h.ndim == 2:
        return h[:, :, None, None]
    if h.ndim == 4:
        return rearrange(h, "b h w d -> b d h w") if channels_last else h
    if h.ndim != 3:
        raise ValueError(f"cannot pool a layer output of shape {tuple(h.shape)}; expected (B, D), (B, N, D) "
                         "tokens or a (B, C, H, W) map")
    side = math.isqrt(h.shape[1])
    if side * side != h.shape[1] and math.isqrt(h.shape[1] - 1) ** 2 == h.shape[1] - 1:
        h, side = h[:, 1:], math.isqrt(h.shape[1] - 1)  # a prepended class token, as in DiMR and ViT
    if side * side == h.shape[1]:
        return rearrange(h, "b (y x) d -> b d y x", y=side)
    return rearrange(h, "b n d -> b d 1 n")


def pool_tokens(h: torch.Tensor, pool_size: int | None, channels_last: bool = False) -> torch.Tensor:
    """Adaptive-average-pool a layer output to pool_size x pool_size tokens: (B, P, D).

    ``h`` is (B, D), (B, N, D) tokens (a square grid, optionally after one leading class token,
    else a 1-D sequence pooled to ``pool_size**2`` tokens) or a 4-D map, channel-last when
    ``channels_last``. ``pool_size=None`` keeps every position.
    """
    grid = _grid(h, channels_last)
    if pool_size is not None:
        size = (pool_size, pool_size) if grid.shape[2] > 1 else (1, pool_size * pool_size)
        if grid.shape[2] * grid.shape[3] < size[0] * size[1]:
            raise ValueError(f"pool_size={pool_size} asks for more positions than the layer output "
                             f"{tuple(h.shape)} has")
        grid = F.adaptive_avg_pool2d(grid, size)
    return rearrange(grid, "b d y x -> b (y x) d")


class LinearHead(nn.Module):
    """A linear probe on the flattened pooled features (no normalisation layer)."""

    def __init__(self, num_tokens: int, dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(num_tokens * dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(rearrange(tokens, "b p d -> b (p d)"))


class AttentionHead(nn.Module):
    """The paper's attention head: a learned query attends over the projected tokens, then linear.

    Tokens are layer-normalised and projected to keys and values of ``num_heads`` heads, the keys
    get learned positions, and softmax(q k^T / sqrt(d)) v pools them into one vector per image.
    """

    def __init__(self, num_tokens: int, dim: int, num_classes: int, hidden_dim: int = 128, num_heads: int = 4):
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim={hidden_dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, hidden_dim))
        self.query = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.to_kv = nn.Linear(dim, 2 * hidden_dim)
        self.proj = nn.Linear(hidden_dim, hidden_dim)
        self.fc = nn.Linear(hidden_dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.query, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        k, v = rearrange(self.to_kv(self.norm(tokens)), "b p (two h d) -> two b h p d", two=2, h=self.num_heads)
        k = k + rearrange(self.pos_embed, "1 p (h d) -> 1 h p d", h=self.num_heads)
        q = rearrange(self.query, "1 n (h d) -> 1 h n d", h=self.num_heads).expand(tokens.shape[0], -1, -1, -1)
        pooled = rearrange(attention(q, k, v), "b h 1 d -> b (h d)")  # (B, hidden_dim)
        return self.fc(self.proj(pooled))


def _make_head(kind: str, num_tokens: int, dim: int, num_classes: int) -> nn.Module:
    if kind == "linear":
        return LinearHead(num_tokens, dim, num_classes)
    if kind == "attention":
        return AttentionHead(num_tokens, dim, num_classes)
    raise ValueError(f"head={kind!r} is not one of {list(HEADS)}")


def _first_tensor(output) -> torch.Tensor:
    """The activation of a hooked module: its tensor output, or the first tensor it returns."""
    if isinstance(output, torch.Tensor):
        return output
    items = tuple(output.values()) if isinstance(output, dict) else output  # diffusers outputs are dicts
    if isinstance(items, (tuple, list)):
        for item in items:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"the hooked layer returned {type(output).__name__} with no tensor in it")


def _candidate_blocks(model: nn.Module, max_depth: int = 4, limit: int = 60) -> str:
    names = [n for n, _ in model.named_modules() if n and n.count(".") < max_depth]
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


class _Captured(Exception):
    """Raised by the hook to stop the forward pass once the wanted activation is taken."""


class _HeadOnlyModule(nn.Module):
    """A subclass's frozen ``features(x)`` (B, P, D) with a trainable ``head`` on top;
    ``no_weight_decay`` names the head's position and query parameters, as timm models do."""

    head: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of images x (B, C, H, W) in [-1, 1]."""
        return self.head(self.features(x))

    def no_weight_decay(self) -> set[str]:
        return {f"head.{n}" for n in ("pos_embed", "query") if hasattr(self.head, n)}

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"expected images of shape (B, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(x.shape)}")


class PixelProbe(_HeadOnlyModule):
    """The raw-pixel baseline: the same heads on pooled pixels (``pool_size=None``: every pixel)."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, *, head: str = "linear",
                 pool_size: int | None = None):
        super().__init__()
        self.input_shape, self.pool_size = tuple(input_shape), pool_size
        tokens = self.features(torch.zeros(1, *self.input_shape))
        self.head = _make_head(head, tokens.shape[1], tokens.shape[2], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pixels as tokens (B, P, C)."""
        self._check_input(x)
        return pool_tokens(x, self.pool_size)


class DiffusionClassifier(_HeadOnlyModule):
    """A trainable head on one block's activation of a frozen diffusion noise predictor.

    ``backbone`` is any network called as ``backbone(x_t, timesteps, class_labels=y)`` (genforge's
    DiMRModel, diffusers' UNet2DModel); class-conditional ones get their null class.
    ``layer`` is a name from ``backbone.named_modules()``, ``t`` the diffusion timestep,
    ``scheduler`` a diffusers scheduler whose betas define abar_t (default: DDPM linear).
    ``channels_last`` says how to read a 4-D activation (default: from the layer's type).
    ``input_shape`` (C, H, W) defaults to the backbone config's in_channels and sample_size.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, layer: str, t: int, *, head: str = "linear",
                 pool_size: int | None = 1, scheduler=None, noise_seed: int = 0, channels_last: bool | None = None,
                 input_shape: tuple[int, int, int] | None = None):
        super().__init__()
        modules = dict(backbone.named_modules())
        if not layer or layer not in modules:
            close = difflib.get_close_matches(layer, [n for n in modules if n], n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"layer {layer!r} is not a module of {type(backbone).__name__}{hint}; "
                             f"candidate blocks: {_candidate_blocks(backbone)}")
        schedule = DDPMScheduler.from_config((scheduler or default_scheduler()).config)
        steps = schedule.config.num_train_timesteps
        if not isinstance(t, int) or not 0 <= t < steps:
            raise ValueError(f"t={t!r} must be an int timestep in [0, {steps})")
        self.backbone = backbone.requires_grad_(False).eval()
        self.layer, self.t, self.pool_size, self.noise_seed = layer, t, pool_size, noise_seed
        self.alpha_bar = float(schedule.alphas_cumprod[t])
        self.channels_last = (isinstance(modules[layer], CHANNELS_LAST_MODULES) if channels_last is None
                              else channels_last)
        self.input_shape = tuple(input_shape or (backbone.config.in_channels, backbone.config.sample_size,
                                                 backbone.config.sample_size))
        try:
            self.class_label = null_class_of(backbone)
        except ValueError:
            self.class_label = None  # an unconditional network
        tokens = self.features(torch.zeros(1, *self.input_shape, device=self._device()))
        self.head = _make_head(head, tokens.shape[1], tokens.shape[2], num_classes)

    def train(self, mode: bool = True):
        """Train mode for the head only: the frozen backbone always runs in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def _device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def noise(self, x0: torch.Tensor) -> torch.Tensor:
        """The fixed eps (1, C, H, W) shared by every image, drawn from ``noise_seed``."""
        generator = torch.Generator().manual_seed(self.noise_seed)
        return torch.randn(1, *x0.shape[1:], generator=generator).to(x0)

    def noised(self, x0: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM, Eq. 4)."""
        return math.sqrt(self.alpha_bar) * x0 + math.sqrt(1 - self.alpha_bar) * self.noise(x0)

    @torch.no_grad()
    def activation(self, x0: torch.Tensor) -> torch.Tensor:
        """The hooked layer's raw output for clean images x0; the forward stops right after it."""
        self._check_input(x0)
        backbone_dtype = next(self.backbone.parameters()).dtype
        x_t = self.noised(x0.to(self._device(), backbone_dtype))
        timesteps = torch.full((x_t.shape[0],), self.t, device=x_t.device, dtype=torch.long)
        labels = None if self.class_label is None else torch.full_like(timesteps, self.class_label)
        captured = []

        def hook(module, args, output):
            captured.append(_first_tensor(output))
            raise _Captured

        handle = self.backbone.get_submodule(self.layer).register_forward_hook(hook)
        try:
            self.backbone(x_t, timesteps, class_labels=labels)
        except _Captured:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"layer {self.layer!r} did not run in {type(self.backbone).__name__}'s forward pass")
        return captured[0]

    def features(self, x0: torch.Tensor) -> torch.Tensor:
        """Frozen features of images x0 (B, C, H, W) in [-1, 1]: pooled tokens (B, P, D), float32."""
        return pool_tokens(self.activation(x0), self.pool_size, self.channels_last).float()


# ----------------------------------------------------------------------------- the method

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
