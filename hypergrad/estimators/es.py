"""Antithetic evolution strategies on the whole unroll (Rechenberg 1973; Salimans et al.
2017; for meta-learning, Metz et al. 2019)."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from hypergrad.estimators.base import Estimator
from hypergrad.task import Task
from hypergrad.unroll import objective
from hypergrad.validation import keywords

# Folded into the estimator's key for the perturbations; the key itself trains every
# particle (common random numbers), as it trains the other estimators' runs. The draw is
# that of pes's first window, so pes with one window is this estimator.
NOISE_STREAM = 0x5E5


@keywords
def es(sigma: float, num_pairs: int, chunk: int | None = None,
       cap: float | None = None) -> Estimator:
    """The gradient of the Gaussian-smoothed validation loss, by antithetic sampling.

    For ``f(phi)`` the validation loss after training with ``space.constrain(phi)`` and
    ``f_sigma(phi) = E_z f(phi + sigma z)``, ``z ~ N(0, I)``::

        grad f_sigma(phi) ~= 1 / (2 N sigma) sum_i z_i (f(phi + sigma z_i) - f(phi - sigma z_i))

    over ``N = num_pairs`` directions (unbiased for any ``N``). No training run is
    differentiated, so memory is that of ``2N`` forward unrolls (or ``chunk`` of them at
    a time) and the estimate stays finite where reverse-mode hypergradients of a chaotic
    unroll explode; in exchange it estimates the gradient of ``f_sigma``, not of ``f``,
    with a variance that grows with the number of hyperparameters. Every particle trains
    with the same key (the same initial weights and minibatches), so the noise of the
    minibatch order cancels within a pair.

    Args:
      sigma: the smoothing scale in ``phi``'s (unconstrained) coordinates.
      num_pairs: N, the antithetic pairs per estimate.
      chunk: run at most this many perturbed unrolls at once (``lax.map`` with a batch
        size); ``None`` vmaps all ``2N``.
      cap: replace each perturbed run's validation loss by ``cap`` where it is larger
        or not finite (a diverged run), so the estimate is that of the smoothed
        ``min(f, cap)`` and stays finite next to a region where training diverges;
        ``None`` keeps the values, and one diverged run makes ``grad`` NaN.

    Returns:
      an estimator ``(task, phi, key) -> (value, grad, aux)``. ``value`` is the plain
      validation loss at ``phi`` (one more unroll, unperturbed); ``aux`` holds that
      run's ``train_loss``, ``train_losses`` and ``params``, ``smoothed_value`` (the
      mean over the ``2N`` perturbed runs, an estimate of ``f_sigma(phi)``), ``stderr``
      (shaped like ``phi``: the standard error of ``grad`` over the pairs) and
      ``pair_std`` (the standard deviation of the pairs' central differences
      ``(f(phi + sigma z) - f(phi - sigma z)) / (2 sigma)``) and ``capped`` (how many of
      the ``2N`` values ``cap`` replaced).
    """
    _check_es(sigma, num_pairs)
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int)
                              or chunk < 1):
        raise ValueError(f"chunk must be a positive integer or None, got {chunk!r}")
    _check_cap(cap)

    def estimate(task: Task, phi: Any, key: jax.Array):
        flat, unravel = ravel_pytree(phi)
        noise = jax.random.fold_in(jax.random.fold_in(key, NOISE_STREAM), 0)
        z = jax.random.normal(noise, (num_pairs, flat.size), flat.dtype)
        points = jnp.concatenate([flat[None] + sigma * z, flat[None] - sigma * z])

        def loss(p):
            return objective(task, unravel(p), key)[0]

        if chunk is None:
            values = jax.vmap(loss)(points)
        else:
            values = jax.lax.map(loss, points, batch_size=chunk)
        values, capped = _apply_cap(values, cap)
        plus, minus = values[:num_pairs], values[num_pairs:]
        diffs = (plus - minus) / (2 * sigma)
        per_pair = diffs[:, None] * z
        value, aux = objective(task, phi, key)
        aux = {**aux, "smoothed_value": jnp.mean(values),
               "stderr": unravel(_stderr(per_pair)), "pair_std": jnp.std(diffs),
               "capped": capped}
        return value, unravel(jnp.mean(per_pair, axis=0)), aux

    return Estimator(estimate, "es", {"sigma": sigma, "num_pairs": num_pairs,
                                       "chunk": chunk, "cap": cap})


def _stderr(samples: jax.Array) -> jax.Array:
    """The standard error of the mean over axis 0 (zero for a single sample)."""
    n = samples.shape[0]
    if n < 2:
        return jnp.zeros(samples.shape[1:], samples.dtype)
    return jnp.std(samples, axis=0, ddof=1) / jnp.sqrt(n)


def _check_es(sigma: Any, num_pairs: Any) -> None:
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) \
            or not float(sigma) > 0:
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    if isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 1:
        raise ValueError(f"num_pairs must be a positive integer, got {num_pairs!r}")


def _apply_cap(values: jax.Array, cap: float | None) -> tuple[jax.Array, jax.Array]:
    """``min(values, cap)`` with non-finite values set to ``cap``, and how many changed."""
    if cap is None:
        return values, jnp.zeros((), jnp.int32)
    over = ~(values <= cap)  # NaN compares False
    return jnp.where(over, jnp.asarray(cap, values.dtype), values), jnp.sum(over)


def _check_cap(cap: Any) -> None:
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, numbers.Real)
                            or not np.isfinite(float(cap))):
        raise ValueError(f"cap must be a finite number or None, got {cap!r}")
