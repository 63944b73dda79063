"""Knowledge transfer: teacher ensembles, KD losses, MEAL V2, knowledge concentration, m2mKD.

Modules: ``ensemble`` (frozen teachers, mean of softmaxes), ``losses`` (soft cross-entropy,
Hinton KD), ``meal_v2`` (the logit discriminator, its loss and parameter groups),
``concentration`` (verticals, structurally connected layers, self-paced scales, targets),
``m2mkd`` (splitting a ViT into modules, the meta model, stitches, the module loss, a
modular MoE student), ``reinforce`` (replayable augmentations, sharded top-k teacher
probabilities with resume, the replaying dataset). Training methods and recipes come next
(issue 4 is still open).
"""
