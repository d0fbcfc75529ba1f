"""The jitted meta-step of one member: hypergradient, clipped hyper-update, guard.

A member's :class:`TuneState` carries the point the next meta-step evaluates (``phi``),
the last accepted point with its hypergradient (where a rejected point steps from
again, with half the step, without evaluating it twice), the best accepted point, the
guard's counters and, for online tuning, the inner state. :func:`make_step` builds the
meta-step ``(task, state, key) -> (state, metrics)`` for one member; the loop
(:mod:`hypergrad.tune.loop`) vmaps it over the population and jits it once.

The objective a step sees is the estimator's validation loss at one key, or its mean
over ``keys`` keys (``fold_in(key, k)``, one vmap: a stochastic task's dropout and
augmentation averaged over several draws, still a deterministic function of ``phi``), or
after chaos was detected the Gaussian-smoothed loss at the scale ``sigma`` of the steps
(:func:`hypergrad.estimators.es`); the guard's trust region then compares smoothed values
while the best point is still chosen by the plain validation loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hypergrad import outer as outer_lib
from hypergrad import population as population_lib
from hypergrad.estimators.base import Estimator, Online
from hypergrad.estimators.es import es
from hypergrad.task import Task
from hypergrad.tune.guard import (
    ACTIVE,
    DEFAULT_GUARD,
    DIVERGENT,
    INCREASE,
    NONFINITE,
    OK,
    OUT_OF_RANGE,
    RETIRED_CHAOTIC,
    RETIRED_CONVERGED,
    RETIRED_REJECTED,
    RETIRED_STALLED,
    RETIRED_START,
    Guard,
)
from hypergrad.unroll import objective

PyTree = Any

#: Hypergradients with a larger global norm are scaled down to it before a hyper-update
#: (0 turns clipping off). Hypergradients of long unrolls spike near the edge of stability
#: and one spike can throw ``phi`` far away. A line search (nonlinear CG) reads the
#: unclipped hypergradient from its ``grad`` argument and is not affected.
DEFAULT_CLIP = 0.5

#: Antithetic pairs of the smoothed hypergradient a chaotic objective switches to.
SMOOTH_PAIRS = 8

# Rises of the validation loss smaller than this times its magnitude are rounding, not
# evidence of chaos.
_ROUNDING = 1e-4


class TuneState(NamedTuple):
    """Everything the loop carries for one member (a leading member axis in a run).

    ``phi``/``opt_state`` are where the next meta-step evaluates; ``last_*`` the last
    accepted point (``last_value`` its loss as the guard compares it, ``last_grad`` its
    hypergradient); ``best_*`` the accepted point with the lowest validation loss.
    ``carry`` is the inner state of online tuning (weights trained up to ``inner_step``),
    ``()`` otherwise. ``value_ref`` is the start's loss (NaN: the next point becomes the
    reference, after the objective changed); ``rise0`` the rise of the first rejected
    increase of the current row and ``step0`` the length (root mean square per
    coordinate) of the step that caused it; ``sigma`` the smoothing scale (0: none).
    """

    phi: PyTree
    opt_state: PyTree
    last_phi: PyTree
    last_state: PyTree
    last_grad: PyTree
    last_value: jax.Array
    last_step: jax.Array
    best_phi: PyTree
    best_value: jax.Array
    best_step: jax.Array
    carry: PyTree
    inner_step: jax.Array
    scale: jax.Array
    value_ref: jax.Array
    grad_ref: jax.Array
    rise0: jax.Array
    step0: jax.Array
    sigma: jax.Array
    rejected: jax.Array
    rejected_in_row: jax.Array
    search_failures: jax.Array
    retired: jax.Array
    meta_step: jax.Array


def _all_finite(tree: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _within(tree: PyTree, bound: float) -> jax.Array:
    leaves = [jnp.all(jnp.abs(x) <= bound) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _select(pred: jax.Array, a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def _dot(a: PyTree, b: PyTree) -> jax.Array:
    return sum((jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                strict=True)), jnp.asarray(0.0))


def _rms(tree: PyTree) -> jax.Array:
    size = sum(x.size for x in jax.tree.leaves(tree))
    return optax.tree.norm(tree) / jnp.sqrt(max(size, 1))


def line_search(state: PyTree) -> dict[str, Any]:
    """The nonlinear-CG line search's outcome, if the hyper-update has one."""
    is_ncg = lambda x: isinstance(x, outer_lib.NonlinearCGState)  # noqa: E731
    for s in jax.tree.leaves(state, is_leaf=is_ncg):
        if is_ncg(s):
            return {"line_search": {"step": s.step_size, "evals": s.num_evals,
                                    "failed": s.failed}}
    return {}


