"""The one training loop every method runs through.

`train(recipe)` looks the recipe's method up in the registry and runs it with
`accelerate`: devices, DDP, mixed precision and gradient accumulation are Accelerator
features. Around them the loop adds AdamW or SGD with the method's parameter groups,
linear LR warm-up then a constant or stepped LR, EMA, atomic checkpoints, JSON-lines logging, a tqdm bar on
the main process, and a step and wall-time budget.

A step is one optimizer update of `grad_accum` micro-batches of `data.batch_size` per
process. Resume is exact (bitwise on CPU): the data order is a pure function of
(seed, micro-batch index) -- epoch e is shuffled by a generator seeded from (seed, e) and
each process takes its shard -- so a resumed run restarts the stream at the saved
micro-batch count instead of replaying the loader; and every RNG state (python, numpy,
torch CPU/CUDA) is restored from the checkpoint after the model is built, so the noise a
method draws from torch's global RNG continues exactly where it stopped.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast, send_to_device, set_seed
from safetensors.torch import save_model
from tqdm.auto import tqdm

from genforge.config import ConfigError, Recipe, save_recipe
from genforge.core.io import write_json
from genforge.data import check_dataset
from genforge.train.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint,
                                       resume_latest, save_checkpoint)
from genforge.train.ema import EMA
from genforge.train.registry import get_method
from genforge.train.resume import check_resume_settings, record_resume

__all__ = ["TrainResult", "train"]


@dataclass
class TrainResult:
    """What a finished `train` call did."""

    steps: int
    final_loss: float | None
    output_dir: Path
    metrics: dict = field(default_factory=dict)
    resumed_from: int | None = None
    stopped_by_time: bool = False


def _seed_from(*values: int) -> int:
    return int(np.random.SeedSequence(list(values)).generate_state(1)[0])


class _BatchStream(torch.utils.data.Sampler):
    """Endless batches of dataset indices for one process, starting at micro-batch `start`.

    Micro-batch k of the run is slice `(k mod E) * P + rank` of epoch `k // E`'s
    permutation (E full batches per epoch over P processes; the ragged tail is dropped).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int, world: int,
                 start: int):
        self.per_epoch = num_items // (batch_size * world)
        if self.per_epoch == 0:
            raise ValueError(f"the dataset has {num_items} items, fewer than one batch of "
                             f"{batch_size} for each of {world} processes")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world, self.start = rank, world, start

    def __iter__(self):
        position, epoch, perm = self.start, None, None
        while True:
            if position // self.per_epoch != epoch:
                epoch = position // self.per_epoch
                gen = torch.Generator().manual_seed(_seed_from(self.seed, epoch))
                perm = torch.randperm(self.num_items, generator=gen)
            first = ((position % self.per_epoch) * self.world + self.rank) * self.batch_size
            yield perm[first:first + self.batch_size].tolist()
            position += 1


def _lr_factor(warmup_steps: int, milestones=(), gamma: float = 0.1):
    """LR factor of optimizer step s: linear from 1/(W+1) to 1 over W steps, times gamma for
    every milestone reached (s >= m).

    A closure (not an object) so LambdaLR's state_dict stores nothing of it and a resumed
    run takes the schedule from its recipe.
    """
    milestones = sorted(milestones)
    return lambda s: min(1.0, (s + 1) / (warmup_steps + 1)) * gamma ** sum(s >= m for m in milestones)


def _optimizer(tc, params) -> torch.optim.Optimizer:
    """AdamW or SGD over ``params`` (a parameter iterable or a list of groups with their own lr)."""
    if tc.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    return torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)


def _resume_point(output_dir: Path, resume, resume_from) -> Path | str | None:
    """Where to resume: a checkpoint path (`resume_from`), "latest" (the newest intact
    checkpoint, found after the model is built) or None (a fresh start).

    Errors for `resume=True` without a checkpoint, for a `resume_from` that is not a
    checkpoint directory, and for a fresh start over an existing run (which would mix two
    runs' checkpoints).
    """
    if resume_from is not None:
        path = Path(resume_from)
        if not (path / "manifest.json").is_file():
            raise CheckpointError(f"--resume-from {path}: not a checkpoint directory (expected "
                                  f"<output_dir>/checkpoints/step_NNNNNNN with a manifest.json)")
        return path
    latest = latest_checkpoint(output_dir)
    if resume is True and latest is None:
        raise CheckpointError(f"no checkpoint found in {output_dir / 'checkpoints'}")
    if not resume and latest is not None:
        raise CheckpointError(f"{output_dir} already holds checkpoints (latest {latest.name}); "
                              f"resume it (--resume) or choose another output_dir")
    return "latest" if latest is not None else None


