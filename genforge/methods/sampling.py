"""Sample a trained class-conditional generator into a grid and score it.

Used at the end of every class-conditional diffusion run and by ``genforge sample``:
the EMA network and a diffusers scheduler form the run's pipeline (a :class:`DiMRPipeline` for
DiMR, a :class:`ClassConditionalPipeline` for the baselines; saved with ``save_pretrained``), a
PNG grid with one row per class is written, and a class-balanced set
of samples is scored with FID through torch-fidelity (on the features of the dataset's judge,
the digits CNN or the MNIST CNN, for the bundled sets; on Inception features from a local
weights file otherwise) and, for the bundled sets, with classifier agreement: the share of
samples the judge assigns to their class.

A run on cached VAE latents (``data.name: latents``, :mod:`genforge.data.latents`) samples
latents and decodes them with the cache's VAE (:func:`latent_decoder`: z / scaling_factor, the
VAE's decoder, clamped to [-1, 1]); its grid, samples.npz and FID are then those of the decoded
RGB images, and its FID reference is the image folder the cache was made from, at the cache's
image size. Latent caches have no judge: no agreement, and FID only with
``eval.feature_extractor: inception-v3-compat`` and a local ``eval.inception_weights`` file
(:func:`check_eval_inputs` refuses a missing file, or a cache whose VAE or image folder is gone,
before training starts).

Samplers (``sample.scheduler`` in a recipe), all diffusers schedulers on the training betas:

- ``"dpm++singlestep"``: the official DiMR sampler. DiMR's ``eval.py`` runs the original
  DPM-Solver with ``predict_x0=True`` (DPM-Solver++), ``method="fast"``, order 3, on a
  time-uniform grid from n = N to n = 1: K = steps // 3 + 1 singlestep updates of orders
  [3, ..., 3, 2, 1] (steps % 3 == 0), [3, ..., 3, 1] (== 1) or [3, ..., 3, 2] (== 2).
  ``DPMSolverSinglestepScheduler(algorithm_type="dpmsolver++", solver_order=3,
  lower_order_final=True, final_sigmas_type="sigma_min")`` takes the same updates on the
  same grid, ending at n = 1 as the official does, and its third-order update is the official
  one. It differs in two details: timesteps are rounded to integers (exact when steps
  divides N - 1 = 999, e.g. 27, 37, 111, 333), and the second intermediate point of a
  third-order update uses diffusers' midpoint form, equal to the official to second order.
- ``"dpm++"``: ``DPMSolverMultistepScheduler`` (DPM-Solver++, order 3), diffusers' usual
  choice. It is the default of the DiMR digits recipes because the numbers in
  docs/benchmarks.md were measured with it; use ``"dpm++singlestep"`` to sample as the
  official code does.
- ``"ddim"`` (the recipe default when none is named) and ``"ddpm"``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler
from tqdm.auto import tqdm

from genforge.config import ConfigError, Recipe
from genforge.core.embed import null_class_of
from genforge.core.io import write_json
from genforge.data import build_dataset
from genforge.data.folder import ImageFolderDataset
from genforge.data.grid import save_class_grid
from genforge.data.latents import load_vae, read_manifest
from genforge.data.transforms import signed_to_uint8
from genforge.metrics import classifier_agreement, compute_fidelity, judge_for
from genforge.metrics.fidelity import INCEPTION_EXTRACTOR, JUDGE_FEATURE_DIM
from genforge.pipelines.class_conditional import ClassConditionalPipeline

SAMPLERS = ("ddim", "ddpm", "dpm++", "dpm++singlestep")


def sampling_scheduler(name: str, train_config):
    """The diffusers sampler ``name`` (one of :data:`SAMPLERS`) on the training schedule's betas."""
    if name == "ddim":
        return DDIMScheduler.from_config(train_config, set_alpha_to_one=False)
    if name == "ddpm":
        return DDPMScheduler.from_config(train_config)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(train_config, algorithm_type="dpmsolver++", solver_order=3)
    if name == "dpm++singlestep":
        return DPMSolverSinglestepScheduler.from_config(train_config, algorithm_type="dpmsolver++", solver_order=3,
                                                        lower_order_final=True, final_sigmas_type="sigma_min")
    raise ValueError(f"unknown sampler {name!r}; expected one of {list(SAMPLERS)}")


