"""Hypergradient estimators, one per module, all ``(task, phi, key) -> (value, grad, aux)``."""

from hypergrad.estimators.base import Estimator
from hypergrad.estimators.forward import forward
from hypergrad.estimators.implicit import NotConvergedWarning, implicit
from hypergrad.estimators.reverse import reverse
from hypergrad.estimators.reversible import reversible
from hypergrad.estimators.truncated import truncated

__all__ = ["Estimator", "NotConvergedWarning", "forward", "implicit", "reverse", "reversible",
           "truncated"]
