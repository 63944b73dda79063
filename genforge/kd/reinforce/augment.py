"""Replayable augmentations of dataset reinforcement: each draws its parameters, records them, and
replays them exactly.

Faghri et al., "Reinforce Data, Multiply Impact", ICCV 2023, arXiv 2303.08983 (official code
``apple/ml-dr``, ``dr/transforms.py``). Every transform has ``sample(x, generator)`` ->
(image, params), ``apply(x, params)`` (the exact replay), ``encode``/``decode`` (params as flat
floats) and ``config()``. :class:`ReinforcePipeline` runs them in the registry's fixed order,
RandomResizedCrop -> HorizontalFlip -> RandAugment -> RandomErasing -> MixUp -> CutMix, with
the mixing partner's own pre-mixing draws, and compresses the params of one augmentation to a
flat list of numbers. Images are float (C, H, W) in the datasets' [-1, 1] range.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from genforge.core.rng import symmetric_beta

Params = Any


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """Uniform integer in [low, high)."""
    return int(torch.randint(low, high, (1,), generator=generator).item())


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand(1, generator=generator).item())


def _check_image(x: torch.Tensor) -> None:
    if x.dim() != 3 or not x.is_floating_point():
        raise ValueError(
            f"expected a float image tensor of shape (C, H, W), got dtype {x.dtype} "
            f"and shape {tuple(x.shape)}"
        )


class RandomResizedCrop:
    """Crop a random box of relative area in ``scale`` and aspect in ``ratio``, resize to size.

    Params: (top, left, h, w) of the crop in the input image.
    """

    name = "random_resized_crop"
    mixing = False

    def __init__(
        self,
        size: int | Sequence[int],
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
    ) -> None:
        self.size = (
            (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        )
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be a positive int or (h, w), got {size}")
        self.scale = tuple(float(s) for s in scale)
        self.ratio = tuple(float(r) for r in ratio)

    def config(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "scale": list(self.scale),
            "ratio": list(self.ratio),
        }

    def _params(self, height: int, width: int, generator: torch.Generator) -> tuple:
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * _uniform(*self.scale, generator)
            aspect = math.exp(_uniform(*log_ratio, generator))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return (
                    _randint(0, height - h + 1, generator),
                    _randint(0, width - w + 1, generator),
                    h,
                    w,
                )
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            h, w = height, width
        return ((height - h) // 2, (width - w) // 2, h, w)

    def sample(
        self, x: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, tuple]:
        _check_image(x)
        params = self._params(x.shape[-2], x.shape[-1], generator)
        return self.apply(x, params), params

    def apply(self, x: torch.Tensor, params: tuple) -> torch.Tensor:
        top, left, h, w = (int(v) for v in params)
        crop = x[:, top : top + h, left : left + w]
        return F.interpolate(
            crop[None], size=self.size, mode="bilinear", align_corners=False
        )[0]

    def encode(self, params: tuple) -> list[float]:
        return [float(v) for v in params]

    def decode(self, flat: Sequence[float], pos: int) -> tuple[tuple, int]:
        return tuple(int(v) for v in flat[pos : pos + 4]), pos + 4


class HorizontalFlip:
    """Flip the width axis with probability p. Params: bool."""

    name = "horizontal_flip"
    mixing = False

    def __init__(self, p: float = 0.5) -> None:
        self.p = float(p)

    def config(self) -> dict[str, Any]:
        return {"p": self.p}

    def sample(
        self, x: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, bool]:
        _check_image(x)
        params = _uniform(0.0, 1.0, generator) < self.p
        return self.apply(x, params), params

    def apply(self, x: torch.Tensor, params: bool) -> torch.Tensor:
        return x.flip(-1) if params else x

    def encode(self, params: bool) -> list[float]:
        return [1.0 if params else 0.0]

    def decode(self, flat: Sequence[float], pos: int) -> tuple[bool, int]:
        return bool(flat[pos]), pos + 1


def _shear_x(x: torch.Tensor, m: float) -> torch.Tensor:
    return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0,
                     shear=[math.degrees(math.atan(m)), 0.0], center=[0, 0])


def _shear_y(x: torch.Tensor, m: float) -> torch.Tensor:
    return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0,
                     shear=[0.0, math.degrees(math.atan(m))], center=[0, 0])


def _translate_x(x: torch.Tensor, m: float) -> torch.Tensor:
    return TF.affine(x, angle=0.0, translate=[int(m), 0], scale=1.0, shear=[0.0, 0.0])


def _translate_y(x: torch.Tensor, m: float) -> torch.Tensor:
    return TF.affine(x, angle=0.0, translate=[0, int(m)], scale=1.0, shear=[0.0, 0.0])


# (name, op(image in [0, 1], magnitude), largest magnitude as a function of (H, W) or None
# for ops without one, signed). Ranges as torchvision's RandAugment (Cubuk et al. 2020, Sec. 3).
_RA_OPS: tuple[tuple[str, Callable, Callable | None, bool], ...] = (
    ("identity", lambda x, m: x, None, False),
    ("shear_x", _shear_x, lambda h, w: 0.3, True),
    ("shear_y", _shear_y, lambda h, w: 0.3, True),
    ("translate_x", _translate_x, lambda h, w: 150.0 / 331.0 * w, True),
    ("translate_y", _translate_y, lambda h, w: 150.0 / 331.0 * h, True),
    ("rotate", lambda x, m: TF.rotate(x, angle=m), lambda h, w: 30.0, True),
    ("brightness", lambda x, m: TF.adjust_brightness(x, 1.0 + m), lambda h, w: 0.9, True),
    ("color", lambda x, m: TF.adjust_saturation(x, 1.0 + m), lambda h, w: 0.9, True),
    ("contrast", lambda x, m: TF.adjust_contrast(x, 1.0 + m), lambda h, w: 0.9, True),
    ("sharpness", lambda x, m: TF.adjust_sharpness(x, 1.0 + m), lambda h, w: 0.9, True),
    ("posterize", lambda x, m: TF.posterize(x, int(m)), None, False),
    ("solarize", lambda x, m: TF.solarize(x, m), None, False),
    ("autocontrast", lambda x, m: TF.autocontrast(x), None, False),
    ("equalize", lambda x, m: TF.equalize(x), None, False),
)


class RandAugment:
    """With probability p, ``num_ops`` random ops at a fixed magnitude bin (Cubuk et al. 2020).

    Params: None (skipped) or a tuple of (op index, signed magnitude), one per op. The op list
    and magnitude ranges follow torchvision's RandAugment; bin ``magnitude`` of
    ``num_magnitude_bins`` gives the magnitude, and the sign of a signed op is drawn at sample
    time (ml-dr stores the signed value, so replay needs no randomness). Posterize uses
    8 - round(4 * bin / (bins - 1)) bits and Solarize the threshold 1 - bin / (bins - 1).
    Images in ``value_range`` are mapped to [0, 1] for the torchvision ops and back;
    equalize quantises to uint8 inside torchvision, deterministically.
    """

    name = "rand_augment"
    mixing = False
    OPS = tuple(op[0] for op in _RA_OPS)

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: int = 9,
        num_magnitude_bins: int = 31,
        p: float = 1.0,
        value_range: Sequence[float] = (-1.0, 1.0),
    ) -> None:
        self.num_ops = int(num_ops)
        self.magnitude = int(magnitude)
        self.num_magnitude_bins = int(num_magnitude_bins)
        self.p = float(p)
        self.value_range = tuple(float(v) for v in value_range)
        if self.num_ops < 1:
            raise ValueError(f"num_ops must be positive, got {num_ops}")
        if self.num_magnitude_bins < 2 or not 0 <= self.magnitude < self.num_magnitude_bins:
            raise ValueError(
                f"magnitude must be a bin in [0, num_magnitude_bins) with at least 2 bins, "
                f"got magnitude={magnitude}, num_magnitude_bins={num_magnitude_bins}"
            )
        if len(self.value_range) != 2 or not self.value_range[0] < self.value_range[1]:
            raise ValueError(f"value_range must be (low, high) with low < high, got {value_range}")

    def config(self) -> dict[str, Any]:
        return {
            "num_ops": self.num_ops,
            "magnitude": self.magnitude,
            "num_magnitude_bins": self.num_magnitude_bins,
            "p": self.p,
            "value_range": list(self.value_range),
        }

    def _magnitude(self, op: int, height: int, width: int) -> float:
        name, _, largest, _ = _RA_OPS[op]
        fraction = self.magnitude / (self.num_magnitude_bins - 1)
        if name == "posterize":
            return float(8 - round(4 * fraction))
        if name == "solarize":
            return 1.0 - fraction
        return 0.0 if largest is None else largest(height, width) * fraction

    def _params(self, height: int, width: int, generator: torch.Generator) -> tuple | None:
        if not _uniform(0.0, 1.0, generator) < self.p:
            return None
        ops = []
        for _ in range(self.num_ops):
            op = _randint(0, len(_RA_OPS), generator)
            m = self._magnitude(op, height, width)
            if _RA_OPS[op][3] and _randint(0, 2, generator):
                m = -m
            ops.append((op, m))
        return tuple(ops)

    def sample(
        self, x: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, tuple | None]:
        _check_image(x)
        if x.shape[0] not in (1, 3):
            raise ValueError(f"RandAugment needs 1 or 3 channels, got {x.shape[0]}")
        params = self._params(x.shape[-2], x.shape[-1], generator)
        return self.apply(x, params), params

    def apply(self, x: torch.Tensor, params: tuple | None) -> torch.Tensor:
        if params is None:
            return x
        low, high = self.value_range
        y = ((x - low) / (high - low)).clamp(0.0, 1.0)
        for op, m in params:
            y = _RA_OPS[int(op)][1](y, float(m))
        return y * (high - low) + low

    def encode(self, params: tuple | None) -> list[float]:
        if params is None:
            return [0.0]
        return [1.0, *(float(v) for pair in params for v in pair)]

    def decode(self, flat: Sequence[float], pos: int) -> tuple[tuple | None, int]:
        if flat[pos] == 0:
            return None, pos + 1
        end = pos + 1 + 2 * self.num_ops
        values = flat[pos + 1 : end]
        ops = tuple((int(values[2 * i]), float(values[2 * i + 1])) for i in range(self.num_ops))
        return ops, end


class RandomErasing:
    """With probability p, set a random box to ``value``. Params: (x, y, h, w) or None.

    x is the top row and y the left column of the box (the torchvision convention).
    ``value`` is in the datasets' [-1, 1] pixel range; the default -1 (black) is ml-dr's,
    which erases to 0 before normalisation. 0 would be mid-grey.
    """

    name = "random_erasing"
    mixing = False

    def __init__(
        self,
        p: float = 0.25,
        scale: Sequence[float] = (0.02, 0.33),
        ratio: Sequence[float] = (0.3, 3.3),
        value: float = -1.0,
    ) -> None:
        self.p = float(p)
        self.scale = tuple(float(s) for s in scale)
        self.ratio = tuple(float(r) for r in ratio)
        self.value = float(value)

    def config(self) -> dict[str, Any]:
        return {
            "p": self.p,
            "scale": list(self.scale),
            "ratio": list(self.ratio),
            "value": self.value,
        }

    def _params(
        self, height: int, width: int, generator: torch.Generator
    ) -> tuple | None:
        if not _uniform(0.0, 1.0, generator) < self.p:
            return None
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = height * width * _uniform(*self.scale, generator)
            aspect = math.exp(_uniform(*log_ratio, generator))
            h = round(math.sqrt(target * aspect))
            w = round(math.sqrt(target / aspect))
            if 0 < h < height and 0 < w < width:
                return (
                    _randint(0, height - h + 1, generator),
                    _randint(0, width - w + 1, generator),
                    h,
                    w,
                )
        return None

    def sample(
        self, x: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, tuple | None]:
        _check_image(x)
        params = self._params(x.shape[-2], x.shape[-1], generator)
        return self.apply(x, params), params

    def apply(self, x: torch.Tensor, params: tuple | None) -> torch.Tensor:
        if params is None:
            return x
        top, left, h, w = (int(v) for v in params)
        out = x.clone()
        out[:, top : top + h, left : left + w] = self.value
        return out

    def encode(self, params: tuple | None) -> list[float]:
        return [0.0] if params is None else [1.0, *(float(v) for v in params)]

    def decode(self, flat: Sequence[float], pos: int) -> tuple[tuple | None, int]:
        if flat[pos] == 0:
            return None, pos + 1
        return tuple(int(v) for v in flat[pos + 1 : pos + 5]), pos + 5


class _Mixing:
    """Shared by MixUp and CutMix: the Beta(α, α) parameter, the probability p, and the replay (``apply``)."""

    mixing = True

    def __init__(self, alpha: float = 1.0, p: float = 0.5) -> None:
        self.alpha = float(alpha)
        self.p = float(p)

    def config(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "p": self.p}

    def apply(self, x: torch.Tensor, params: Params, partner: torch.Tensor | None) -> torch.Tensor:
        """Replay ``params`` on x with the partner image; None (the transform did not fire) returns x."""
        if params is None:
            return x
        if partner is None or partner.shape != x.shape:
            raise ValueError(
                f"{type(self).__name__} needs a partner image of shape {tuple(x.shape)}, got "
                f"{None if partner is None else tuple(partner.shape)}"
            )
        return self._mix(x, params, partner)


class MixUp(_Mixing):
    """With probability p: out = λ x + (1 - λ) x2, λ ~ Beta(α, α). Params: λ or None."""

    name = "mixup"

    def sample(
        self, x: torch.Tensor, generator: torch.Generator, partner: torch.Tensor
    ) -> tuple[torch.Tensor, float | None]:
        _check_image(x)
        params = (
            symmetric_beta(self.alpha, generator)
            if _uniform(0.0, 1.0, generator) < self.p
            else None
        )
        return self.apply(x, params, partner), params

    def _mix(self, x: torch.Tensor, lam: float, partner: torch.Tensor) -> torch.Tensor:
        return lam * x + (1.0 - lam) * partner

    def encode(self, params: float | None) -> list[float]:
        return [0.0] if params is None else [1.0, float(params)]

    def decode(self, flat: Sequence[float], pos: int) -> tuple[float | None, int]:
        if flat[pos] == 0:
            return None, pos + 1
        return float(flat[pos + 1]), pos + 2


class CutMix(_Mixing):
    """With probability p, paste a box of x2 into x. Params: (λ, (top, left, bottom, right)) or None.

    The box has sides sqrt(1 - λ0) times the image's, λ0 ~ Beta(α, α), centred uniformly and
    clipped; λ = 1 - box area / image area is the fraction of x that is kept.
    """

    name = "cutmix"

    def sample(
        self, x: torch.Tensor, generator: torch.Generator, partner: torch.Tensor
    ) -> tuple[torch.Tensor, tuple | None]:
        _check_image(x)
        if not _uniform(0.0, 1.0, generator) < self.p:
            return x, None
        height, width = x.shape[-2:]
        cut = math.sqrt(1.0 - symmetric_beta(self.alpha, generator))
        ch, cw = int(height * cut), int(width * cut)
        cy, cx = _randint(0, height, generator), _randint(0, width, generator)
        box = (
            max(cy - ch // 2, 0),
            max(cx - cw // 2, 0),
            min(cy + ch // 2, height),
            min(cx + cw // 2, width),
        )
        lam = 1.0 - (box[2] - box[0]) * (box[3] - box[1]) / (height * width)
        params = (lam, box)
        return self.apply(x, params, partner), params

    def _mix(self, x: torch.Tensor, params: tuple, partner: torch.Tensor) -> torch.Tensor:
        top, left, bottom, right = (int(v) for v in params[1])
        out = x.clone()
        out[:, top:bottom, left:right] = partner[:, top:bottom, left:right]
        return out

    def encode(self, params: tuple | None) -> list[float]:
        if params is None:
            return [0.0]
        return [1.0, float(params[0]), *(float(v) for v in params[1])]

    def decode(self, flat: Sequence[float], pos: int) -> tuple[tuple | None, int]:
        if flat[pos] == 0:
            return None, pos + 1
        box = tuple(int(v) for v in flat[pos + 2 : pos + 6])
        return (float(flat[pos + 1]), box), pos + 6


REGISTRY: dict[str, type] = {
    cls.name: cls
    for cls in (
        RandomResizedCrop,
        HorizontalFlip,
        RandAugment,
        RandomErasing,
        MixUp,
        CutMix,
    )
}
ORDER = tuple(REGISTRY)


class ReinforcePipeline:
    """Augmentations in the registry's fixed order, recording replayable params.

    ``sample`` returns (image, params) with params = [id2, θ_1, ..., θ_n]: id2 is the
    partner's dataset index (None when no mixing transform fired); while mixing, every
    pre-mixing θ_t is the pair (θ_img, θ_img2), the partner's own draw.
    """

    def __init__(self, transforms: Sequence[Any]) -> None:
        names = [t.name for t in transforms]
        unknown = [n for n in names if n not in REGISTRY]
        if unknown:
            raise ValueError(f"unknown transforms {unknown}; known: {list(ORDER)}")
        if len(set(names)) != len(names):
            raise ValueError(f"each transform may appear once, got {names}")
        self.transforms = sorted(transforms, key=lambda t: ORDER.index(t.name))
        self.pre = [t for t in self.transforms if not t.mixing]
        self.mix = [t for t in self.transforms if t.mixing]

    def config(self) -> list[list[Any]]:
        return [[t.name, t.config()] for t in self.transforms]

    @classmethod
    def from_config(cls, config: Sequence[Sequence[Any]]) -> ReinforcePipeline:
        return cls([REGISTRY[name](**kwargs) for name, kwargs in config])

    def sample(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None,
        partner: tuple[int, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, list[Params]]:
        """Draw one augmentation of x; ``partner`` = (id2, raw image) enables mixing."""
        pre_img, pre_img2 = [], []
        x2 = None
        for t in self.pre:
            x, p = t.sample(x, generator)
            pre_img.append(p)
        if self.mix and partner is not None:
            x2 = partner[1]
            for t in self.pre:
                x2, p = t.sample(x2, generator)
                pre_img2.append(p)
        mix_params = []
        for t in self.mix:
            if x2 is None:
                mix_params.append(None)
                continue
            x, p = t.sample(x, generator, x2)
            mix_params.append(p)
        if any(p is not None for p in mix_params):
            return x, [int(partner[0]), *zip(pre_img, pre_img2), *mix_params]
        return x, [None, *pre_img, *mix_params]

    def apply(
        self,
        x: torch.Tensor,
        params: Sequence[Params],
        partner_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Replay ``params`` on x; the raw image of dataset index id2 is needed when id2 is set."""
        if len(params) != len(self.transforms) + 1:
            raise ValueError(
                f"expected {len(self.transforms) + 1} params ([id2] + one per transform), "
                f"got {len(params)}"
            )
        id2, pre, mix = (
            params[0],
            params[1 : 1 + len(self.pre)],
            params[1 + len(self.pre) :],
        )
        if id2 is not None and partner_image is None:
            raise ValueError(
                f"these params mix with dataset index {id2}; pass its image"
            )
        x2 = partner_image if id2 is not None else None
        for t, p in zip(self.pre, pre):
            if id2 is None:
                x = t.apply(x, p)
            else:
                x, x2 = t.apply(x, p[0]), t.apply(x2, p[1])
        for t, p in zip(self.mix, mix):
            x = t.apply(x, p, x2)
        return x

    def compress(self, params: Sequence[Params]) -> list[float]:
        """Flat numbers: [id2 or -1], then each θ (pre-mixing ones twice while mixing)."""
        id2 = params[0]
        flat = [-1.0 if id2 is None else float(id2)]
        for i, t in enumerate(self.transforms):
            p = params[1 + i]
            if id2 is not None and not t.mixing:
                flat += t.encode(p[0]) + t.encode(p[1])
            else:
                flat += t.encode(p)
        return flat

    def decompress(self, flat: Sequence[float]) -> list[Params]:
        id2 = None if flat[0] < 0 else int(flat[0])
        params: list[Params] = [id2]
        pos = 1
        for t in self.transforms:
            if id2 is not None and not t.mixing:
                p_img, pos = t.decode(flat, pos)
                p_img2, pos = t.decode(flat, pos)
                params.append((p_img, p_img2))
            else:
                p, pos = t.decode(flat, pos)
                params.append(p)
        if pos != len(flat):
            raise ValueError(
                f"compressed params have {len(flat)} numbers, decoded {pos}"
            )
        return params
