"""Reverse-mode hypergradients through the whole unroll (Maclaurin et al. 2015, §2)."""

from __future__ import annotations

from typing import Any

import jax

from hypergrad.estimators.base import Estimator
from hypergrad.inner import check_hvp
from hypergrad.task import Task
from hypergrad.unroll import check_policy, objective
from hypergrad.validation import keywords


@keywords
def reverse(checkpoint: Any = "auto", hvp: str = "reverse") -> Estimator:
    """Backpropagate the validation loss through all T inner steps.

    Exact up to floating point; memory grows with T unless a checkpoint policy trades it
    for recomputation.

    Args:
      checkpoint: ``"auto"`` (default: the policy measured fastest on the backend,
        :func:`hypergrad.unroll.auto_policy`: ``"step"`` on CPU, ``None`` elsewhere),
        ``None`` (store every step), ``"step"`` (store each step's weights and recompute
        activations), an integer k (store the weights every k steps) or ``"nested"`` (two
        levels: about sqrt(T) stored states, one extra forward pass). All are exact; they
        round differently in the last bits.
      hvp: ``"reverse"`` (default) is plain reverse-over-reverse autodiff, which stores
        every step's activations; ``"forward"`` backpropagates through each inner step's
        gradient with one forward-over-reverse Hessian-vector product, keeping only the
        step's inputs: faster and far leaner (``scripts/bench_unroll.py``), but it cannot
        differentiate the training data or carry tangents through the estimator (see
        :func:`hypergrad.inner.value_and_grad`). Both give the same hypergradient up to
        rounding (1e-10 relative in float64, tested). With ``"forward"``, a task's
        ``hvp_batch_size`` runs each product over the batch in chunks, which lowers peak
        memory further for some time.

    Returns:
      an estimator ``(task, phi, key) -> (value, grad, aux)``; ``grad`` is shaped like
      ``phi`` and ``aux`` holds ``train_loss``, ``train_losses`` and the trained ``params``.
    """
    check_policy(checkpoint)
    check_hvp(hvp)

    def estimate(task: Task, phi: Any, key: jax.Array):
        (value, aux), grad = jax.value_and_grad(
            lambda p: objective(task, p, key, checkpoint=checkpoint, hvp=hvp), has_aux=True
        )(phi)
        return value, grad, aux

    return Estimator(estimate, "reverse", {"checkpoint": checkpoint, "hvp": hvp})
