"""The timm model contract every ``gf_`` backbone honours, as one reusable check, and the
checks the family tests share.

``check_timm_contract(name, img_size=..)`` is what a family's test calls for its tiny
configuration; each assertion is one clause of the contract in specs/backbones.md, plus what
timm's own model tests (tests/test_models.py of pytorch-image-models) ask of every timm model:
a model that only runs at its build size says ``fixed_input_size`` in its pretrained config
(and one that says so refuses another size), an FX trace through timm's feature-extraction
helpers computes the eager outputs and gradients, and ``torch.jit.script`` gives the eager
outputs.

The test directories are not packages and each has its own ``conftest``, so the shared checks
reach the tests as fixtures that return the function: ``timm_contract``, ``loss_falls``,
``meta_model``, ``meta_param_count``, ``official_key_errors_named`` and ``randomise_running_stats``.
"""

from __future__ import annotations

import functools
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import create_feature_extractor, get_graph_node_names
from timm.models import group_parameters

import genforge  # noqa: F401  (registers the gf_ models)
from genforge.backbones.registry import load_official
from genforge.data import DigitsDataset
from genforge.core.state_dict import StateDictError


def _pooled_width(model) -> int:
    return getattr(model, "head_hidden_size", None) or model.num_features


def _fx_traced(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` traced by torch.fx through timm's helpers (its notrace modules and functions as
    leaves), returning the final output under the key ``'out'``."""
    _, eval_nodes = get_graph_node_names(model)
    return create_feature_extractor(model, return_nodes={eval_nodes[-1]: "out"})


def _runs_at(model: torch.nn.Module, x: torch.Tensor) -> bool:
    try:
        with torch.no_grad():
            model(x)
    except (ValueError, RuntimeError):
        return False
    return True


def assert_timm_contract(name: str, *, img_size: int, in_chans: int = 3, tmp_path=None,
                         atol: float = 1e-5, unused_params: tuple[str, ...] = ()) -> None:
    assert name.startswith("gf_") and name in timm.list_models("gf_*")
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, in_chans=in_chans).eval()
    x = torch.randn(2, in_chans, img_size, img_size)

    cfg = model.pretrained_cfg
    assert len(cfg["input_size"]) == 3 and len(cfg["mean"]) == len(cfg["std"]) == 3
    # timm's tests run a model at other sizes unless its config says the size is fixed
    fixed, runs = bool(cfg.get("fixed_input_size", False)), _runs_at(model, torch.randn(1, in_chans, 2 * img_size,
                                                                                     2 * img_size))
    assert runs != fixed, f"pretrained_cfg says fixed_input_size={fixed}, but a {2 * img_size}px input " + (
        "runs" if runs else "is refused")

    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        assert logits.shape == (2, 10) and model.num_classes == 10
        torch.testing.assert_close(model.forward_head(feats), logits, atol=atol, rtol=1e-4)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, _pooled_width(model))
        torch.testing.assert_close(model.get_classifier()(pre), logits, atol=atol, rtol=1e-4)

        final, inters = model.forward_intermediates(x)
        assert len(inters) == len(model.feature_info)
        for info, feat in zip(model.feature_info, inters):
            assert feat.shape[1] == info["num_chs"], info
            assert img_size // feat.shape[-1] == info["reduction"], info
        torch.testing.assert_close(final, feats, atol=atol, rtol=1e-4)
        torch.testing.assert_close(_fx_traced(model)(x)["out"], logits, rtol=0, atol=0, msg="FX trace differs")

    with timm.set_scriptable(True):
        scriptable = timm.create_model(name, num_classes=10, in_chans=in_chans).eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(scriptable)(x), scriptable(x), atol=atol, rtol=1e-4,
                                   msg="TorchScript differs")

    fmodel = timm.create_model(name, features_only=True, out_indices=(1, 3) if len(model.feature_info) > 3
                               else (0, len(model.feature_info) - 1), in_chans=in_chans).eval()
    with torch.no_grad():
        maps = fmodel(x)
    assert [m.shape[1] for m in maps] == fmodel.feature_info.channels()
    assert [img_size // m.shape[-1] for m in maps] == fmodel.feature_info.reduction()

    model.reset_classifier(5)
    assert model.num_classes == 5
    with torch.no_grad():
        assert model(x).shape == (2, 5)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, _pooled_width(model))

    names = {n for n, _ in model.named_parameters()}
    assert set(model.no_weight_decay()) <= names | {n.rsplit(".", 1)[0] for n in names}
    assert group_parameters(model, model.group_matcher())

    model = timm.create_model(name, num_classes=10, in_chans=in_chans).train()
    torch.manual_seed(1)
    model(x).logsumexp(-1).sum().backward()
    no_grad = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
               and not any(u in n for u in unused_params)]
    assert not no_grad, f"parameters without gradient: {no_grad[:10]}"
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    model(x).logsumexp(-1).sum().backward()
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-4, rtol=1e-3, msg=f"grad checkpointing changed {n}")
    model.set_grad_checkpointing(False)
    traced = _fx_traced(model).train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    traced(x)["out"].logsumexp(-1).sum().backward()
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-4, rtol=1e-3, msg=f"the FX trace changed grad {n}")

    if tmp_path is not None:
        source = timm.create_model(name, in_chans=in_chans).eval()
        file = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(file))
        loaded = timm.create_model(name, pretrained=True, in_chans=in_chans,
                                   pretrained_cfg_overlay=dict(file=str(file))).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), source(x))


@pytest.fixture
def timm_contract(tmp_path):
    """``timm_contract(name, img_size=...)`` runs the whole contract, local-weights loading included."""
    def check(name: str, **kwargs):
        assert_timm_contract(name, tmp_path=tmp_path, **kwargs)
    return check


@functools.lru_cache(maxsize=None)
def _digits(split: str, img_size: int, in_chans: int) -> DigitsDataset:
    return DigitsDataset(split, image_size=img_size, resize="resize", channels=in_chans)


def assert_loss_falls(name: str, *, img_size: int, optimizer, lr: float, steps: int = 20, batch_size: int = 16,
                      in_chans: int = 3, held_out: int = 128, max_ratio: float = 0.75) -> None:
    """From seed 0, a ``num_classes=10`` model trained for ``steps`` optimiser steps on random mini-batches
    of the digits train split (resized to ``img_size``): its cross-entropy on the first ``held_out`` test
    digits falls below ``max_ratio`` of its value before training (about ln 10).

    The held-out loss is measured in train mode under no_grad, i.e. with batch statistics, so a
    BatchNorm model is judged by what it learnt, not by how far its running statistics have caught up.
    """
    train, test = _digits("train", img_size, in_chans), _digits("test", img_size, in_chans)
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, in_chans=in_chans).train()
    opt = optimizer(model.parameters(), lr=lr)
    x_test, y_test = test.images[:held_out], test.labels[:held_out]

    def held_out_loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(model(x_test), y_test).item()

    before = held_out_loss()
    batches = torch.randint(len(train), (steps, batch_size), generator=torch.Generator().manual_seed(0))
    for idx in batches:
        loss = F.cross_entropy(model(train.images[idx]), train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out_loss()
    assert math.isfinite(after) and after < max_ratio * before, (before, after)


def meta_model(name: str, **kwargs) -> torch.nn.Module:
    """``timm.create_model(name, **kwargs)`` on the meta device: structure and sizes without memory."""
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def meta_param_count(name: str, **kwargs) -> int:
    """The number of parameters of ``timm.create_model(name, **kwargs)``, built on the meta device."""
    return sum(p.numel() for p in meta_model(name, **kwargs).parameters())


def assert_official_key_errors_named(name: str, official_state: dict[str, torch.Tensor], *,
                                     missing: str | None = None, extra: str | None = None,
                                     extra_shape: tuple[int, ...] = (1,), named: tuple[str, ...] = ()) -> None:
    """``load_official(name, ...)`` of ``official_state`` less its key ``missing`` and/or plus a key
    ``extra`` (zeros of ``extra_shape``) raises a StateDictError naming each of ``named``: the
    model's names for those keys, by default the keys themselves."""
    state = dict(official_state)
    if missing is not None:
        del state[missing]
    if extra is not None:
        state[extra] = torch.zeros(extra_shape, device=next(iter(state.values())).device)
    with torch.device("meta"), pytest.raises(StateDictError) as err:
        load_official(name, state)
    for key in named or [k for k in (missing, extra) if k is not None]:
        assert key in str(err.value), key


def randomise_running_stats(module: torch.nn.Module, generator: torch.Generator | int = 0) -> torch.nn.Module:
    """Random BN running means (0.5 N(0, 1)) and variances (0.5 + U(0, 1)) from ``generator`` (or a
    generator seeded with it), as a trained model has; returns the module in eval mode, where BN uses them."""
    g = generator if isinstance(generator, torch.Generator) else torch.Generator().manual_seed(generator)
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.5 * torch.randn(buf.shape, generator=g))
            elif name.endswith("running_var"):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=g))
    return module.eval()


@pytest.fixture
def loss_falls():
    """``loss_falls(name, img_size=.., optimizer=.., lr=..)``: see ``assert_loss_falls``."""
    return assert_loss_falls


@pytest.fixture(name="meta_model")
def meta_model_fixture():
    return meta_model


@pytest.fixture(name="meta_param_count")
def meta_param_count_fixture():
    return meta_param_count


@pytest.fixture(name="randomise_running_stats")
def randomise_running_stats_fixture():
    return randomise_running_stats


@pytest.fixture
def official_key_errors_named():
    """``official_key_errors_named(name, state, missing=.., extra=.., named=..)``: see
    ``assert_official_key_errors_named``."""
    return assert_official_key_errors_named
