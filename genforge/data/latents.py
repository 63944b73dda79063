"""Latent caches: encode an image folder once with a diffusers ``AutoencoderKL``, train on the latents.

Latent generators (ARFlow, DiMR, DiT at 256 px) train on VAE latents of ImageNet; encoding every
image at every epoch costs more than the generator's step. As the official ARFlow
``cache_imagenet.py`` does, :func:`cache_latents` stores for each image the posterior's
parameters ("moments": mean and log-variance, 2 x latent channels) of the image and of its
horizontal flip, and :class:`LatentsDataset` draws z = mean + exp(logvar / 2) eps from one of
the two (flip with probability 1/2) at each read and multiplies it by the VAE's
``scaling_factor`` (0.18215 for SD's VAE), as the official ``train.py`` does.

The VAE is ``AutoencoderKL.from_pretrained(DIR)`` on a local directory (its ``config.json``
names the class and gives ``scaling_factor``); nothing is downloaded. Images are read with
:class:`~genforge.data.folder.ImageFolderDataset` (class folders sorted -> labels, resize and
center crop to ``image_size``). We keep the square center crop of our image folders; the
official uses ADM's crop, which equals it for images whose shorter side is ``image_size``.

Cache layout (``OUT``): ``latents.json`` (VAE path, scaling factor, image folder, image size,
classes, image count, shard size; the resolved paths let a run decode its samples and score them
against the images the cache was made from) and ``shard_NNNNN.safetensors`` files, each holding ``moments``,
``moments_flip`` (float16, (n, 2c, h, w)) and ``labels`` (int64) of images
[k * shard_size, (k + 1) * shard_size) in the folder's order (float16 halves the cache; the
official stores float32 .npz files, one per image). Every shard is written atomically, so
a killed run is resumed by running the same command again: finished shards are kept and the
first missing one is encoded next. A cache made with other settings is refused, not mixed.

Text caches (Stable Diffusion distillation, the ``sd_latents`` dataset): with ``--text-encoder DIR
--tokenizer DIR`` (a local ``CLIPTextModel`` and its tokenizer, e.g. an SD-1.5 directory's
``text_encoder`` and ``tokenizer``), ``FOLDER`` is an image-text folder
(:class:`~genforge.data.image_text.ImageTextFolderDataset`: a same-stem ``.txt`` caption beside
each image) and each shard holds ``text_embeds`` (float16 (n, tokens, hidden): the encoder's last
hidden states of the caption, tokenized as ``StableDiffusionPipeline`` does) instead of labels, so
training needs neither the VAE nor the text encoder. ``probes.safetensors`` records what the cache
was made with, checked by :func:`check_text_cache` before training: the hidden states of the empty
prompt (also what prompt dropout feeds) and the VAE's posterior mean of a fixed 64x64 test image.
The manifest adds the encoder and tokenizer paths.

Command: ``genforge cache-latents --vae DIR --images FOLDER --out DIR [--image-size 256]
[--text-encoder DIR --tokenizer DIR]``.
"""

from __future__ import annotations

import argparse
import json
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from genforge.core.io import atomic_write, write_json
from genforge.data.folder import ImageFolderDataset
from genforge.data.image_text import ImageTextFolderDataset

MANIFEST = "latents.json"
PROBES = "probes.safetensors"


def load_vae(vae_dir: str | Path):
    """``AutoencoderKL.from_pretrained(vae_dir)``; a ValueError naming ``vae_dir`` unless its
    config.json describes an AutoencoderKL (checked before any weights are read)."""
    from diffusers import AutoencoderKL

    config = Path(vae_dir) / "config.json"
    if not config.is_file():
        raise ValueError(f"--vae {vae_dir}: not a diffusers AutoencoderKL directory (no config.json; "
                         f"expected the folder AutoencoderKL.save_pretrained writes, e.g. sd-vae-ft-ema)")
    try:
        name = json.loads(config.read_text()).get("_class_name")
    except (ValueError, AttributeError) as err:
        raise ValueError(f"--vae {vae_dir}: config.json is not a model config ({err})") from None
    if name != "AutoencoderKL":
        raise ValueError(f"--vae {vae_dir}: config.json describes a {name!r}, not an 'AutoencoderKL'")
    return AutoencoderKL.from_pretrained(vae_dir).eval()