def _check_output_dir(out: Path) -> None:
    """Refuse, before any work, an output or checkpoint path that is a file."""
    for path in (out, out / "checkpoints"):
        if path.exists() and not path.is_dir():
            raise CheckpointError(f"{path} is a file; output_dir and its checkpoints/ must be "
                                  f"directories (choose another output_dir)")


def _truncate_log(log_path: Path, step: int) -> None:
    """Drop log lines a killed run wrote after the checkpoint we resume from (and a line
    cut short by the kill)."""
    if not log_path.is_file():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    log_path.write_text("".join(kept))


class _Log:
    """Means over the steps since the last log line -> train_log.jsonl and the progress bar.

    Scalars stay tensors until a line is written, so logging does not sync the GPU each step.
    """

    def __init__(self, accelerator, path: Path, images_per_step: int, progress):
        self.accelerator, self.path, self.progress = accelerator, path, progress
        self.images_per_step = images_per_step
        self.losses, self.scalars, self.start = [], {}, time.monotonic()

    def add_loss(self, loss: torch.Tensor) -> None:
        self.losses.append(loss)
        self.progress.update(1)

    def add_scalars(self, scalars: dict) -> None:
        for key, value in scalars.items():
            self.scalars.setdefault(key, []).append(
                value.detach() if isinstance(value, torch.Tensor) else value)

    def emit(self, step: int, lr: float) -> None:
        # Means over every process (each saw its shard of the global batch), one reduce a key.
        device = self.accelerator.device
        means = {k: torch.stack([torch.as_tensor(v, dtype=torch.float32).to(device) for v in vs]).mean()
                 for k, vs in {"loss": self.losses, **self.scalars}.items()}
        means = {k: self.accelerator.reduce(v, "mean").item() for k, v in means.items()}
        loss = means.pop("loss")
        elapsed = max(time.monotonic() - self.start, 1e-9)
        row = {"step": step, "loss": loss, "lr": lr,
               "images_per_s": self.images_per_step * len(self.losses) / elapsed, **means}
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.progress.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.3g}")
            self.progress.write(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in row.items()))
        self.losses, self.scalars, self.start = [], {}, time.monotonic()


