"""Pre-extracted VQ token grids: written once in resumable shards, read back as a dataset.

Token generators (ENAT, MaskGIT, aMUSEd) train on code ids, not pixels, so a tokenizer run
encodes every image once (ENAT's ``extract_imagenet_feature.py`` does the same).
:func:`write_token_shards` writes ``shard_00000.safetensors``, ... each with ``tokens`` (n, L)
int64 and ``labels`` (n,) int64, every shard atomically (temporary name, then rename), and
skips shards already on disk: a killed extraction resumes where it stopped. :class:`TokenShards`
reads a directory of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

SHARD_PATTERN = "shard_{:05d}.safetensors"


def write_token_shards(encode: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, directory: str | Path, *,
                       shard_size: int = 4096, batch_size: int = 256, num_workers: int = 0) -> list[Path]:
    """Encode ``dataset``'s ``(image, label)`` items with ``encode`` ((B, C, H, W) -> (B, L) ids)
    into shards of ``shard_size`` items under ``directory``; existing shards are kept."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    starts = range(0, len(dataset), shard_size)
    for index, start in enumerate(tqdm(starts, desc="token shards", unit="shard")):
        path = directory / SHARD_PATTERN.format(index)
        paths.append(path)
        if path.is_file():
            continue
        part = Subset(dataset, range(start, min(start + shard_size, len(dataset))))
        tokens, labels = [], []
        for images, label in DataLoader(part, batch_size=batch_size, num_workers=num_workers):
            with torch.no_grad():
                tokens.append(encode(images).to(torch.int64).cpu())
            labels.append(torch.as_tensor(label, dtype=torch.int64))
        tmp = path.with_suffix(".tmp")
        save_file({"tokens": torch.cat(tokens).contiguous(), "labels": torch.cat(labels).contiguous()}, str(tmp))
        os.replace(tmp, path)
    return paths


class TokenShards(Dataset):
    """``(tokens (L,) int64, label int)`` items from every shard in ``directory``."""

    def __init__(self, directory: str | Path):
        paths = sorted(Path(directory).glob(SHARD_PATTERN.replace("{:05d}", "*")))
        if not paths:
            raise ValueError(f"no token shards ({SHARD_PATTERN.format(0)}, ...) in {directory}; run the tokenizer "
                             f"recipe first (e.g. genforge train recipes/enat/vq_digits.yaml)")
        shards = [load_file(str(path)) for path in paths]
        self.tokens = torch.cat([s["tokens"] for s in shards])
        self.labels = torch.cat([s["labels"] for s in shards])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.tokens[i], int(self.labels[i])
