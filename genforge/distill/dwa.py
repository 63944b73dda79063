"""Diversity-driven synthesis by directed weight adjustment (DWA; Du et al., NeurIPS 2024, arXiv 2409.17612).

DWA is SRe2L's recover step (Yin et al., NeurIPS 2023, arXiv 2306.13092) run against a
teacher perturbed in a batch-specific direction. For every batch ``ipc_id`` (one image per
class, initialised from real images):

1. Directed weight adjustment (Sec. 3.3, Eq. 9-10; ``Perterb.first_step`` in the code), done
   once before any pixel update: K times, g = ∇_θ CE(f_θ(x_jit), y) on the batch's real
   initialisation and θ ← θ + (ρ/K)·g/‖g‖₂ with the global norm over all parameters. The
   step is never undone, so ‖Δθ‖ ≤ ρ, and BN running statistics are untouched.
2. Recovery (SRe2L Eq. 4-6 with DWA's variance weight): Adam (betas 0.5, 0.9) on the pixels
   with a cosine lr, each step on a randomly rolled copy x_jit, minimising

       CE(f_θ̃(x_jit), y) + r_bn · Σ_l m_l (r_var·‖σ²_l(x) − σ̂²_l‖₂ + ‖μ_l(x) − μ̂_l‖₂)

   over the inputs of every BatchNorm2d (m_1 = 10, others 1); then the pixels are clipped to
   the valid [0, 1] box in normalised space. The last iterate is kept.

The teacher is copied fresh for every batch and stays in ``eval()``. ρ = 0 (or K = 0) is
SRe2L exactly. The adjustment takes gradients with respect to the weights only: the
released code lets those K backward passes also accumulate into the pixels' gradient, which
would make ρ = 0 differ from SRe2L. Soft labels are the unperturbed teacher's tempered
probabilities on the final images.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from genforge.core.state_dict import load_state_dict_strict, read_state_dict
from genforge.distill.data import RealData
from genforge.distill.evaluate import EvalOptions, train_network
from genforge.distill.fyi import flip_concat
from genforge.distill.networks import build_convnet
from genforge.distill.seeding import INIT_STREAM, stream, stream_seed
from genforge.distill.state import check_settings, read_safetensors, save_safetensors, tensors_digest

__all__ = ["BNStatisticsLoss", "DWAOptions", "directed_weight_adjustment", "distill_dwa", "load_teacher",
           "recover_batch", "teacher_training", "train_teacher"]


@dataclass
class DWAOptions:
    """DWA's recover settings (defaults: the CIFAR script) and the teacher trained when none is given."""

    iterations: int = 1000
    lr: float = 0.25
    beta1: float = 0.5
    beta2: float = 0.9
    jitter: int = 4
    r_bn: float = 0.01
    first_bn_multiplier: float = 10.0
    r_var: float = 11.0
    rho: float = 15e-3
    steps: int = 12
    temperature: float = 4.0
    teacher_width: int = 32
    teacher_depth: int = 2
    teacher_epochs: int = 300

    def check(self) -> None:
        if self.iterations < 1 or self.steps < 0 or self.jitter < 0 or self.teacher_epochs < 1:
            raise ValueError("iterations and teacher_epochs must be positive; steps and jitter non-negative")
        if self.rho < 0:
            raise ValueError(f"rho must be >= 0, got {self.rho}")
        if self.lr <= 0 or self.temperature <= 0:
            raise ValueError("lr and temperature must be > 0")


class BNStatisticsLoss:
    """Σ_l m_l (r_var·‖σ²_l − σ̂²_l‖₂ + ‖μ_l − μ̂_l‖₂) over the inputs of every ``BatchNorm2d``.

    Use as a context manager around the forward pass; ``value()`` then returns the sum.
    The batch variance is the biased one, per channel over (B, H, W).
    """

    def __init__(self, model: nn.Module, r_var: float, first_multiplier: float):
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no BatchNorm2d layer: SRe2L/DWA match BN statistics")
        self.r_var, self.first_multiplier = r_var, first_multiplier
        self.terms: list[Tensor] = []
        self.handles = []

    def _hook(self, module: nn.BatchNorm2d, inputs, output) -> None:
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.transpose(0, 1).flatten(1).var(dim=1, unbiased=False)
        self.terms.append(self.r_var * torch.linalg.vector_norm(module.running_var - var)
                          + torch.linalg.vector_norm(module.running_mean - mean))

    def __enter__(self) -> "BNStatisticsLoss":
        self.terms = []
        self.handles = [layer.register_forward_hook(self._hook) for layer in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def value(self) -> Tensor:
        weights = [self.first_multiplier] + [1.0] * (len(self.terms) - 1)
        return sum(w * t for w, t in zip(weights, self.terms))


def directed_weight_adjustment(teacher: nn.Module, x: Tensor, y: Tensor, rho: float, steps: int) -> None:
    """θ ← θ + (ρ/K)·∇_θCE/‖∇_θCE‖, K = ``steps`` times, in place (DWA Eq. 9-10)."""
    params = [p for p in teacher.parameters() if p.requires_grad]
    for _ in range(steps if rho > 0 else 0):
        grads = torch.autograd.grad(F.cross_entropy(teacher(x), y), params, allow_unused=True)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads if g is not None]))
        scale = rho / steps / (norm + 1e-12)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p.add_(g, alpha=float(scale))


