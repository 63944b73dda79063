"""Dataset reinforcement: store augmentations and teacher top-k probabilities once, replay them.

Faghri et al., "Reinforce Data, Multiply Impact", ICCV 2023, arXiv 2303.08983 (official code
``apple/ml-dr``). For every training image x_i the generation pass draws NS augmentations
a_ij = A(x_i; θ_ij) with recorded parameters θ_ij, runs the frozen teacher ensemble once,

    p_ij = (1/K) * sum_k softmax(z_k(a_ij))                      (mean of softmaxes)

and keeps only its top-k entries (v_ij, c_ij) = topk(p_ij, k). Training then replays: with
probability p it picks a random j, rebuilds a_ij = A(x_i; θ_ij) exactly from the stored θ_ij
(no teacher call) and uses the densified target

    smooth:  t[c] = v_c for c in c_ij,   t[c] = (1 - sum v_ij) / (C - k) elsewhere
    zeros:   t[c_ij] = softmax(v_ij),    0 elsewhere  (the official quirk; also the
             fallback of ``smooth`` when the leftover mass 1 - sum v_ij is negative)

otherwise the original image, through a fresh draw of the pipeline's per-image transforms
(everything but MixUp/CutMix; ml-dr gives these samples its train transform, the same crop,
RandAugment and erasing), with a one-hot target. The training loss is
KL(t || softmax(student)) with batch-mean reduction, i.e. plain ERM cost.

The augmentations (:mod:`genforge.kd.augment`) run in an order fixed by a registry, whatever
order they are given in: RandomResizedCrop -> HorizontalFlip -> RandAugment -> RandomErasing
-> MixUp -> CutMix.
Mixing partners are a random dataset index ``id2``; the partner image goes through the same
pre-mixing transforms with its own parameters, stored as a pair (θ_img, θ_img2).

Storage: instead of the official one ``{idx}.pth.tar`` pickle per index, indices are grouped
in shards of ``shard_size`` (safetensors, no pickled objects), written atomically
(:func:`genforge.core.io.atomic_write`) and listed in ``index.json`` after each shard, so an interrupted run resumes by
skipping finished shards. ``manifest.json`` records the run's provenance: the dataset name,
size and class count, NS, k, the seed, the shard size, the augmentation config and what the
caller adds (``genforge reinforce`` adds the teachers with the sha256 of their weight files
and the temperature); every shard carries the same record in its safetensors metadata. A
resumed run refuses a directory whose manifest or any finished shard records other values,
naming every differing key, and :meth:`ReinforcedDataset.check_complete` checks every shard's
record and tensor shapes against the manifest before a student trains.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from genforge.core.io import atomic_write
from genforge.kd.augment import ReinforcePipeline

MANIFEST = "manifest.json"
INDEX = "index.json"
FORMAT_VERSION = 2
SHARD_META = "genforge_reinforce"
"""The safetensors metadata key under which every shard repeats the manifest."""


def _write_json(path: Path, obj: Any) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))


def _shard_name(shard: int) -> str:
    return f"shard_{shard:05d}.safetensors"


def _differences(recorded: dict[str, Any], expected: dict[str, Any], keys: Sequence[str]) -> str:
    """'key: recorded -> expected; ...' for the keys whose values differ ('' when none does)."""
    return "; ".join(
        f"{key}: {recorded.get(key)!r} -> {expected.get(key)!r}"
        for key in keys
        if recorded.get(key) != expected.get(key)
    )


def _read_manifest(out_dir: Path) -> dict[str, Any]:
    path = out_dir / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {out_dir} is not a reinforced dataset")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} is not a reinforced-dataset manifest of format {FORMAT_VERSION} (found "
            f"{manifest.get('format_version') if isinstance(manifest, dict) else manifest!r}); "
            "rebuild the directory with genforge reinforce"
        )
    return manifest


def _check_manifest(out_dir: Path, expected: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The directory's manifest; ValueError naming every key of ``keys`` it records otherwise."""
    manifest = _read_manifest(out_dir)
    diff = _differences(manifest, expected, keys)
    if diff:
        raise ValueError(
            f"{out_dir} was reinforced with other settings ({diff}; recorded -> this run); "
            "refusing to mix shards of different runs: use another output directory"
        )
    return manifest


