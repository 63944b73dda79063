"""Dataset reinforcement, training: replay the stored augmentations with their teacher targets.

Faghri et al., "Reinforce Data, Multiply Impact", ICCV 2023, arXiv 2303.08983 (official code
``apple/ml-dr``). With probability p, item i picks a random j among its NS stored entries,
rebuilds a_ij = A(x_i; θ_ij) exactly from the stored θ_ij (no teacher call) and uses the
densified target

    smooth:  t[c] = v_c for c in c_ij,   t[c] = (1 - sum v_ij) / (C - k) elsewhere
    zeros:   t[c_ij] = softmax(v_ij),    0 elsewhere  (the official quirk; also the
             fallback of ``smooth`` when the leftover mass 1 - sum v_ij is negative)

otherwise the original image, through a fresh draw of the pipeline's per-image transforms
(everything but MixUp/CutMix; ml-dr gives these samples its train transform, the same crop,
RandAugment and erasing), with a one-hot target. The student's loss on these targets is in
:mod:`genforge.kd.reinforce.method`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from genforge.kd.reinforce.augment import ReinforcePipeline
from genforge.kd.reinforce.shards import check_manifest, check_shard, finished_shards, shard_name, shard_rows

__all__ = ["ReinforcedDataset", "densify"]


def densify(
    values: torch.Tensor, ids: torch.Tensor, num_classes: int, mode: str = "smooth"
) -> torch.Tensor:
    """Dense (C,) target from stored top-k (values, ids); see the module docstring."""
    if mode not in ("smooth", "zeros"):
        raise ValueError(f"densify must be 'smooth' or 'zeros', got {mode!r}")
    leftover = 1.0 - float(values.sum())
    k = values.numel()
    if mode == "smooth" and leftover >= 0 and num_classes > k:
        target = torch.full((num_classes,), leftover / (num_classes - k))
        target[ids] = values.float()
        return target
    target = torch.zeros(num_classes)
    target[ids] = torch.softmax(values.float(), dim=0)
    return target


class ReinforcedDataset(torch.utils.data.Dataset):
    """Replays a reinforced dataset: no teacher is ever called.

    With probability ``p_replay``, item i is a random stored augmentation of image i rebuilt
    from its params, with the densified teacher target; otherwise the original image and a
    one-hot target. With ``augment_original`` (the default, as ml-dr) that original image goes
    through a fresh draw of the stored pipeline's per-image transforms (no MixUp/CutMix, so no
    partner); without it, it is returned as the dataset gives it.
    """

    def __init__(
        self,
        dataset: Sequence[tuple[torch.Tensor, int]],
        out_dir: str | os.PathLike,
        p_replay: float = 0.99,
        densify: str = "smooth",
        dataset_name: str | None = None,
        augment_original: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        if densify not in ("smooth", "zeros"):
            raise ValueError(f"densify must be 'smooth' or 'zeros', got {densify!r}")
        if not 0.0 <= p_replay <= 1.0:
            raise ValueError(f"p_replay must be in [0, 1], got {p_replay}")
        self.dataset = dataset
        self.out_dir = Path(out_dir)
        expected = {
            "dataset_name": dataset_name or type(dataset).__name__,
            "dataset_size": len(dataset),
        }
        self.manifest = check_manifest(self.out_dir, expected, list(expected))
        self.pipeline = ReinforcePipeline.from_config(self.manifest["pipeline"])
        self.num_classes = int(self.manifest["num_classes"])
        self.p_replay = float(p_replay)
        self.densify = densify
        self.augment_original = bool(augment_original)
        self.generator = generator
        self.finished = set(finished_shards(self.out_dir))
        self._cache: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def check_complete(self) -> None:
        """Every shard there, finished, and made by the run its manifest describes.

        FileNotFoundError naming the shards that are missing or unfinished; ValueError naming
        a shard whose recorded provenance (seed, teachers, NS, k, ...) differs from the
        manifest's, or whose tensors do not have the manifest's (rows, NS, k) shapes.
        """
        shards = math.ceil(len(self.dataset) / int(self.manifest["shard_size"]))
        missing = [
            s
            for s in range(shards)
            if s not in self.finished or not (self.out_dir / shard_name(s)).exists()
        ]
        if missing:
            raise FileNotFoundError(
                f"{self.out_dir}: shards {missing} of {shards} are missing or unfinished; "
                "rerun reinforce() (genforge reinforce RECIPE) on this directory to complete it"
            )
        for shard in range(shards):
            check_shard(self.out_dir / shard_name(shard), self.manifest, shard_rows(self.manifest, shard))

    def _shard(self, shard: int) -> dict[str, torch.Tensor]:
        if shard not in self._cache:
            path = self.out_dir / shard_name(shard)
            if shard not in self.finished or not path.exists():
                raise FileNotFoundError(
                    f"shard {shard} ({path}) is missing or unfinished; rerun reinforce() "
                    "on this directory to complete it"
                )
            try:
                self._cache[shard] = load_file(str(path))
            except SafetensorError as err:
                raise ValueError(f"shard {path} is not a readable safetensors file ({err})") from None
        return self._cache[shard]

    def entries(self, idx: int) -> list[dict[str, Any]]:
        """The NS stored entries of index idx: params (decompressed), values and ids."""
        shard_size = int(self.manifest["shard_size"])
        data = self._shard(idx // shard_size)
        row = idx % shard_size
        stored = int(data["indices"][row])
        if stored != idx:
            raise ValueError(f"shard row holds dataset index {stored}, expected {idx}")
        out = []
        for j in range(int(self.manifest["num_samples"])):
            n = int(data["params_len"][row, j])
            flat = data["params"][row, j, :n].tolist()
            out.append(
                {
                    "params": self.pipeline.decompress(flat),
                    "values": data["values"][row, j],
                    "ids": data["ids"][row, j],
                }
            )
        return out

    def replay(self, idx: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The j-th stored augmentation of image idx and its densified target."""
        entry = self.entries(idx)[j]
        params = entry["params"]
        partner = self.dataset[params[0]][0] if params[0] is not None else None
        image = self.pipeline.apply(self.dataset[idx][0], params, partner)
        return image, densify(
            entry["values"], entry["ids"], self.num_classes, self.densify
        )

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if float(torch.rand(1, generator=self.generator)) < self.p_replay:
            j = int(
                torch.randint(
                    int(self.manifest["num_samples"]), (1,), generator=self.generator
                )
            )
            return self.replay(idx, j)
        image, label = self.dataset[idx]
        if self.augment_original:
            image, _ = self.pipeline.sample(image, self.generator)  # no partner: no mixing
        return image, F.one_hot(torch.tensor(int(label)), self.num_classes).float()
