"""Truncated backpropagation through the last K inner steps (Shaban et al. 2019)."""

from __future__ import annotations

from typing import Any

import jax

from hypergrad.estimators.base import Estimator, Online
from hypergrad.inner import check_hvp
from hypergrad.task import Task
from hypergrad.unroll import check_policy, check_window, segment, start, truncated_objective
from hypergrad.validation import keywords


@keywords
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
      Online (:class:`~hypergrad.estimators.base.Online`) it trains one run window by
      window and backpropagates through each window from the weights the last one left
      (Franceschi et al. 2017's real-time HO, Shaban et al. 2019).
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
                                              "hvp": hvp}, _online(window, hvp))


def _online(window: int, hvp: str) -> Online:
    """One training run, carried as its inner state; each window differentiated from the
    state the last one left (a constant)."""

    def init(task: Task, phi: Any, key: jax.Array):
        task.require_final("truncated")
        return start(task, task.space.constrain(phi), key)[0]

    def step(carry, task: Task, phi: Any, key: jax.Array, meta_step, inner_step):
        del meta_step  # the windows run on from inner_step, as accepted steps leave it
        _, data_key = jax.random.split(key)  # as `start` splits the run's key
        begin = inner_step

        def f(p):
            hparams = task.space.constrain(p)
            inner, losses = segment(task, hparams, carry, data_key, begin, window, hvp=hvp)
            value = task.validation_loss(inner.params, hparams, inner.model_state)
            return value, (inner, losses)

        (value, (inner, losses)), grad = jax.value_and_grad(f, has_aux=True)(phi)
        return inner, value, grad, losses[-1], lambda p: f(p)[0]

    return Online(window, init, step, lambda carry: jax.tree.map(lambda a: a[None], carry))