def generate(pipe: ClassConditionalPipeline, labels: torch.Tensor, *, steps: int, guidance_scale: float, seed: int,
             batch_size: int, desc: str = "sampling", decode=None) -> torch.Tensor:
    """Samples for ``labels`` in [-1, 1] as (N, C, H, W), generated in batches from one seed; with
    ``decode``, ``decode(x)`` of each batch's final samples as the pipeline leaves them
    (``output_type="latent"``, e.g. VAE latents for :func:`latent_decoder`'s function)."""
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for start in tqdm(range(0, labels.shape[0], batch_size), desc=desc, unit="batch"):
        out = pipe(class_labels=labels[start:start + batch_size], guidance_scale=guidance_scale,
                   num_inference_steps=steps, generator=generator, output_type="pt" if decode is None else "latent")
        chunks.append(out.images * 2 - 1 if decode is None else decode(out.images))  # pipeline [0, 1] -> [-1, 1]
    return torch.cat(chunks)


def latent_decoder(recipe: Recipe):
    """For a run on cached latents: ``decode(latents) -> RGB images in [-1, 1]`` with the cache's VAE
    (``AutoencoderKL.decode(z / scaling_factor)`` in ``eval.batch_size`` batches, clamped); None for
    a recipe on pixels."""
    if recipe.data.name != "latents":
        return None
    manifest = read_manifest(recipe.data.root)
    vae, scale = load_vae(manifest["vae"]), float(manifest["scaling_factor"])

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        vae.to(latents.device)
        return torch.cat([vae.decode(z.to(vae.dtype) / scale).sample.float().clamp(-1, 1)
                          for z in latents.split(recipe.eval.batch_size)])

    return decode


def check_eval_inputs(recipe: Recipe, source: str) -> None:
    """ConfigError, before training, for end-of-run inputs that are missing: an Inception FID
    without an existing ``eval.inception_weights`` file, and for a latent cache that exists, a VAE
    directory or (with Inception) an image folder its latents.json names but that is gone."""
    inception = recipe.eval.feature_extractor == INCEPTION_EXTRACTOR
    weights = recipe.eval.inception_weights
    if inception and (weights is None or not Path(weights).is_file()):
        raise ConfigError(f"{source}: eval.inception_weights {weights!r} is not a file; FID with "
                          f"{INCEPTION_EXTRACTOR!r} needs torch-fidelity's Inception weights "
                          "(weights-inception-2015-12-05-6726825d.pth) as a local file")
    root = recipe.data.root
    if recipe.data.name != "latents" or root is None or not (Path(root) / "latents.json").is_file():
        return  # a missing cache is reported by the dataset, before training too
    manifest = read_manifest(root)
    needed = {"vae": "VAE directory", **({"images": "image folder"} if inception else {})}
    for key, what in needed.items():
        if manifest.get(key) is None or not Path(manifest[key]).is_dir():
            raise ConfigError(f"{source}: the {what} {manifest.get(key)!r} that the latent cache "
                              f"{root}/latents.json records under {key!r} does not exist; decoding "
                              "samples needs it (restore it, or remake the cache with genforge cache-latents)")


def evaluate_class_conditional(model, noise_scheduler, recipe: Recipe, output_dir: Path,
                               pipeline_class: type[ClassConditionalPipeline]) -> dict:
    """Save the ``pipeline_class`` pipeline, a per-class grid, class-balanced samples and their metrics."""
    model.eval()
    pipe = pipeline_class(model=model, scheduler=sampling_scheduler(recipe.sample.scheduler, noise_scheduler.config))
    return evaluate_pipeline(pipe, null_class_of(model), recipe, output_dir)


