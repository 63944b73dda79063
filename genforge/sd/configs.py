"""Named ``UNet2DConditionModel`` configs: SD-1.5's teacher and the small ones built locally.

Only the keys that differ from diffusers' defaults are given.
"""

SD15_UNET_CONFIG = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
"""The UNet of Stable Diffusion v1.4/v1.5 (859,520,964 parameters), as in the runwayml/stable-diffusion-v1-5
``unet/config.json``."""

UNET_CONFIGS = {
    "sd15": SD15_UNET_CONFIG,
    "sd-like-tiny": {
        "block_out_channels": [32, 64, 64], "layers_per_block": 2, "sample_size": 16, "in_channels": 4,
        "out_channels": 4, "cross_attention_dim": 32, "attention_head_dim": 4, "norm_num_groups": 16,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]},
    "diffusers-tiny": {
        "block_out_channels": [32, 64], "layers_per_block": 2, "sample_size": 32, "in_channels": 4,
        "out_channels": 4, "cross_attention_dim": 32, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]},
}
"""``sd-like-tiny``: SD-1.x's layout at toy width (attention in all but the innermost stage, whose width
equals the previous one's, as bk-tiny needs); ``diffusers-tiny``: the UNet of diffusers'
StableDiffusionPipeline fast tests."""
