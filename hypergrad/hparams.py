"""Hyperparameter spaces: constraints and the map between ``phi`` and ``hparams``.

A hyperparameter is optimized in unconstrained coordinates ``phi`` (log for positive
values, logit for the unit interval, a scaled logit for a bounded interval) and read by
the training code in its natural units (``hparams``). A :class:`HyperSpace` declares each
hyperparameter and maps ``phi <-> hparams``. Values may be scalars or arrays; nothing
here assumes scalars.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hypergrad.messages import show
from hypergrad.validation import keywords

Array = jax.Array
PyTree = Any


class Schedule(NamedTuple):
    """How a hyperparameter varies over the inner steps.

    Attributes:
      kind: ``"per_step"`` (one value per step), ``"windows"`` (one value per window of
        ``every`` steps), ``"linear"`` or ``"exponential"`` (interpolation between a
        learnable first and last value, in natural units or geometrically).
      every: the window length of ``"windows"``.
      end: the initial last value of ``"linear"``/``"exponential"`` (``None``: the
        constraint's value, a constant schedule to start from).
    """

    kind: str
    every: int = 1
    end: Any = None


SCHEDULES = ("constant", "per_step", "windows:K", "linear", "exponential")
GRANULARITIES = ("global", "layer", "tensor", "parameter")


def per_step() -> Schedule:
    """One value per inner step: T values (Maclaurin et al. 2015, Fig. 2)."""
    return Schedule("per_step")


def windows(every: int) -> Schedule:
    """One value per window of ``every`` inner steps, shared within the window
    (Micaelli & Storkey 2021)."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"windows() needs a positive integer window, got {show(every)}")
    return Schedule("windows", every)


def linear(end: Any = None) -> Schedule:
    """``v_t = v_0 + (v_end - v_0) t / (T - 1)``, both endpoints learnable."""
    return Schedule("linear", end=end)


def exponential(end: Any = None) -> Schedule:
    """``v_t = v_0 (v_end / v_0)^(t / (T - 1))``, both endpoints learnable; needs
    positive values."""
    return Schedule("exponential", end=end)


def parse_schedule(spec: Any) -> Schedule | None:
    """A :class:`Schedule` from itself, ``None`` or a string such as ``"per_step"``,
    ``"windows:10"``, ``"linear"``, ``"exponential"`` or ``"constant"``."""
    if spec is None or isinstance(spec, Schedule):
        return spec
    if isinstance(spec, str):
        text = spec.strip()
        if text == "constant":
            return None
        if text in ("per_step", "linear", "exponential"):
            return Schedule(text)
        if text.startswith("windows:") and text[8:].isdigit() and int(text[8:]) >= 1:
            return windows(int(text[8:]))
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {show(spec)}")


def parse_per(spec: Any) -> Any:
    """Check a granularity: ``None``/``"global"``, ``"layer"``, ``"tensor"``,
    ``"parameter"``, a function from a parameter path to a group name, or a mapping from
    group name to a regular expression matched against parameter paths."""
    if spec is None or spec == "global":
        return None
    if spec in GRANULARITIES or callable(spec):
        return spec
    if isinstance(spec, Mapping) and spec:
        for group, pattern in spec.items():
            try:
                re.compile(pattern)
            except (re.error, TypeError):
                raise ValueError(f"per: group {show(group)} has an invalid pattern "
                                 f"{show(pattern)}") from None
        return tuple(spec.items())
    raise ValueError(f"per must be one of {', '.join(GRANULARITIES)}, a function of the "
                     f"parameter path or a mapping from group to pattern, got {show(spec)}")


class Layout(NamedTuple):
    """How a granular or scheduled hyperparameter is laid out, found by
    :meth:`HyperSpace.resolve`.

    Attributes:
      treedef: the structure of the tree the value spreads onto (the weights, by default).
      paths: each leaf's path, such as ``"convs/0/kernel"``.
      shapes: each leaf's shape.
      groups: the group names (``None`` for ``per="parameter"``, where every entry of
        every leaf is its own value, or for a global value).
      leaf_groups: the group index of each leaf.
      slots: the schedule's number of values (``None`` when constant).
      steps: the horizon T the schedule was resolved for.
    """

    treedef: Any
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    groups: tuple[str, ...] | None
    leaf_groups: tuple[int, ...]
    slots: int | None
    steps: int


class Constraint(NamedTuple):
    """One hyperparameter's declaration: its initial value, its bijection to R, and how
    it is shared over the weights (``per``) and over the inner steps (``schedule``).

    Attributes:
      value: the initial value in natural units (a scalar or an array).
      kind: ``"positive"``, ``"unit"``, ``"bounded"`` or ``"real"``.
      to_natural: ``phi -> value``, elementwise.
      to_phi: ``value -> phi``, elementwise; the inverse of ``to_natural``.
      low, high: the open interval the value must lie in.
      per: the granularity (see :func:`parse_per`); ``None`` is one value as given.
      schedule: a :class:`Schedule`, or ``None`` for one value for every step.
      layout: set by :meth:`HyperSpace.resolve` when ``per`` or ``schedule`` is set.
    """

    value: Any
    kind: str
    to_natural: Callable[[Array], Array]
    to_phi: Callable[[Array], Array]
    low: float
    high: float
    per: Any = None
    schedule: Schedule | None = None
    layout: Layout | None = None

    def check(self, value: Any, name: str = "value") -> None:
        """Raise ``ValueError`` unless ``value`` is a number or a non-empty array of
        numbers, each in ``(low, high)``."""
        leaves = jax.tree.leaves(value)
        for leaf in leaves:
            try:  # not a string: np.asarray("0.5", float) is 0.5, jnp.log("0.5") fails
                v = None if isinstance(leaf, str | bytes) else np.asarray(leaf, np.float64)
            except (TypeError, ValueError):
                v = None
            if v is None or v.size == 0:
                leaves = []
                break
        if not leaves:
            raise ValueError(f"{name} must be a number or a non-empty array of numbers, "
                             f"got {show(value)}")
        for leaf in leaves:
            v = np.asarray(leaf, dtype=np.float64)
            if not np.all(np.isfinite(v)) or np.any(v <= self.low) or np.any(v >= self.high):
                raise ValueError(f"{name} must be {_describe(self)}, got {_show(value)}")

    def with_options(self, per: Any = None, schedule: Any = None) -> Constraint:
        """A copy with another granularity and schedule (checked; unresolved)."""
        schedule = parse_schedule(schedule)
        if schedule is not None and schedule.kind == "exponential" and self.low < 0:
            raise ValueError("an exponential schedule needs a positive hyperparameter; "
                             f"this one is {self.kind}")
        return self._replace(per=parse_per(per), schedule=schedule, layout=None)

    @property
    def granular(self) -> bool:
        """Whether the value is resolved against the weights or the steps."""
        return self.per is not None or self.schedule is not None


def _describe(c: Constraint) -> str:
    if c.kind == "positive":
        return "> 0"
    if c.kind == "unit":
        return "strictly between 0 and 1"
    if c.kind == "bounded":
        return f"strictly between {c.low:g} and {c.high:g}"
    return "finite"


def _show(value: Any) -> str:
    try:
        v = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return show(value)
    if v.size == 0:
        return "an empty array"
    if v.size == 1:
        return f"{v.item():g}"
    return f"an array with entries in [{v.min():g}, {v.max():g}]"


@keywords
def positive(value: Any, *, per: Any = None, schedule: Any = None) -> Constraint:
    """A positive hyperparameter, optimized as ``phi = log(value)``.

    ``per`` and ``schedule`` (here and in :func:`unit`, :func:`bounded`, :func:`real`)
    spread it over the weights and the steps; see :meth:`Constraint.with_options`.
    """
    c = Constraint(value, "positive", jnp.exp, jnp.log, 0.0, np.inf)
    return c.with_options(per, schedule)


@keywords
def unit(value: Any, *, per: Any = None, schedule: Any = None) -> Constraint:
    """A hyperparameter in (0, 1), optimized as ``phi = logit(value)``."""
    c = Constraint(value, "unit", jax.nn.sigmoid, jax.scipy.special.logit, 0.0, 1.0)
    return c.with_options(per, schedule)


@keywords
def bounded(value: Any, low: float, high: float, *, per: Any = None,
            schedule: Any = None) -> Constraint:
    """A hyperparameter in (low, high), optimized as a scaled logit."""
    low, high = float(low), float(high)
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(f"bounded() needs finite low and high, got low={low:g}, "
                         f"high={high:g}; use positive() for (0, inf) or real() for "
                         "(-inf, inf)")
    if not low < high:
        raise ValueError(f"bounded() needs low < high, got low={low:g}, high={high:g}")
    width = high - low
    c = Constraint(
        value,
        "bounded",
        lambda phi: low + width * jax.nn.sigmoid(phi),
        lambda v: jax.scipy.special.logit((v - low) / width),
        low,
        high,
    )
    return c.with_options(per, schedule)


@keywords
def real(value: Any, *, per: Any = None, schedule: Any = None) -> Constraint:
    """An unconstrained hyperparameter: ``phi = value``."""
    c = Constraint(value, "real", lambda phi: phi, lambda v: v, -np.inf, np.inf)
    return c.with_options(per, schedule)


class HyperSpace:
    """Declares the hyperparameters being tuned and maps ``phi <-> hparams``.

    Example::

      space = HyperSpace({"learning_rate": positive(0.1), "momentum": unit(0.5)})
      phi = space.init()               # {"learning_rate": log 0.1, "momentum": 0.0}
      hparams = space.constrain(phi)   # {"learning_rate": 0.1, "momentum": 0.5}

    A hyperparameter declared with ``per`` (one value per layer, per tensor, per weight
    or per group of a function of the path) or a ``schedule`` (one value per step, per
    window of steps, or interpolated between learnable endpoints) is laid out against the
    task's weights and horizon by :meth:`resolve`, which :class:`hypergrad.task.Task`
    calls. ``hparams`` then hold the compact values (``(T, layers)`` for a per-layer,
    per-step learning rate); :meth:`at_step` gives what the training code reads at one
    inner step: scheduled values at that step, and grouped values spread over the weights
    as a pytree shaped like them (a scalar per leaf, or a full array per leaf for
    ``per="parameter"``).

    Args:
      constraints: a mapping from hyperparameter name to :class:`Constraint`. Each
        initial value is checked here, and an error names the hyperparameter.
      targets: for a granular hyperparameter that does not act on the weights, the tree
        it spreads onto (for example one leaf per activation layer for a per-layer
        slope); by default the weights.
    """

    def __init__(self, constraints: Mapping[str, Constraint],
                 targets: Mapping[str, PyTree] | None = None):
        for name, c in constraints.items():
            if not isinstance(c, Constraint):
                raise TypeError(
                    f"hyperparameter {name!r} must be declared with positive(), unit(), "
                    f"bounded() or real(), got {type(c).__name__}"
                )
            c.check(c.value, name)
            if c.schedule is not None and c.schedule.end is not None:
                c.check(c.schedule.end, f"{name} (schedule end)")
        self.constraints: dict[str, Constraint] = dict(constraints)
        targets = dict(targets or {})
        unknown = sorted(set(targets) - set(self.constraints))
        if unknown:
            raise ValueError(f"targets name {unknown}, which this space does not tune")
        self.targets: dict[str, PyTree] = {n: _shapes(t) for n, t in targets.items()}

    @property
    def names(self) -> tuple[str, ...]:
        """The hyperparameter names, in declaration order."""
        return tuple(self.constraints)

    @property
    def scheduled(self) -> tuple[str, ...]:
        """The names of the hyperparameters that vary over the inner steps."""
        return tuple(n for n, c in self.constraints.items() if c.schedule is not None)

    @property
    def resolved(self) -> bool:
        """Whether every granular or scheduled hyperparameter has its layout."""
        return all(c.layout is not None for c in self.constraints.values() if c.granular)

    def __contains__(self, name: object) -> bool:
        return name in self.constraints

    def __repr__(self) -> str:
        parts = []
        for n, c in self.constraints.items():
            extra = "".join(
                f", {k}={v!r}" for k, v in (("per", c.per), ("schedule", c.schedule))
                if v is not None)
            parts.append(f"{n}={c.kind}({_show(c.value)}{extra})")
        return f"HyperSpace({', '.join(parts)})"

    # -- layout ----------------------------------------------------------------------

    def resolve(self, params: PyTree, steps: int,
                targets: Mapping[str, PyTree] | None = None) -> HyperSpace:
        """Lay out every granular or scheduled hyperparameter for weights shaped like
        ``params`` and a horizon of ``steps`` inner steps.

        Args:
          params: the weights (arrays or ``jax.ShapeDtypeStruct``); only shapes are used.
          steps: the horizon T.
          targets: trees for hyperparameters that spread onto something else than the
            weights (kept from earlier calls unless replaced).

        Raises:
          ValueError: a group that matches no parameter, a parameter that matches no
            group, or an initial value that does not fit the layout.
        """
        if not any(c.granular for c in self.constraints.values()) and not targets:
            return self
        targets = {**self.targets, **(targets or {})}
        out, same = {}, set(targets) == set(self.targets)
        for name, c in self.constraints.items():
            if c.granular:
                layout = _layout(name, c, targets.get(name, params), steps)
                same = same and layout == c.layout
                c = c._replace(layout=layout)
                _initial(name, c)  # the initial value must fit the layout
            out[name] = c
        # The same layout keeps the same space: jitted functions take the space as static
        # data, so an equal but new one would compile again.
        return self if same else HyperSpace(out, targets)

    def _layout(self, name: str) -> Layout | None:
        c = self.constraints[name]
        if c.granular and c.layout is None:
            raise ValueError(
                f"hyperparameter {name!r} is declared per={c.per!r}, "
                f"schedule={c.schedule!r}: resolve the space against the weights first "
                "(space.resolve(params, steps); a Task does it)")
        return c.layout

    # -- phi <-> hparams -------------------------------------------------------------

    def init(self, dtype: Any = None) -> dict[str, PyTree]:
        """The initial values in unconstrained coordinates ``phi``.

        On a resolved space (``task.space``) each granular or scheduled hyperparameter
        comes laid out over the weights and the steps, as the estimators take it. On a
        space not yet resolved (no weights, no horizon) it comes as declared: the value
        given to the constraint, which ``task.space.init()`` lays out.

        Args:
          dtype: a floating dtype; defaults to JAX's default float (float64 under x64).
        """
        dtype = dtype or jnp.result_type(float)
        out = {}
        for n, c in self.constraints.items():
            value = _initial(n, c) if c.layout is not None else c.value
            out[n] = jax.tree.map(lambda v, c=c: c.to_phi(jnp.asarray(v, dtype=dtype)), value)
        return out

    def constrain(self, phi: Mapping[str, PyTree]) -> dict[str, PyTree]:
        """Map unconstrained ``phi`` to ``hparams`` in natural units."""
        return {n: jax.tree.map(c.to_natural, phi[n]) for n, c in self.constraints.items()}

    def unconstrain(self, hparams: Mapping[str, Any]) -> dict[str, PyTree]:
        """Map ``hparams`` in natural units to unconstrained ``phi``."""
        return {n: jax.tree.map(lambda v, c=c: c.to_phi(jnp.asarray(v)), hparams[n])
                for n, c in self.constraints.items()}

    def with_values(self, **values: Any) -> HyperSpace:
        """A copy whose initial values are replaced by ``values`` (each checked)."""
        unknown = sorted(set(values) - set(self.constraints))
        if unknown:
            raise KeyError(f"unknown hyperparameter(s) {unknown}; this space has {self.names}")
        new = dict(self.constraints)
        for name, value in values.items():
            new[name] = self.constraints[name]._replace(value=value)
        return HyperSpace(new, self.targets)

    def with_options(self, name: str, *, per: Any = None, schedule: Any = None) -> HyperSpace:
        """A copy in which ``name`` has granularity ``per`` and ``schedule`` (unresolved)."""
        if name not in self.constraints:
            raise KeyError(f"unknown hyperparameter {name!r}; this space has {self.names}")
        new = dict(self.constraints)
        new[name] = self.constraints[name].with_options(per, schedule)
        return HyperSpace(new, self.targets)

    # -- what the training code reads --------------------------------------------------

    def step_values(self, hparams: Mapping[str, PyTree], t: Any) -> dict[str, PyTree]:
        """Each scheduled hyperparameter's value at inner step ``t``.

        ``t`` is an integer (possibly traced) or an integer array; with an array the
        values gain its shape in front.
        """
        return {n: _at(self.constraints[n], hparams[n], jnp.asarray(t))
                for n in self.scheduled}

    def expand(self, hparams: Mapping[str, PyTree],
               step_values: Mapping[str, PyTree] | None = None) -> dict[str, PyTree]:
        """``hparams`` as the training code reads them at one step.

        Scheduled hyperparameters take their ``step_values``; grouped ones become a tree
        shaped like their target with each leaf's group value. Keys the space does not
        declare pass through.
        """
        out = dict(hparams)
        for n, c in self.constraints.items():
            if n not in out or not c.granular:
                continue
            layout = self._layout(n)
            assert layout is not None
            value = out[n]
            if c.schedule is not None:
                if step_values is None or n not in step_values:
                    raise ValueError(f"{n} has a schedule: give its step value "
                                     "(space.at_step(hparams, t))")
                value = step_values[n]
            if layout.groups is not None:
                value = jax.tree.unflatten(
                    layout.treedef, [value[..., g] for g in layout.leaf_groups])
            out[n] = value
        return out

    def at_step(self, hparams: Mapping[str, PyTree], t: Any) -> dict[str, PyTree]:
        """``hparams`` as the training code reads them at inner step ``t``."""
        if not any(c.granular for c in self.constraints.values()):
            return dict(hparams)
        return self.expand(hparams, self.step_values(hparams, t))

    # -- monitoring --------------------------------------------------------------------

    def summarize(self, hparams: Mapping[str, PyTree]) -> dict[str, Any]:
        """JSON-ready summary: scalars as floats, arrays as mean/min/max, and for grouped
        hyperparameters the same per group (layer, tensor or named group)."""
        out = summarize(hparams)
        for n, c in self.constraints.items():
            if n not in hparams or c.layout is None:
                continue
            layout = c.layout
            if layout.groups is not None:
                value = np.asarray(hparams[n], dtype=np.float64)
                parts = {g: value[..., i] for i, g in enumerate(layout.groups)}
            elif c.per is not None:  # per parameter: one group per tensor
                leaves = jax.tree.leaves(hparams[n])
                parts = {p: np.asarray(v, np.float64)
                         for p, v in zip(layout.paths, leaves, strict=True)}
            else:
                continue
            out[n] = {**_stats(np.concatenate([np.ravel(v) for v in parts.values()])),
                      "groups": {g: _compact(v) for g, v in parts.items()}}
        return out

    def arrays(self, hparams: Mapping[str, PyTree]) -> dict[str, np.ndarray]:
        """Every value as NumPy arrays, for saving: ``NAME`` (or ``NAME/PATH`` per leaf of
        a per-parameter value), ``NAME@groups`` (group names) and ``NAME@steps`` (the
        value at every inner step, for scheduled ones that are not per parameter)."""
        out = {}
        for n, c in self.constraints.items():
            value = hparams[n]
            layout = c.layout
            if layout is not None and layout.groups is None and c.per is not None:
                for p, leaf in zip(layout.paths, jax.tree.leaves(value), strict=True):
                    out[f"{n}/{p}"] = np.asarray(leaf)
                continue
            out[n] = np.asarray(value)
            if layout is not None and layout.groups is not None:
                out[f"{n}@groups"] = np.asarray(layout.groups)
            if c.schedule is not None:
                assert layout is not None
                ts = jnp.arange(layout.steps)
                out[f"{n}@steps"] = np.asarray(_at(c, jnp.asarray(value), ts))
        return out


def _shapes(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), tree)


