"""Hyper-updates: optax transformations that update the unconstrained hyperparameters ``phi``.

Every optimizer here is an ``optax.GradientTransformationExtraArgs`` called the same way, so
a meta-step can use any of them::

    updates, state = opt.update(grad, state, phi, value=value, grad=grad, value_fn=value_fn)
    phi = optax.apply_updates(phi, updates)

``value`` is the objective at ``phi``, ``grad`` its hypergradient and ``value_fn(phi)`` the
objective itself (a full training run). Only :func:`nonlinear_cg` calls ``value_fn``, in its
line search; :func:`gradient_descent` and :func:`adam` ignore the extra arguments.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "DEFAULT",
    "DEFAULT_LR",
    "NAMES",
    "NonlinearCGState",
    "adam",
    "by_name",
    "gradient_descent",
    "nonlinear_cg",
]

_VARIANTS = ("polak_ribiere", "fletcher_reeves", "hestenes_stiefel")


def gradient_descent(
    learning_rate: float, momentum: float = 0.0
) -> optax.GradientTransformationExtraArgs:
    """Gradient descent on ``phi``, with heavy-ball momentum when ``momentum > 0``.

    The update is ``-learning_rate * t`` with the trace ``t = grad + momentum * t``
    (Polyak, 1964). Extra arguments (``value``, ``grad``, ``value_fn``) are accepted and ignored.
    """
    no_momentum = isinstance(momentum, int | float) and momentum == 0
    tx = optax.sgd(learning_rate, momentum=None if no_momentum else momentum)
    return optax.with_extra_args_support(tx)


def adam(
    learning_rate: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformationExtraArgs:
    """Adam on ``phi`` (Kingma & Ba, 2015); extra arguments are accepted and ignored."""
    return optax.with_extra_args_support(optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))


class NonlinearCGState(NamedTuple):
    """State of :func:`nonlinear_cg`; the last six fields describe the latest update.

    Attributes:
      count: number of updates taken (int32).
      prev_grad: gradient at the previous update.
      prev_direction: search direction of the previous update.
      prev_slope: ``prev_grad . prev_direction`` (negative).
      step_scale: step the next initial trial is scaled from: the accepted step, or after a
        failed search the step it would have tried next.
      step_size: accepted step along the direction, 0 when the line search failed.
      value: objective at the accepted point (the input ``value`` when the search failed).
      num_evals: calls of ``value_fn`` made by the line search (int32).
      beta: the conjugacy coefficient used by this update (0 when it restarted).
      restarted: whether the direction was reset to ``-grad``.
      failed: whether the line search found no acceptable step; the update was zero.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    prev_grad: optax.Updates
    prev_direction: optax.Updates
    prev_slope: jax.Array
    step_scale: jax.Array
    step_size: jax.Array
    value: jax.Array
    num_evals: jax.Array
    beta: jax.Array
    restarted: jax.Array
    failed: jax.Array


class _Search(NamedTuple):
    """Carry of the line-search loop: a bracket ``lower < best < upper`` around the minimum."""

    alpha: jax.Array  # next step to evaluate
    lower: jax.Array  # largest evaluated step below `best` (0 at first)
    f_lower: jax.Array
    best: jax.Array  # best Armijo step so far (0 until one is found)
    f_best: jax.Array
    upper: jax.Array  # smallest evaluated step above `best` (inf if none)
    f_upper: jax.Array  # inf where the objective was not finite
    found: jax.Array  # some evaluated step satisfied the Armijo condition
    done: jax.Array
    num_evals: jax.Array


def _parabola_min(f0, slope, a, fa):
    """Minimizer of the parabola through ``f(0)``, ``f'(0)`` and ``f(a)``; NaN if concave."""
    curv = fa - f0 - slope * a
    ok = jnp.isfinite(curv) & (curv > 0)
    return jnp.where(ok, -slope * a * a / (2 * jnp.where(ok, curv, 1.0)), jnp.nan)


def _parabola3_min(x1, f1, x2, f2, x3, f3):
    """Minimizer of the parabola through three points; NaN if it is not convex."""
    p = (x2 - x1) ** 2 * (f2 - f3) - (x2 - x3) ** 2 * (f2 - f1)
    q = (x2 - x1) * (f2 - f3) - (x2 - x3) * (f2 - f1)
    ok = jnp.isfinite(q) & (q < 0)
    return jnp.where(ok, x2 - 0.5 * p / jnp.where(ok, q, -1.0), jnp.nan)


