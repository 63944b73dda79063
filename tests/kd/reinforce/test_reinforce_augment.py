"""The replayable augmentations of dataset reinforcement (Faghri et al., arXiv 2303.08983), RandAugment included."""

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from genforge.data.transforms import signed_to_uint8
from genforge.kd.reinforce.augment import (
    ORDER,
    CutMix,
    HorizontalFlip,
    MixUp,
    RandAugment,
    RandomErasing,
    RandomResizedCrop,
    ReinforcePipeline,
)


def _images(n=4, channels=3, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g) * 2 - 1


def test_registry_places_rand_augment_after_flip_before_erasing():
    assert ORDER.index("horizontal_flip") < ORDER.index("rand_augment") < ORDER.index("random_erasing")
    pipe = ReinforcePipeline([RandomErasing(), RandAugment(), RandomResizedCrop(8)])
    assert [t.name for t in pipe.transforms] == ["random_resized_crop", "rand_augment", "random_erasing"]


@pytest.mark.parametrize("channels", [1, 3])
def test_replay_is_bitwise_exact_through_compression(channels):
    ra = RandAugment(num_ops=3, magnitude=12, p=1.0)
    g = torch.Generator().manual_seed(1)
    seen = set()
    for x in _images(n=60, channels=channels):
        y, params = ra.sample(x, g)
        flat = ra.encode(params)
        decoded, end = ra.decode(flat, 0)
        assert end == len(flat) == 1 + 2 * 3
        assert decoded == params
        assert torch.equal(ra.apply(x, params), y)
        assert torch.equal(ra.apply(x, decoded), y)
        seen.update(op for op, _ in params)
    assert seen == set(range(len(RandAugment.OPS)))  # every op was exercised and replayed


def test_params_differ_across_draws_and_signs_are_drawn():
    ra = RandAugment(num_ops=2, magnitude=9)
    g = torch.Generator().manual_seed(0)
    x = _images(1)[0]
    draws = [ra.sample(x, g)[1] for _ in range(50)]
    assert len(set(draws)) > 40
    rotations = {m for params in draws for op, m in params if RandAugment.OPS[op] == "rotate"}
    assert rotations == {9.0, -9.0}  # bin 9 of 31 is 30 * 9 / 30 degrees, either sign


def test_magnitudes_follow_torchvision_ranges():
    ra = RandAugment(magnitude=15, num_magnitude_bins=31)
    mag = {name: ra._magnitude(i, 12, 20) for i, name in enumerate(RandAugment.OPS)}
    assert mag["shear_x"] == pytest.approx(0.15)
    assert mag["translate_x"] == pytest.approx(150 / 331 * 20 / 2)
    assert mag["translate_y"] == pytest.approx(150 / 331 * 12 / 2)
    assert mag["posterize"] == 6.0 and mag["solarize"] == 0.5 and mag["identity"] == 0.0


def test_an_op_equals_torchvision_in_the_unit_range():
    ra = RandAugment()
    x = _images(1)[0]
    rotate, solarize = RandAugment.OPS.index("rotate"), RandAugment.OPS.index("solarize")
    expected = TF.solarize(TF.rotate((x + 1) / 2, angle=-12.0), 0.4) * 2 - 1
    torch.testing.assert_close(ra.apply(x, ((rotate, -12.0), (solarize, 0.4))), expected)


def test_p_zero_is_none_and_identity():
    ra = RandAugment(p=0.0)
    g = torch.Generator().manual_seed(0)
    for x in _images(5):
        y, params = ra.sample(x, g)
        assert params is None and y is x
        assert ra.decode(ra.encode(None), 0) == (None, 1)


def test_value_range_is_preserved():
    ra = RandAugment(num_ops=2, magnitude=30)
    g = torch.Generator().manual_seed(3)
    for x in _images(40):
        y = ra.sample(x, g)[0]
        assert y.min() >= -1 and y.max() <= 1 and y.dtype == x.dtype
    unit = RandAugment(value_range=(0.0, 1.0), magnitude=30)
    for x in (_images(20) + 1) / 2:
        y = unit.sample(x, g)[0]
        assert y.min() >= 0 and y.max() <= 1