# -- online tuning ----------------------------------------------------------------------


def online_of(estimator: Estimator) -> Online:
    """How ``estimator`` tunes while training (:class:`~hypergrad.estimators.base.Online`),
    or a ``ValueError`` naming the estimators that can."""
    if estimator.online is None:
        raise ValueError("online tuning trains through windows of the run: pass "
                         "hg.estimators.truncated(window) or hg.estimators.pes(sigma, "
                         f"num_pairs, window), not {estimator.name}")
    return estimator.online


def online_weights(estimator: Estimator, carry: Any) -> Any:
    """The inner states an online run with ``estimator`` has trained so far, stacked on a
    leading axis: one for ``truncated`` (the run's), ``2N`` for ``pes`` (its particles)."""
    return online_of(estimator).weights(carry)


# -- the state --------------------------------------------------------------------------


def init_state(task: Task, estimator: Estimator, outer: optax.GradientTransformation,
               phi: PyTree, key: jax.Array, *, online: bool = False) -> TuneState:
    """The state of one member before its first meta-step, starting at ``phi``."""
    dtype = jnp.result_type(*jax.tree.leaves(phi))
    carry: PyTree = online_of(estimator).init(task, phi, key) if online else ()
    opt_state = outer.init(phi)
    i32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
    f = lambda v: jnp.asarray(v, dtype)  # noqa: E731
    return TuneState(
        phi=phi, opt_state=opt_state, last_phi=phi, last_state=opt_state,
        last_grad=jax.tree.map(jnp.zeros_like, phi), last_value=f(jnp.nan),
        last_step=i32(-1), best_phi=phi, best_value=f(jnp.inf), best_step=i32(-1),
        carry=carry, inner_step=i32(0), scale=f(1.0), value_ref=f(jnp.nan),
        grad_ref=f(0.0), rise0=f(0.0), step0=f(0.0), sigma=f(0.0), rejected=i32(0),
        rejected_in_row=i32(0), search_failures=i32(0), retired=i32(ACTIVE),
        meta_step=i32(0))


# -- the meta-step ----------------------------------------------------------------------


