"""Generator networks, one file per family, each a diffusers ModelMixin + ConfigMixin."""

from genforge.models.dimr import DIMR_CONFIGS, DiMRModel, dimr_config
from genforge.models.dit import DiTModel

__all__ = ["DIMR_CONFIGS", "DiMRModel", "DiTModel", "dimr_config"]
