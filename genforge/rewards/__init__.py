"""Reward models for ReNO (arXiv 2406.04312) behind one interface (:class:`Reward`).

``genforge.rewards.load(name, path)`` builds a registered reward from local files:
``"clip"``, ``"pickscore"``, ``"hpsv2"`` (needs the ``[rewards]`` extra, open_clip),
``"imagereward"``, ``"aesthetic"`` and ``"digits-cnn"`` (the shipped digits classifier's
log-probability of the wanted class). Each has ``score(images, prompts)`` (higher is better)
and ``loss(images, prompts) = offset - score``, differentiable in images in [0, 1].
"""

from genforge.rewards.base import CLIP_MEAN, CLIP_STD, REWARDS, Reward, RewardMLP, load, register_reward
from genforge.rewards.classifier import ClassifierReward
from genforge.rewards.clip import AestheticReward, CLIPReward, HPSv2Reward
from genforge.rewards.imagereward import ImageReward

__all__ = ["CLIP_MEAN", "CLIP_STD", "REWARDS", "AestheticReward", "CLIPReward", "ClassifierReward", "HPSv2Reward",
           "ImageReward", "Reward", "RewardMLP", "load", "register_reward"]
