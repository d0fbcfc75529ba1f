"""Check any estimator against central finite differences of the objective, and measure
the memory its compiled program takes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from hypergrad.task import Task
from hypergrad.unroll import objective

MAX_COORDINATES = 16


def memory_bytes(fn: Any, *args: Any) -> dict[str, int] | None:
    """XLA's ``argument``, ``output`` and ``temp`` (working) bytes of ``jax.jit(fn)``
    compiled for ``args`` (``None`` where the backend does not say), measured without
    running it. Two methods on the same data differ in ``temp``: the arguments (the data
    among them) are the same for both."""
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    if stats is None:
        return None
    return {"argument": int(stats.argument_size_in_bytes),
            "output": int(stats.output_size_in_bytes), "temp": int(stats.temp_size_in_bytes)}


def peak_bytes(fn: Any, *args: Any) -> int | None:
    """The memory one call of ``jax.jit(fn)`` holds at its peak: the sum of
    :func:`memory_bytes` (``None`` where the backend does not say)."""
    sizes = memory_bytes(fn, *args)
    return None if sizes is None else sum(sizes.values())


def directional_errors(
    est: Any, task: Task, phi: Any, key: jax.Array, *, directions: int | None = None,
    eps: float | Sequence[float] | None = None, seed: int = 0,
) -> list[dict[str, Any]]:
    """Compare ``<grad, d>`` with ``(f(phi + eps d) - f(phi - eps d)) / (2 eps)``.

    Training a ReLU network makes ``f`` only piecewise smooth: each pre-activation that
    crosses zero between ``phi - eps d`` and ``phi + eps d`` bends ``f`` there, and that
    difference no longer measures the derivative at ``phi``; too small a step drowns in
    rounding error instead. So several steps are tried and the closest agreement is
    reported. A wrong hypergradient disagrees at every step.

    The error of a direction is relative to the largest directional derivative among the
    checked directions, ``|analytic - numeric| / max_d max(|analytic_d|, |numeric_d|)``:
    the error as a fraction of the hypergradient's size. Relative to its own derivative,
    a direction in which ``f`` is nearly flat (1/60 of the others, say) would magnify
    rounding noise that every direction shares into a false failure; a wrong
    hypergradient still shows in the directions where it is large.

    Needs 64-bit mode (``jax.config.update("jax_enable_x64", True)``): in float32 the
    rounding error of the differences swamps a 1e-6 tolerance.

    Args:
      est: an estimator ``(task, phi, key) -> (value, grad, aux)``.
      task, phi, key: the point to check; ``f`` is the validation loss after training.
      directions: how many random unit directions to check (drawn with ``seed``), at
        least 1; ``None`` checks every coordinate of ``phi`` when it has at most
        :data:`MAX_COORDINATES` entries, and that many random directions otherwise.
      eps: the finite-difference step(s) in ``phi``, each positive and finite; by default
        ``1e-4 ... 1e-7`` for float64 ``phi`` and ``1e-2, 1e-3`` for lower precision.

    Returns:
      one record per direction: ``name``, ``analytic``, ``numeric``, ``eps`` (the step
      that agreed best), ``scale`` (the largest directional derivative, shared by all
      records) and ``rel_error`` (``|analytic - numeric| / scale``).

    Raises:
      ValueError: 64-bit mode is off, ``directions`` is below 1 or a step is not positive.
    """
    if not jax.config.read("jax_enable_x64"):
        raise ValueError("checking a hypergradient needs float64: call "
                         "jax.config.update('jax_enable_x64', True) first")
    if directions is not None and (isinstance(directions, bool)
                                   or not isinstance(directions, int) or directions < 1):
        raise ValueError(f"directions must be a positive integer or None, got {directions!r}")
    flat, unravel = ravel_pytree(phi)
    if eps is None:
        eps = (1e-4, 1e-5, 1e-6, 1e-7) if flat.dtype == jnp.float64 else (1e-2, 1e-3)
    steps = np.atleast_1d(np.asarray(eps, dtype=np.float64))
    if steps.size == 0 or not np.all(np.isfinite(steps) & (steps > 0)):
        raise ValueError(f"eps must be positive finite step(s), got {eps!r}")
    _, grad, _ = est(task, phi, key)
    g = np.asarray(ravel_pytree(grad)[0], dtype=np.float64)
    f = jax.jit(lambda p: objective(task, p, key)[0])

    if directions is None and flat.size > MAX_COORDINATES:
        directions = MAX_COORDINATES
    if directions is None:
        names = _coordinate_names(phi)
        basis = np.eye(flat.size)
    else:
        rng = np.random.default_rng(seed)
        basis = rng.standard_normal((directions, flat.size))
        basis /= np.linalg.norm(basis, axis=1, keepdims=True)
        names = [f"random[{i}]" for i in range(directions)]

    records = []
    for name, d in zip(names, basis, strict=True):
        analytic = float(g @ d)
        best: dict[str, Any] | None = None
        for h in steps:
            step = jnp.asarray(h * d, dtype=flat.dtype)
            numeric = float(f(unravel(flat + step)) - f(unravel(flat - step))) / (2 * h)
            err = abs(analytic - numeric)
            if best is None or err < best["error"]:
                best = {"name": name, "analytic": analytic, "numeric": numeric,
                        "eps": float(h), "error": err}
        assert best is not None  # steps is not empty
        records.append(best)
    # np.max, unlike max, propagates a NaN: a diverged difference fails every direction.
    scale = float(np.max([[abs(r["analytic"]), abs(r["numeric"])] for r in records]))
    scale = float(np.maximum(scale, np.finfo(np.float64).tiny))
    for r in records:
        r["scale"] = scale
        r["rel_error"] = float(r.pop("error") / scale)
    return records


def check_hypergrad(
    est: Any, task: Task, phi: Any, key: jax.Array, *, directions: int | None = None,
    eps: float | Sequence[float] | None = None, seed: int = 0,
) -> float:
    """The largest relative error of ``est`` against central differences.

    See :func:`directional_errors` for the arguments and how errors are scaled; like it,
    this refuses to run unless 64-bit mode is on.
    """
    records = directional_errors(est, task, phi, key, directions=directions, eps=eps, seed=seed)
    return float(np.max([r["rel_error"] for r in records]))


def _coordinate_names(phi: Any) -> list[str]:
    names = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(phi):
        base = jax.tree_util.keystr(path, simple=True, separator="/")
        size = int(np.size(leaf))
        names += [base] if size == 1 else [f"{base}[{i}]" for i in range(size)]
    return names
