"""RevCol (arXiv 2212.11696): reversible columns, their memory-saving backward, intermediate supervision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import genforge.backbones.revcol  # noqa: F401  (registers the gf_revcol_* models)
from genforge.backbones.registry import load_official
from genforge.backbones.revcol import RevCol, intermediate_supervision_loss

FIXTURE = Path(__file__).parents[1] / "fixtures" / "backbones" / "revcol_official_keys.json"
NANO = dict(dims=(8, 16, 24, 32), depths=(1, 2, 1, 1), num_classes=10)


def _official_keys() -> dict[str, list[int]]:
    return json.loads(FIXTURE.read_text())["keys"]


def _randomised(model: RevCol, seed: int = 0) -> RevCol:
    """Move weights off their init (layer scale 1e-6 would hide the blocks) and give gamma both signs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".gamma." in name:
                magnitude = 0.4 + torch.rand(p.shape, generator=gen, dtype=p.dtype)
                p.copy_(magnitude * torch.where(torch.rand(p.shape, generator=gen) < 0.3, -1.0, 1.0).to(p.dtype))
            else:
                p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def _grads(model: RevCol, x: torch.Tensor, loss_fn, seed: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    params = list(model.parameters())
    loss = loss_fn(model, x)
    return list(torch.autograd.grad(loss, [x, *params]))


def test_nano_honours_the_timm_contract(timm_contract):
    timm_contract("gf_revcol_nano", img_size=32)


def test_nano_loss_falls_on_digits_with_the_reversible_backward(loss_falls):
    loss_falls("gf_revcol_nano", img_size=32, optimizer=torch.optim.AdamW, lr=3e-3, batch_size=32)


def test_reversible_backward_gives_plain_autograd_gradients_with_drop_path():
    model = _randomised(RevCol(**NANO, num_columns=4, drop_path_rate=0.5).double()).train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.double, requires_grad=True)
    with torch.no_grad():
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(1)
        assert not torch.allclose(a, model(x)), "drop-path must be active for this test to mean anything"

    def loss_fn(m, inp):
        return m(inp).logsumexp(-1).sum()

    model.save_memory = False
    plain = _grads(model, x, loss_fn)
    model.save_memory = True
    reversible = _grads(model, x, loss_fn)  # recomputation replays the same drop-path masks
    for p, r in zip(plain, reversible):
        assert r is not None
        torch.testing.assert_close(r, p, rtol=1e-9, atol=1e-11)


def test_reversible_backward_gives_plain_gradients_for_the_intermediate_supervision_loss():
    """Auxiliary heads read middle columns, so gradients also enter the columns' outputs from outside."""
    model = _randomised(RevCol(**NANO, num_columns=4, inter_supv=True).double()).train()
    x = torch.rand(1, 3, 32, 32, dtype=torch.double, requires_grad=True)
    target = torch.tensor([3])

    def loss_fn(m, inp):
        logits, recons = m.forward_intermediate_supervision(inp)
        return intermediate_supervision_loss(logits, recons, inp.detach(), target)

    model.save_memory = False
    plain = _grads(model, x, loss_fn)
    model.save_memory = True
    reversible = _grads(model, x, loss_fn)
    names = ["input"] + [n for n, _ in model.named_parameters()]
    for name, p, r in zip(names, plain, reversible):
        assert p is not None and p.abs().sum() > 0, f"{name} gets no gradient from the compound loss"
        torch.testing.assert_close(r, p, rtol=1e-9, atol=1e-11, msg=name)


