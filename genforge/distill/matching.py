"""The matching loop shared by DM and DataDAM: synthetic pixels updated against random networks.

Each iteration (DM: Zhao & Bilen, WACV 2023, arXiv 2110.04181, Alg. 1; DataDAM: Sajedi et
al., ICCV 2023, arXiv 2310.00093, Alg. 1):

1. draw a freshly initialised ConvNet, freeze its parameters (it stays in train mode, with
   no inner training);
2. for every class take ``batch_real`` real images and that class's synthetic images (with
   FYI, the synthetic images and their mirrors), and augment both with one shared DSA seed;
3. compute the engine's objective on the concatenated real batch (detached) and synthetic
   batch, and take one SGD step (momentum 0.5) on the synthetic pixels only.

Classes are independent given the network when the norm is per-sample (instance norm or
none), so ``classes`` lets several processes each distil a share of them; with batch norm
all classes share the batch statistics and must be distilled by one process.
Every ``checkpoint_every`` iterations the images and the optimiser state are written
atomically to ``<output_dir>/distill_state.safetensors`` with the run's settings and the
sha256 of the real data; ``resume=True`` continues from it (possibly to a larger
``iterations``; any other changed setting, or other data, is refused, naming the keys).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from genforge.distill.data import RealData
from genforge.distill.dsa import DSA, check_strategy
from genforge.distill.fyi import flip_concat
from genforge.distill.networks import ConvNet, ConvNetConfig, build_convnet
from genforge.distill.seeding import NET, stream, stream_seed
from genforge.distill.state import check_settings, read_safetensors, save_safetensors
from genforge.distill.synthetic import initial_images

__all__ = ["MatchingOptions", "Objective", "class_means", "distill_by_matching"]

# objective(net, real_batches, syn_batches) -> (loss, scalars to log); one tensor per class
Objective = Callable[[ConvNet, list[Tensor], list[Tensor]], tuple[Tensor, dict]]


@dataclass
class MatchingOptions:
    """Options of the matching engines (defaults: DataDAM's code at low IPC; DM's ``DMOptions``
    takes its own code's ``batch_real`` of 256)."""

    iterations: int = 1000
    lr_img: float = 1.0
    momentum: float = 0.5
    batch_real: int = 64
    init: str = "real"
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    net_width: int = 128
    net_depth: int = 3
    net_norm: str = "instancenorm"
    checkpoint_every: int = 200

    def check(self) -> None:
        for name in ("iterations", "batch_real", "checkpoint_every"):
            if getattr(self, name) < (0 if name == "iterations" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr_img <= 0:
            raise ValueError(f"lr_img must be > 0, got {self.lr_img}")
        check_strategy(self.dsa_strategy)
        self.net_config()

    def net_config(self) -> ConvNetConfig:
        return ConvNetConfig(width=self.net_width, depth=self.net_depth, norm=self.net_norm)


def class_means(x: Tensor, sizes: list[int]) -> Tensor:
    """``(K, D)`` means of the consecutive per-class chunks of ``x`` (``(sum(sizes), D)``)."""
    return torch.stack([chunk.mean(0) for chunk in x.flatten(1).split(sizes)])


def _state_file(output_dir: Path) -> Path:
    return output_dir / "distill_state.safetensors"


def _save_state(output_dir: Path, images: Tensor, optimizer: torch.optim.SGD, iteration: int, tag: dict) -> None:
    buffer = optimizer.state[images].get("momentum_buffer")
    tensors = {"images": images}
    if buffer is not None:
        tensors["momentum_buffer"] = buffer
    save_safetensors(_state_file(output_dir), tensors,
                     metadata={"iteration": str(iteration), "run": json.dumps(tag, sort_keys=True)})


def _load_state(output_dir: Path, images: Tensor, optimizer: torch.optim.SGD, tag: dict) -> int:
    file = _state_file(output_dir)
    if not file.is_file():
        raise FileNotFoundError(f"resume=True but there is no distillation state at {file}")
    tensors, meta = read_safetensors(file, "distillation state")
    check_settings(file, json.loads(meta["run"]) if "run" in meta else None, tag)
    if tensors["images"].shape != images.shape:
        raise ValueError(f"{file} holds images {tuple(tensors['images'].shape)}, expected {tuple(images.shape)}")
    with torch.no_grad():
        images.copy_(tensors["images"])
    if "momentum_buffer" in tensors:
        optimizer.state[images]["momentum_buffer"] = tensors["momentum_buffer"].to(images)
    return int(meta["iteration"])


def distill_by_matching(real: RealData, objective: Objective, options: MatchingOptions, *, ipc: int, seed: int,
                        flip: bool = False, classes: list[int] | None = None, output_dir: str | Path | None = None,
                        resume: bool = False, progress: bool = True, desc: str = "distilling",
                        run_tag: dict | None = None) -> tuple[Tensor, Tensor]:
    """Synthetic ``(images, labels)`` for ``classes`` (default: all), ``ipc`` per class."""
    options.check()
    classes = list(range(real.num_classes)) if classes is None else list(classes)
    if classes != list(range(real.num_classes)) and options.net_norm == "batchnorm":
        raise ValueError("distilling a subset of the classes needs a per-sample norm (instancenorm or none): "
                         "with batchnorm every class shares the batch statistics")
    images, labels = initial_images(real, classes, ipc, options.init, seed)
    images = images.to(real.images.device).requires_grad_(True)
    optimizer = torch.optim.SGD([images], lr=options.lr_img, momentum=options.momentum)
    dsa = DSA(options.dsa_strategy)
    channels, size = real.image_shape[0], real.image_shape[1]
    output_dir = Path(output_dir) if output_dir is not None else None
    settings = {k: v for k, v in asdict(options).items() if k not in ("iterations", "checkpoint_every")}
    tag = dict(run_tag or {}, ipc=ipc, seed=seed, flip=flip, classes=classes, options=settings, data=real.fingerprint)
    start = _load_state(output_dir, images, optimizer, tag) if resume and output_dir is not None else 0

    bar = tqdm(range(start, options.iterations), desc=desc, disable=not progress, initial=start,
               total=options.iterations)
    for it in bar:
        net = build_convnet(channels, real.num_classes, size, width=options.net_width, depth=options.net_depth,
                            norm=options.net_norm, seed=stream_seed(seed, it, NET))
        net = net.to(images.device).train().requires_grad_(False)
        real_batches, syn_batches = [], []
        for k, c in enumerate(classes):
            g = stream(seed, it, c)
            real_c = real.sample(c, options.batch_real, g)
            syn_c = images[k * ipc:(k + 1) * ipc]
            if flip:
                syn_c, _ = flip_concat(syn_c)
            aug_seed = int(torch.randint(1 << 30, (1,), generator=g))
            real_batches.append(dsa(real_c, seed=aug_seed))
            syn_batches.append(dsa(syn_c, seed=aug_seed))
        loss, logs = objective(net, real_batches, syn_batches)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", **{k: f"{v:.4f}" for k, v in logs.items()}, refresh=False)
        done = it + 1
        if output_dir is not None and (done % options.checkpoint_every == 0 or done == options.iterations):
            _save_state(output_dir, images, optimizer, done, tag)
    bar.close()
    return images.detach(), labels