def _shard_record(path: Path) -> tuple[dict[str, Any] | None, dict[str, list[int]]]:
    """(the provenance a shard's metadata records, its tensors' shapes); ValueError if unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get(SHARD_META)
            shapes = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"shard {path} is not a readable safetensors file ({err})") from None
    return (json.loads(meta) if meta is not None else None), shapes


def _check_shard(path: Path, manifest: dict[str, Any], rows: int) -> None:
    """ValueError unless the shard records the manifest's provenance and holds its shapes."""
    recorded, shapes = _shard_record(path)
    if recorded is None:
        raise ValueError(f"shard {path} records no provenance (metadata {SHARD_META!r}); rebuild the "
                         "directory with genforge reinforce")
    diff = _differences(recorded, manifest, sorted(recorded.keys() | manifest.keys()))
    if diff:
        raise ValueError(f"shard {path} comes from another run than {path.parent / MANIFEST} ({diff}; "
                         "shard -> manifest); refusing to mix shards of different runs")
    expected = [rows, manifest["num_samples"], manifest["top_k"]]
    if shapes.get("values") != expected or shapes.get("ids") != expected or shapes.get("indices") != [rows]:
        raise ValueError(f"shard {path} holds values {shapes.get('values')}, ids {shapes.get('ids')} and "
                         f"indices {shapes.get('indices')}; its manifest needs {expected} (rows, NS, k)")


def _shard_rows(manifest: dict[str, Any], shard: int) -> int:
    size, shard_size = int(manifest["dataset_size"]), int(manifest["shard_size"])
    return min(shard_size, size - shard * shard_size)


