"""Knowledge transfer: students trained from teachers. One module or folder per method family.

Shared by the families:
- ``teachers``: frozen classifiers from run directories or weight files;
- ``ensemble``: ``TeacherEnsemble``, the mean of the teachers' softmaxes;
- ``losses``: soft cross-entropy and the T^2-scaled KL of Hinton KD;
- ``api``: :func:`train_student`, one call that trains a student with any method through the
  training loop.

The families, each with its network pieces, losses, training Methods and recipe entry:
- ``hinton``: classic KD (Method ``kd``) and ``TeacherMethod``, the base of online students;
- ``meal_v2``: MEAL V2's logit discriminator, loss and parameter groups (Method ``meal_v2``);
- ``reinforce/``: dataset reinforcement: replayable augmentations, resumable shards, the
  replaying dataset (Method ``reinforced``) and ``genforge reinforce``;
- ``concentration``: knowledge concentration: verticals, SC layers, self-paced scale, targets
  (Methods ``specialists`` and ``concentration``);
- ``m2mkd/``: m2mKD: split ViTs, meta model, stitches, the MoE student (Methods ``m2mkd`` and
  ``modular_student``).

Importing this package registers those Methods; the training registry imports it (with
``genforge.methods``) the first time a recipe names a method.
"""

from genforge.kd import concentration, hinton, m2mkd, meal_v2, reinforce  # noqa: F401  (their Methods register)
from genforge.kd.api import train_student
from genforge.kd.ensemble import TeacherEnsemble
from genforge.kd.teachers import TeacherError, load_classifier, load_teachers

__all__ = ["TeacherEnsemble", "TeacherError", "load_classifier", "load_teachers", "train_student"]
