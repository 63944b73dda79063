"""Stable Diffusion UNet compression: BK-SDM (arXiv 2305.15798) and A-SDM (arXiv 2312.15516).

``prune`` turns a diffusers ``UNet2DConditionModel`` into a student by a plan; the modules hold
the A-SDM components (CLME-CondConv, GRI attention) and the distillation losses.
"""

from genforge.sd.condconv import CondConv2d
from genforge.sd.gri import GRIAttnProcessor, apply_gri
from genforge.sd.configs import SD15_UNET_CONFIG, UNET_CONFIGS
from genforge.sd.prune import PLANS, ASDMOptions, PlanError, feature_layers, prune, student_config
from genforge.sd.unet import ASDMUNet2DConditionModel
from genforge.sd import method  # noqa: E402,F401  (registers sd_text_to_image and sd_distill)

__all__ = ["PLANS", "SD15_UNET_CONFIG", "UNET_CONFIGS", "ASDMOptions", "PlanError", "prune", "student_config", "feature_layers",
           "CondConv2d", "GRIAttnProcessor", "apply_gri", "ASDMUNet2DConditionModel"]
