"""Knowledge transfer: teacher ensembles, KD losses, MEAL V2, dataset reinforcement, knowledge
concentration, m2mKD.

``genforge.kd.distill(teachers=[...], student=..., method="meal_v2", ...)`` trains a student
through the one training loop (:mod:`genforge.kd.api`). Modules: ``teachers`` (frozen
classifiers from run directories or weight files), ``ensemble`` (mean of softmaxes),
``losses`` (soft cross-entropy, Hinton KD), ``meal_v2`` (the logit discriminator, its loss and
parameter groups), ``augment`` (replayable augmentations and their pipeline), ``reinforce``
(sharded top-k teacher probabilities with resume, the replaying dataset), ``reinforce_recipe`` (``genforge
reinforce``), ``concentration`` (verticals, structurally connected layers, self-paced scales,
targets), ``m2mkd`` (splitting a ViT into modules, the meta model, stitches, the module loss,
a modular MoE student). The trainable methods that use them are registered in
``genforge.methods`` (``kd``, ``meal_v2``, ``reinforced``, ``specialists``,
``concentration``, ``m2mkd``, ``modular_student``).
"""

from genforge.kd.api import distill
from genforge.kd.ensemble import TeacherEnsemble
from genforge.kd.teachers import TeacherError, load_classifier, load_teachers

__all__ = ["TeacherEnsemble", "TeacherError", "distill", "load_classifier", "load_teachers"]
