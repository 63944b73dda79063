"""Tiny models built from configs for the ReNO tests of tests/rewards and tests/pipelines: a CLIP
tokenizer written locally (no hub download), a tiny transformers CLIP model and a tiny
SD-Turbo-shaped pipeline. A module of its own (not conftest.py), so that its name is unique
when the whole suite is collected."""

import torch


def write_clip_tokenizer(directory):
    """A byte-level CLIP BPE tokenizer with no merges (every byte is a token), saved to ``directory``."""
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's byte -> unicode map
    others = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    tokenizer.save_pretrained(directory)
    return tokenizer


def tiny_clip_model(seed: int = 0, image_size: int = 32):
    """A random CLIPModel: 32-wide, one-layer towers, 16-d projection, ``image_size`` input."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(vocab_size=520, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513)
    vision = dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                  num_attention_heads=4)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)


def tiny_clip_text(hidden=32, projection=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=hidden, intermediate_size=37, layer_norm_eps=1e-5,
                            num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=1000,
                            projection_dim=32)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def tiny_sd_pipeline(clip_tokenizer):
    """Tiny SD-Turbo-shaped pipeline (diffusers' fast-test sizes): 8x8 latents, 16x16 images,
    one trailing Euler step from t = 999."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="trailing", steps_offset=1)
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=tiny_clip_text(), tokenizer=clip_tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.unet.set_default_attn_processor()
    pipe.vae.set_default_attn_processor()
    return pipe
