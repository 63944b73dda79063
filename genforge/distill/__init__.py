"""Dataset distillation: DM, DataDAM, the FYI flip and diversity-driven synthesis (DWA).

``genforge.distill(method, dataset, ipc, ...)`` returns a :class:`SyntheticSet` (this package
is callable: calling it calls :func:`genforge.distill.api.distill`);
``evaluate_synthetic`` applies the field's train-on-synthetic protocol; ``genforge distill
RECIPE`` does both from a YAML recipe. Module map: ``data`` (real pool), ``synthetic`` (the
set), ``networks`` (ConvNet-D1..4), ``dsa``, ``zca``, ``fyi``, ``matching`` (the loop of DM
and DataDAM), ``dm``, ``datadam``, ``dwa``, ``evaluate``, ``seeding`` (per-class, per-iteration
random streams), ``state`` (what a run keeps: refused reruns, atomic saves, recorded
settings), ``api`` (``distill``), ``recipe`` (recipes and the run).
"""

import sys
import types

from genforge.distill.api import ENGINE_OPTIONS, distill, engine_options
from genforge.distill.data import Normalisation, RealData, load_real
from genforge.distill.evaluate import EvalOptions, EvalResult, evaluate_synthetic
from genforge.distill.synthetic import SyntheticSet

__all__ = ["ENGINE_OPTIONS", "EvalOptions", "EvalResult", "Normalisation", "RealData", "SyntheticSet", "distill",
           "engine_options", "evaluate_synthetic", "load_real"]


class _CallablePackage(types.ModuleType):
    """Lets ``genforge.distill(...)`` be the API call while ``genforge.distill.*`` stays a package."""

    def __call__(self, *args, **kwargs) -> SyntheticSet:
        return distill(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
