"""Dataset reinforcement, generation: run the teachers once and store what replay needs, in shards.

Faghri et al., "Reinforce Data, Multiply Impact", ICCV 2023, arXiv 2303.08983 (official code
``apple/ml-dr``, ``reinforce.py``). :func:`reinforce` draws, for every training image x_i, NS
augmentations a_ij = A(x_i; θ_ij) through a :class:`~genforge.kd.reinforce.augment.ReinforcePipeline`
(mixing partners are a random dataset index ``id2``), runs the frozen teacher ensemble once,

    p_ij = (1/K) * sum_k softmax(z_k(a_ij))                      (mean of softmaxes)

and keeps only the parameters θ_ij and the top-k entries (v_ij, c_ij) = topk(p_ij, k).

Storage: instead of the official one ``{idx}.pth.tar`` pickle per index, indices are grouped
in shards of ``shard_size`` (safetensors, no pickled objects), written atomically
(:func:`genforge.core.io.atomic_write`) and listed in ``index.json`` after each shard, so an
interrupted run resumes by skipping finished shards. ``manifest.json`` records the run's
provenance: the dataset name (:func:`dataset_tag`), size and class count, NS, k, the seed,
the shard size, the augmentation config and what the caller adds (``genforge reinforce`` adds
the teachers with the sha256 of their weight files and the temperature); every shard carries
the same record in its safetensors metadata. A resumed run refuses a directory whose manifest
or any finished shard records other values, naming every differing key;
:meth:`~genforge.kd.reinforce.dataset.ReinforcedDataset.check_complete` runs the same shard
checks before a student trains.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from genforge.config import DataConfig, setting_differences
from genforge.core.io import atomic_write, write_json
from genforge.kd.reinforce.augment import ReinforcePipeline

__all__ = ["FORMAT_VERSION", "INDEX", "MANIFEST", "SHARD_META", "check_manifest", "check_reinforced_dir",
           "check_shard", "dataset_tag", "finished_shards", "read_manifest", "reinforce", "reinforce_manifest",
           "shard_name", "shard_rows"]

MANIFEST = "manifest.json"
INDEX = "index.json"
FORMAT_VERSION = 2
SHARD_META = "genforge_reinforce"
"""The safetensors metadata key under which every shard repeats the manifest."""


def _write_json(path: Path, obj: Any) -> None:
    write_json(path, obj, indent=1, sort_keys=True)


def shard_name(shard: int) -> str:
    return f"shard_{shard:05d}.safetensors"


def read_manifest(out_dir: Path) -> dict[str, Any]:
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


def check_manifest(out_dir: Path, expected: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The directory's manifest; ValueError naming every key of ``keys`` it records otherwise."""
    manifest = read_manifest(out_dir)
    diff = setting_differences(manifest, expected, keys)
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


def check_shard(path: Path, manifest: dict[str, Any], rows: int) -> None:
    """ValueError unless the shard records the manifest's provenance and holds its shapes."""
    recorded, shapes = _shard_record(path)
    if recorded is None:
        raise ValueError(f"shard {path} records no provenance (metadata {SHARD_META!r}); rebuild the "
                         "directory with genforge reinforce")
    diff = setting_differences(recorded, manifest)
    if diff:
        raise ValueError(f"shard {path} comes from another run than {path.parent / MANIFEST} ({diff}; "
                         "shard -> manifest); refusing to mix shards of different runs")
    expected = [rows, manifest["num_samples"], manifest["top_k"]]
    if shapes.get("values") != expected or shapes.get("ids") != expected or shapes.get("indices") != [rows]:
        raise ValueError(f"shard {path} holds values {shapes.get('values')}, ids {shapes.get('ids')} and "
                         f"indices {shapes.get('indices')}; its manifest needs {expected} (rows, NS, k)")


def shard_rows(manifest: dict[str, Any], shard: int) -> int:
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
    check_manifest(out, manifest, sorted(manifest.keys() | read_manifest(out).keys()))
    done = finished_shards(out)
    for shard in done:
        check_shard(out / shard_name(shard), manifest, shard_rows(manifest, shard))
    return done


def finished_shards(out: Path) -> list[int]:
    """The shards ``index.json`` lists whose files exist."""
    index_path = out / INDEX
    listed = json.loads(index_path.read_text())["shards"] if index_path.exists() else []
    return sorted(s for s in set(listed) if (out / shard_name(s)).exists())


def dataset_tag(data: DataConfig, split: str, dataset) -> str:
    """The ``dataset_name`` a reinforced directory records, e.g. ``digits:train:16:pad:1ch``.

    It names everything that changes the images the stored params are replayed on (dataset,
    split, size, resize mode, channels), so that shards of another dataset are refused.
    """
    return f"{data.name}:{split}:{dataset.image_size}:{data.resize}:{dataset.channels}ch"


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
        num_classes = int(read_manifest(out)["num_classes"])
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
        with atomic_write(out / shard_name(shard)) as tmp:
            save_file(tensors, str(tmp), metadata={SHARD_META: json.dumps(manifest, sort_keys=True)})
        done.append(shard)
        _write_json(index_path, {"shards": sorted(done)})
        written += 1
    return out
