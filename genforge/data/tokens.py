"""Pre-extracted VQ token grids: written once in resumable shards, read back as a dataset.

Token generators (ENAT, MaskGIT, aMUSEd) train on code ids, not pixels, so a tokenizer run
encodes every image once (ENAT's ``extract_imagenet_feature.py`` does the same).
:func:`write_token_shards` writes ``shard_00000.safetensors``, ... each with ``tokens`` (n, L)
int64 and ``labels`` (n,) int64, every shard atomically (temporary name, then rename), and
skips shards already on disk: a killed extraction resumes where it stopped. Under several
processes (``accelerate launch``) process ``rank`` of ``world`` writes shards rank, rank + world, ...;
the caller waits for every process before reading them. With ``flip=True`` every batch's images are
followed by their horizontal flips, as separate items (ENAT's ``extract_imagenet_feature.py`` does
so for the training split). :class:`TokenShards` reads a directory of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

SHARD_PATTERN = "shard_{:05d}.safetensors"


def write_token_shards(encode: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, directory: str | Path, *,
                       shard_size: int = 4096, batch_size: int = 256, num_workers: int = 0, rank: int = 0,
                       world: int = 1, flip: bool = False) -> list[Path]:
    """Encode ``dataset``'s ``(image, label)`` items with ``encode`` ((B, C, H, W) -> (B, L) ids)
    into shards of ``shard_size`` dataset items (twice as many entries with ``flip``) under
    ``directory``; existing shards are kept. Process ``rank`` of ``world`` writes every world-th
    shard from its rank; returns every shard's path."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must lie in [0, {world - 1}] for world={world}; got {rank}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    starts = list(range(0, len(dataset), shard_size))
    paths = [directory / SHARD_PATTERN.format(index) for index in range(len(starts))]
    for index in tqdm(range(rank, len(starts), world), desc="token shards", unit="shard", disable=rank != 0):
        path, start = paths[index], starts[index]
        if path.is_file():
            continue
        part = Subset(dataset, range(start, min(start + shard_size, len(dataset))))
        tokens, labels = [], []
        for images, label in DataLoader(part, batch_size=batch_size, num_workers=num_workers):
            label = torch.as_tensor(label, dtype=torch.int64)
            if flip:
                images, label = torch.cat([images, images.flip(-1)]), label.repeat(2)
            with torch.no_grad():
                tokens.append(encode(images).to(torch.int64).cpu())
            labels.append(label)
        tmp = path.with_suffix(".tmp")
        save_file({"tokens": torch.cat(tokens).contiguous(), "labels": torch.cat(labels).contiguous()}, str(tmp))
        os.replace(tmp, path)
    return paths


def shard_sequence_length(directory: str | Path) -> int:
    """L, the tokens per item of the shards in ``directory`` (read from the first shard's header)."""
    with safe_open(str(_shard_paths(directory)[0]), framework="pt") as shard:
        return int(shard.get_slice("tokens").get_shape()[1])


def _shard_paths(directory: str | Path) -> list[Path]:
    paths = sorted(Path(directory).glob(SHARD_PATTERN.replace("{:05d}", "*")))
    if not paths:
        raise ValueError(f"no token shards ({SHARD_PATTERN.format(0)}, ...) in {directory}; run the tokenizer "
                         f"recipe first (e.g. genforge train recipes/enat/vq_digits.yaml)")
    missing = sorted({SHARD_PATTERN.format(i) for i in range(len(paths))} - {path.name for path in paths})
    if missing:  # an extraction killed while other processes had written later shards
        raise ValueError(f"token shards in {directory} are incomplete ({missing[0]} is missing); rerun the "
                         f"tokenizer recipe to finish the extraction")
    return paths


def _narrow(tokens: torch.Tensor) -> torch.Tensor:
    """int16 when every id fits (codebooks up to 32768 codes), else as stored."""
    return tokens.to(torch.int16) if tokens.numel() and int(tokens.max()) < 2 ** 15 else tokens


class TokenShards(Dataset):
    """``(tokens (L,) int64, label int)`` items from every shard in ``directory``. The ids are held
    in memory as int16 where they fit (ImageNet's 2 x 1.28M grids of 256 ids: 1.3 GB, not 5.2 GB)."""

    def __init__(self, directory: str | Path):
        tokens, labels = [], []
        for path in _shard_paths(directory):
            shard = load_file(str(path))
            tokens.append(_narrow(shard["tokens"]))
            labels.append(shard["labels"])
        self.tokens, self.labels = torch.cat(tokens), torch.cat(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.tokens[i].long(), int(self.labels[i])
