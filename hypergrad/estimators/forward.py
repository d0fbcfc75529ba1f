"""Forward-mode hypergradients: one tangent per hyperparameter (Franceschi et al. 2017)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from hypergrad.estimators.base import Estimator
from hypergrad.task import Task
from hypergrad.unroll import objective
from hypergrad.validation import keywords


@keywords
def forward() -> Estimator:
    """Push the tangent of every coordinate of ``phi`` forward through the unroll.

    Forward-mode differentiation of the training dynamics (Franceschi et al. 2017, §3,
    ``Z_t = A_t Z_{t-1} + B_t`` with ``Z_t = d state_t / d phi``): the tangents travel
    with the state, so memory does not grow with the horizon T, while the cost grows
    with the number of hyperparameter entries (all tangents are pushed at once with a
    vmapped ``jax.jvp``).
    Exact up to floating point, like reverse mode.

    Returns:
      an estimator ``(task, phi, key) -> (value, grad, aux)``; ``grad`` is shaped like
      ``phi`` and ``aux`` holds ``train_loss``, ``train_losses`` and the trained ``params``.
    """

    def estimate(task: Task, phi: Any, key: jax.Array):
        flat, unravel = ravel_pytree(phi)

        def f(x):
            return objective(task, unravel(x), key)

        def push(tangent):
            return jax.jvp(f, (flat,), (tangent,), has_aux=True)

        basis = jnp.eye(flat.size, dtype=flat.dtype)
        # The primal does not depend on the tangent, so vmap computes it once.
        value, tangents, aux = jax.vmap(push, out_axes=(None, 0, None))(basis)
        return value, unravel(tangents), aux

    return Estimator(estimate, "forward", {})
