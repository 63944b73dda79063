"""Dataset reinforcement: store augmentations and teacher top-k probabilities once, then train on replays.

Faghri et al., "Reinforce Data, Multiply Impact", ICCV 2023, arXiv 2303.08983 (official code
``apple/ml-dr``). A frozen teacher ensemble runs once over NS recorded augmentations of every
training image; its top-k probabilities and the augmentations' parameters are stored, and a
student then trains on exact replays of them with no teacher in memory, at the cost of plain
ERM with the same augmentations. The modules, in the order a reader follows the method:

- ``augment``: the replayable augmentations (RandomResizedCrop -> HorizontalFlip ->
  RandAugment -> RandomErasing -> MixUp -> CutMix, a fixed order) and ``ReinforcePipeline``,
  which draws, records, replays and compresses their parameters;
- ``shards``: :func:`reinforce`, the generation pass, writing resumable safetensors shards
  with a manifest of the run's provenance, and the checks that refuse mixing runs;
- ``dataset``: :class:`ReinforcedDataset`, the replay with densified top-k targets;
- ``method``: the ``reinforced`` training Method, KL(target || student) on that dataset;
- ``recipe``: reinforce recipes and ``genforge reinforce RECIPE`` (also
  ``python -m genforge.kd.reinforce RECIPE``).
"""

from genforge.kd.reinforce.augment import ORDER, REGISTRY, ReinforcePipeline
from genforge.kd.reinforce.dataset import ReinforcedDataset, densify
from genforge.kd.reinforce.method import ReinforcedMethod
from genforge.kd.reinforce.recipe import ReinforceRecipe, load_reinforce_recipe, run_reinforce_recipe
from genforge.kd.reinforce.shards import check_reinforced_dir, dataset_tag, reinforce

__all__ = ["ORDER", "REGISTRY", "ReinforcePipeline", "ReinforceRecipe", "ReinforcedDataset", "ReinforcedMethod",
           "check_reinforced_dir", "dataset_tag", "densify", "load_reinforce_recipe", "reinforce",
           "run_reinforce_recipe"]
