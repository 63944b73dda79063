"""The timm model contract every ``gf_`` backbone honours, as one reusable check.

``check_timm_contract(name, img_size=..)`` is what a family's test calls for its tiny
configuration; each assertion is one clause of the contract in specs/backbones.md.
"""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import group_parameters

import genforge  # noqa: F401  (registers the gf_ models)


def _pooled_width(model) -> int:
    return getattr(model, "head_hidden_size", None) or model.num_features


def assert_timm_contract(name: str, *, img_size: int, in_chans: int = 3, tmp_path=None,
                         atol: float = 1e-5, unused_params: tuple[str, ...] = ()) -> None:
    assert name.startswith("gf_") and name in timm.list_models("gf_*")
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, in_chans=in_chans).eval()
    x = torch.randn(2, in_chans, img_size, img_size)

    cfg = model.pretrained_cfg
    assert len(cfg["input_size"]) == 3 and len(cfg["mean"]) == len(cfg["std"]) == 3

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
