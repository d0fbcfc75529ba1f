"""The first-order approximation of reverse mode (first-order MAML, Finn et al. 2017,
§5.2; Nichol et al. 2018)."""

from __future__ import annotations

from typing import Any

import jax

from hypergrad.estimators.base import Estimator
from hypergrad.task import Task
from hypergrad.unroll import check_policy, objective
from hypergrad.validation import keywords


@keywords
def first_order(checkpoint: Any = "auto") -> Estimator:
    """Backpropagate through the unroll with every inner step's gradient held constant.

    Reverse mode through the T steps, but the training gradient ``g_t`` is treated as a
    constant (:func:`hypergrad.inner.value_and_grad` with ``hvp="none"``): no
    Hessian-vector products. With SGD, ``w_T = w_0 - sum_t lr_t g_t`` gives
    ``d w_T / d w_0 = I``, so the gradient with respect to learned initial weights is the
    validation gradient at the adapted weights: first-order MAML (FOMAML). For a learning
    rate it is ``-sum_t g_t . grad L_val(w_T)``, the greedy first-order term. Biased (exact
    only where the training loss is linear in the weights), cheaper than
    :func:`hypergrad.estimators.reverse` by the Hessian-vector products.

    Args:
      checkpoint: as :func:`hypergrad.estimators.reverse`.

    Returns:
      an estimator ``(task, phi, key) -> (value, grad, aux)``; ``value`` is exact (the
      meta-loss of the run), ``grad`` the first-order approximation.
    """
    check_policy(checkpoint)

    def estimate(task: Task, phi: Any, key: jax.Array):
        (value, aux), grad = jax.value_and_grad(
            lambda p: objective(task, p, key, checkpoint=checkpoint, hvp="none"),
            has_aux=True)(phi)
        return value, grad, aux

    return Estimator(estimate, "first_order", {"checkpoint": checkpoint})