def _jitter(x: Tensor, limit: int, generator: torch.Generator) -> Tensor:
    dy, dx = (int(v) for v in torch.randint(0, limit + 1, (2,), generator=generator))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def recover_batch(teacher: nn.Module, init: Tensor, targets: Tensor, options: DWAOptions, box: tuple[Tensor, Tensor],
                  generator: torch.Generator, *, flip: bool = False) -> Tensor:
    """One DWA batch: adjust a fresh copy of ``teacher`` on ``init``, then recover the pixels."""
    model = copy.deepcopy(teacher).eval()
    x = init.detach().clone().requires_grad_(True)
    low, high = box

    def view(images: Tensor) -> tuple[Tensor, Tensor]:
        jittered = _jitter(images, options.jitter, generator)
        return flip_concat(jittered, targets) if flip else (jittered, targets)

    optimizer = torch.optim.Adam([x], lr=options.lr, betas=(options.beta1, options.beta2), eps=1e-8)
    bn_loss = BNStatisticsLoss(model, options.r_var, options.first_bn_multiplier)
    for it in range(options.iterations):
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * (1 + math.cos(math.pi * it / options.iterations)) * options.lr
        x_jit, y = view(x)
        if it == 0:
            directed_weight_adjustment(model, x_jit.detach(), y, options.rho, options.steps)
        with bn_loss:
            logits = model(x_jit)
        loss = F.cross_entropy(logits, y) + options.r_bn * bn_loss.value()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            x.copy_(torch.maximum(torch.minimum(x, high), low))
    return x.detach()


def teacher_training(options: DWAOptions) -> EvalOptions:
    """How the teacher is trained: the evaluation recipe for ``teacher_epochs``, batches of 256."""
    return EvalOptions(epochs=options.teacher_epochs, batch_size=256)


def train_teacher(real: RealData, options: DWAOptions, seed: int, *, progress: bool = True) -> nn.Module:
    """The squeeze step: a ConvNetBN trained on the real train set with the evaluation recipe
    (VICO's loop, so ``teacher_epochs`` + 1 passes)."""
    channels, size = real.image_shape[0], real.image_shape[1]
    net = build_convnet(channels, real.num_classes, size, width=options.teacher_width,
                        depth=options.teacher_depth, norm="batchnorm", seed=stream_seed(seed, 1 << 23))
    with tqdm(total=1, desc="training the teacher", disable=not progress) as bar:
        train_network(net, real.images, real.labels, teacher_training(options), stream(seed, 1 << 24))
        bar.update()
    return net.eval()


def load_teacher(path: str | Path, real: RealData, options: DWAOptions) -> nn.Module:
    """A ConvNetBN teacher (``teacher_width``/``teacher_depth``) from a safetensors or torch file."""
    channels, size = real.image_shape[0], real.image_shape[1]
    net = build_convnet(channels, real.num_classes, size, width=options.teacher_width,
                        depth=options.teacher_depth, norm="batchnorm")
    load_state_dict_strict(net, read_state_dict(path), what=f"teacher {path}")
    return net.eval()


def _pixel_box(real: RealData) -> tuple[Tensor, Tensor]:
    """The [0, 1] pixel range in normalised space, per channel, as ``(1, C, 1, 1)`` bounds."""
    zeros = torch.zeros(1, real.image_shape[0], 1, 1)
    return real.normalisation(zeros), real.normalisation(zeros + 1)


def distill_dwa(real: RealData, teacher: nn.Module, options: DWAOptions, *, ipc: int, seed: int, flip: bool = False,
                ipc_ids: list[int] | None = None, output_dir: str | Path | None = None, resume: bool = False,
                progress: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Images, hard labels and teacher soft labels of batches ``ipc_ids`` (default ``range(ipc)``).

    Each finished batch is written to ``<output_dir>/dwa_batches/ipc_<k>.safetensors`` with
    the settings that made it (seed, flip, the recover options, the sha256 of the teacher's
    weights and of the real data); ``resume=True`` reuses the batches already there and
    refuses one made with other settings, naming the keys.
    """
    options.check()
    if real.zca is not None:
        raise ValueError("DWA clips pixels to the [0, 1] box in normalised space; it cannot run on ZCA-whitened data")
    real.check_ipc(ipc)  # each batch starts from a distinct real image per class
    ipc_ids = list(range(ipc)) if ipc_ids is None else list(ipc_ids)
    teacher = teacher.eval()
    box = _pixel_box(real)
    targets = torch.arange(real.num_classes)
    batches = Path(output_dir) / "dwa_batches" if output_dir is not None else None
    recover = {k: v for k, v in asdict(options).items() if k != "temperature" and not k.startswith("teacher_")}
    tag = {"seed": seed, "flip": flip, "options": recover, "data": real.fingerprint,
           "teacher": tensors_digest(teacher.state_dict())}
    images = []
    for ipc_id in tqdm(ipc_ids, desc=f"DWA rho={options.rho:g}", disable=not progress):
        file = batches / f"ipc_{ipc_id}.safetensors" if batches is not None else None
        if resume and file is not None and file.is_file():
            tensors, meta = read_safetensors(file, "DWA batch")
            check_settings(file, json.loads(meta["run"]) if "run" in meta else None, tag)
            images.append(tensors["images"])
            continue
        # batch k starts from the k-th image of each class's seeded draw: the images the random
        # subset of the same seed holds, distinct across batches
        init = torch.stack([real.sample(c, ipc_id + 1, stream(seed, c, INIT_STREAM))[ipc_id]
                            for c in range(real.num_classes)])
        batch = recover_batch(teacher, init, targets, options, box, stream(seed, ipc_id), flip=flip)
        if file is not None:
            save_safetensors(file, {"images": batch}, metadata={"run": json.dumps(tag, sort_keys=True)})
        images.append(batch)
    x = torch.stack(images, dim=1).flatten(0, 1)  # class-major: (K * len(ipc_ids), C, H, W)
    labels = targets.repeat_interleave(len(ipc_ids))
    with torch.no_grad():
        soft = F.softmax(teacher(x) / options.temperature, dim=1)
    return x, labels, soft


