"""The DM/DataDAM matching loop on the bundled digits: learning, sharding, resuming."""

import pytest
import torch

import genforge.distill.api
from genforge.distill import SyntheticSet, distill_dataset
from genforge.distill.data import RealData
from genforge.distill.dm import dm_objective
from genforge.distill.matching import MatchingOptions, distill_by_matching

SMALL = dict(net_width=8, net_depth=2, batch_real=16, dsa_strategy="color_crop_cutout_scale_rotate")


def test_dm_loss_falls_on_digits(digits):
    real, _ = digits
    losses = []

    def recording(net, r, s):
        loss, logs = dm_objective(net, r, s)
        losses.append(float(loss.detach()))
        return loss, logs

    distill_by_matching(real, recording, MatchingOptions(iterations=80, init="noise", **SMALL), ipc=1, seed=0,
                        progress=False)
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])


def test_each_iteration_draws_a_fresh_network(digits):
    real, _ = digits
    weights = []

    def recording(net, r, s):
        weights.append(net.blocks[0][0].weight.detach().clone())
        assert not any(p.requires_grad for p in net.parameters()) and net.training
        return dm_objective(net, r, s)

    distill_by_matching(real, recording, MatchingOptions(iterations=2, **SMALL), ipc=1, seed=0, progress=False)
    assert not torch.equal(weights[0], weights[1])


@pytest.mark.parametrize("method", ["dm", "datadam"])
def test_class_shards_distilled_apart_equal_one_run(digits, method):
    real, _ = digits
    kwargs = dict(iterations=4, progress=False, **SMALL)
    whole = distill_dataset(method, real, ipc=2, seed=1, **kwargs)
    parts = [distill_dataset(method, real, ipc=2, seed=1, shard=(i, 3), **kwargs) for i in range(3)]
    merged = SyntheticSet.merge(parts)
    assert torch.equal(merged.labels, whole.labels)
    torch.testing.assert_close(merged.images, whole.images)


def test_batch_norm_matching_refuses_class_shards(digits):
    real, _ = digits
    with pytest.raises(ValueError, match="per-sample norm"):
        distill_dataset("dm", real, ipc=1, shard=(0, 2), iterations=1, net_norm="batchnorm", progress=False)


def test_a_killed_run_resumes_to_the_same_images(digits, tmp_path):
    real, _ = digits
    kwargs = dict(ipc=1, seed=2, progress=False, checkpoint_every=3, **SMALL)
    straight = distill_dataset("datadam", real, iterations=6, **kwargs)
    distill_dataset("datadam", real, iterations=3, output_dir=tmp_path, **kwargs)
    with pytest.raises(ValueError, match="different run"):
        distill_dataset("datadam", real, iterations=6, output_dir=tmp_path, resume=True, power=1.0, **kwargs)
    resumed = distill_dataset("datadam", real, iterations=6, output_dir=tmp_path, resume=True, **kwargs)
    torch.testing.assert_close(resumed.images, straight.images)


def test_resume_without_a_saved_state_is_an_error(digits, tmp_path):
    real, _ = digits
    with pytest.raises(FileNotFoundError, match="no distillation state"):
        distill_dataset("dm", real, ipc=1, iterations=2, output_dir=tmp_path, resume=True, progress=False, **SMALL)


@pytest.mark.parametrize(("method", "official_batch_real"), [("dm", 256), ("datadam", 64)])
def test_engines_take_their_official_real_batch_by_default(monkeypatch, method, official_batch_real):
    """DM's main_DM.py draws 256 real images per class, DataDAM's code 64."""
    g = torch.Generator().manual_seed(0)
    real = RealData(torch.rand(600, 1, 8, 8, generator=g), torch.arange(2).repeat_interleave(300), 2)
    sizes = []

    def recording(net, r, s, **kwargs):
        sizes.append([len(batch) for batch in r])
        return torch.cat(s).sum() * 0, {}

    monkeypatch.setattr(genforge.distill.api, "dm_objective" if method == "dm" else "datadam_objective", recording)
    distill_dataset(method, real, ipc=1, iterations=2, net_width=4, net_depth=2, progress=False)
    assert sizes == [[official_batch_real] * 2] * 2