def evaluate_pipeline(pipe, num_classes: int, recipe: Recipe, output_dir: Path, **sampling) -> dict:
    """Save ``pipe`` to ``<output_dir>/pipeline``, then sample a per-class grid (samples_grid.png) and
    class-balanced samples (samples.npz) with ``sampling`` as extra pipeline arguments, and score them."""
    output_dir.mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(output_dir / "pipeline")
    sampler, decode = functools.partial(pipe, **sampling), latent_decoder(recipe)
    settings = {"steps": recipe.sample.steps, "guidance_scale": recipe.sample.guidance_scale,
                "batch_size": recipe.eval.batch_size}
    per_class = recipe.sample.num_per_class
    grid_labels = torch.arange(num_classes).repeat_interleave(per_class)
    grid = generate(sampler, grid_labels, seed=recipe.seed, desc="sampling grid", decode=decode, **settings)
    save_class_grid(grid, per_class, output_dir / "samples_grid.png")
    labels = torch.arange(recipe.eval.num_samples) % num_classes
    # decoded samples are kept as uint8, batch by batch: 50k at 256 px take 9.8 GB instead of 39 GB as float
    to_pixels = None if decode is None else (lambda x: signed_to_uint8(decode(x)))
    images = generate(sampler, labels, seed=recipe.seed + 1, desc="sampling for metrics", decode=to_pixels,
                      **settings)
    pixels = images if images.dtype == torch.uint8 else signed_to_uint8(images)
    np.savez_compressed(output_dir / "samples.npz", images=pixels.numpy(), labels=labels.numpy(),
                        resize=np.array(recipe.data.resize))  # how the reference is to be sized
    metrics = score_samples(images, labels, recipe)
    write_json(output_dir / "sample_metrics.json", metrics, indent=2)
    return metrics


def score_samples(images: torch.Tensor, labels: torch.Tensor, recipe: Recipe) -> dict:
    """FID against the training split, plus classifier agreement where the dataset has a judge;
    ``images`` float in [-1, 1] or, for datasets without a judge, uint8.

    The bundled datasets have their own judge (``digits`` the digits CNN, ``mnist5k`` the
    MNIST CNN; :data:`genforge.metrics.JUDGES`): a recipe asking for a judge's features
    (``eval.feature_extractor: digits-cnn`` or ``mnist-cnn``) gets FID on the judge of its
    dataset, so ``--set data.name=mnist5k`` on a digits recipe scores with the MNIST judge.
    Datasets without a judge get no agreement, and no FID unless Inception is asked for. The
    reference of a latent cache is its image folder, at the cache's image size.
    """
    data, evaluation = recipe.data, recipe.eval
    if data.name == "latents":
        manifest = read_manifest(data.root)
        reference = ImageFolderDataset(manifest["images"], image_size=manifest["image_size"], channels=3)
    else:
        reference = build_dataset(data.name, split="train", root=data.root, image_size=data.image_size,
                                  resize=data.resize, channels=data.channels)
    real = reference.images if hasattr(reference, "images") else reference  # a dataset is read lazily
    metrics = {"num_samples": int(images.shape[0])}
    judge = judge_for(data.name)
    if judge is not None:
        metrics["classifier_agreement"] = float(classifier_agreement(images, labels, judge[1]))
    extractor = evaluation.feature_extractor
    if extractor in JUDGE_FEATURE_DIM:  # a judge's features: the judge of this dataset, if any
        if judge is None:
            return metrics
        extractor = judge[0]
    fidelity = compute_fidelity(real, images, feature_extractor=extractor,
                                inception_weights=evaluation.inception_weights, batch_size=evaluation.batch_size,
                                feature_layer=evaluation.feature_layer)
    metrics["fid"] = float(fidelity["fid"])
    return metrics
