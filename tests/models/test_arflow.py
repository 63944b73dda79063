"""Specification of the ARFlow network (genforge.models.arflow) and its official-layout converter.

The official facts are fixtures recorded from TheFllood/ARFlow's model class (keys, shapes,
parameter counts) and its outputs on deterministic weights (tests/fixtures/arflow_official_*.json).
"""

import json
import math
from pathlib import Path

import pytest
import torch

from genforge.models.arflow import ARFLOW_CONFIGS, ARFlowCache, ARFlowModel, arflow_config
from genforge.models.convert_arflow import ConversionError, convert_official_state_dict, load_official_arflow

FIXTURES = Path(__file__).parents[1] / "fixtures"
OFFICIAL_KEYS = json.loads((FIXTURES / "arflow_official_keys.json").read_text())
OFFICIAL_REFERENCE = json.loads((FIXTURES / "arflow_official_reference.json").read_text())


def deterministic(shape, index: int, scale: float) -> torch.Tensor:
    """scale * sin(0.7 k + index) over the k-th element, as the official reference fixture was made."""
    k = torch.arange(math.prod(shape), dtype=torch.float64)
    return (scale * torch.sin(k * 0.7 + index)).float().reshape(shape)


def official_state(name: str = "tiny") -> dict[str, torch.Tensor]:
    shapes = OFFICIAL_KEYS["keys"][name]
    return {key: deterministic(shape, i, 0.1) for i, (key, shape) in enumerate(sorted(shapes.items()))}


def tiny_official_model() -> ARFlowModel:
    return load_official_arflow(official_state(), arflow_config("tiny"))


def test_official_weights_give_the_official_outputs_in_training_and_in_generation():
    ref = OFFICIAL_REFERENCE
    model = tiny_official_model().eval()
    x = deterministic((2, 3, 4, 8, 8), 1000, 1.0)
    t, y = torch.tensor(ref["t"]), torch.tensor(ref["y"])
    with torch.no_grad():
        parallel = model(x, t, y).sample
        torch.testing.assert_close(parallel.flatten(), torch.tensor(ref["train"]), atol=2e-5, rtol=0)
        cache = ARFlowCache()  # generation: one image per call, the state carried in the cache
        for s, official in enumerate(ref["infer_steps"]):
            step = model(x[:, s:s + 1], t[:, s:s + 1], y, cache=cache).sample
            torch.testing.assert_close(step.flatten(), torch.tensor(official), atol=2e-5, rtol=0)
    assert len(cache.states) == 2 and cache.states[0].shape == (2, 2, 32, 32)


def test_official_layout_of_s2_loads_strictly_on_the_meta_device():
    with torch.device("meta"):
        model = ARFlowModel(**arflow_config("S/2"))
    converted = convert_official_state_dict({k: torch.empty(v, device="meta")
                                             for k, v in OFFICIAL_KEYS["keys"]["S/2@16"].items()})
    ours = model.state_dict()
    assert set(converted) == set(ours)
    assert all(tuple(converted[k].shape) == tuple(ours[k].shape) for k in ours)


@pytest.mark.parametrize("name", [n for n in ARFLOW_CONFIGS if "/" in n])
def test_paper_configs_have_the_official_parameter_counts(name):
    with torch.device("meta"):
        model = ARFlowModel(**arflow_config(name))
    ours = sum(p.numel() for p in model.parameters()) + model.pos_embed.numel()  # official: pos_embed a Parameter
    official = OFFICIAL_KEYS["parameter_counts"][name]["16"]
    assert abs(ours - official) / official < 0.02, (ours, official)


def test_a_checkpoint_that_does_not_fit_is_refused_naming_the_keys():
    state = official_state()
    state["blocks.0.attn.q_proj.weight"] = torch.zeros(64, 32)
    del state["final_layer.linear.bias"]
    with pytest.raises(ConversionError, match=r"missing.*final_linear\.bias.*shape mismatch: blocks\.0\.attn\.q_proj"):
        load_official_arflow(state, arflow_config("tiny"))
    state = official_state()
    state["blocks.0.attn.rotary.weight"] = torch.zeros(2)
    with pytest.raises(ConversionError, match=r"unexpected \(1\): \['blocks\.0\.attn\.rotary\.weight'\]"):
        load_official_arflow(state, arflow_config("tiny"))


def test_a_saved_official_checkpoint_loads_from_its_ema_entry(tmp_path):
    state = official_state()
    torch.save({"model": {k: torch.zeros_like(v) for k, v in state.items()}, "ema": state, "args": None},
               tmp_path / "ckpt.pt")
    model = load_official_arflow(tmp_path / "ckpt.pt", "tiny")
    torch.testing.assert_close(model.final_linear.bias, state["final_layer.linear.bias"])


def test_a_later_image_never_changes_the_output_for_an_earlier_one():
    model = tiny_official_model().eval()
    x = torch.randn(2, 4, 4, 8, 8)
    t, y = torch.rand(2, 4).sort(1).values, torch.tensor([1, 2])
    changed = x.clone()
    changed[:, 2:] = torch.randn(2, 2, 4, 8, 8) * 3
    with torch.no_grad():
        a, b = model(x, t, y).sample, model(changed, t, y).sample
    torch.testing.assert_close(a[:, :2], b[:, :2], atol=1e-6, rtol=0)
    assert (a[:, 2:] - b[:, 2:]).abs().max() > 1e-2


def test_save_and_load_round_trip(tmp_path):
    model = tiny_official_model().eval()
    model.save_pretrained(tmp_path / "m")
    loaded = ARFlowModel.from_pretrained(tmp_path / "m").eval()
    x, t, y = torch.randn(1, 2, 4, 8, 8), torch.tensor([[0.2, 0.6]]), torch.tensor([4])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y).sample, model(x, t, y).sample, atol=0, rtol=0)


@pytest.mark.parametrize("kwargs,match", [
    ({"y": torch.tensor([3, 11])}, r"class_labels must lie in \[0, 10\].*\[3, 11\]"),
    ({"x": torch.zeros(2, 3, 4, 8, 4)}, r"x of shape \(B, S, 4, 8, 8\), got \(2, 3, 4, 8, 4\)"),
    ({"t": torch.zeros(2)}, r"t must have shape \(B, S\) = \(2, 3\)"),
])
def test_bad_input_is_a_clear_error(kwargs, match):
    model = ARFlowModel(**arflow_config("tiny"))
    args = {"x": torch.zeros(2, 3, 4, 8, 8), "t": torch.zeros(2, 3), "y": torch.tensor([0, 10]), **kwargs}
    with pytest.raises(ValueError, match=match):
        model(args["x"], args["t"], args["y"])
