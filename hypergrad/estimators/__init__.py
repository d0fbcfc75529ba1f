"""Hypergradient estimators, one per module, all ``(task, phi, key) -> (value, grad, aux)``."""

from hypergrad.estimators.base import Estimator, Online
from hypergrad.estimators.es import es
from hypergrad.estimators.first_order import first_order
from hypergrad.estimators.forward import forward
from hypergrad.estimators.implicit import NotConvergedWarning, implicit
from hypergrad.estimators.names import NAMES, by_name
from hypergrad.estimators.pes import PESState, PESSteps, pes, pes_steps
from hypergrad.estimators.reverse import reverse
from hypergrad.estimators.reversible import reversible
from hypergrad.estimators.truncated import truncated

__all__ = ["NAMES", "Estimator", "NotConvergedWarning", "Online", "PESState", "PESSteps", "by_name",
           "es", "first_order", "forward", "implicit", "pes", "pes_steps", "reverse", "reversible",
           "truncated"]
