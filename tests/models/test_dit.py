"""The DiT baseline: diffusers' DiTTransformer2DModel with DiT's initialisation (arXiv 2212.09748)."""

import torch
from diffusers import DiTTransformer2DModel

from genforge.models.dimr import DiMRModel, dimr_config
from genforge.models.dit import DIT_CONFIGS, dit_baseline


def tiny_dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return dit_baseline(**DIT_CONFIGS["tiny"])


def perturb(model, std=0.05):
    """Non-zero adaLN and output layers, as after some training."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm1.linear" in name or "proj_out" in name:
                param.normal_(std=std)
    return model


def inputs(batch=4):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 4, 8, 8, generator=generator), torch.randint(0, 1000, (batch,), generator=generator),
            torch.randint(0, 11, (batch,), generator=generator))


def test_adaln_zero_makes_every_block_start_as_the_identity_and_the_network_predict_zero():
    model = tiny_dit()
    x, t, y = inputs()
    tokens = model.pos_embed(x)
    for block in model.transformer_blocks:
        assert torch.equal(block(tokens, timestep=t, class_labels=y), tokens)
    assert torch.count_nonzero(model(x, t, y).sample) == 0


def test_the_label_is_dropped_once_by_the_training_method_never_inside_the_blocks():
    model = perturb(tiny_dit())
    x, t, y = inputs(batch=64)
    with torch.no_grad():
        train_mode = model.train()(x, t, y).sample
        eval_mode = model.eval()(x, t, y).sample
    assert torch.equal(train_mode, eval_mode)
    # diffusers' own table drops labels in train mode (p = 0.1 per block): 64 labels x 2 blocks all kept has p ~ 1e-6
    plain = perturb(DiTTransformer2DModel(**DIT_CONFIGS["tiny"]))
    with torch.no_grad():
        assert not torch.equal(plain.train()(x, t, y).sample, plain.eval()(x, t, y).sample)


def test_time_and_class_reach_the_output_once_modulation_is_trained():
    model = perturb(tiny_dit()).eval()
    x, t, y = inputs()
    out = model(x, t, y).sample
    assert out.shape == x.shape
    assert not torch.allclose(out, model(x, t.flip(0), y).sample)
    assert not torch.allclose(out, model(x, t, (y + 1) % 11).sample)


def test_save_and_load_pretrained_round_trip(tmp_path):
    model = perturb(tiny_dit()).eval()
    model.save_pretrained(tmp_path)
    loaded = DiTTransformer2DModel.from_pretrained(tmp_path).eval()
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    x, t, y = inputs()
    assert torch.equal(loaded(x, t, y).sample, model(x, t, y).sample)


def test_the_digits_config_matches_dimrs_parameter_count_within_two_percent():
    dit = dit_baseline(**DIT_CONFIGS["digits"]).num_parameters()
    dimr = DiMRModel(**dimr_config("digits")).num_parameters()
    assert abs(dit - dimr) / dimr < 0.02
