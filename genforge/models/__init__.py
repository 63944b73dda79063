"""Generator networks, one file per family: our own as diffusers ModelMixin + ConfigMixin (DiMR,
ARFlow), or diffusers' class with its training-time setup (the DiT baseline)."""

from genforge.models.arflow import ARFLOW_CONFIGS, ARFlowModel, arflow_config
from genforge.models.dimr import DIMR_CONFIGS, DiMRModel, dimr_config
from genforge.models.dit import DIT_CONFIGS, dit_baseline

__all__ = ["ARFLOW_CONFIGS", "ARFlowModel", "DIMR_CONFIGS", "DIT_CONFIGS", "DiMRModel", "arflow_config", "dimr_config",
           "dit_baseline"]