def test_replay_inside_mixing_pairs_through_compression():
    pipe = ReinforcePipeline([RandomResizedCrop(8), RandAugment(p=0.8), RandomErasing(0.5), MixUp(1.0, 1.0)])
    images = _images(6, size=10)
    g = torch.Generator().manual_seed(2)
    mixed = 0
    for i in range(6):
        id2 = (i + 1) % 6
        y, params = pipe.sample(images[i], g, partner=(id2, images[id2]))
        assert params[0] == id2
        ra_img, ra_img2 = params[2]
        mixed += ra_img is not None and ra_img2 is not None and ra_img != ra_img2
        replayed = pipe.apply(images[i], pipe.decompress(pipe.compress(params)), images[id2])
        assert torch.equal(replayed, y)
    assert mixed > 0


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="magnitude"):
        RandAugment(magnitude=31, num_magnitude_bins=31)
    with pytest.raises(ValueError, match="num_ops"):
        RandAugment(num_ops=0)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        RandAugment().sample(torch.zeros(2, 8, 8), torch.Generator())


def test_registry_fixes_order():
    # given out of order on purpose: the registry fixes the order
    pipe = ReinforcePipeline([CutMix(), RandomErasing(0.5), MixUp(), HorizontalFlip(0.5), RandomResizedCrop(5)])
    names = [t.name for t in pipe.transforms]
    assert names == [
        "random_resized_crop",
        "horizontal_flip",
        "random_erasing",
        "mixup",
        "cutmix",
    ]


def test_single_transforms_replay_exactly_and_params_vary():
    x, x2 = torch.rand(3, 10, 10), torch.rand(3, 10, 10)
    g = torch.Generator().manual_seed(1)
    for t in (RandomResizedCrop(5), HorizontalFlip(0.5), RandomErasing(0.9)):
        seen = []
        for _ in range(8):
            out, p = t.sample(x, g)
            torch.testing.assert_close(t.apply(x, p), out, rtol=0, atol=0)
            seen.append(p)
        assert len({repr(p) for p in seen}) > 1
    for t in (MixUp(1.0, 0.9), CutMix(1.0, 0.9)):
        seen = []
        for _ in range(8):
            out, p = t.sample(x, g, x2)
            torch.testing.assert_close(t.apply(x, p, x2), out, rtol=0, atol=0)
            seen.append(p)
        assert len({repr(p) for p in seen}) > 1


@pytest.mark.parametrize("mix_p", [0.0, 0.5, 1.0])
def test_pipeline_replay_and_compress_roundtrip(mix_p):
    data = _images(n=6, size=10)
    pipe = ReinforcePipeline([RandomResizedCrop(5), HorizontalFlip(0.5), RandomErasing(0.5), MixUp(1.0, mix_p),
                              CutMix(1.0, mix_p)])
    g = torch.Generator().manual_seed(3)
    mixed = 0
    for i in range(len(data)):
        for _ in range(4):
            id2 = int(torch.randint(len(data), (1,), generator=g))
            out, params = pipe.sample(data[i], g, partner=(id2, data[id2]))
            assert out.shape == (3, 5, 5)
            flat = pipe.compress(params)
            assert all(isinstance(v, float) for v in flat)
            back = pipe.decompress(flat)
            assert back == params
            partner = data[back[0]] if back[0] is not None else None
            mixed += back[0] is not None
            torch.testing.assert_close(
                pipe.apply(data[i], back, partner), out, rtol=0, atol=0
            )
    if mix_p == 1.0:
        assert mixed == len(data) * 4
    if mix_p == 0.0:
        assert mixed == 0


def test_random_erasing_fills_black_like_ml_dr():
    """ml-dr erases to 0 before normalisation: black, pixel 0 (-1 in our [-1, 1] images)."""
    x = torch.rand(3, 10, 10) * 1.8 - 0.9  # no black pixel before erasing
    out, (top, left, h, w) = RandomErasing(p=1.0).sample(x, torch.Generator().manual_seed(0))
    box = torch.zeros(10, 10, dtype=torch.bool)
    box[top : top + h, left : left + w] = True
    assert box.any()
    assert (signed_to_uint8(out[:, box]) == 0).all()
    torch.testing.assert_close(out[:, ~box], x[:, ~box], rtol=0, atol=0)
