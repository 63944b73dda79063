"""Dataset reinforcement (Faghri et al., arXiv 2303.08983): the stored shards and their replay."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genforge.kd.ensemble import TeacherEnsemble
from genforge.kd.reinforce import ReinforcedDataset, ReinforcePipeline, densify, reinforce
from genforge.kd.reinforce.augment import CutMix, HorizontalFlip, MixUp, RandomErasing, RandomResizedCrop

NS, K, C = 4, 3, 10


class TinySet(torch.utils.data.Dataset):
    def __init__(self, n=6, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, 10, 10, generator=g)
        self.labels = torch.randint(0, C, (n,), generator=g)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


class OtherSet(TinySet):
    pass


def _teacher():
    torch.manual_seed(0)
    linears = [nn.Sequential(nn.Flatten(), nn.Linear(3 * 5 * 5, C)) for _ in range(2)]
    return TeacherEnsemble(linears)


class Exploding(nn.Module):
    def forward(self, x):
        raise AssertionError("the teacher must not be called during replay")


def _run(data, teacher, out, **kw):
    return reinforce(
        data,
        teacher,
        out,
        _pipeline(),
        num_samples=NS,
        top_k=K,
        seed=5,
        shard_size=4,
        **kw,
    )


def _pipeline(mix_p=0.5):
    # Given out of order on purpose: the registry fixes the order.
    return ReinforcePipeline(
        [
            CutMix(1.0, mix_p),
            RandomErasing(0.5),
            MixUp(1.0, mix_p),
            HorizontalFlip(0.5),
            RandomResizedCrop(5),
        ]
    )


def test_densify_smooth_and_zeros():
    values, ids = torch.tensor([0.5, 0.2, 0.1]), torch.tensor([4, 0, 7])
    smooth = densify(values, ids, C, "smooth")
    torch.testing.assert_close(smooth.sum(), torch.tensor(1.0))
    torch.testing.assert_close(smooth[ids], values)
    torch.testing.assert_close(smooth[1], torch.tensor(0.2 / 7))
    zeros = densify(values, ids, C, "zeros")
    torch.testing.assert_close(zeros[ids], torch.softmax(values, 0))
    assert zeros.sum().item() == pytest.approx(1.0) and (zeros > 0).sum() == K


@pytest.fixture()
def reinforced(tmp_path):
    data, teacher = TinySet(), _teacher()
    out = _run(data, teacher, tmp_path / "dr")
    return data, teacher, out


def test_stored_probs_are_topk_of_ensemble_on_augmented_image(reinforced):
    data, teacher, out = reinforced
    ds = ReinforcedDataset(data, out, p_replay=1.0)
    all_params, mixed = [], 0
    for i in range(len(data)):
        entries = ds.entries(i)
        assert len(entries) == NS
        for j, e in enumerate(entries):
            image, target = ds.replay(i, j)
            probs = teacher(image[None])[0]
            expected = torch.softmax(
                torch.stack([t(image[None])[0] for t in teacher.teachers]), -1
            ).mean(0)
            torch.testing.assert_close(probs, expected)
            top = probs.topk(K)
            torch.testing.assert_close(e["values"], top.values)
            torch.testing.assert_close(e["ids"], top.indices)
            torch.testing.assert_close(target.sum(), torch.tensor(1.0))
            torch.testing.assert_close(target[e["ids"]], e["values"])
            all_params.append(repr(e["params"]))
            mixed += e["params"][0] is not None
    assert len(set(all_params)) == len(all_params)
    assert 0 < mixed < len(all_params)


def test_shard_rows_hold_their_dataset_index(reinforced):
    data, _, out = reinforced
    from safetensors.torch import load_file

    rows = torch.cat(
        [
            load_file(str(out / f"shard_{s:05d}.safetensors"))["indices"]
            for s in range(2)
        ]
    )
    assert rows.tolist() == list(range(len(data)))


def test_replay_never_calls_teacher_and_p0_is_one_hot(reinforced, monkeypatch):
    data, _, out = reinforced

    def no_module_calls(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__} was called during replay")

    monkeypatch.setattr(nn.Module, "__call__", no_module_calls)
    ds = ReinforcedDataset(data, out, p_replay=1.0)
    for i in range(len(data)):
        image, target = ds[i]
        assert image.shape == (3, 5, 5) and target.sum().item() == pytest.approx(1.0)
    plain = ReinforcedDataset(data, out, p_replay=0.0, augment_original=False)
    for i in range(len(data)):
        image, target = plain[i]
        torch.testing.assert_close(image, data[i][0])
        assert (
            target.tolist()
            == torch.nn.functional.one_hot(torch.tensor(data[i][1]), C).float().tolist()
        )


def test_items_not_replayed_get_a_fresh_per_image_augmentation_never_mixed(tmp_path):
    """As ml-dr's train transform: the 1 - p originals are cropped like the replays, not mixed."""
    data, teacher = TinySet(), _teacher()
    full_crop = RandomResizedCrop(5, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # the whole image
    out = reinforce(data, teacher, tmp_path / "dr", ReinforcePipeline([full_crop, MixUp(1.0, 1.0)]),
                    num_samples=2, top_k=K, seed=0, shard_size=4)
    replayed = ReinforcedDataset(data, out, p_replay=1.0)
    originals = ReinforcedDataset(data, out, p_replay=0.0)
    mixed_with_another = 0
    for i in range(len(data)):
        own = F.interpolate(data[i][0][None], size=(5, 5), mode="bilinear", align_corners=False)[0]
        image, target = originals[i]
        torch.testing.assert_close(image, own, rtol=0, atol=0)
        assert target.tolist() == F.one_hot(torch.tensor(data[i][1]), C).float().tolist()
        for j, entry in enumerate(replayed.entries(i)):  # every stored replay is mixed
            if entry["params"][0] != i:
                assert not torch.equal(replayed.replay(i, j)[0], own)
                mixed_with_another += 1
    assert mixed_with_another > 0


def test_items_not_replayed_are_drawn_afresh_from_the_generator(reinforced):
    data, _, out = reinforced

    def originals(seed):
        ds = ReinforcedDataset(data, out, p_replay=0.0, generator=torch.Generator().manual_seed(seed))
        return [ds[i][0] for i in range(len(data)) for _ in range(3)]

    first, again, other = originals(0), originals(0), originals(1)
    assert all(image.shape == (3, 5, 5) for image in first)  # the replays' crop size
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert len({image.numpy().tobytes() for image in first}) > len(data)


def test_resume_after_kill_gives_identical_data(tmp_path, reinforced):
    data, teacher, full = reinforced
    part = tmp_path / "part"
    _run(data, teacher, part, max_shards=1)
    assert json.loads((part / "index.json").read_text())["shards"] == [0]
    with pytest.raises(FileNotFoundError, match="shard 1"):
        ReinforcedDataset(data, part, p_replay=1.0).entries(5)
    before = (part / "shard_00000.safetensors").read_bytes()
    _run(data, teacher, part)
    assert (part / "shard_00000.safetensors").read_bytes() == before
    # Every shard is finished: a rerun skips them all and never calls the teacher.
    _run(data, Exploding(), part)
    (part / "shard_00001.safetensors").unlink()
    _run(data, teacher, part)
    for s in range(2):
        name = f"shard_{s:05d}.safetensors"
        assert (part / name).read_bytes() == (full / name).read_bytes()


def test_other_dataset_and_missing_shard_are_refused(tmp_path, reinforced):
    data, teacher, out = reinforced
    with pytest.raises(ValueError, match="dataset_name"):
        ReinforcedDataset(OtherSet(), out)
    with pytest.raises(ValueError, match="dataset_size"):
        ReinforcedDataset(TinySet(n=5), out)
    with pytest.raises(ValueError, match="refusing"):
        _run(OtherSet(), teacher, out)
    (out / "shard_00001.safetensors").unlink()
    ds = ReinforcedDataset(data, out, p_replay=1.0)
    ds.entries(0)
    with pytest.raises(FileNotFoundError, match="missing"):
        ds[4]