def make_step(estimator: Estimator, outer: optax.GradientTransformationExtraArgs, *,
              online: bool = False, clip: float = DEFAULT_CLIP, guard: Guard = DEFAULT_GUARD,
              resample: bool = False, keys: int = 1, sigma: float = 0.0,
              cap: float | None = None):
    """One member's meta-step ``(task, state, key) -> (state, metrics)``, not jitted.

    It evaluates ``state.phi`` (hypergradient, validation and training loss) and applies
    the guard (:mod:`hypergrad.tune.guard`). From an accepted point it takes the
    hyper-update (the hypergradient clipped to norm ``clip``, times ``state.scale``);
    after a rejected point it goes back to the last accepted point and steps from there
    with half the scale and a fresh outer state (a descent direction again, whatever
    momentum had built up). The trust region (``guard.tolerance``) applies where the
    objective is deterministic: not ``online``, not ``resample``.

    With ``online`` the evaluation trains the window of ``estimator`` (a truncated
    estimator) from ``state.carry`` and differentiates through it; an accepted step keeps
    the trained weights. With ``resample`` meta-step ``t`` trains with ``fold_in(key, t)``
    (a fresh minibatch order and fresh noise each meta-step) instead of ``key``. With
    ``keys > 1`` the point's loss and hypergradient are the means over the keys
    ``fold_in(key, k)``; with ``sigma > 0`` the hypergradient is that of the loss smoothed
    at scale ``sigma`` (:func:`hypergrad.estimators.es` with :data:`SMOOTH_PAIRS` pairs and
    ``cap``). ``metrics`` holds the evaluated point's ``val_loss``, ``train_loss``,
    ``phi``, ``hparams``, ``hypergrad`` and ``hypergrad_norm``, the ``finite``,
    ``point_ok`` and ``accepted`` flags, the rejection ``reason``, ``rho`` (the achieved
    over the predicted change since the last accepted point) and the line search's
    outcome for nonlinear CG.
    """
    window = online_of(estimator).window if online else 0
    trust = not online and not resample and guard.tolerance != float("inf")
    smooth = es(float(sigma), SMOOTH_PAIRS, cap=cap) if sigma > 0 else None

    def one_key(task, phi, key):
        """(value the guard compares, plain value, grad, train loss) at one key."""
        if smooth is not None:
            value, grad, aux = smooth(task, phi, key)
            return aux["smoothed_value"], value, grad, aux["train_loss"]
        value, grad, aux = estimator(task, phi, key)
        return value, value, grad, aux["train_loss"]

    def evaluate(task, s, key):
        if not online:
            if keys == 1:
                judged, value, grad, train_loss = one_key(task, s.phi, key)
                plain = lambda p: objective(task, p, key)[0]  # noqa: E731
            else:
                ks = jax.vmap(lambda k: jax.random.fold_in(key, k))(jnp.arange(keys))
                out = jax.vmap(lambda k: one_key(task, s.phi, k))(ks)
                judged, value, grad, train_loss = jax.tree.map(lambda a: jnp.mean(a, 0), out)
                plain = lambda p: jnp.mean(  # noqa: E731
                    jax.vmap(lambda k: objective(task, p, k)[0])(ks))
            return judged, value, grad, train_loss, s.carry, plain
        carry, value, grad, train_loss, value_at = estimator.online.step(
            s.carry, task, s.phi, key, s.meta_step, s.inner_step)
        return value, value, grad, train_loss, carry, value_at

    def step(task, s: TuneState, key):
        if resample:
            key = jax.random.fold_in(key, s.meta_step)
        judged, value, grad, train_loss, carry, value_fn = evaluate(task, s, key)
        dtype = s.scale.dtype
        judged = jnp.asarray(judged).astype(dtype)
        value = jnp.asarray(value).astype(dtype)
        grad = jax.tree.map(lambda g, p: g.astype(jnp.result_type(p)), grad, s.phi)
        gnorm = optax.tree.norm(grad).astype(dtype)
        first = s.last_step < 0
        anchor = first | jnp.isnan(s.value_ref)
        ref = jnp.where(anchor, judged, s.value_ref)
        finite = (jnp.isfinite(value) & jnp.isfinite(judged) & _all_finite(grad)
                  & _all_finite(carry))
        calm = ((judged - ref <= guard.value_ratio * jnp.abs(ref))
                & (gnorm <= guard.grad_ratio * jnp.maximum(jnp.abs(ref), s.grad_ref)))
        rise = judged - s.last_value
        if trust:
            kept = anchor | ((rise <= guard.tolerance * jnp.abs(s.last_value))
                             & (judged <= ref))
        else:
            kept = jnp.asarray(True)
        active = s.retired == ACTIVE
        point_ok = finite & calm & kept & active
        reason = jnp.where(~finite, NONFINITE, jnp.where(
            ~calm, DIVERGENT, jnp.where(~kept, INCREASE, OK))).astype(jnp.int32)
        # The achieved change over the change the last accepted point's hypergradient
        # predicted for the step taken from it.
        moved = jax.tree.map(lambda a, b: a - b, s.phi, s.last_phi)
        predicted = _dot(s.last_grad, moved).astype(dtype)
        rho = jnp.where(anchor | (predicted == 0), jnp.nan, rise / predicted)

        # Step from the evaluated point if accepted, else again from the last accepted
        # one, with half the scale and a fresh outer state.
        base_phi = _select(point_ok, s.phi, s.last_phi)
        base_grad = _select(point_ok, grad, s.last_grad)
        base_state = _select(point_ok, s.opt_state, outer.init(s.last_phi))
        base_value = jnp.where(point_ok, judged, s.last_value)
        retry = active & ~point_ok & ~first
        grow = point_ok & ~anchor & (predicted < 0) & (rho > 0.75)
        scale = jnp.where(retry, 0.5 * s.scale,
                          jnp.where(grow, jnp.minimum(1.0, 2.0 * s.scale), s.scale))
        # (a step out of range halves the scale again for the next try)
        clipped = base_grad
        if clip:
            clipped = optax.clip_by_global_norm(clip).update(base_grad, optax.EmptyState())[0]
        updates, new_state = outer.update(clipped, base_state, base_phi, value=base_value,
                                          grad=base_grad, value_fn=value_fn)
        new_phi = optax.apply_updates(base_phi, jax.tree.map(lambda u: scale * u, updates))
        step_ok = (_all_finite(new_phi) & _all_finite(new_state)
                   & _within(new_phi, guard.max_phi))
        accepted = point_ok & step_ok
        reason = jnp.where(point_ok & ~step_ok, OUT_OF_RANGE, reason)

        last_phi = base_phi
        last_state = _select(point_ok, s.opt_state, s.last_state)
        better = point_ok & (value < s.best_value)
        moves = (point_ok | retry) & step_ok
        phi = _select(moves, new_phi, base_phi)
        opt_state = _select(moves, new_state, _select(point_ok, s.opt_state, base_state))
        rejected = active & ~accepted
        in_row = jnp.where(rejected, s.rejected_in_row + 1, 0)
        starts_row = rejected & (s.rejected_in_row == 0)
        rise0 = jnp.where(starts_row, rise, s.rise0)
        step0 = jnp.where(starts_row, _rms(moved).astype(dtype), s.step0)
        search = line_search(new_state).get("line_search")
        failures = s.search_failures
        if search is not None:
            # A failed search, or one whose best step is 0, leaves phi where it was; the
            # objective being deterministic, the next search would repeat it.
            stuck = search["failed"] | (search["step"] == 0)
            failures = jnp.where(accepted, jnp.where(stuck, failures + 1, 0), failures)
        increase = reason == INCREASE
        chaotic = (increase & (in_row > guard.chaos_halvings)
                   & (rise >= guard.chaos_ratio * rise0)
                   & (rise > _ROUNDING * jnp.abs(s.last_value)))
        code = jnp.where(
            first & ~point_ok, RETIRED_START,
            jnp.where(chaotic, RETIRED_CHAOTIC,
                      jnp.where(in_row >= guard.max_rejections,
                                jnp.where(increase, RETIRED_CONVERGED, RETIRED_REJECTED),
                                jnp.where(failures >= guard.max_search_failures,
                                          RETIRED_STALLED, ACTIVE))))
        retired = jnp.where(active, code, s.retired)
        state = TuneState(
            phi=phi, opt_state=opt_state, last_phi=last_phi, last_state=last_state,
            last_grad=base_grad, last_value=base_value,
            last_step=jnp.where(point_ok, s.meta_step, s.last_step),
            best_phi=_select(better, s.phi, s.best_phi),
            best_value=jnp.where(better, value, s.best_value),
            best_step=jnp.where(better, s.meta_step, s.best_step),
            carry=_select(accepted, carry, s.carry),
            inner_step=s.inner_step + jnp.where(accepted, window, 0).astype(jnp.int32),
            scale=jnp.where(active & ~step_ok, 0.5 * scale, scale).astype(dtype),
            value_ref=jnp.where(point_ok & anchor, judged, s.value_ref),
            grad_ref=jnp.where(point_ok, jnp.maximum(s.grad_ref, gnorm), s.grad_ref),
            rise0=rise0.astype(dtype), step0=step0.astype(dtype), sigma=s.sigma,
            rejected=s.rejected + rejected.astype(jnp.int32),
            rejected_in_row=in_row.astype(jnp.int32),
            search_failures=failures.astype(jnp.int32),
            retired=retired.astype(jnp.int32),
            meta_step=s.meta_step + 1,
        )
        metrics = {"val_loss": value, "judged": judged,
                   "train_loss": jnp.asarray(train_loss).astype(dtype),
                   "phi": s.phi, "hparams": task.space.constrain(s.phi), "hypergrad": grad,
                   "hypergrad_norm": gnorm, "finite": finite, "point_ok": point_ok,
                   "accepted": accepted, "active": active, "scale": state.scale,
                   "reason": reason, "rho": rho, "last_value": s.last_value,
                   "sigma": s.sigma,
                   **line_search(new_state)}
        return state, metrics

    return step


