"""Persistent evolution strategies over truncated windows of the unroll (Vicol, Metz and
Sohl-Dickstein, ICML 2021)."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from hypergrad.estimators.base import Estimator, Online
from hypergrad.inner import InnerState
from hypergrad.task import Task
from hypergrad.unroll import objective, segment, start
from hypergrad.validation import keywords

# The same stream as es's, so that pes with a single window draws es's perturbations.
NOISE_STREAM = 0x5E5


class PESState(NamedTuple):
    """The particles of one training run, between two windows.

    Attributes:
      inner: the ``2N`` particles' inner states stacked on a leading axis, the ``N``
        positively perturbed ones first, then their antithetic partners.
      xi: ``[N, d]``, each positive particle's perturbations summed over the windows so
        far, in units of ``sigma`` (its partner's is ``-xi``).
      t: the inner steps run so far (an ``int32`` scalar).
      key: the run's training key: initial weights and minibatch order.
    """

    inner: InnerState
    xi: jax.Array
    t: jax.Array
    key: jax.Array


class PESSteps(NamedTuple):
    """The functional core of PES for a loop that carries the particles across windows.

    Attributes:
      init: ``(task, phi, key) -> PESState`` at inner step 0, ``key`` the training key
        of the run.
      step: ``(state, task, phi, key, length=window) -> (state, value, grad, aux)``:
        trains every particle ``length`` more steps (a Python int, static under
        ``jax.jit``) at ``phi`` plus a fresh antithetic perturbation drawn from ``key``
        (use a new key per window), and estimates the gradient of the validation
        loss at the window's end. ``value`` is the particles' mean validation loss;
        ``aux`` holds ``train_loss`` (the particles' mean last batch loss), ``stderr``
        and ``pair_std`` as in :func:`hypergrad.estimators.es`.
    """

    init: Callable[..., PESState]
    step: Callable[..., tuple[PESState, jax.Array, Any, dict[str, Any]]]


@keywords
def pes_steps(sigma: float, num_pairs: int, window: int,
              cap: float | None = None) -> PESSteps:
    """PES's ``init`` and ``step`` for online tuning (see :class:`PESSteps`).

    Each window perturbs ``phi`` afresh, ``phi + sigma z_k`` with ``z_k ~ N(0, I)``, and
    every particle keeps its own weights from window to window. Weighting a window's
    antithetic differences by the accumulated ``xi = sum_k z_k`` instead of by ``z_k``
    alone accounts for what the earlier perturbations did to the particle's weights, so
    the estimate is unbiased for the gradient of the validation loss smoothed over every
    window's perturbation (Vicol et al. 2021), where truncated ES (weighting by
    ``z_k``) is biased. The step may take any ``phi``: an online loop updates it between
    windows. A step at ``t = 0`` initializes the particles' weights with their perturbed
    hyperparameters; ``t + length`` must not exceed ``task.steps`` (start a new run with
    ``init`` then). ``cap`` is :func:`hypergrad.estimators.es`'s: a diverged particle
    keeps diverging, and counts as ``cap`` in every window after.
    """
    _check_pes(sigma, num_pairs, window, cap)

    def init(task: Task, phi: Any, key: jax.Array) -> PESState:
        flat, _ = ravel_pytree(phi)
        inner, _ = start(task, task.space.constrain(phi), key)
        inner = jax.tree.map(lambda a: jnp.broadcast_to(a, (2 * num_pairs, *jnp.shape(a))),
                             inner)
        return PESState(inner, jnp.zeros((num_pairs, flat.size), flat.dtype),
                        jnp.zeros((), jnp.int32), key)

    def step(state: PESState, task: Task, phi: Any, key: jax.Array, length: int = window):
        state, losses, points, unravel = _advance(sigma, num_pairs, state, task, phi, key,
                                                  length)
        if task.meta_loss == "train_mean":  # the window's own part of the meta-loss
            values = jnp.mean(losses, axis=1)
        else:
            task.require_final("pes")
            values = jax.vmap(
                lambda p, params: task.validation_loss(params,
                                                       task.space.constrain(unravel(p)))
            )(points, state.inner.params)
        values, capped = _apply_cap(values, cap)
        # In phi's dtype (xi's), whatever the validation loss's, as Estimator casts its
        # gradients: the online loop calls these steps without an Estimator.
        diffs = ((values[:num_pairs] - values[num_pairs:]) / (2 * sigma)).astype(state.xi.dtype)
        per_pair = diffs[:, None] * state.xi
        aux = {"train_loss": jnp.mean(losses[:, -1]), "stderr": unravel(_stderr(per_pair)),
               "pair_std": jnp.std(diffs), "capped": capped}
        return state, jnp.mean(values), unravel(jnp.mean(per_pair, axis=0)), aux

    return PESSteps(init, step)


@keywords
def pes(sigma: float, num_pairs: int, window: int, cap: float | None = None) -> Estimator:
    """PES on one whole training run, cut into windows of ``window`` steps.

    Runs the windows of :func:`pes_steps` from step 0 to ``task.steps`` (the last one
    shorter when ``window`` does not divide the horizon) and returns the last window's
    estimate: an unbiased estimate of the gradient of the validation loss smoothed over
    an independent perturbation per window. For a validation loss quadratic in the
    hyperparameters that is the plain hypergradient, as :func:`hypergrad.estimators.es`
    estimates it; otherwise the two smoothings differ (per-window perturbations spread
    the trained weights less than one perturbation held for the whole run). Its variance
    is larger than ES's, since ``xi`` adds one unit-variance term per window. With
    ``window >= task.steps`` it is ES with the same key.

    The plain estimator is for testing and comparison: PES pays off online, where
    :func:`pes_steps` lets a loop update ``phi`` after every window without restarting
    training.

    Args:
      sigma: the smoothing scale in ``phi``'s (unconstrained) coordinates.
      num_pairs: N, the antithetic pairs (``2N`` particles, each with its own weights).
      window: the inner steps per window.
      cap: as in :func:`hypergrad.estimators.es`.

    Returns:
      an estimator ``(task, phi, key) -> (value, grad, aux)``, ``value`` and ``aux`` as
      in :func:`hypergrad.estimators.es` (``smoothed_value`` is the particles' mean
      validation loss at the end). With ``task.meta_loss="train_mean"`` each window's
      loss is its mean training loss and ``grad`` sums every window's estimate weighted
      by its share of the steps (``stderr`` is the last window's).
    """
    _check_pes(sigma, num_pairs, window, cap)
    core = pes_steps(sigma, num_pairs, window, cap)

    def estimate(task: Task, phi: Any, key: jax.Array):
        noise = jax.random.fold_in(key, NOISE_STREAM)
        windows, rest = divmod(task.steps, window)
        last = rest or window
        head = windows if rest else windows - 1  # windows before the last one
        state = core.init(task, phi, key)
        trajectory = task.meta_loss == "train_mean"
        if head and trajectory:
            # The mean over every step is each window's mean weighted by its length: the
            # estimate sums each window's PES estimate with that weight.
            def body(s, k):
                s, _, g, _ = core.step(s, task, phi, jax.random.fold_in(noise, k), window)
                return s, g

            state, grads = jax.lax.scan(body, state, jnp.arange(head))
            early = jax.tree.map(lambda g: jnp.sum(g, axis=0) * (window / task.steps), grads)
        elif head:
            def body(s, k):
                return _advance(sigma, num_pairs, s, task, phi, jax.random.fold_in(noise, k),
                                window)[0], None

            state, _ = jax.lax.scan(body, state, jnp.arange(head))
        state, smoothed, grad, aux = core.step(state, task, phi,
                                               jax.random.fold_in(noise, head), last)
        if trajectory:
            grad = jax.tree.map(lambda g: g * (last / task.steps), grad)
            if head:
                grad = jax.tree.map(jnp.add, early, grad)
        value, center = objective(task, phi, key)
        return value, grad, {**center, "smoothed_value": smoothed, "stderr": aux["stderr"],
                             "pair_std": aux["pair_std"], "capped": aux["capped"]}

    return Estimator(estimate, "pes", {"sigma": sigma, "num_pairs": num_pairs,
                                        "window": window, "cap": cap}, _online(core, window))


def _online(core: PESSteps, window: int) -> Online:
    """Online PES: the particles are the carry (their key stored as raw key data, so the
    carry is arrays only); each window perturbs afresh from the run's key and the
    window's count."""

    def init(task: Task, phi: Any, key: jax.Array) -> PESState:
        state = core.init(task, phi, key)
        return state._replace(key=jax.random.key_data(state.key))

    def step(carry: PESState, task: Task, phi: Any, key: jax.Array, meta_step, inner_step):
        del inner_step  # the particles count their own steps
        noise = jax.random.fold_in(jax.random.fold_in(key, NOISE_STREAM), meta_step)
        live = carry._replace(key=jax.random.wrap_key_data(carry.key))
        state, value, grad, aux = core.step(live, task, phi, noise, window)
        return (state._replace(key=jax.random.key_data(state.key)), value, grad,
                aux["train_loss"], lambda p: core.step(live, task, p, noise, window)[1])

    return Online(window, init, step, lambda carry: carry.inner)


def _advance(sigma: float, num_pairs: int, state: PESState, task: Task, phi: Any,
             key: jax.Array, length: int):
    """Train every particle ``length`` steps at ``phi`` plus a fresh perturbation from
    ``key``; returns ``(state, losses, points, unravel)``."""
    flat, unravel = ravel_pytree(phi)
    z = jax.random.normal(key, (num_pairs, flat.size), flat.dtype)
    points = jnp.concatenate([flat[None] + sigma * z, flat[None] - sigma * z])

    def run(p, inner):
        hp = task.space.constrain(unravel(p))
        fresh, data_key = start(task, hp, state.key)
        inner = jax.tree.map(lambda f, s: jnp.where(state.t == 0, f, s), fresh, inner)
        return segment(task, hp, inner, data_key, state.t, length)

    inner, losses = jax.vmap(run)(points, state.inner)
    return PESState(inner, state.xi + z, state.t + length, state.key), losses, points, unravel


def _stderr(samples: jax.Array) -> jax.Array:
    """The standard error of the mean over axis 0 (zero for a single sample)."""
    n = samples.shape[0]
    if n < 2:
        return jnp.zeros(samples.shape[1:], samples.dtype)
    return jnp.std(samples, axis=0, ddof=1) / jnp.sqrt(n)


def _apply_cap(values: jax.Array, cap: float | None) -> tuple[jax.Array, jax.Array]:
    """``min(values, cap)`` with non-finite values set to ``cap``, and how many changed."""
    if cap is None:
        return values, jnp.zeros((), jnp.int32)
    over = ~(values <= cap)  # NaN compares False
    return jnp.where(over, jnp.asarray(cap, values.dtype), values), jnp.sum(over)


def _check_pes(sigma: Any, num_pairs: Any, window: Any, cap: Any) -> None:
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) \
            or not float(sigma) > 0:
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    if isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 1:
        raise ValueError(f"num_pairs must be a positive integer, got {num_pairs!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, numbers.Real)
                            or not np.isfinite(float(cap))):
        raise ValueError(f"cap must be a finite number or None, got {cap!r}")
