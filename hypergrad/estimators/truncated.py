"""Truncated backpropagation through the last K inner steps (Shaban et al. 2019)."""

from __future__ import annotations

from typing import Any

import jax

from hypergrad.estimators.base import Estimator
from hypergrad.inner import check_hvp
from hypergrad.task import Task
from hypergrad.unroll import check_policy, check_window, truncated_objective


def truncated(window: int, checkpoint: Any = "auto", hvp: str = "reverse") -> Estimator:
    """Backpropagate the validation loss through the last ``window`` inner steps only.

    The first ``T - K`` steps train as usual but their final state is treated as a
    constant, so memory grows with K instead of T. This is K-step truncated reverse mode
    (K-RMD, Shaban et al. 2019, §3): biased for K < T (near a minimum of the train loss it
    approximates the implicit hypergradient with ``I - (I - lr H)^K`` in place of ``I``);
    ``window >= T`` gives exactly the reverse hypergradient. Minibatches are the same
    as the full unroll's for the same key.

    Args:
      window: K, the number of final steps differentiated (a positive integer).
      checkpoint: the checkpoint policy for those K steps, as in
        :func:`hypergrad.estimators.reverse`.
      hvp: how to backpropagate through each step's gradient, as in
        :func:`hypergrad.estimators.reverse`.

    Returns:
      an estimator ``(task, phi, key) -> (value, grad, aux)``; ``value`` is the exact
      validation loss, ``aux`` holds ``train_loss``, ``train_losses`` and ``params``.
    """
    check_window(window)
    check_policy(checkpoint)
    check_hvp(hvp)

    def estimate(task: Task, phi: Any, key: jax.Array):
        (value, aux), grad = jax.value_and_grad(
            lambda p: truncated_objective(task, p, key, window, checkpoint=checkpoint,
                                         hvp=hvp),
            has_aux=True,
        )(phi)
        return value, grad, aux

    return Estimator(estimate, "truncated", {"window": window, "checkpoint": checkpoint,
                                              "hvp": hvp})
