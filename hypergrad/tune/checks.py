"""``hg.tune``'s arguments, checked on entry before anything compiles.

The rules the command line shares (clipping, spread, what a population cannot be tuned
with, the counts) live in :mod:`hypergrad.validation`; here are the ones that need the
tuning loop's types: the strategy's size, ``phi`` against the task's space, a start
the guard can move from, and a ``state=`` against the state this call would make.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hypergrad import population as population_lib
from hypergrad import validation
from hypergrad.hparams import HyperSpace
from hypergrad.messages import clip, show
from hypergrad.tune.step import TuneState, line_search
from hypergrad.tune.strategies import ExploreRefine, Local, Plan

PyTree = Any

_ANOTHER = "state= belongs to another run: "


def members(strategy: Any, plan: Plan | None) -> int | None:
    """How many members this call tunes at once, from ``plan`` or the strategy's fields
    (checked on the way); ``None`` for a strategy that does not say."""
    if plan is not None:
        size = plan.population
        return 1 if size is None else validation.integer("plan.population", size, low=1)
    if isinstance(strategy, Local):
        validation.spread("Local.spread", strategy.spread)
        validation.integer("Local.explore", strategy.explore)
        size = strategy.population
        return 1 if size is None else validation.integer("Local.population", size, low=1)
    if isinstance(strategy, ExploreRefine):
        if not isinstance(strategy.explore, float):  # a fraction is checked by its plan
            validation.integer("ExploreRefine.explore", strategy.explore)
        validation.integer("ExploreRefine.keys", strategy.keys, low=1)
        return validation.integer("ExploreRefine.members", strategy.members, low=1)
    return None


def population(size: int | None, outer: optax.GradientTransformation, space: HyperSpace,
               online: bool) -> None:
    """:func:`hypergrad.validation.population` for this call: whether ``outer`` is
    nonlinear CG is read from the shapes of its state (no compilation)."""
    if size is None or size == 1:
        return
    opt_state = jax.eval_shape(outer.init, jax.eval_shape(space.init))
    validation.population(size, ncg=bool(line_search(opt_state)), online=online)


def phi(value: Any, space: HyperSpace) -> None:
    """Refuse a ``phi`` that is not shaped as ``space.init()``: the same names, and each
    the same structure and shapes (any float dtype)."""
    expected = jax.eval_shape(space.init)
    if not isinstance(value, Mapping) or set(value) != set(expected):
        got = ", ".join(map(str, value)) if isinstance(value, Mapping) else show(value)
        raise ValueError(f"phi must be a dict of the task's hyperparameters "
                         f"({', '.join(expected)}) in unconstrained coordinates, as "
                         f"task.space.init() gives it; got {got}")
    for name, shapes in expected.items():
        diff = _difference(value[name], shapes, dtypes=False)
        if diff is not None:
            raise ValueError(f"phi[{name!r}] {diff} (compare task.space.init()[{name!r}])")


def start(phi: PyTree, space: HyperSpace, max_phi: float) -> None:
    """Refuse a start beyond ``max_phi`` (:func:`hypergrad.validation.beyond`): the
    guard would reject every step from it."""
    if not max_phi < math.inf:
        return
    for name, c in space.constraints.items():
        leaves = [np.ravel(np.asarray(x)) for x in jax.tree.leaves(phi[name])]
        if not leaves:
            continue
        v = np.concatenate(leaves)
        outside = v[~(np.abs(v) <= max_phi)]
        if outside.size:
            dtype = v.dtype
            low, high = (float(c.to_natural(jnp.asarray(b, dtype))) for b in (-max_phi, max_phi))
            shown = f"{float(c.to_natural(jnp.asarray(outside[0]))):g} (phi {outside[0]:g})"
            raise validation.beyond(name, shown, low, high, max_phi, entry=v.size > 1)


def state(given: Any, space: HyperSpace, size: int | None, key: jax.Array,
          make: Callable[[PyTree, jax.Array], TuneState]) -> None:
    """Refuse a ``state=`` made for another run: other hyperparameters (names, shapes),
    another population size, another outer optimizer, online against offline.

    ``make(phis, keys)`` builds this call's states (:func:`hypergrad.tune.states`); its
    shapes (``jax.eval_shape``: traced, not compiled) at the given state's own ``phi``
    are compared with the state's, leaf by leaf.
    """
    if not isinstance(given, TuneState):
        raise TypeError(f"state must be a TuneState (history.state, or a checkpoint's), "
                        f"got {type(given).__name__}")
    n = np.shape(given.meta_step)
    if len(n) != 1:
        raise ValueError(_ANOTHER + f"its meta_step has shape {n}, not one entry per member")
    if size is not None and n[0] != size:
        raise ValueError(_ANOTHER + f"it was made for {_runs(n[0])} and this call runs "
                         f"{_runs(size)}; pass population={n[0]} (or the strategy it was "
                         f"made with)")
    expected_phi = jax.eval_shape(space.init)
    if not isinstance(given.phi, Mapping) or set(given.phi) != set(expected_phi):
        names = ", ".join(map(str, given.phi)) if isinstance(given.phi, Mapping) else \
            type(given.phi).__name__
        raise ValueError(_ANOTHER + f"it tunes {names}; this task tunes "
                         f"{', '.join(expected_phi)}")
    for name, shapes in expected_phi.items():
        per_member = jax.tree.map(lambda s: jax.ShapeDtypeStruct((n[0], *s.shape), s.dtype),
                                  shapes)
        diff = _difference(given.phi[name], per_member, dtypes=False)
        if diff is not None:
            raise ValueError(_ANOTHER + f"its {name} {diff} (another granularity or "
                             f"schedule)")
    expected = jax.eval_shape(make, given.phi, population_lib.member_keys(key, n[0]))
    have, want = jax.tree.leaves(given.carry), jax.tree.leaves(expected.carry)
    if have and not want:
        raise ValueError(_ANOTHER + "it was made for online tuning (it carries the training "
                         "run's weights); pass online=True and the estimator it was made "
                         "with")
    if want and not have:
        raise ValueError(_ANOTHER + "it was made for offline tuning (it carries no training "
                         "run); pass online=False, or start the online run without state=")
    diff = _difference(given.carry, expected.carry)
    if diff is not None:
        raise ValueError(_ANOTHER + f"its online training state {diff} (another online "
                         f"estimator, truncated against pes, or another model)")
    for field in ("opt_state", "last_state"):
        diff = _difference(getattr(given, field), getattr(expected, field))
        if diff is not None:
            have_kinds, want_kinds = _kinds(getattr(given, field)), _kinds(
                getattr(expected, field))
            detail = "" if have_kinds != want_kinds else f" ({diff})"
            raise ValueError(_ANOTHER + f"its outer optimizer's state holds {have_kinds} "
                             f"and this call's outer optimizer makes {want_kinds}{detail}; "
                             f"pass the outer optimizer it was made with")
    for field in TuneState._fields:
        diff = _difference(getattr(given, field), getattr(expected, field))
        if diff is not None:
            raise ValueError(_ANOTHER + f"its {field} {diff}")


def _runs(size: int) -> str:
    return "a single run" if size == 1 else f"a population of {size}"


def _difference(given: PyTree, expected: PyTree, dtypes: bool = True) -> str | None:
    """How ``given`` differs from ``expected`` (a tree of shapes and dtypes), in words;
    ``None`` where it does not."""
    have, have_def = jax.tree_util.tree_flatten_with_path(given)
    want, want_def = jax.tree_util.tree_flatten_with_path(expected)
    have_def, want_def = typing.cast(Any, have_def), typing.cast(Any, want_def)
    if have_def != want_def:
        return f"is structured as {clip(str(have_def), 160)}, not {clip(str(want_def), 160)}"
    for (path, a), (_, b) in zip(have, want, strict=True):
        where = f"at {jax.tree_util.keystr(path)} " if path else ""
        shape = tuple(np.shape(a))
        if shape != tuple(b.shape):
            return f"has shape {shape} {where}where {tuple(b.shape)} is expected"
        dtype = getattr(a, "dtype", None) or np.result_type(a)
        if dtypes and dtype != b.dtype:
            return f"has dtype {dtype} {where}where {b.dtype} is expected"
    return None


def _kinds(tree: PyTree) -> str:
    """The named states in an optimizer state (``ScaleByAdamState``, ...), in order."""
    names: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            names.append(type(x).__name__)
        if isinstance(x, tuple | list):
            for y in x:
                walk(y)
        elif isinstance(x, Mapping):
            for y in x.values():
                walk(y)

    walk(tree)
    return ", ".join(dict.fromkeys(names)) or "nothing"
