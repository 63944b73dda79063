"""Reading weight files without running code, and strict loading that names what differs."""

import pytest
import timm
import torch
from safetensors.torch import save_file

import genforge  # noqa: F401  (registers the gf_ models)
from genforge.backbones import load_official
from genforge.core.state_dict import StateDictError, load_state_dict_strict, read_state_dict


def test_nested_torch_checkpoints_and_safetensors_read_to_the_same_flat_dict(tmp_path):
    state = {"a.weight": torch.randn(2, 3), "b": torch.arange(4)}
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "ckpt.pth")
    save_file(state, str(tmp_path / "w.safetensors"))
    for file in ("ckpt.pth", "w.safetensors"):
        read = read_state_dict(tmp_path / file)
        assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in state)


class Payload:
    """An arbitrary class: unpickling it would import and run code of the file's choosing."""


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    torch.save({"model": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(StateDictError, match="weights_only"):
        read_state_dict(tmp_path / "evil.pth")
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "missing.pth")


def test_strict_loading_names_missing_unexpected_and_misshaped_keys():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(StateDictError, match=r"missing \(1\): \['bias'\].*unexpected \(1\): \['extra'\]"):
        load_state_dict_strict(model, {"weight": torch.zeros(2, 3), "extra": torch.zeros(1)})
    with pytest.raises(StateDictError, match=r"weight expected \(2, 3\) got \(3, 2\)"):
        load_state_dict_strict(model, {"weight": torch.zeros(3, 2), "bias": torch.zeros(2)})


def _official_hornet_key(key: str) -> str:
    """Our HorNet key back in the official ``hornet.py`` layout (the converter's inverse)."""
    parts = key.split(".")
    if parts[0] == "stem":
        return "downsample_layers.0." + ".".join(parts[1:])
    if parts[0] == "stages" and parts[2] == "downsample":
        return f"downsample_layers.{parts[1]}." + ".".join(parts[3:])
    if parts[0] == "stages":
        return f"stages.{parts[1]}.{parts[3]}." + ".".join(parts[4:])
    return {"norm": "norm.", "fc": "head."}[parts[1]] + ".".join(parts[2:])


def test_load_official_reads_an_official_layout_file_and_reproduces_the_model(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("gf_hornet_nano", num_classes=10).eval()
    official = {_official_hornet_key(k): v for k, v in source.state_dict().items()}
    assert not any(k.startswith(("stem.", "head.norm")) for k in official)
    torch.save({"model": official, "epoch": 299}, tmp_path / "hornet_official.pth")
    loaded = load_official("gf_hornet_nano", tmp_path / "hornet_official.pth", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))
