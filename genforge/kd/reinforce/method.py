"""Training a student on a reinforced dataset: plain ERM cost, no teacher in memory.

Dataset reinforcement (Faghri et al., ICCV 2023, arXiv 2303.08983, Sec. 3; ``apple/ml-dr``)
stores, once, NS augmentations of every training image with the teacher ensemble's top-k
probabilities (``genforge reinforce``, :mod:`genforge.kd.reinforce.recipe`). This method
trains any timm model on that directory: each item is, with probability ``p_replay``, a random
stored augmentation replayed exactly from its params with the densified teacher target t, and
otherwise the original image with its one-hot target, through a fresh draw of the stored
pipeline's per-image transforms as ml-dr gives these samples its train transform. The loss is

    L = KL(t || softmax(z_S)),   averaged over the batch ("batchmean"),

the KD loss at temperature 1 (:func:`genforge.kd.losses.kd_kl_loss`). No teacher is ever
built. Like the ``classifier`` method, the EMA student is scored on the test split and saved
as a classifier run (``model.safetensors`` + ``model_config.json``).

The recipe's ``model:`` section: ``name``, ``kwargs`` and ``pretrained_file`` as for the
``classifier`` method, plus ``reinforced_dir`` (required: the reinforce recipe's output
directory, made from the same ``data:`` section), ``p_replay`` (0.99, the ImageNet setting),
``densify`` (``smooth``: the leftover mass spread over the other classes; ``zeros``) and
``augment_original`` (true, ml-dr's behaviour; false: the 1 - p_replay original images go in
un-augmented). Before training, every shard is checked against the directory's manifest (its
recorded provenance: seed, teachers, temperature, NS, k, transforms, dataset; and its tensor
shapes): a missing, unfinished or foreign shard is a ConfigError naming it and the keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from genforge.config import ConfigError, check_known_keys
from genforge.kd.losses import kd_kl_loss
from genforge.kd.reinforce.dataset import ReinforcedDataset
from genforge.kd.reinforce.shards import MANIFEST, dataset_tag
from genforge.methods.classification import MODEL_DEFAULTS, ClassifierMethod
from genforge.train import register_method

__all__ = ["ReinforcedMethod"]

REINFORCED_DEFAULTS = {"reinforced_dir": None, "p_replay": 0.99, "densify": "smooth", "augment_original": True}
STUDENT_DEFAULTS = {key: value for key, value in MODEL_DEFAULTS.items() if key != "label_smoothing"}


@register_method("reinforced")
class ReinforcedMethod(ClassifierMethod):
    """A timm student trained with KL(target || student) on a reinforced dataset."""

    model_defaults: ClassVar[dict] = {**STUDENT_DEFAULTS, **REINFORCED_DEFAULTS}

    def validate_model_config(self, model_cfg: dict) -> None:
        source = self._source()
        check_known_keys(model_cfg, list(self.model_defaults), "model", source)
        directory = model_cfg.get("reinforced_dir")
        if not isinstance(directory, str) or not directory:
            raise ConfigError(f"{source}: model.reinforced_dir is required: the output directory of a "
                              "reinforce recipe (genforge reinforce RECIPE)")
        if not (Path(directory) / MANIFEST).is_file():
            raise ConfigError(f"{source}: model.reinforced_dir {directory!r} holds no {MANIFEST}; build it "
                              "first with genforge reinforce RECIPE")
        p_replay = model_cfg.get("p_replay", REINFORCED_DEFAULTS["p_replay"])
        if isinstance(p_replay, bool) or not isinstance(p_replay, (int, float)) or not 0 <= p_replay <= 1:
            raise ConfigError(f"{source}: model.p_replay must be a number in [0, 1], got {p_replay!r}")
        densify = model_cfg.get("densify", REINFORCED_DEFAULTS["densify"])
        if densify not in ("smooth", "zeros"):
            raise ConfigError(f"{source}: model.densify must be 'smooth' or 'zeros', got {densify!r}")
        if not isinstance(model_cfg.get("augment_original", True), bool):
            raise ConfigError(f"{source}: model.augment_original must be true or false, "
                              f"got {model_cfg['augment_original']!r}")
        super().validate_model_config({k: v for k, v in model_cfg.items() if k not in REINFORCED_DEFAULTS})

    def train_dataset(self) -> torch.utils.data.Dataset:
        super().train_dataset()  # checks the test split before training
        directory = self.options["reinforced_dir"]
        try:
            data = ReinforcedDataset(self.train_set, directory, p_replay=float(self.options["p_replay"]),
                                     densify=self.options["densify"],
                                     augment_original=self.options["augment_original"],
                                     dataset_name=dataset_tag(self.recipe.data, "train", self.train_set))
        except ValueError as err:
            raise ConfigError(f"{self._source()}: model.reinforced_dir: {err}; the reinforce recipe's data "
                              "section must match this recipe's") from None
        try:  # every shard there and made by the run the manifest records, before training starts
            data.check_complete()
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"{self._source()}: model.reinforced_dir: {err}") from None
        if data.num_classes != self.train_set.num_classes:
            raise ConfigError(f"{self._source()}: {directory} stores {data.num_classes}-class targets but dataset "
                              f"{self.recipe.data.name!r} has {self.train_set.num_classes} classes")
        return data

    def training_step(self, model, batch) -> tuple[torch.Tensor, dict]:
        images, targets = batch
        logits = model(images)
        loss = kd_kl_loss(logits, temperature=1.0, teacher_probs=targets)
        accuracy = (logits.argmax(dim=1) == targets.argmax(dim=1)).float().mean()
        return loss, {"train_accuracy": accuracy}
