"""What every hypergradient estimator is: a named function with one signature."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, eq=False)
class Estimator:
    """A hypergradient method: ``est(task, phi, key) -> (value, grad, aux)``.

    ``value`` is the validation loss after training with ``space.constrain(phi)``, ``grad``
    its gradient with respect to ``phi`` (shaped and typed like ``phi``: calling the
    estimator casts it, so a float64 loss cannot promote a float32 ``phi``'s gradient and,
    through it, the outer optimizer's state) and ``aux`` a dict of diagnostics. ``name``
    and ``options`` describe the method for logs and configs.
    """

    fn: Callable[..., tuple[Any, Any, dict[str, Any]]]
    name: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __call__(self, task, phi, key):
        value, grad, aux = self.fn(task, phi, key)
        grad = jax.tree.map(lambda g, p: jnp.asarray(g, jnp.result_type(p)), grad, phi)
        return value, grad, aux
