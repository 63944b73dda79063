"""Dataset distillation: DM, DataDAM, the FYI flip and diversity-driven synthesis (DWA).

``distill_dataset(method, dataset, ipc, ...)`` returns a :class:`SyntheticSet`;
``evaluate_synthetic`` applies the field's train-on-synthetic protocol; ``genforge distill
RECIPE`` does both from a YAML recipe. Module map: ``data`` (real pool), ``synthetic`` (the
set), ``networks`` (ConvNet-D1..4), ``dsa``, ``zca``, ``fyi``, ``matching`` (the loop of DM
and DataDAM), ``dm``, ``datadam``, ``dwa``, ``evaluate``, ``seeding`` (per-class, per-iteration
random streams), ``state`` (what a run keeps: refused reruns, atomic saves, recorded
settings), ``api`` (``distill_dataset``), ``recipe`` (recipes and the run).

Knowledge distillation, training a student network from teachers, is :mod:`genforge.kd`
(``genforge.kd.train_student``).
"""

from genforge.distill.api import ENGINE_OPTIONS, distill_dataset, engine_options
from genforge.distill.data import Normalisation, RealData, load_real
from genforge.distill.evaluate import EvalOptions, EvalResult, evaluate_synthetic
from genforge.distill.synthetic import SyntheticSet

__all__ = ["ENGINE_OPTIONS", "EvalOptions", "EvalResult", "Normalisation", "RealData", "SyntheticSet",
           "distill_dataset", "engine_options", "evaluate_synthetic", "load_real"]