def check_reinforced_dir(out_dir: str | os.PathLike, manifest: dict[str, Any]) -> list[int]:
    """The finished shards of ``out_dir`` if it holds the run ``manifest`` describes ([] if new).

    ValueError, before any work, naming every key its manifest or any finished shard records
    with another value than ``manifest``.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output directory {str(out)!r} is a file; a reinforced dataset is a directory")
    if not (out / MANIFEST).exists():
        return []
    _check_manifest(out, manifest, sorted(manifest.keys() | _read_manifest(out).keys()))
    done = finished_shards(out)
    for shard in done:
        _check_shard(out / _shard_name(shard), manifest, _shard_rows(manifest, shard))
    return done


def finished_shards(out: Path) -> list[int]:
    """The shards ``index.json`` lists whose files exist."""
    index_path = out / INDEX
    listed = json.loads(index_path.read_text())["shards"] if index_path.exists() else []
    return sorted(s for s in set(listed) if (out / _shard_name(s)).exists())


def reinforce_manifest(
    dataset_name: str,
    dataset_size: int,
    num_classes: int,
    num_samples: int,
    top_k: int,
    seed: int,
    shard_size: int,
    pipeline: ReinforcePipeline,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The record a reinforced directory's manifest and every shard carry (JSON values)."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset_name": dataset_name,
        "dataset_size": dataset_size,
        "num_classes": num_classes,
        "num_samples": num_samples,
        "top_k": top_k,
        "seed": seed,
        "shard_size": shard_size,
        "pipeline": pipeline.config(),
    }
    clash = sorted(set(provenance or {}) & set(manifest))
    if clash:
        raise ValueError(f"provenance may not redefine {clash}")
    return json.loads(json.dumps({**manifest, **(provenance or {})}, sort_keys=True))


def reinforce(
    dataset: Sequence[tuple[torch.Tensor, int]],
    teacher: Callable[[torch.Tensor], torch.Tensor],
    out_dir: str | os.PathLike,
    pipeline: ReinforcePipeline,
    num_samples: int = 4,
    top_k: int = 3,
    seed: int = 0,
    shard_size: int = 256,
    dataset_name: str | None = None,
    device: str | torch.device = "cpu",
    max_shards: int | None = None,
    progress: bool = False,
    batch_size: int | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write NS augmentations and the teacher's top-k probabilities for every dataset index.

    ``dataset[i]`` returns (float image (C, H, W), label); ``teacher`` maps a batch to
    probabilities (B, C), e.g. a ``TeacherEnsemble`` (mean of softmaxes). Each index draws
    from its own generator seeded by (seed, index), so the output does not depend on shard
    boundaries or on resuming. Finished shards listed in ``index.json`` whose files exist are
    skipped; ``max_shards`` stops after writing that many new shards. ``progress`` shows a
    tqdm bar over the shards; ``batch_size`` caps how many images the teacher sees at once
    (default: a whole shard). ``provenance`` adds keys to the record every shard and the
    manifest carry (the teachers, their weights' sha256 and the temperature: the teacher
    callable itself cannot be recorded); a directory recording other values is refused.
    """
    if num_samples < 1 or top_k < 1 or shard_size < 1:
        raise ValueError(
            f"num_samples, top_k and shard_size must be positive, got {num_samples}, "
            f"{top_k}, {shard_size}"
        )
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive or None, got {batch_size}")
    out = Path(out_dir)
    size = len(dataset)
    if (out / MANIFEST).exists():
        num_classes = int(_read_manifest(out)["num_classes"])
    else:
        probe = pipeline.sample(dataset[0][0], torch.Generator().manual_seed(seed))[0]
        with torch.no_grad():
            num_classes = int(teacher(probe[None].to(device)).shape[-1])
    if top_k > num_classes:
        raise ValueError(f"top_k={top_k} exceeds the teacher's {num_classes} classes")
    manifest = reinforce_manifest(dataset_name or type(dataset).__name__, size, num_classes, num_samples, top_k,
                                  seed, shard_size, pipeline, provenance)
    done = check_reinforced_dir(out, manifest)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MANIFEST).exists():
        _write_json(out / MANIFEST, manifest)
    index_path = out / INDEX
    written = 0
    shards = range(math.ceil(size / shard_size))
    for shard in tqdm(shards, desc="reinforce", unit="shard", disable=not progress):
        if shard in done:
            continue
        if max_shards is not None and written >= max_shards:
            break
        indices = range(shard * shard_size, min((shard + 1) * shard_size, size))
        images, flats = [], []
        for idx in indices:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + idx)
            x = dataset[idx][0]
            for _ in range(num_samples):
                id2 = int(torch.randint(0, size, (1,), generator=generator))
                img, params = pipeline.sample(
                    x, generator, partner=(id2, dataset[id2][0])
                )
                images.append(img)
                flats.append(pipeline.compress(params))
        stacked = torch.stack(images)
        with torch.no_grad():
            probs = torch.cat(
                [
                    teacher(chunk.to(device)).float().cpu()
                    for chunk in stacked.split(batch_size or len(stacked))
                ]
            )
        if probs.shape != (len(images), num_classes):
            raise ValueError(
                f"the teacher returned shape {tuple(probs.shape)}, expected "
                f"({len(images)}, {num_classes}) as recorded in {out / MANIFEST}"
            )
        values, ids = probs.topk(top_k, dim=-1)
        width = max(len(f) for f in flats)
        params = torch.full((len(flats), width), float("nan"), dtype=torch.float64)
        for row, flat in enumerate(flats):
            params[row, : len(flat)] = torch.tensor(flat, dtype=torch.float64)
        n = len(indices)
        tensors = {
            "indices": torch.tensor(list(indices), dtype=torch.int64),
            "values": values.reshape(n, num_samples, top_k).contiguous(),
            "ids": ids.reshape(n, num_samples, top_k).contiguous(),
            "params": params.reshape(n, num_samples, width).contiguous(),
            "params_len": torch.tensor([len(f) for f in flats]).reshape(n, num_samples),
        }
        with atomic_write(out / _shard_name(shard)) as tmp:
            save_file(tensors, str(tmp), metadata={SHARD_META: json.dumps(manifest, sort_keys=True)})
        done.append(shard)
        _write_json(index_path, {"shards": sorted(done)})
        written += 1
    return out


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
        self.manifest = _check_manifest(self.out_dir, expected, list(expected))
        self.pipeline = ReinforcePipeline.from_config(self.manifest["pipeline"])
        self.num_classes = int(self.manifest["num_classes"])
        self.p_replay = float(p_replay)
        self.densify = densify
        self.augment_original = bool(augment_original)
        self.generator = generator
        index_path = self.out_dir / INDEX
        self.finished = (
            set(json.loads(index_path.read_text())["shards"])
            if index_path.exists()
            else set()
        )
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
            if s not in self.finished or not (self.out_dir / _shard_name(s)).exists()
        ]
        if missing:
            raise FileNotFoundError(
                f"{self.out_dir}: shards {missing} of {shards} are missing or unfinished; "
                "rerun reinforce() (genforge reinforce RECIPE) on this directory to complete it"
            )
        for shard in range(shards):
            _check_shard(self.out_dir / _shard_name(shard), self.manifest, _shard_rows(self.manifest, shard))

    def _shard(self, shard: int) -> dict[str, torch.Tensor]:
        if shard not in self._cache:
            path = self.out_dir / _shard_name(shard)
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