def _path(path: tuple) -> str:
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def _tensor(path: tuple) -> tuple:
    """A leaf's path to its tensor: without the ``.value`` a Flax NNX ``State`` (from
    ``nnx.split``) puts after each variable, so that ``layer/kernel/value`` groups by
    ``layer`` as ``layer/kernel`` does."""
    last = path[-1] if path else None
    if isinstance(last, jax.tree_util.GetAttrKey) and last.name == "value":
        return path[:-1]
    return path


def _layout(name: str, c: Constraint, target: PyTree, steps: int) -> Layout:
    """Where each leaf of ``target`` takes its value from, and the schedule's length."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    flat = [(_tensor(p), x) for p, x in flat]
    paths = tuple(_path(p) for p, _ in flat)
    shapes = tuple(tuple(np.shape(x)) for _, x in flat)
    groups: tuple[str, ...] | None = None
    leaf_groups: tuple[int, ...] = ()
    per = c.per
    if per is not None and not flat:
        raise ValueError(f"{name} is declared per={per!r} but the tree it acts on has no "
                         "parameters")
    if per in ("layer", "tensor") or callable(per):
        if per == "layer":
            keys = [_path(p[:-1]) or "params" for p, _ in flat]
        elif per == "tensor":
            keys = list(paths)
        else:
            keys = [per(path) for path in paths]
            bad = [k for k in keys if not isinstance(k, str)]
            if bad:
                raise ValueError(f"{name}: per function must return a group name (a str), "
                                 f"got {bad[0]!r}")
        groups = tuple(dict.fromkeys(keys))
        leaf_groups = tuple(groups.index(k) for k in keys)
    elif isinstance(per, tuple):  # (group, pattern) pairs
        groups = tuple(g for g, _ in per)
        found = []
        for path in paths:
            hit = next((i for i, (_, pat) in enumerate(per) if re.search(pat, path)), None)
            if hit is None:
                raise ValueError(f"{name}: parameter {path!r} matches no group of per "
                                 f"(groups: {', '.join(groups)})")
            found.append(hit)
        unused = [g for i, g in enumerate(groups) if i not in found]
        if unused:
            raise ValueError(f"{name}: group {unused[0]!r} matches no parameter (parameters: "
                             f"{', '.join(paths)})")
        leaf_groups = tuple(found)
    slots = None
    s = c.schedule
    if s is not None:
        if s.kind == "per_step":
            slots = steps
        elif s.kind == "windows":
            slots = -(-steps // s.every)
        else:
            slots = 2
    return Layout(treedef, paths, shapes, groups, leaf_groups, slots, steps)


def _initial(name: str, c: Constraint) -> PyTree:
    """The initial value laid out: ``[slots,] (groups,)`` or a tree of leaf shapes.

    With a ``per_step`` or ``windows`` schedule, a value whose first axis has one entry
    per step (per window) gives each step (window) its own start, spread over the rest
    of the layout; any other value is the start of every step."""
    layout = c.layout
    assert layout is not None
    lead: tuple[int, ...] = () if layout.slots is None else (layout.slots,)
    ends = None
    if c.schedule is not None and c.schedule.kind in ("linear", "exponential"):
        end = c.value if c.schedule.end is None else c.schedule.end
        ends = (c.value, end)
    value = np.asarray(c.value, np.float64)
    stepped = c.schedule is not None and c.schedule.kind in ("per_step", "windows")
    per_slot = stepped and value.ndim >= 1 and value.shape[0] == layout.slots
    if stepped and c.per is None and value.ndim >= 1 and value.shape[0] not in (
            layout.slots, 1):  # a vector copied to every step is given as (1, n)
        raise ValueError(_misfit(name, c, value.shape, lead + value.shape))

    def fill(shape):
        try:
            if ends is not None:
                return np.stack([np.broadcast_to(np.asarray(v, np.float64), shape)
                                 for v in ends])
            if per_slot:  # (slots,) or (slots, *shape): each slot spread over `shape`
                v = value.reshape(value.shape + (1,) * (len(shape) + 1 - value.ndim))
                return np.broadcast_to(v, lead + shape).copy()
            return np.broadcast_to(value, lead + shape).copy()
        except ValueError:
            raise ValueError(_misfit(name, c, value.shape, lead + shape)) from None

    if layout.groups is not None:
        return fill((len(layout.groups),))
    if c.per is not None:  # per parameter
        return jax.tree.unflatten(layout.treedef, [fill(s) for s in layout.shapes])
    return fill(value.shape[1:] if stepped and value.ndim >= 1 else value.shape)


def _misfit(name: str, c: Constraint, shape: tuple[int, ...], laid: tuple[int, ...]) -> str:
    """Why an initial value of ``shape`` does not fit the layout ``laid``, and the fix."""
    message = f"the initial value of {name} (shape {shape}) does not fit its layout " \
              f"(shape {laid})"
    s, layout = c.schedule, c.layout
    if s is not None and s.kind in ("per_step", "windows") and layout is not None and shape:
        what = "step" if s.kind == "per_step" else f"window of {s.every} steps"
        message += (f"; a {s.kind} schedule over {layout.steps} steps takes one value, "
                    f"{layout.slots} values (one per {what}), or an array of shape "
                    f"({layout.slots}, ...) or (1, ...) for a vector hyperparameter")
    return message


def _at(c: Constraint, value: PyTree, t: Array) -> PyTree:
    """The value of a scheduled hyperparameter at step(s) ``t``."""
    s, layout = c.schedule, c.layout
    assert s is not None and layout is not None
    if s.kind in ("per_step", "windows"):
        idx = t if s.kind == "per_step" else t // s.every
        return jax.tree.map(lambda a: jnp.take(a, idx, axis=0, mode="clip"), value)

    def interpolate(a):
        frac = (t / max(layout.steps - 1, 1)).astype(a.dtype)
        frac = frac.reshape(frac.shape + (1,) * (a.ndim - 1))
        first, last = (a[i].reshape((1,) * t.ndim + a.shape[1:]) for i in (0, 1))
        if s.kind == "linear":
            return first + (last - first) * frac
        return jnp.exp(jnp.log(first) + (jnp.log(last) - jnp.log(first)) * frac)

    return jax.tree.map(interpolate, value)


def _stats(v: np.ndarray) -> dict[str, float]:
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}


def _compact(v: np.ndarray) -> Any:
    return float(v.reshape(())) if v.size == 1 else _stats(v)


def summarize(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-ready summary of ``hparams``: scalars as floats, arrays as mean/min/max."""
    out: dict[str, Any] = {}
    for name, value in hparams.items():
        leaves = [np.asarray(x, dtype=np.float64) for x in jax.tree.leaves(value)]
        if len(leaves) == 1 and leaves[0].size == 1:
            out[name] = float(leaves[0].reshape(()))
        else:
            flat = np.concatenate([x.ravel() for x in leaves])
            out[name] = {
                "mean": float(flat.mean()),
                "min": float(flat.min()),
                "max": float(flat.max()),
            }
    return out
