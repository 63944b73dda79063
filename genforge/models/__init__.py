"""Generator networks, one file per family: our own as diffusers ModelMixin + ConfigMixin (DiMR),
or diffusers' class with its training-time setup (the DiT baseline)."""

from genforge.models.dimr import DIMR_CONFIGS, DiMRModel, dimr_config
from genforge.models.dit import DIT_CONFIGS, dit_baseline

__all__ = ["DIMR_CONFIGS", "DIT_CONFIGS", "DiMRModel", "dimr_config", "dit_baseline"]
