"""Hypergradient estimators, one per module, all ``(task, phi, key) -> (value, grad, aux)``."""

from hypergrad.estimators.base import Estimator
from hypergrad.estimators.reverse import reverse

__all__ = ["Estimator", "reverse"]