def _linesearch(
    objective: Callable[[jax.Array], jax.Array],
    f0: jax.Array,
    slope: jax.Array,
    alpha0: jax.Array,
    *,
    max_evals: int,
    c1: float,
    rtol: float,
    increase: float,
    decrease: float,
) -> _Search:
    """Armijo line search on ``a -> objective(a)`` that interpolates towards the minimum.

    Until a step passes ``f(a) <= f0 + c1 a slope`` it backtracks (N&W §3.5): to the
    minimizer of the parabola through ``f(0)``, ``slope`` and the failed ``f(a)``, kept in
    ``[0.1, 0.5] a``, or to ``decrease * a`` when ``f(a)`` is not finite. After that it keeps
    the best passing step inside a bracket and moves to the minimizer of the parabola through
    the bracket (or through ``f(0)``, ``slope`` and the best point while there is no finite
    upper end, growing at most ``increase`` times); it stops when that minimizer is within
    ``rtol`` of the best step, when an evaluation does not improve on it, or after
    ``max_evals`` evaluations. Before a step passes it also gives up once ``|a slope|`` is
    below the roundoff of ``f0``. On a quadratic the first interpolated step is exact.
    """
    dtype = f0.dtype

    def body(s: _Search) -> _Search:
        a = s.alpha
        f = objective(a)  # +inf where not finite
        armijo = f <= f0 + c1 * a * slope
        better = armijo & (f < s.f_best)
        # Update the bracket: a new best pushes the old one to the side it came from.
        above = a > s.best
        lower = jnp.where(better & above, s.best, jnp.where(~better & ~above, a, s.lower))
        f_lower = jnp.where(better & above, s.f_best, jnp.where(~better & ~above, f, s.f_lower))
        upper = jnp.where(better & ~above, s.best, jnp.where(~better & above, a, s.upper))
        f_upper = jnp.where(better & ~above, s.f_best, jnp.where(~better & above, f, s.f_upper))
        best = jnp.where(better, a, s.best)
        f_best = jnp.where(better, f, s.f_best)
        found = s.found | armijo

        # Still searching for an acceptable step: backtrack from the smallest failure.
        backtrack = jnp.where(
            jnp.isfinite(f),
            jnp.clip(_parabola_min(f0, slope, a, f), 0.1 * a, 0.5 * a),
            decrease * a,
        )
        # Found one: interpolate inside the bracket, or extrapolate from the best point.
        # Safeguard: stay a tenth of the way away from the known points on either side.
        bracketed = jnp.isfinite(f_upper)
        inside = _parabola3_min(lower, f_lower, best, f_best, upper, f_upper)
        inside = jnp.clip(inside, lower + 0.1 * (best - lower), upper - 0.1 * (upper - best))
        outside = _parabola_min(f0, slope, best, f_best)
        outside = jnp.where(jnp.isnan(outside), increase * best, outside)
        outside = jnp.clip(
            outside,
            lower + 0.1 * (best - lower),
            jnp.minimum(increase * best, 0.5 * (best + upper)),
        )
        refine = jnp.where(bracketed, inside, outside)

        num_evals = s.num_evals + 1
        converged = ~(jnp.abs(refine - best) > rtol * best)  # also true for a NaN `refine`
        stalled = s.found & ~better
        # Give up once a backtracked step could not change f0 measurably in this precision.
        negligible = ~found & ~(jnp.abs(backtrack * slope) > jnp.finfo(dtype).eps * jnp.abs(f0))
        done = (found & (converged | stalled)) | negligible | (num_evals >= max_evals)
        return _Search(
            alpha=jnp.where(found, refine, backtrack),
            lower=lower,
            f_lower=f_lower,
            best=best,
            f_best=f_best,
            upper=upper,
            f_upper=f_upper,
            found=found,
            done=done,
            num_evals=num_evals,
        )

    zero = jnp.zeros([], dtype)
    inf = jnp.asarray(jnp.inf, dtype)
    # A zero slope needs no search (step 0); a non-finite slope or f0 fails without evaluations.
    init = _Search(
        alpha=alpha0,
        lower=zero,
        f_lower=f0,
        best=zero,
        f_best=f0,
        upper=inf,
        f_upper=inf,
        found=slope == 0,
        done=~(slope < 0) | ~jnp.isfinite(slope) | ~jnp.isfinite(f0),
        num_evals=jnp.zeros([], jnp.int32),
    )
    return jax.lax.while_loop(lambda s: ~s.done, body, init)