def _saved_activation_bytes(model: RevCol, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd packs for backward, each storage once, parameters excluded."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    packed: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            packed[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(packed.values())


def test_reversible_columns_store_only_their_outputs_so_memory_barely_grows_with_columns():
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    saved = {}
    for columns in (2, 4):
        for save_memory in (True, False):
            torch.manual_seed(0)
            model = RevCol(**NANO, num_columns=columns, save_memory=save_memory).train()
            saved[columns, save_memory] = _saved_activation_bytes(model, x)
    # One column's four outputs X_0..X_3 at strides 4-32 of a 32x32 float32 input.
    column_outputs = 4 * (8 * 8 * 8 + 16 * 4 * 4 + 24 * 2 * 2 + 32 * 1 * 1)
    reversible_growth = (saved[4, True] - saved[2, True]) / 2
    plain_growth = (saved[4, False] - saved[2, False]) / 2
    assert saved[4, True] * 4 < saved[4, False]
    assert reversible_growth <= column_outputs
    assert plain_growth >= 10 * column_outputs


def test_inverse_reconstructs_the_previous_column_to_numerical_precision():
    for dtype, tol in ((torch.double, 1e-12), (torch.float, 1e-5)):
        model = _randomised(RevCol(**NANO, num_columns=3).to(dtype)).eval()
        with torch.no_grad():
            x = model.stem(torch.randn(2, 3, 32, 32, dtype=dtype))
            first = model.columns[0](x, None)
            second = model.columns[1](x, first)
            third = model.columns[2](x, second)
            for column, states, prev in ((model.columns[2], third, second), (model.columns[1], second, first)):
                for rebuilt, true in zip(column.invert(x, states), prev):
                    torch.testing.assert_close(rebuilt, true, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="first column"):
        model.columns[0].invert(x, first)


def test_gamma_is_kept_away_from_zero_with_its_sign():
    model = RevCol(**NANO, num_columns=2).eval()
    gamma = model.columns[1].gamma[1]
    with torch.no_grad():
        gamma.view(-1)[:4] = torch.tensor([0.0, -1e-5, 1e-5, -0.3])
        model(torch.randn(1, 3, 32, 32))
    torch.testing.assert_close(gamma.view(-1)[:4], torch.tensor([1e-3, -1e-3, 1e-3, -0.3]))


def test_grad_checkpointing_recomputes_columns_only_in_plain_mode():
    """Checkpointing a column in plain mode recomputes it once; a reversible column already recomputes
    itself, so checkpointing is not stacked on top (each level still runs twice, not three times)."""
    model = _randomised(RevCol(**NANO, num_columns=2)).train()
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    calls = []
    model.columns[1].levels[2].register_forward_hook(lambda *_: calls.append(1))

    def run(save_memory, checkpointing):
        model.save_memory = save_memory
        model.set_grad_checkpointing(checkpointing)
        calls.clear()
        grads = _grads(model, x, lambda m, inp: m(inp).square().mean())
        return len(calls), grads

    runs_plain, plain = run(False, False)
    runs_ckpt, ckpt = run(False, True)
    runs_rev, _ = run(True, True)
    assert (runs_plain, runs_ckpt, runs_rev) == (1, 2, 2)
    for p, c in zip(plain, ckpt):
        torch.testing.assert_close(c, p)


def test_only_the_last_column_feeds_the_head_and_auxiliary_outputs_follow_the_official_taps():
    model = _randomised(RevCol(**NANO, num_columns=8, inter_supv=True)).eval()
    assert model.aux_columns == [1, 3, 5]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, recons = model.forward_intermediate_supervision(x)
        out = model(x)
        for module in [*model.cls_blocks, *model.decoder_blocks]:
            for p in module.parameters():
                p.zero_()
        untouched = model(x)
    assert len(logits) == 4 and len(recons) == 3
    assert all(r.shape == x.shape for r in recons)
    torch.testing.assert_close(logits[-1], out)
    torch.testing.assert_close(untouched, out)
    assert not torch.allclose(logits[0], logits[-1])


def test_intermediate_supervision_loss_weighs_early_reconstruction_and_late_classification_more():
    target = torch.tensor([1])
    image = torch.rand(1, 3, 4, 4)
    logits = [torch.randn(1, 5) for _ in range(4)]
    recons = [torch.randn(1, 3, 4, 4) for _ in range(3)]
    bce = [F.binary_cross_entropy_with_logits(r, image.clamp(0.01, 0.99)) for r in recons]
    ce = [F.cross_entropy(z, target) for z in logits]
    expected = ce[3] + sum(bce[k] * (1 - k / 3) * 3.0 + ce[k] * (k + 1) / 4 * 0.7 for k in range(3))
    torch.testing.assert_close(intermediate_supervision_loss(logits, recons, image, target), expected)
    with pytest.raises(ValueError, match="one more logits"):
        intermediate_supervision_loss(logits[:3], recons, image, target)


@pytest.mark.parametrize("name, paper_millions", [
    ("gf_revcol_tiny", 30), ("gf_revcol_small", 60), ("gf_revcol_base", 138)])  # official README table
def test_paper_configs_have_the_paper_parameter_counts(meta_param_count, name, paper_millions):
    count = meta_param_count(name)
    assert abs(count / 1e6 - paper_millions) / paper_millions < 0.05, count


def test_tiny_has_exactly_the_official_classification_parameters(meta_param_count):
    """Official RevCol-T minus its auxiliary modules and the first column's gammas (which scale zero)."""
    official = sum(torch.Size(shape).numel() for key, shape in _official_keys().items()
                   if not key.startswith(("cls_blocks.0", "cls_blocks.1", "cls_blocks.2", "decoder_blocks"))
                   and not key.startswith("subnet0.alpha"))
    assert meta_param_count("gf_revcol_tiny") == official


@pytest.mark.parametrize("inter_supv", [False, True])
def test_official_revcol_tiny_keys_load_strictly(inter_supv):
    with torch.device("meta"):
        state = {k: torch.zeros(shape) for k, shape in _official_keys().items()}
        model = load_official("gf_revcol_tiny", state, inter_supv=inter_supv)
    assert model.inter_supv is inter_supv
    assert (model.cls_blocks is not None) is inter_supv


def test_a_missing_or_unknown_official_key_is_named(official_key_errors_named):
    state = {k: torch.zeros(shape, device="meta") for k, shape in _official_keys().items()}
    official_key_errors_named("gf_revcol_tiny", state, missing="subnet2.level1.fusion.up.channel_reschedule.0.weight",
                              named=("columns.2.levels.1.fusion.up.proj.weight",))
    official_key_errors_named("gf_revcol_tiny", state, extra="stray.weight")


def test_bad_configurations_and_inputs_are_refused():
    with pytest.raises(ValueError, match="multiple of 4"):
        RevCol(**NANO, num_columns=6, inter_supv=True)
    with pytest.raises(ValueError, match="divisible by 32"):
        RevCol(**NANO, num_columns=2)(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="inter_supv"):
        RevCol(**NANO, num_columns=2).forward_intermediate_supervision(torch.randn(1, 3, 32, 32))
