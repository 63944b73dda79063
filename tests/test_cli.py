"""The genforge command: real subcommands with their own help and shown defaults; FID with progress."""

import numpy as np
import pytest

from genforge.cli import main
from genforge.data import DigitsDataset
from genforge.data.transforms import signed_to_uint8


def help_of(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command, option, default", [
    ("train", "--set KEY=VALUE", "(default: [])"),
    ("distill", "--no-progress", "(default: False)"),
    ("reinforce", "--max-shards MAX_SHARDS", "(default: None)"),
    ("reno", "--no-progress", "(default: False)"),
    ("sample", "--per-class PER_CLASS", "(default: 10)"),
    ("eval", "--real REAL", "(default: digits:train)"),
])
def test_each_subcommand_has_its_own_help_with_its_name_and_defaults(capsys, command, option, default):
    text = help_of(capsys, command)
    assert text.startswith(f"usage: genforge {command} ")
    after = text[text.index(f"\n  {option}"):]
    next_option = after.find("\n  -", 1)
    assert default in " ".join(after[:next_option if next_option > 0 else None].split())


def test_the_top_level_help_lists_every_subcommand(capsys):
    text = help_of(capsys)
    assert text.startswith("usage: genforge ")
    assert all(f"\n    {name}" in text for name in ("train", "distill", "reinforce", "reno", "sample", "eval"))


def test_eval_shows_torch_fidelitys_progress_unless_asked_not_to(tmp_path, capfd):
    test = DigitsDataset("test", image_size=8)
    npz = tmp_path / "s.npz"
    np.savez_compressed(npz, images=signed_to_uint8(test.images[:80]).numpy(), labels=test.labels[:80].numpy())
    assert main(["eval", "--fake", str(npz), "--real", "digits:train"]) == 0
    assert "Processing samples" in capfd.readouterr().err  # torch-fidelity's tqdm bar over the batches
    assert main(["eval", "--fake", str(npz), "--real", "digits:train", "--no-progress"]) == 0
    assert "Processing samples" not in capfd.readouterr().err