def load_text_encoder(text_encoder_dir: str | Path, tokenizer_dir: str | Path):
    """(tokenizer, CLIPTextModel) from local directories (``save_pretrained`` layouts); a ValueError naming
    the directory when it has no config.json / tokenizer files."""
    from transformers import AutoTokenizer, CLIPTextModel

    if not (Path(text_encoder_dir) / "config.json").is_file():
        raise ValueError(f"--text-encoder {text_encoder_dir}: not a transformers CLIPTextModel directory (no "
                         f"config.json; expected e.g. the text_encoder folder of a Stable Diffusion directory)")
    if not any((Path(tokenizer_dir) / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        raise ValueError(f"--tokenizer {tokenizer_dir}: no tokenizer.json or vocab.json (expected e.g. the "
                         f"tokenizer folder of a Stable Diffusion directory)")
    return AutoTokenizer.from_pretrained(tokenizer_dir), CLIPTextModel.from_pretrained(text_encoder_dir).eval()


@torch.no_grad()
def encoder_probes(vae, tokenizer, text_encoder) -> dict[str, torch.Tensor]:
    """What a text cache records of its encoders: the empty prompt's hidden states (1, tokens, hidden) and
    the VAE posterior mean of a fixed 64x64 gradient image, float32 on the CPU."""
    from genforge.sd.text import encode_prompts

    image = torch.linspace(-1, 1, 3 * 64 * 64).reshape(1, 3, 64, 64).to(vae.device, vae.dtype)
    return {"null_text_embeds": encode_prompts(tokenizer, text_encoder, [""]).float().cpu(),
            "vae_probe": vae.encode(image).latent_dist.mean.float().cpu()}


def check_text_cache(root: str | Path, vae, tokenizer, text_encoder) -> None:
    """ValueError unless the text cache at ``root`` was made with these encoders (their probes agree to a
    relative error of 1e-3)."""
    saved = load_file(str(Path(root) / PROBES))
    for key, value in encoder_probes(vae, tokenizer, text_encoder).items():
        ref = saved[key]
        if ref.shape != value.shape or (value - ref).norm() > 1e-3 * ref.norm():
            part = "VAE" if key == "vae_probe" else "text encoder / tokenizer"
            raise ValueError(f"latent cache {root} was made with another {part} than this run's "
                             f"({key}: shape {tuple(ref.shape)} vs {tuple(value.shape)}); re-cache with this run's "
                             f"--vae / --text-encoder / --tokenizer")


def _shard_path(out: Path, index: int) -> Path:
    return out / f"shard_{index:05d}.safetensors"


def _check_manifest(out: Path, manifest: dict) -> None:
    """Refuse to resume into a cache made with other settings."""
    path = out / MANIFEST
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    differing = sorted(k for k in manifest if saved.get(k) != manifest[k])
    if differing:
        raise ValueError(f"{out} holds a latent cache made with other settings ({', '.join(differing)} differ: "
                         f"{ {k: saved.get(k) for k in differing} }); use another --out or delete it")


@torch.no_grad()
def cache_latents(vae_dir: str | Path, images: str | Path, out: str | Path, *, image_size: int = 256,
                  batch_size: int = 32, shard_size: int = 1024, device: str | None = None,
                  progress: bool = True, text_encoder: str | Path | None = None,
                  tokenizer: str | Path | None = None) -> Path:
    """Encode ``images`` (an image folder, or with ``text_encoder`` and ``tokenizer`` an image-text folder)
    into latent shards under ``out``; returns ``out``.

    Resumes: shards already in ``out`` (from an interrupted run with the same settings) are kept.
    """
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be positive, got {shard_size} and {batch_size}")
    if (text_encoder is None) != (tokenizer is None):
        raise ValueError("a text cache needs both --text-encoder and --tokenizer")
    vae = load_vae(vae_dir)
    text = None if text_encoder is None else load_text_encoder(text_encoder, tokenizer)
    if text is None:
        dataset = ImageFolderDataset(images, image_size=image_size, channels=3)
    else:
        dataset = ImageTextFolderDataset(images, image_size=image_size, channels=3)
    out = Path(out)
    manifest = {"vae": str(Path(vae_dir).resolve()), "scaling_factor": float(vae.config.scaling_factor),
                "images": str(Path(images).resolve()), "image_size": image_size,
                "classes": getattr(dataset, "classes", []), "num_images": len(dataset), "shard_size": shard_size}
    if text is not None:
        manifest.update(text_encoder=str(Path(text_encoder).resolve()), tokenizer=str(Path(tokenizer).resolve()))
    _check_manifest(out, manifest)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MANIFEST, manifest, indent=2)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae.to(device)
    if text is not None:
        from genforge.sd.text import encode_prompts

        text[1].to(device)
        with atomic_write(out / PROBES) as tmp:
            save_file(encoder_probes(vae, *text), str(tmp))
    num_shards = -(-len(dataset) // shard_size)
    todo = [k for k in range(num_shards) if not _shard_path(out, k).is_file()]
    done = sum(min(shard_size, len(dataset) - k * shard_size) for k in range(num_shards) if k not in todo)
    bar = tqdm(total=len(dataset), initial=done, desc="cache-latents", unit="img", disable=not progress)
    for k in todo:
        start = k * shard_size
        stop = min(start + shard_size, len(dataset))
        parts = {"moments": [], "moments_flip": [], "labels" if text is None else "text_embeds": []}
        for first in range(start, stop, batch_size):
            items = [dataset[i] for i in range(first, min(first + batch_size, stop))]
            x = torch.stack([image for image, _ in items]).to(device, vae.dtype)
            parts["moments"].append(vae.encode(x).latent_dist.parameters.half().cpu())
            parts["moments_flip"].append(vae.encode(x.flip(-1)).latent_dist.parameters.half().cpu())
            if text is None:
                parts["labels"].append(torch.tensor([label for _, label in items]))
            else:
                parts["text_embeds"].append(encode_prompts(*text, [c for _, c in items]).half().cpu())
            bar.update(len(items))
        with atomic_write(_shard_path(out, k)) as tmp:
            save_file({name: torch.cat(values).contiguous() for name, values in parts.items()}, str(tmp))
    bar.close()
    return out


def read_manifest(root: str | Path) -> dict:
    """The ``latents.json`` of the cache at ``root``; FileNotFoundError naming ``root`` if it has none."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{root} is not a latent cache (no {MANIFEST}); make one with "
                                f"`genforge cache-latents --vae DIR --images FOLDER --out {root}`")
    return json.loads(path.read_text())


@lru_cache(maxsize=64)
def _open_shard(path: str):
    return safe_open(path, framework="pt")


class LatentsDataset(Dataset):
    """``(z (c, h, w) float32, label)`` from a cache of :func:`cache_latents`: a posterior sample of
    the image or of its flip (probability 1/2 each, torch's global RNG) times ``scaling_factor``.

    A text cache (``.captioned``) gives ``(z, text_embeds (tokens, hidden) float32)`` instead, and
    ``.null_text_embeds``: the empty prompt's hidden states."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest = read_manifest(root)
        self.shard_size, self.scaling_factor = manifest["shard_size"], manifest["scaling_factor"]
        num_shards = -(-manifest["num_images"] // self.shard_size)
        missing = [k for k in range(num_shards) if not _shard_path(self.root, k).is_file()]
        if missing:
            raise FileNotFoundError(f"latent cache {root} is incomplete: {len(missing)} of {num_shards} shards "
                                    f"missing (first: {_shard_path(self.root, missing[0]).name}); rerun the "
                                    f"cache-latents command to finish it")
        self.captioned = "text_encoder" in manifest
        self.num_items = manifest["num_images"]
        if self.captioned:
            self.null_text_embeds = load_file(str(self.root / PROBES))["null_text_embeds"][0]
        else:
            self.labels = torch.cat([_open_shard(str(_shard_path(self.root, k))).get_tensor("labels")
                                     for k in range(num_shards)])
        shape = _open_shard(str(_shard_path(self.root, 0))).get_slice("moments").get_shape()
        self.channels, self.image_size = shape[1] // 2, shape[2]
        self.classes = manifest["classes"]
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        shard = _open_shard(str(_shard_path(self.root, i // self.shard_size)))
        key = "moments_flip" if torch.rand(()) < 0.5 else "moments"
        moments = shard.get_slice(key)[i % self.shard_size].float()
        mean, logvar = moments.chunk(2, dim=0)
        z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn(mean.shape)
        if self.captioned:
            return z * self.scaling_factor, shard.get_slice("text_embeds")[i % self.shard_size].float()
        return z * self.scaling_factor, int(self.labels[i])


def main(argv: list[str] | None = None, prog: str = "python -m genforge.data.latents") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Encode an image folder into resumable latent shards "
                                     "with a local diffusers AutoencoderKL.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--vae", required=True, help="local AutoencoderKL directory (save_pretrained layout)")
    parser.add_argument("--images", required=True, help="image folder: FOLDER/<class>/<images>; with --text-encoder "
                        "an image-text folder (a same-stem .txt caption beside each image)")
    parser.add_argument("--out", required=True, help="cache directory; rerun the same command to resume")
    parser.add_argument("--image-size", type=int, default=256, help="resize + center crop to this size")
    parser.add_argument("--batch-size", type=int, default=32, help="images per VAE call")
    parser.add_argument("--shard-size", type=int, default=1024, help="images per shard file")
    parser.add_argument("--device", help="torch device (default: cuda if available)")
    parser.add_argument("--text-encoder", help="local CLIPTextModel directory: also cache the captions' hidden states")
    parser.add_argument("--tokenizer", help="local tokenizer directory of --text-encoder")
    args = parser.parse_args(argv)
    from genforge.cli import run_script

    def run(args) -> int:
        out = cache_latents(args.vae, args.images, args.out, image_size=args.image_size, batch_size=args.batch_size,
                            shard_size=args.shard_size, device=args.device, text_encoder=args.text_encoder,
                            tokenizer=args.tokenizer)
        print(f"wrote {out} ({len(LatentsDataset(out))} images)")
        return 0

    return run_script(run, args)


if __name__ == "__main__":
    raise SystemExit(main())
