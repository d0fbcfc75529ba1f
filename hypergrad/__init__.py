"""hypergrad: gradient-based hyperparameter optimization in JAX."""

from importlib.metadata import PackageNotFoundError, version

from hypergrad import (
    data,
    estimators,
    hparams,
    implicit,
    inner,
    meta,
    models,
    online,
    outer,
    search,
    tasks,
    unroll,
)
from hypergrad.check import check_hypergrad, directional_errors
from hypergrad.experiment import Experiment, Problem, classification_scores
from hypergrad.hparams import Constraint, HyperSpace, bounded, positive, real, unit
from hypergrad.task import Task
from hypergrad.tune import (
    ExploreRefine,
    Guard,
    History,
    Local,
    Point,
    TuneError,
    TuneState,
    TuneWarning,
    tune,
)
from hypergrad.unroll import Fit, fit, score

try:
    __version__ = version("hypergrad")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "unknown"

__all__ = [
    "Constraint",
    "Experiment",
    "ExploreRefine",
    "Fit",
    "Guard",
    "History",
    "Local",
    "HyperSpace",
    "Point",
    "Problem",
    "Task",
    "TuneError",
    "TuneState",
    "TuneWarning",
    "bounded",
    "check_hypergrad",
    "classification_scores",
    "data",
    "directional_errors",
    "estimators",
    "fit",
    "hparams",
    "implicit",
    "inner",
    "meta",
    "models",
    "online",
    "outer",
    "positive",
    "real",
    "score",
    "search",
    "tasks",
    "tune",
    "unit",
    "unroll",
]
