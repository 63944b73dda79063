"""DiMR: a multi-resolution diffusion network with time-dependent normalisation.

Liu et al., "Alleviating Distortion in Image Generation via Multi-Resolution Diffusion
Models", NeurIPS 2024, arXiv 2406.09416 (official code: qihao067/DiMR). The network is a
cascade of R stages from low to high resolution (Sec. 3.1, Fig. 2):

- stage 0 is a Transformer on coarse tokens (patchify conv, learned absolute positions, a
  prepended class token), stages r >= 1 are ConvNeXt branches at higher resolution;
- a stage's position table has ``max_height * max_width`` rows and token (i, j) reads row
  ``i * max_width + j`` (official ``PositionEmbeddings``), so grids may be non-square and any
  grid up to the maximum runs; ``max_width`` defaults to ``max_height``;
- each stage has 2*floor(n/2)+1 blocks in U-ViT's long-skip layout: the first half push
  their outputs, a middle block, then each later block first applies Linear(2d -> d) to
  concat(x, skip);
- every intermediate feature of stage r (its input embedding and each block output,
  K = 2*floor(n/2)+2 maps) is concatenated on channels, passed through
  TD-LN(K*d) -> pixel-shuffle Linear(K*d -> d'*rho^2) -> TD-LN(d') and *added* to stage
  r+1's input embedding (Sec. 3.1, "feature cascade");
- every stage has a head TD-LN -> 3x3 conv predicting epsilon at its own resolution; the
  training loss sums the stages' losses (Eq. 3) and sampling uses the last prediction;
- time enters only through TD-LN / TD-RMSNorm (Sec. 3.3, Eq. 4); no timestep embedding.

Time convention: the model takes diffusers' discrete timestep t in [0, N) (N = 1000), which is
the official n - 1, and feeds the norms tau = ((t + 1) / N * 8 - 4) / 4 (the official code's
"log_snr" / 4, a linear map of n).

Norm names (``norm_type``) are genforge's (:data:`genforge.core.norm.NORM_TYPES`):
``"TDRMSN"`` (the released configs' TD-RMSNorm, our default) and ``"TDLN"`` (TD-LN). The
official code's ``"LN"``, its default when a config names none, is the time-dependent
LayerNorm, i.e. our ``"TDLN"``; our ``"LN"`` / ``"RMSN"`` are plain time-free norms for
ablations. :mod:`genforge.models.convert_dimr` translates official names and configs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from einops import rearrange
from torch import nn

from genforge.core.blocks import ConvNeXtBlock, TransformerBlock
from genforge.core.embed import batch_conditions
from genforge.core.norm import TDLayerNorm

STAGE_KEYS = {
    "transformer": {"block_type", "dim", "hidden_dim", "num_heads", "num_blocks", "max_height", "max_width",
                    "patch_size", "input_ratio", "final_kernel_size", "dropout"},
    "convnext": {"block_type", "dim", "hidden_dim", "kernel_size", "num_blocks", "max_height", "max_width",
                 "patch_size", "input_ratio", "final_kernel_size", "dropout"},
}
STAGE_DEFAULTS = {"max_width": None, "patch_size": 1, "input_ratio": 1, "final_kernel_size": 3, "dropout": 0.0}


def timestep_to_tau(timestep: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """diffusers t in [0, N) -> tau = ((t+1)/N * 8 - 4) / 4 in (-1, 1] (official log_snr / 4)."""
    return ((timestep.float() + 1) / num_train_timesteps * 8 - 4) / 4


def built_blocks(num_blocks: int) -> int:
    """Blocks actually built for a configured count: 2*floor(n/2)+1 (odd, U-ViT layout)."""
    return num_blocks // 2 * 2 + 1


def cascade_width(stage: dict) -> int:
    """Channels a stage hands upward: K*d with K = 2*floor(n/2)+2 collected feature maps."""
    return stage["dim"] * (built_blocks(stage["num_blocks"]) + 1)


def validate_stages(stages: list[dict]) -> list[dict]:
    """Fill defaults and check each stage dict; unknown or missing keys are errors."""
    if not stages:
        raise ValueError("DiMR needs at least one stage")
    resolved = []
    for index, stage in enumerate(stages):
        block_type = stage.get("block_type")
        if block_type not in STAGE_KEYS:
            raise ValueError(f"stage {index}: block_type must be one of {sorted(STAGE_KEYS)}, got {block_type!r}")
        allowed = STAGE_KEYS[block_type]
        unknown = set(stage) - allowed
        if unknown:
            raise ValueError(f"stage {index} ({block_type}): unknown keys {sorted(unknown)}; allowed {sorted(allowed)}")
        full = {**STAGE_DEFAULTS, **stage}
        missing = allowed - set(full)
        if missing:
            raise ValueError(f"stage {index} ({block_type}): missing keys {sorted(missing)}")
        if full["max_width"] is None:
            full["max_width"] = full["max_height"]
        if index > 0:
            _check_upsampling(index, full, resolved[-1])
        resolved.append(full)
    return resolved


def _check_upsampling(index: int, stage: dict, lower: dict) -> None:
    """Stage ``index``'s grid must be one integer ratio larger than ``lower``'s on both axes."""
    ratios = []
    for axis in ("max_height", "max_width"):
        if stage[axis] % lower[axis]:
            raise ValueError(f"stage {index}: {axis} {stage[axis]} is not a multiple of the previous "
                             f"stage's {lower[axis]}")
        ratios.append(stage[axis] // lower[axis])
    if ratios[0] != ratios[1]:
        raise ValueError(f"stage {index}: the grid grows {ratios[0]}x in height but {ratios[1]}x in width "
                         f"from the previous stage; the pixel-shuffle cascade needs one ratio")


class PixelShuffleUpsample(nn.Module):
    """Linear(d_in -> d_out * rho^2), then rearrange channels into a rho x larger grid."""

    def __init__(self, dim_in: int, dim_out: int, ratio: int):
        super().__init__()
        self.ratio = ratio
        self.proj = nn.Linear(dim_in, dim_out * ratio * ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, h, w, d_in) -> (B, h*rho, w*rho, d_out)
        return rearrange(self.proj(x), "b h w (r1 r2 c) -> b (h r1) (w r2) c", r1=self.ratio, r2=self.ratio)


class FeatureCascade(nn.Module):
    """TD-LN(K*d) -> pixel-shuffle -> TD-LN(d'): stage r's features into stage r+1 (Sec. 3.1)."""

    def __init__(self, dim_in: int, dim_out: int, ratio: int):
        super().__init__()
        self.norm_in = TDLayerNorm(dim_in)
        self.upsample = PixelShuffleUpsample(dim_in, dim_out, ratio)
        self.norm_out = TDLayerNorm(dim_out)

    def forward(self, features: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        return self.norm_out(self.upsample(self.norm_in(features, tau)), tau)


class DiMRStage(nn.Module):
    """One resolution branch: embed, long-skip blocks, prediction head, collected features."""

    def __init__(self, in_channels: int, stage: dict, norm_type: str, num_classes: int | None,
                 lowres: dict | None):
        super().__init__()
        dim, self.is_transformer = stage["dim"], stage["block_type"] == "transformer"
        self.input_ratio = stage["input_ratio"]
        self.max_height, self.max_width = stage["max_height"], stage["max_width"]
        self.patch_embed = nn.Conv2d(in_channels, dim, stage["patch_size"], stride=stage["patch_size"])
        self.pos_embed = nn.Embedding(self.max_height * self.max_width, dim)
        self.class_embed = nn.Embedding(num_classes + 1, dim) if self.is_transformer and num_classes else None
        self.cascade = None
        if lowres is not None:
            self.cascade = FeatureCascade(cascade_width(lowres), dim, self.max_height // lowres["max_height"])
        count = built_blocks(stage["num_blocks"])
        if self.is_transformer:
            make = lambda: TransformerBlock(dim, stage["num_heads"], stage["hidden_dim"], norm_type, stage["dropout"])
        else:
            make = lambda: ConvNeXtBlock(dim, stage["hidden_dim"], stage["kernel_size"], norm_type, stage["dropout"])
        self.blocks = nn.ModuleList(make() for _ in range(count))
        self.skip_proj = nn.ModuleList(nn.Linear(2 * dim, dim) for _ in range(count // 2))
        self.head_norm = TDLayerNorm(dim)
        self.head_conv = nn.Conv2d(dim, in_channels, stage["final_kernel_size"], padding=stage["final_kernel_size"] // 2)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, h, w, d): area-downsample, patchify, add learned positions."""
        if self.input_ratio > 1:
            size = (images.shape[-2] // self.input_ratio, images.shape[-1] // self.input_ratio)
            images = F.interpolate(images, size=size, mode="area")
        x = rearrange(self.patch_embed(images), "b d h w -> b h w d")
        h, w = x.shape[1:3]
        if h > self.max_height or w > self.max_width:
            raise ValueError(f"stage grid {h}x{w} exceeds its maximum {self.max_height}x{self.max_width} "
                             f"(max_height x max_width)")
        rows = torch.arange(h, device=x.device)[:, None] * self.max_width
        index = rows + torch.arange(w, device=x.device)[None, :]
        return x + self.pos_embed(index)

    def forward(self, images: torch.Tensor, tau: torch.Tensor, lowres_features: torch.Tensor | None,
                class_labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(images)
        if self.cascade is not None:
            x = x + self.cascade(lowres_features, tau)
        batch, h, w, dim = x.shape
        if self.is_transformer:
            x = rearrange(x, "b h w d -> b (h w) d")
            if self.class_embed is not None:
                x = torch.cat([self.class_embed(class_labels)[:, None], x], dim=1)
        collected, skips = [x], []
        half = len(self.blocks) // 2
        for block in self.blocks[:half]:
            x = block(x, tau)
            collected.append(x)
            skips.append(x)
        x = self.blocks[half](x, tau)
        collected.append(x)
        for proj, block in zip(self.skip_proj, self.blocks[half + 1:]):
            x = block(proj(torch.cat([x, skips.pop()], dim=-1)), tau)
            collected.append(x)
        features = torch.cat(collected, dim=-1)  # (B, [1+]N, K*d) or (B, h, w, K*d)
        if self.is_transformer:
            offset = 1 if self.class_embed is not None else 0
            x = rearrange(x[:, offset:], "b (h w) d -> b h w d", h=h, w=w)
            features = rearrange(features[:, offset:], "b (h w) d -> b h w d", h=h, w=w)
        out = self.head_conv(rearrange(self.head_norm(x, tau), "b h w d -> b d h w"))
        return out, features


@dataclass
class DiMROutput(BaseOutput):
    """``sample``: the highest-resolution epsilon prediction; ``multiscale``: all, low to high."""

    sample: torch.Tensor
    multiscale: tuple[torch.Tensor, ...]


class DiMRModel(ModelMixin, ConfigMixin):
    """DiMR network: forward(sample (B,C,H,W), timestep (B,), class_labels (B,)) -> DiMROutput.

    ``num_classes`` counts real classes; the class table has one more row, the null class
    ``num_classes`` used for classifier-free guidance (the official config's 1001 for ImageNet).
    ``sample_size`` is the latent size the pipeline samples: an int (square) or [height, width].
    """

    @register_to_config
    def __init__(self, in_channels: int = 4, sample_size: int | list[int] = 32, num_classes: int = 1000,
                 stage_configs: list | None = None, norm_type: str = "TDRMSN", block_grad_to_lowres: bool = False,
                 num_train_timesteps: int = 1000, loss_weights: list | None = None):
        super().__init__()
        resolved = validate_stages(stage_configs if stage_configs is not None
                                   else copy.deepcopy(DIMR_CONFIGS["XL/2R"]["stage_configs"]))
        weights = loss_weights if loss_weights is not None else default_loss_weights(len(resolved))
        if len(weights) != len(resolved):
            raise ValueError(f"loss_weights has {len(weights)} entries for {len(resolved)} stages")
        self.stage_loss_weights = [float(w) for w in weights]
        self.stages = nn.ModuleList(
            DiMRStage(in_channels, stage, norm_type, num_classes, resolved[i - 1] if i else None)
            for i, stage in enumerate(resolved))
        self.apply(_init_weights)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                class_labels: torch.Tensor | None = None, return_dict: bool = True):
        timestep, class_labels = batch_conditions(timestep, class_labels, sample.shape[0], self.null_class,
                                                  sample.device)
        tau = timestep_to_tau(timestep, self.config.num_train_timesteps).to(sample.dtype)
        outputs, features = [], None
        for stage in self.stages:
            out, features = stage(sample, tau, features, class_labels)
            if self.config.block_grad_to_lowres:
                features = features.detach()
            outputs.append(out)
        if not return_dict:
            return outputs[-1], tuple(outputs)
        return DiMROutput(sample=outputs[-1], multiscale=tuple(outputs))


def default_loss_weights(num_stages: int) -> list[float]:
    """The released configs' lambda = [1/4, 1] for two stages; 4^-(R-1-r) in general."""
    return [4.0 ** -(num_stages - 1 - r) for r in range(num_stages)]


def multiscale_noise_targets(noise: torch.Tensor, num_stages: int) -> list[torch.Tensor]:
    """Targets low to high: stage r's target is noise box-summed over 2^k x 2^k and / 2^k.

    Dividing the sum of 4^k i.i.d. unit-variance values by 2^k (not 4^k) keeps unit variance
    (official ``even_multi_scale_targets`` with ``scale_correction=True``).
    """
    targets = []
    for level in reversed(range(num_stages)):
        ratio = 2**level
        targets.append(noise if ratio == 1 else F.avg_pool2d(noise, ratio) * ratio)
    return targets


def multiscale_loss(model: DiMRModel, outputs: tuple[torch.Tensor, ...], noise: torch.Tensor) -> torch.Tensor:
    """L = sum_r lambda_r * mean((eps_hat_r - eps_r)^2) (Eq. 3, official ``LSimple``)."""
    targets = multiscale_noise_targets(noise, len(outputs))
    loss = noise.new_zeros(())
    for weight, pred, target in zip(model.stage_loss_weights, outputs, targets):
        if pred.shape != target.shape:
            raise ValueError(f"stage output {tuple(pred.shape)} does not match its target {tuple(target.shape)}")
        loss = loss + weight * F.mse_loss(pred.float(), target.float())
    return loss


def _init_weights(module: nn.Module) -> None:
    """Official init: truncated normal (std 0.02) for Linear and Embedding, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def _transformer(dim, hidden, heads, blocks, height, patch=2):
    return {"block_type": "transformer", "dim": dim, "hidden_dim": hidden, "num_heads": heads,
            "num_blocks": blocks, "max_height": height, "patch_size": patch}


def _convnext(dim, hidden, kernel, blocks, height):
    return {"block_type": "convnext", "dim": dim, "hidden_dim": hidden, "kernel_size": kernel,
            "num_blocks": blocks, "max_height": height}


DIMR_CONFIGS: dict[str, dict] = {
    "tiny": {"in_channels": 4, "sample_size": 8, "num_classes": 10,
             "stage_configs": [_transformer(32, 64, 4, 3, 4), _convnext(16, 32, 3, 2, 8)]},
    "digits": {"in_channels": 1, "sample_size": 8, "num_classes": 10,
               "stage_configs": [_transformer(128, 256, 4, 5, 4), _convnext(64, 128, 3, 2, 8)]},
    "digits_tiny": {"in_channels": 1, "sample_size": 8, "num_classes": 10,
                    "stage_configs": [_transformer(32, 64, 4, 1, 4), _convnext(16, 32, 3, 1, 8)]},
    "digits16": {"in_channels": 1, "sample_size": 16, "num_classes": 10,
                 "stage_configs": [_transformer(128, 256, 4, 5, 8), _convnext(64, 128, 3, 2, 16)]},
    "mnist": {"in_channels": 1, "sample_size": 32, "num_classes": 10,
              "stage_configs": [_transformer(128, 272, 4, 5, 8, patch=4),
                                {**_convnext(64, 128, 3, 2, 16), "input_ratio": 2},
                                _convnext(32, 64, 3, 2, 32)]},
    "XL/2R": {"in_channels": 4, "sample_size": 32, "num_classes": 1000,
              "stage_configs": [_transformer(960, 1920, 16, 39, 16), _convnext(480, 960, 7, 20, 32)]},
    "G/2R": {"in_channels": 4, "sample_size": 32, "num_classes": 1000,
             "stage_configs": [_transformer(1152, 2304, 16, 57, 16), _convnext(576, 1152, 7, 29, 32)]},
}
"""Named configs. ``digits`` works on the native 8x8 digits (4x4 tokens, then 8x8), ``digits_tiny``
is a 20k-parameter, one-block-per-stage version for quick runs (the end-to-end test), ``digits16``
works on digits padded to 16x16. ``mnist`` (1,336,451 parameters) is the three-resolution
cascade for MNIST-5k padded to 32x32: a Transformer on 8x8 tokens (4x4 patches), a ConvNeXt
branch at 16x16 (the image area-downsampled 2x) and one at 32x32. XL/2R and G/2R are the paper's ImageNet-256 latent models (505M / 1.06B
parameters), with the official configs' values (configs/DiMR-{XL,G}-2R_imagenet256.py: both have
16 heads in stage 0 and a 7x7 kernel in stage 1)."""


def dimr_config(name: str, **overrides) -> dict:
    """A deep copy of a named config with keyword overrides applied."""
    if name not in DIMR_CONFIGS:
        raise ValueError(f"unknown DiMR config {name!r}; known: {sorted(DIMR_CONFIGS)}")
    return {**copy.deepcopy(DIMR_CONFIGS[name]), **overrides}
