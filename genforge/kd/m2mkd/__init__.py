"""m2mKD: module-to-module knowledge distillation through a shared meta model.

Lo et al., "m2mKD: Module-to-Module Knowledge Distillation for Modular Transformers",
arXiv 2402.16918 (code: kamanphoebe/m2mKD). Read in this order:

- ``network``: splitting a timm ViT into modules, the meta model, the stitch layers, the
  hybrid forward meta[0:i] -> module -> meta[i+1:], and the modular MoE student;
- ``method``: the m2mKD loss and the two training Methods, ``m2mkd`` (teach each student
  module against its teacher module inside the frozen meta model) and ``modular_student``
  (train the assembled student end to end, from the taught modules or from scratch).
"""

from genforge.kd.m2mkd.method import M2MKDMethod, ModularStudentMethod, m2mkd_loss, m2mkd_pair_loss
from genforge.kd.m2mkd.network import (MetaModel, MoEMlp, ModularStudent, Stitched, hybrid_forward, split_vit,
                                       student_module)

__all__ = ["M2MKDMethod", "MetaModel", "MoEMlp", "ModularStudent", "ModularStudentMethod", "Stitched",
           "hybrid_forward", "m2mkd_loss", "m2mkd_pair_loss", "split_vit", "student_module"]