def _save_weights(model: torch.nn.Module, directory: Path) -> None:
    """`save_pretrained` when the model has it (diffusers/transformers), else safetensors."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(directory)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        save_model(model, str(directory / "model.safetensors"), force_contiguous=True)


def train(recipe: Recipe, *, resume: bool | str = False, resume_from=None,
          method=None) -> TrainResult:
    """Train `recipe`'s method; `resume`: True (newest intact checkpoint, error if none),
    "auto" (newest intact if any) or False (fresh; error if the output dir already holds
    checkpoints). `resume_from` names one checkpoint directory to continue from instead.

    `method` overrides the registry lookup with a ready `Method` instance.
    """
    if resume not in (True, False, "auto"):
        raise ValueError(f"resume must be True, False or 'auto', got {resume!r}")
    method = method if method is not None else get_method(recipe.method)(recipe)
    method.validate_model_config(recipe.model)
    try:
        check_dataset(recipe.data.name, root=recipe.data.root, resize=recipe.data.resize)
    except ValueError as err:
        raise ConfigError(f"recipe for method {recipe.method!r}: data: {err}") from None
    tc, out = recipe.train, Path(recipe.output_dir)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=method.find_unused_parameters)
    # cpu=True without CUDA: otherwise accelerate ignores torchrun's processes on a CPU machine
    # and each one trains alone as the "main" process, writing the same files.
    # step_scheduler_with_optimizer=False: our LR schedule counts optimizer steps, while
    # accelerate would step it once per process.
    accelerator = Accelerator(gradient_accumulation_steps=tc.grad_accum, mixed_precision=tc.mixed_precision,
                              cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp],
                              step_scheduler_with_optimizer=False)
    _check_output_dir(out)
    checkpoint = _resume_point(out, resume, resume_from)
    # the run the checkpoint belongs to: <run>/checkpoints/step_N
    run_of = Path(checkpoint).parents[1] if isinstance(checkpoint, Path) else out
    changed = check_resume_settings(run_of, recipe) if checkpoint is not None else {}
    if accelerator.is_main_process:
        save_recipe(recipe, out / "recipe.yaml")

    set_seed(recipe.seed, device_specific=True)
    model = method.build_model()
    groups = method.parameter_groups(model)
    optimizer = _optimizer(tc, groups if groups is not None else model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_factor(tc.warmup_steps, tc.lr_milestones, tc.lr_gamma))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    raw_model = accelerator.unwrap_model(model)
    ema = EMA(raw_model, decay=tc.ema_decay, warmup=tc.ema_warmup)
    method.ema_model = ema.module  # the live EMA copy, for methods whose step uses it (ENAT)
    dataset = method.train_dataset()

    step = position = 0
    if checkpoint == "latest":
        checkpoint, restored = resume_latest(accelerator, out, ema=ema)
    elif checkpoint is not None:
        restored = load_checkpoint(accelerator, checkpoint, ema=ema)
    if checkpoint is not None:
        step, position = restored["step"], restored["data_position"]
        if accelerator.is_main_process:
            _truncate_log(out / "train_log.jsonl", step)
            record_resume(out, step, changed)
        accelerator.print(f"resumed from {checkpoint}"
                          + (f" with changed {', '.join(changed)}" if changed else ""))
    resumed_from, last_saved = (step if checkpoint is not None else None), step

    stream = _BatchStream(len(dataset), recipe.data.batch_size, recipe.seed,
                          accelerator.process_index, accelerator.num_processes, position)
    # Our own generator: otherwise creating the iterator would draw from the global RNG.
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=stream, num_workers=recipe.data.num_workers,
        generator=torch.Generator().manual_seed(_seed_from(recipe.seed, position)),
        pin_memory=accelerator.device.type == "cuda")
    batches = iter(loader)

    images_per_step = recipe.data.batch_size * tc.grad_accum * accelerator.num_processes
    progress = tqdm(total=tc.max_steps, initial=step, desc=f"train {recipe.method}",
                    disable=not accelerator.is_local_main_process)
    log = _Log(accelerator, out / "train_log.jsonl", images_per_step, progress)
    deadline = None if tc.max_minutes is None else time.monotonic() + 60 * tc.max_minutes
    final_loss, stopped_by_time = None, False
    model.train()
    while step < tc.max_steps:
        micro_losses = []
        for _ in range(tc.grad_accum):
            batch = send_to_device(next(batches), accelerator.device)
            position += 1
            with accelerator.accumulate(model):
                loss, scalars = method.training_step(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and tc.grad_clip is not None:
                    accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro_losses.append(loss.detach().float())
            log.add_scalars(scalars)
        scheduler.step()
        ema.update(raw_model)
        step += 1
        final_loss = torch.stack(micro_losses).mean()
        log.add_loss(final_loss)
        if step % tc.log_every == 0 or step == tc.max_steps:
            log.emit(step, scheduler.get_last_lr()[0])

        if deadline is not None:  # every process must agree, or they would deadlock
            flag = torch.tensor([int(time.monotonic() > deadline)], device=accelerator.device)
            stopped_by_time = bool(broadcast(flag).item()) and step < tc.max_steps
        if step % tc.checkpoint_every == 0 or stopped_by_time:
            save_checkpoint(accelerator, out, step, ema=ema, data_position=position,
                            keep=tc.keep_checkpoints)
            last_saved = step
            if accelerator.is_main_process:
                method.on_checkpoint(ema.module, out, step)
        if stopped_by_time:
            break
    progress.close()
    if final_loss is not None:
        final_loss = final_loss.item()
    if last_saved != step:
        save_checkpoint(accelerator, out, step, ema=ema, data_position=position,
                        keep=tc.keep_checkpoints)
        if accelerator.is_main_process:
            method.on_checkpoint(ema.module, out, step)
    if stopped_by_time:
        message = (f"train.max_minutes={tc.max_minutes} CUT TRAINING SHORT at step {step} of "
                   f"{tc.max_steps}: this run is not the recipe's result (resume with --resume "
                   f"to finish it)")
        accelerator.print(f"WARNING: {message}")
        warnings.warn(message, stacklevel=2)

    accelerator.wait_for_everyone()
    raw_model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    ema_model = ema.module
    if accelerator.is_main_process:
        _save_weights(raw_model, out / "model")
        _save_weights(ema_model, out / "ema")
    metrics = method.on_train_end(ema_model, accelerator, out) or {}
    if stopped_by_time:
        metrics = {**metrics, "stopped_by_time": {"step": step, "max_steps": tc.max_steps,
                                                  "max_minutes": tc.max_minutes}}
    if accelerator.is_main_process:
        write_json(out / "metrics.json", metrics, indent=2, default=float)
        if metrics:
            accelerator.print("metrics: " + json.dumps(metrics, default=float))
    return TrainResult(steps=step, final_loss=final_loss, output_dir=out, metrics=metrics,
                       resumed_from=resumed_from, stopped_by_time=stopped_by_time)