def make_final(estimator: Estimator, *, online: bool = False, resample: bool = False,
               keys: int = 1):
    """``(task, state, key) -> value``: the validation loss at ``state.phi`` (for online
    tuning: of the weights trained so far, with ``state.phi``'s hyperparameters; with
    ``keys > 1`` the mean over the step's keys); with ``resample``, trained with the key
    the next meta-step would use."""

    def final(task, s: TuneState, key):
        if resample:
            key = jax.random.fold_in(key, s.meta_step)
        if online:
            hparams = task.space.constrain(s.phi)
            values = jax.vmap(lambda w: task.validation_loss(w.params, hparams, w.model_state))(
                online_weights(estimator, s.carry))
            return jnp.mean(values)
        if keys == 1:
            return objective(task, s.phi, key)[0]
        ks = jax.vmap(lambda k: jax.random.fold_in(key, k))(jnp.arange(keys))
        return jnp.mean(jax.vmap(lambda k: objective(task, s.phi, k)[0])(ks))

    return final


def with_key(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn(task, *args, key)`` as ``one(task, *args, key_data)``, for raw per-member keys
    (:func:`hypergrad.population.member_keys`)."""

    def one(task, *args):
        *rest, key_data = args
        return fn(task, *rest, jax.random.wrap_key_data(key_data))

    return one


def initial_state(task: Task, estimator: Estimator, outer: optax.GradientTransformation, *,
                  key: jax.Array, phi: PyTree | None = None, population: int = 1,
                  spread: float = 0.5, online: bool = False) -> TuneState:
    """Every member's state before the first meta-step, stacked on a leading axis (see
    :func:`tune` for the arguments); a checkpoint's template."""
    phi = task.space.init() if phi is None else phi
    keys = population_lib.member_keys(key, population)
    phis = jax.jit(population_lib.member_phis, static_argnums=(1,))(
        phi, population, spread, jax.random.wrap_key_data(keys[0]))
    return states(task, estimator, outer, phis, keys, online)


def states(task: Task, estimator: Estimator, outer: optax.GradientTransformation,
           phis: PyTree, keys: jax.Array, online: bool = False) -> TuneState:
    """The members' states before their first meta-step, at the stacked starts ``phis``
    with one raw key per member (:func:`hypergrad.population.member_keys`)."""
    return _build(estimator, outer, online)(task, phis, keys)


@functools.lru_cache(maxsize=64)
def _build(estimator: Estimator, outer: optax.GradientTransformation, online: bool):
    """:func:`states` as one compiled program (run eagerly, the inits compile op by op,
    once per leaf), kept per estimator, outer and mode like the meta-step, so that
    another ``hg.tune`` call with them does not compile it again."""
    outer = optax.with_extra_args_support(outer)

    @jax.jit
    def build(task, phis, keys):
        init = lambda p, k: init_state(task, estimator, outer, p,  # noqa: E731
                                       jax.random.wrap_key_data(k), online=online)
        return jax.vmap(init)(phis, keys)

    return build
