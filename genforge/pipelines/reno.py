"""ReNO: reward-based noise optimisation (Eyring et al., NeurIPS 2024, arXiv 2406.04312).

ReNO treats the initial noise z of a one-step (or few-step) generator G as the only trainable
tensor and minimises, with the generator and the reward models frozen (paper Sec. 3; official
code ExplainableML/ReNO ``training/trainer.py``):

    L(z) = sum_i w_i * L_i(G(z, c), c)  +  K(z)                                   (objective)
    L_i  = offset_i - R_i(image, prompt)                  (:mod:`genforge.rewards`)
    K(z) = lambda * (||z||^2 / 2 - (d - 1) * log ||z||),  d = numel of one sample's z   (norm prior)

K is the negative log-density of the chi_d-distributed norm of a d-dimensional standard
Gaussian; its minimum is at ||z|| = sqrt(d - 1). It is computed in fp32 with the norm clamped
away from 0 (the official fp16 version can reach -inf). The loop, per iteration:

1. zero the gradient; re-seed the pipeline's generator with the fixed seed (so an ancestral
   scheduler sees the same noise every iteration);
2. render G(z, c) through the pipeline's own ``__call__`` (encode prompt, prepare latents with
   ``latents=z``, denoise, decode) with its ``no_grad`` decorator removed, and score it;
3. keep the image as the best so far when the reward loss sum_i w_i L_i (without K) is lower;
4. unless this is the last iteration: backpropagate L (reward gradients first, one reward at a
   time, then through the generator), clip the gradient norm to ``grad_clip`` and step
   SGD (lr 5, momentum 0.9, Nesterov) or Adam (eps 1e-2).

Official defaults: 50 iterations, lr 5, grad_clip 0.1, lambda 0.01, one inference step. Where we
differ on purpose: several latents can be optimised at once (one per prompt), each with its own
gradient-norm clip, regulariser and best image, which for one latent is exactly the official
loop; a reward of weight 0 is not evaluated (officially it is computed and logged); the official
SD path decodes with a hard-coded 1/0.18215, here the pipeline's own ``vae.config.scaling_factor``.

:func:`best_of_n` is the official ``imageselect`` baseline: the best of N fresh random latents
under the same rewards, no gradient, with the first candidate ReNO's own initial latent.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from genforge.pipelines.class_conditional import ClassConditionalPipeline, sample_shape
from genforge.rewards import Reward, load

__all__ = ["RenoResult", "best_of_n", "clip_grad_norm_per_sample_", "latent_shape", "norm_prior", "optimize",
           "prepare_pipeline", "render", "supported_pipelines"]


def supported_pipelines() -> tuple[type, ...]:
    """Pipeline classes ReNO renders through (and their subclasses)."""
    from diffusers import PixArtAlphaPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionPipeline, StableDiffusionXLPipeline, PixArtAlphaPipeline, ClassConditionalPipeline


def _check_pipeline(pipe) -> None:
    if not isinstance(pipe, supported_pipelines()):
        names = ", ".join(cls.__name__ for cls in supported_pipelines())
        raise TypeError(f"ReNO cannot render through a {type(pipe).__name__}; supported pipelines: {names} "
                        f"(and their subclasses)")


def _denoiser(pipe):
    if isinstance(pipe, ClassConditionalPipeline):
        return pipe.model
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def prepare_pipeline(pipe, gradient_checkpointing: bool = True):
    """Freeze ``pipe`` in place for ReNO: every component in eval mode without gradients,
    gradient checkpointing on (or off) in the denoiser and VAE where they support it, and the
    pipeline's own per-call progress bar off."""
    _check_pipeline(pipe)
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
    for module in (_denoiser(pipe), getattr(pipe, "vae", None)):
        if getattr(module, "_supports_gradient_checkpointing", False):
            (module.enable_gradient_checkpointing if gradient_checkpointing else module.disable_gradient_checkpointing)()
    return pipe


