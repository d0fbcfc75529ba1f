"""hypergrad: gradient-based hyperparameter optimization in JAX."""

from hypergrad import data, estimators, hparams, inner, models, online, outer, search, unroll
from hypergrad.check import check_hypergrad, directional_errors
from hypergrad.hparams import Constraint, HyperSpace, bounded, positive, real, unit
from hypergrad.task import Task

__all__ = [
    "Constraint",
    "HyperSpace",
    "Task",
    "bounded",
    "check_hypergrad",
    "data",
    "directional_errors",
    "estimators",
    "hparams",
    "inner",
    "models",
    "online",
    "outer",
    "positive",
    "real",
    "search",
    "unit",
    "unroll",
]