def _dot(x: optax.Updates, y: optax.Updates) -> jax.Array:
    # Elementwise products, not jnp.vdot: keeps float32 exact on accelerators (no TF32).
    leaves = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.sum(a * b), x, y))
    return sum(leaves, start=jnp.zeros([], leaves[0].dtype))


def _axpy(alpha: jax.Array, x: optax.Updates, y: optax.Updates) -> optax.Updates:
    """``alpha * x + y``, each leaf keeping the dtype of ``y``."""
    return jax.tree.map(lambda a, b: (alpha * a + b).astype(b.dtype), x, y)


def _float_dtype(tree: Any) -> jnp.dtype:
    dtype = jnp.result_type(*jax.tree.leaves(tree))
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.result_type(float)


def nonlinear_cg(
    learning_rate: float = 1.0,
    variant: str = "polak_ribiere",
    restart_every: int | None = None,
    max_linesearch_steps: int = 20,
    slope_rtol: float = 1e-4,
    increase_factor: float = 10.0,
    decrease_factor: float = 0.5,
    linesearch_rtol: float = 1e-3,
) -> optax.GradientTransformationExtraArgs:
    """Nonlinear conjugate gradient with an interpolating Armijo line search on ``value_fn``.

    The direction is ``d_k = -g_k + beta_k d_{k-1}`` (Nocedal & Wright, Numerical Optimization,
    2nd ed., §5.2), with ``beta_k`` from ``variant``:

    - ``"polak_ribiere"``: ``g_k.(g_k - g_{k-1}) / |g_{k-1}|^2``, clipped at 0 (PR+, eq. 5.45);
    - ``"fletcher_reeves"``: ``|g_k|^2 / |g_{k-1}|^2`` (eq. 5.41a);
    - ``"hestenes_stiefel"``: ``g_k.(g_k - g_{k-1}) / d_{k-1}.(g_k - g_{k-1})`` (eq. 5.46).

    The direction restarts at ``-g_k`` on the first update, after a failed line search, when
    ``beta_k`` is negative or not finite, when ``d_k`` is not a descent direction
    (``d_k.g_k >= 0``) and every ``restart_every`` updates. ``restart_every=None`` never
    restarts by count: PR+ and the descent check already restart when conjugacy is lost, and
    the textbook period (the number of hyperparameters) is usually longer than the run.

    The step satisfies the Armijo condition ``f(phi + a d) <= f(phi) + slope_rtol * a g.d``
    and approximately minimizes ``f`` along ``d``, using objective values only. The first
    trial step is ``learning_rate``, later ones follow N&W eq. (3.60),
    ``a_{k-1} (g_{k-1}.d_{k-1}) / (g_k.d_k)``, growing at most ``increase_factor`` times. A
    failed trial backtracks to the minimizer of the parabola through ``f(0)``,
    ``f'(0) = g.d`` and ``f(a)``, kept within ``[0.1, 0.5] a`` (N&W §3.5), or to
    ``decrease_factor * a`` when ``f(a)`` is not finite. Once a trial passes, the search
    moves to the minimizer of the parabola through the best point and its neighbours while
    that improves the objective and moves the step by more than ``linesearch_rtol``, and
    returns the best passing point. The parabola is exact on quadratics, which is what
    conjugacy needs: CG then minimizes an ``n``-dimensional quadratic in about ``n``
    updates. If no trial passes within ``max_linesearch_steps`` evaluations (or the trial
    step becomes too small to change ``f`` in floating point), the update is zero,
    ``state.failed`` is set and the next update restarts from a smaller trial step.

    Because it only compares objective values, the search cannot resolve gradients below
    about ``sqrt(eps * |f| * curvature)``; CG stalls there rather than diverging.

    Args:
      learning_rate: first trial step along ``d_0 = -g_0``.
      variant: formula for ``beta``, one of ``"polak_ribiere"``, ``"fletcher_reeves"``,
        ``"hestenes_stiefel"``.
      restart_every: restart every this many updates; ``None`` only restarts on the
        conditions above.
      max_linesearch_steps: most ``value_fn`` evaluations per update.
      slope_rtol: Armijo constant ``c_1``.
      increase_factor: largest growth of the trial step between updates, and of the
        interpolated step over an accepted one.
      decrease_factor: backtracking factor after a non-finite value.
      linesearch_rtol: stop refining the step once the interpolated minimizer is this close
        (relative) to the best step. Larger values save objective evaluations; values much
        above 1e-3 lose the finite termination of CG on quadratics.

    Returns:
      A ``GradientTransformationExtraArgs`` whose ``update`` needs the keyword arguments
      ``value``, ``grad`` and ``value_fn``; other keyword arguments are passed to ``value_fn``.
      The direction is built from ``grad``; the positional ``updates`` are ignored.
    """
    if variant not in _VARIANTS:
        raise ValueError(f"unknown nonlinear_cg variant {variant!r}; choose one of {_VARIANTS}")
    if restart_every is not None and restart_every < 1:
        raise ValueError(f"restart_every must be a positive int or None, got {restart_every}")
    if max_linesearch_steps < 1:
        raise ValueError(f"max_linesearch_steps must be >= 1, got {max_linesearch_steps}")

    def init_fn(params: optax.Params) -> NonlinearCGState:
        dtype = _float_dtype(params)
        zeros = optax.tree.zeros_like(params)
        zero = jnp.zeros([], dtype)
        return NonlinearCGState(
            count=jnp.zeros([], jnp.int32),
            prev_grad=zeros,
            prev_direction=zeros,
            prev_slope=zero,
            step_scale=jnp.asarray(learning_rate, dtype),
            step_size=zero,
            value=jnp.asarray(jnp.inf, dtype),
            num_evals=jnp.zeros([], jnp.int32),
            beta=zero,
            restarted=jnp.asarray(False),
            failed=jnp.asarray(False),
        )

    def update_fn(
        updates: optax.Updates,
        state: NonlinearCGState,
        params: optax.Params,
        *,
        value: jax.Array,
        grad: optax.Updates,
        value_fn: Callable[..., jax.Array],
        **extra_args: Any,
    ) -> tuple[optax.Updates, NonlinearCGState]:
        del updates  # the direction is built from `grad`
        dtype = state.step_scale.dtype
        f0 = jnp.asarray(value).astype(dtype)
        g = jax.tree.map(lambda gi, p: jnp.asarray(gi).astype(p.dtype), grad, params)
        g_prev, d_prev = state.prev_grad, state.prev_direction

        # Conjugacy coefficient (N&W eqs. 5.41a, 5.45, 5.46).
        gg = _dot(g, g).astype(dtype)
        y = jax.tree.map(jnp.subtract, g, g_prev)
        if variant == "fletcher_reeves":
            beta = gg / _dot(g_prev, g_prev).astype(dtype)
        elif variant == "polak_ribiere":
            beta = _dot(g, y).astype(dtype) / _dot(g_prev, g_prev).astype(dtype)
        else:
            beta = _dot(g, y).astype(dtype) / _dot(d_prev, y).astype(dtype)

        restart = (state.count == 0) | state.failed | ~(beta >= 0) | ~jnp.isfinite(beta)
        if restart_every is not None:
            restart = restart | (state.count % restart_every == 0)
        # Where restarting, beta may be inf/NaN: select the direction, never multiply by 0.
        d_cg = jax.tree.map(lambda gi, di: -gi + (beta * di).astype(gi.dtype), g, d_prev)
        slope_cg = _dot(g, d_cg).astype(dtype)
        restart = restart | ~(slope_cg < 0)
        d = jax.tree.map(lambda gi, di: jnp.where(restart, -gi, di), g, d_cg)
        slope = jnp.where(restart, -gg, slope_cg)

        # Initial trial step, N&W eq. (3.60): same first-order decrease as the last update.
        ratio = state.prev_slope / slope
        ratio = jnp.where(jnp.isfinite(ratio) & (ratio > 0), ratio, 1.0)
        alpha0 = jnp.where(
            state.count == 0,
            jnp.asarray(learning_rate, dtype),
            state.step_scale * jnp.minimum(ratio, increase_factor),
        )

        def objective(alpha):
            f = value_fn(_axpy(alpha, d, params), **extra_args)
            f = jnp.asarray(f).astype(dtype)
            return jnp.where(jnp.isfinite(f), f, jnp.inf)  # non-finite counts as failure

        s = _linesearch(
            objective,
            f0,
            slope,
            alpha0,
            max_evals=max_linesearch_steps,
            c1=slope_rtol,
            rtol=linesearch_rtol,
            increase=increase_factor,
            decrease=decrease_factor,
        )

        failed = ~s.found
        step = jnp.where(failed, 0.0, s.best)
        new_updates = jax.tree.map(
            lambda di, p: jnp.where(failed, jnp.zeros_like(p), (step * di).astype(p.dtype)),
            d,
            params,
        )
        new_state = NonlinearCGState(
            count=state.count + 1,
            prev_grad=g,
            prev_direction=d,
            prev_slope=slope,
            # After a failure the next search starts afresh from `learning_rate` (starting
            # from the last, tiny backtracked step would fail at once, for ever); a zero
            # gradient accepts step 0 and keeps the old scale.
            step_scale=jnp.where(failed, jnp.asarray(learning_rate, dtype),
                                 jnp.where(step > 0, step, state.step_scale)),
            step_size=step,
            value=jnp.where(failed, f0, s.f_best),
            num_evals=s.num_evals,
            beta=jnp.where(restart, 0.0, beta),
            restarted=restart,
            failed=failed,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_BY_NAME: dict[str, Callable[[float], optax.GradientTransformationExtraArgs]] = {
    "gd": gradient_descent, "ncg": nonlinear_cg, "adam": adam}
#: The hyper-updates a config can name.
NAMES = tuple(_BY_NAME)

# Step sizes for `by_name(name, None)`, in units of `phi` (log / logit coordinates). For ncg
# it is only the first trial step: the line search sets the scale from then on.
# gd: with hypergradients clipped to norm 0.5 (the run default), a step of 1 in log
# units moves a hyperparameter by at most a factor e^0.5 per meta-step. adam: 0.2, chosen
# by scripts/bench_hpo.py (docs/benchmarks/search.md): against
# 0.05 it ended lower on all four problems on digits, and it beat gd on the seed CNN's
# run and on MNIST (b) and (d); it was 0.05 before.
DEFAULT_LR: dict[str, float] = {"gd": 1.0, "ncg": 1.0, "adam": 0.2}
#: The hyper-update of ``hg.tune`` given none and of ``hypergrad run``: Adam, step
#: ``DEFAULT_LR["adam"]``.
DEFAULT = "adam"


def by_name(name: str, learning_rate: float | None = None) -> optax.GradientTransformationExtraArgs:
    """The outer optimizer called ``name`` ("gd", "ncg" or "adam") with its defaults.

    For ``"ncg"`` the learning rate is the first trial step of the line search; ``None``
    takes ``DEFAULT_LR[name]``. The same name and rate give the same object (the
    transformations are pure), so ``hg.tune``'s compiled meta-step serves every call that
    names them.
    """
    if not isinstance(name, str) or not (learning_rate is None or isinstance(
            learning_rate, int | float)):
        return _by_name(name, learning_rate)  # (unhashable input: the error below)
    return _cached_by_name(name, learning_rate)


def _by_name(name: str, learning_rate: float | None) -> optax.GradientTransformationExtraArgs:
    try:
        factory = _BY_NAME[name]
    except KeyError:
        choices = ", ".join(repr(k) for k in _BY_NAME)
        raise ValueError(f"unknown outer optimizer {name!r}; choose one of {choices}") from None
    return factory(DEFAULT_LR[name] if learning_rate is None else learning_rate)


_cached_by_name = functools.lru_cache(maxsize=64)(_by_name)


class RecurrenceState(NamedTuple):
    """State of :func:`fibonacci_recurrence`: ``alpha_{t-2}`` and ``beta_{t-1}``."""

    prev_params: optax.Params
    prev_grad: optax.Updates


def fibonacci_recurrence() -> optax.GradientTransformationExtraArgs:
    """The source article's hyper-update ``a_t = a_{t-1} + a_{t-2} (exp(b_t) - b_{t-1})``.

    ``a`` is ``phi`` (use a ``real`` hyperparameter to apply it to the value itself) and
    ``b_t`` the hypergradient given to the update at meta-step t; ``a_{-1} = 0`` and
    ``b_0 = 0``. It is not a descent method: with ``b`` near zero the step is
    ``a_{t-2}``, so ``a_t`` grows like the Fibonacci numbers (``a_t ~ F_{t+1} a_0``,
    by a factor of about 1.618 per meta-step) whatever the objective does; the
    hypergradient only rescales that growth. Extra arguments are accepted and ignored.
    """

    def init_fn(params: optax.Params) -> RecurrenceState:
        zeros = optax.tree.zeros_like(params)
        return RecurrenceState(zeros, zeros)

    def update_fn(updates, state, params, **extra_args):
        del extra_args
        step = jax.tree.map(lambda a2, b, b1: (a2 * (jnp.exp(b) - b1)).astype(a2.dtype),
                            state.prev_params, updates, state.prev_grad)
        return step, RecurrenceState(params, updates)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