def latent_shape(pipe, batch: int, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
    """Shape of the noise ``pipe`` starts from for ``batch`` images (height/width in pixels)."""
    config = _denoiser(pipe).config
    if isinstance(pipe, ClassConditionalPipeline):
        return (batch, config.in_channels, *sample_shape(config.sample_size))
    scale = pipe.vae_scale_factor
    height, width = height or config.sample_size * scale, width or config.sample_size * scale
    return batch, config.in_channels, height // scale, width // scale


def render(pipe, z: torch.Tensor, prompts, *, num_inference_steps: int = 1, guidance_scale: float = 1.0,
           generator: torch.Generator | None = None, **call_kwargs) -> torch.Tensor:
    """G(z, c): images (B, C, H, W) in [0, 1] from ``pipe``'s own ``__call__`` without ``no_grad``,
    differentiable in ``z`` (cast to the denoiser's dtype, so an fp16 generator takes an fp32 z)."""
    call = type(pipe).__call__.__wrapped__  # torch.no_grad's decorator keeps the function here
    z = z.to(_denoiser(pipe).dtype)
    if isinstance(pipe, ClassConditionalPipeline):
        out = call(pipe, class_labels=prompts, latents=z, guidance_scale=guidance_scale,
                   num_inference_steps=num_inference_steps, generator=generator, output_type="pt",
                   return_dict=False, **call_kwargs)
    else:
        height, width = z.shape[-2] * pipe.vae_scale_factor, z.shape[-1] * pipe.vae_scale_factor
        out = call(pipe, prompt=prompts, latents=z, height=height, width=width, guidance_scale=guidance_scale,
                   num_inference_steps=num_inference_steps, generator=generator, output_type="pt",
                   return_dict=False, **call_kwargs)
    return out[0]


def norm_prior(z: torch.Tensor, weight: float, eps: float = 1e-12) -> torch.Tensor:
    """K(z) per sample (B,): weight * (||z||^2 / 2 - (d - 1) log ||z||), in fp32."""
    flat = z.float().flatten(1)
    norm = flat.norm(dim=1).clamp_min(eps)
    return weight * (0.5 * norm**2 - (flat.shape[1] - 1) * norm.log())


def clip_grad_norm_per_sample_(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale each sample's gradient in place to norm <= ``max_norm`` (torch's
    ``clip_grad_norm_`` rule, max_norm / (norm + 1e-6) capped at 1); returns the norms before."""
    norms = grad.float().flatten(1).norm(dim=1)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    grad.mul_(scale.to(grad.dtype).view(-1, *[1] * (grad.dim() - 1)))
    return norms


@dataclass
class RenoResult:
    """Best images (B, C, H, W) in [0, 1] and latents, the initial ones, the reward losses
    (per reward and ``"total"``, each (B,)) at iteration 0 and at the best iteration, and
    ``history``: one dict per iteration (or candidate) of losses, ``"norm"`` and ``"seconds"``."""

    images: torch.Tensor
    latents: torch.Tensor
    initial_images: torch.Tensor
    initial_latents: torch.Tensor
    initial_rewards: dict[str, torch.Tensor]
    best_rewards: dict[str, torch.Tensor]
    best_iteration: torch.Tensor
    history: list[dict[str, torch.Tensor]] = field(default_factory=list)


def _resolve_rewards(rewards: Mapping[str, float], models: Mapping[str, Reward] | None,
                     weights_dir) -> list[tuple[str, float, Reward]]:
    if not rewards or not isinstance(rewards, Mapping):
        raise ValueError(f"rewards must map reward names to weights, e.g. {{'hpsv2': 5.0}}, got {rewards!r}")
    models = dict(models or {})
    unused = set(models) - set(rewards)
    if unused:
        raise ValueError(f"models given for {sorted(unused)}, which have no weight in rewards={dict(rewards)}")
    active = [(name, float(w)) for name, w in rewards.items() if float(w) != 0.0]
    if not active:
        raise ValueError(f"every reward weight is 0 in {dict(rewards)}: nothing to optimise")
    return [(name, w, models[name] if name in models else
             load(name, Path(weights_dir) / name if weights_dir is not None else None)) for name, w in active]


def _prompts_and_batch(pipe, prompt) -> tuple[object, int]:
    if isinstance(pipe, ClassConditionalPipeline):
        labels = torch.as_tensor(prompt, dtype=torch.long).reshape(-1)
        return labels.tolist(), len(labels)
    if isinstance(prompt, str):
        return [prompt], 1
    if not prompt or not all(isinstance(p, str) for p in prompt):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    return list(prompt), len(prompt)


def _reward_targets(pipe, prompts: list, reward_prompt) -> list:
    """What the rewards score against: ``reward_prompt`` (one per prompt), or the prompts."""
    if reward_prompt is None:
        return prompts
    targets, _ = _prompts_and_batch(pipe, reward_prompt)
    if len(targets) != len(prompts):
        raise ValueError(f"reward_prompt must give one target per prompt ({len(prompts)}), got {len(targets)}")
    return targets


@contextmanager
def _on(reward: Reward, device: torch.device, offload: bool):
    """``reward`` on ``device`` inside the block; back on the CPU after it when ``offload``."""
    if offload:
        reward.to(device)
    try:
        yield reward
    finally:
        if offload:
            reward.to("cpu")


def _reward_losses(image: torch.Tensor, prompts, rewards, device, offload: bool, backward: bool):
    """Each reward's loss (B,) of ``image``; when ``backward``, each weighted loss is
    backpropagated into ``image.grad`` right away, so one reward's activations live at a time."""
    losses, total = {}, torch.zeros(image.shape[0], device=device)
    for name, weight, reward in rewards:
        with _on(reward, device, offload):
            loss = reward.loss(image, prompts).float().to(device)
            if backward:
                (weight * loss).sum().backward()
        losses[name] = loss.detach()
        total += weight * loss.detach()
    losses["total"] = total
    return losses


class _Best:
    """Per-sample best (lowest total reward loss) image, latent and losses, and iteration 0's."""

    def __init__(self):
        self.total = None

    def update(self, iteration: int, image, z, losses) -> None:
        # copies: on the CPU in fp32 these would otherwise be views of the live, optimised latent
        image, z = image.detach().float().cpu().clone(), z.detach().float().cpu().clone()
        losses = {k: v.cpu() for k, v in losses.items()}
        if self.total is None:
            self.initial_image, self.initial_z, self.initial_losses = image, z, losses
            self.image, self.z, self.losses = image.clone(), z.clone(), dict(losses)
            self.total, self.iteration = losses["total"].clone(), torch.zeros(len(z), dtype=torch.long)
            return
        better = losses["total"] < self.total
        self.image[better], self.z[better], self.total[better] = image[better], z[better], losses["total"][better]
        self.iteration[better] = iteration
        for key, value in losses.items():
            self.losses[key] = torch.where(better, value, self.losses[key])

    def result(self, history) -> RenoResult:
        return RenoResult(self.image, self.z, self.initial_image, self.initial_z, self.initial_losses, self.losses,
                          self.iteration, history)


def _initial_latents(pipe, batch, latents, seed, height, width) -> torch.Tensor:
    shape = latent_shape(pipe, batch, height, width)
    if latents is None:
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
    return latents.detach().float().cpu()


def optimize(pipe, prompt, rewards: Mapping[str, float], *, models: Mapping[str, Reward] | None = None,
             weights_dir: str | Path | None = None, n_iters: int = 50, lr: float = 5.0, optimizer: str = "sgd",
             momentum: float = 0.9, nesterov: bool = True, grad_clip: float = 0.1, reg_weight: float = 0.01,
             seed: int = 0, latents: torch.Tensor | None = None, num_inference_steps: int = 1,
             guidance_scale: float = 1.0, height: int | None = None, width: int | None = None,
             gradient_checkpointing: bool = True, offload_rewards: bool = False, progress: bool = False,
             call_kwargs: Mapping | None = None, reward_prompt=None) -> RenoResult:
    """Optimise the initial noise of ``pipe`` for ``prompt`` (a string or list of strings; class
    labels for a class-conditional pipeline) under ``rewards`` = {name: weight}.

    A reward's model is ``models[name]`` if given, else ``genforge.rewards.load(name,
    weights_dir / name)``. ``latents`` (B, C, h, w) default to N(0, I) drawn with ``seed`` and
    are kept in fp32 whatever the pipeline's dtype. ``offload_rewards`` keeps the reward models
    on the CPU except while each one runs. ``call_kwargs`` go to the pipeline's ``__call__`` as
    they are (e.g. ``use_resolution_binning=False`` for PixArt). ``reward_prompt`` (default:
    ``prompt``) is what the rewards score against, one per latent, when it differs from what the
    pipeline is conditioned on, e.g. a class reward on an unconditional render (ours; officially
    both are the prompt). Returns a :class:`RenoResult`.
    """
    if n_iters < 1 or lr <= 0 or grad_clip <= 0 or reg_weight < 0:
        raise ValueError(f"need n_iters >= 1, lr > 0, grad_clip > 0, reg_weight >= 0; got n_iters={n_iters}, "
                         f"lr={lr}, grad_clip={grad_clip}, reg_weight={reg_weight}")
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    _check_pipeline(pipe)
    prompts, batch = _prompts_and_batch(pipe, prompt)
    targets = _reward_targets(pipe, prompts, reward_prompt)
    active = _resolve_rewards(rewards, models, weights_dir)
    prepare_pipeline(pipe, gradient_checkpointing)
    device = pipe.device
    for _, _, reward in active:
        reward.to("cpu" if offload_rewards else device)
    z = torch.nn.Parameter(_initial_latents(pipe, batch, latents, seed, height, width).to(device))
    opt = (torch.optim.SGD([z], lr=lr, momentum=momentum, nesterov=nesterov) if optimizer == "sgd"
           else torch.optim.Adam([z], lr=lr, eps=1e-2))
    best, history = _Best(), []
    for iteration in tqdm(range(n_iters), desc="ReNO", disable=not progress, leave=False):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        generator = torch.Generator(device).manual_seed(seed)
        image = render(pipe, z, prompts, num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale, generator=generator, **(call_kwargs or {}))
        step = iteration != n_iters - 1
        detached = image.detach().requires_grad_(step)
        losses = _reward_losses(detached, targets, active, device, offload_rewards, backward=step)
        best.update(iteration, image, z, losses)
        record = {**losses, "norm": z.detach().float().flatten(1).norm(dim=1)}
        if step:
            regulariser = norm_prior(z, reg_weight).sum()
            torch.autograd.backward([image, regulariser], [detached.grad, None])
            record["grad_norm"] = clip_grad_norm_per_sample_(z.grad, grad_clip)
            opt.step()
        record["seconds"] = torch.tensor(time.perf_counter() - start)
        history.append({k: v.detach().cpu() for k, v in record.items()})
    return best.result(history)


@torch.no_grad()
def best_of_n(pipe, prompt, rewards: Mapping[str, float], n: int, *, models: Mapping[str, Reward] | None = None,
              weights_dir: str | Path | None = None, seed: int = 0, latents: torch.Tensor | None = None,
              num_inference_steps: int = 1, guidance_scale: float = 1.0, height: int | None = None,
              width: int | None = None, offload_rewards: bool = False, progress: bool = False,
              call_kwargs: Mapping | None = None, reward_prompt=None) -> RenoResult:
    """The official ``imageselect`` baseline: render ``n`` random latents (the first is the one
    :func:`optimize` starts from with the same ``seed``, the rest fresh N(0, I) draws) and keep,
    per prompt, the image of lowest total reward loss (scored against ``reward_prompt`` when
    given, as in :func:`optimize`). ``history`` has one entry per candidate."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _check_pipeline(pipe)
    prompts, batch = _prompts_and_batch(pipe, prompt)
    targets = _reward_targets(pipe, prompts, reward_prompt)
    active = _resolve_rewards(rewards, models, weights_dir)
    prepare_pipeline(pipe)
    device = pipe.device
    for _, _, reward in active:
        reward.to("cpu" if offload_rewards else device)
    z = _initial_latents(pipe, batch, latents, seed, height, width)
    draws = torch.Generator().manual_seed(seed + 1)
    best, history = _Best(), []
    for candidate in tqdm(range(n), desc="best-of-N", disable=not progress, leave=False):
        start = time.perf_counter()
        if candidate:
            z = torch.randn(z.shape, generator=draws)
        generator = torch.Generator(device).manual_seed(seed)
        image = render(pipe, z.to(device), prompts, num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale, generator=generator, **(call_kwargs or {}))
        losses = _reward_losses(image, targets, active, device, offload_rewards, backward=False)
        best.update(candidate, image, z, losses)
        history.append({**{k: v.cpu() for k, v in losses.items()}, "seconds": torch.tensor(time.perf_counter() - start)})
    return best.result(history)
