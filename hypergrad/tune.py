"""The tuning loop: meta-steps with a guard, a population of one or many, and a History.

``history = hg.tune(task, hg.estimators.reverse(), optax.adam(0.05), meta_steps=30,
key=jax.random.key(0))`` is the one outer loop of the project: the command line, the
experiments and notebooks all call it. Each meta-step is one jitted function (the
hypergradient, the hyper-update and the guard), compiled once; a single run is a population
of one, so ``population=P`` runs the same function vmapped over P members (and sharded
over the devices).

The guard (:class:`Guard`) decides for every meta-step whether the point it evaluated and
the step it took are accepted:

- the *point* ``phi_t`` is accepted when its validation loss and hypergradient are finite
  and not divergent: the loss has not risen above the start's by more than
  ``value_ratio`` times the start's magnitude, and the hypergradient's norm is at most
  ``grad_ratio`` times the larger of the start's loss magnitude and the largest accepted
  hypergradient norm so far (an exploding unroll returns finite hypergradients of 1e100);
- the *step* is accepted when the point is and the new ``phi`` (and the outer state) are
  finite and within ``max_phi``.

A rejected point sends ``phi`` back to the last accepted point; a rejected step keeps
``phi``; both halve the step scale. A member whose starting point is rejected, or that is
rejected ``max_rejections`` times in a row, is retired; so is one whose line search
(nonlinear CG) failed twice in a row (it has stalled). The loop stops when every member
is retired. Nothing non-finite ever reaches ``phi``.

After the last meta-step the point it moved to is evaluated once more (a training run,
no hypergradient) and checked by the loss half of the guard. :attr:`History.final` is the
last accepted point with its evaluated validation loss, that one if it passed, and
:attr:`History.best` the accepted point with the lowest validation loss: both finite.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hypergrad import outer as outer_lib
from hypergrad import population as population_lib
from hypergrad import search
from hypergrad.estimators.base import Estimator
from hypergrad.estimators.pes import NOISE_STREAM, PESState, pes_steps
from hypergrad.task import Task
from hypergrad.unroll import objective, segment, start

PyTree = Any

#: Hypergradients with a larger global norm are scaled down to it before a hyper-update
#: (0 turns clipping off). Hypergradients of long unrolls spike near the edge of stability
#: and one spike can throw ``phi`` far away. A line search (nonlinear CG) reads the
#: unclipped hypergradient from its ``grad`` argument and is not affected.
DEFAULT_CLIP = 0.5

# Why a member stopped (``TuneState.retired``).
ACTIVE, RETIRED_START, RETIRED_REJECTED, RETIRED_STALLED = 0, 1, 2, 3


class Guard(NamedTuple):
    """When a meta-step is rejected, and when a member gives up (see the module docstring).

    Attributes:
      max_rejections: a member rejected this many times in a row is retired.
      value_ratio: a point whose validation loss exceeds the start's by more than this
        times the start's magnitude is divergent (``inf`` turns the check off).
      grad_ratio: a hypergradient whose norm exceeds this times the larger of the start's
        loss magnitude and the largest accepted hypergradient norm is divergent.
      max_phi: a new ``phi`` with a coordinate beyond ``+-max_phi`` is rejected (in
        unconstrained coordinates: ``exp(50)`` is no learning rate).
      max_search_failures: a member whose line search found no step (it failed, or its
        best step was 0) this many times in a row has stalled and is retired.
    """

    max_rejections: int = 5
    value_ratio: float = 100.0
    grad_ratio: float = 1e6
    max_phi: float = 50.0
    max_search_failures: int = 2


DEFAULT_GUARD = Guard()


class TuneState(NamedTuple):
    """Everything the loop carries for one member (a leading member axis in a run).

    ``phi``/``opt_state`` are where the next meta-step evaluates; ``last_*`` the last
    accepted point (where a rejected point returns, and the final candidate); ``best_*``
    the accepted point with the lowest validation loss. ``carry`` is the inner state of
    online tuning (weights trained up to ``inner_step``), ``()`` otherwise.
    """

    phi: PyTree
    opt_state: PyTree
    last_phi: PyTree
    last_state: PyTree
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
    rejected: jax.Array
    rejected_in_row: jax.Array
    search_failures: jax.Array
    retired: jax.Array
    meta_step: jax.Array


class Point(NamedTuple):
    """An evaluated point: the meta-step it was evaluated at (``meta_steps`` for the point
    after the last update), its validation loss, ``phi`` and ``hparams`` (natural units);
    ``member`` is the population member (``None`` for a single run)."""

    meta_step: int
    val_loss: float
    phi: PyTree
    hparams: PyTree
    member: int | None = None


class TuneError(RuntimeError):
    """No point of the run was ever accepted (its start diverged or was not finite)."""


class TuneWarning(RuntimeWarning):
    """The run stopped early because every member was rejected too often."""


# -- the jitted meta-step ---------------------------------------------------------------


def _all_finite(tree: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _within(tree: PyTree, bound: float) -> jax.Array:
    leaves = [jnp.all(jnp.abs(x) <= bound) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _select(pred: jax.Array, a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def _line_search(state: PyTree) -> dict[str, Any]:
    """The nonlinear-CG line search's outcome, if the hyper-update has one."""
    is_ncg = lambda x: isinstance(x, outer_lib.NonlinearCGState)  # noqa: E731
    for s in jax.tree.leaves(state, is_leaf=is_ncg):
        if is_ncg(s):
            return {"line_search": {"step": s.step_size, "evals": s.num_evals,
                                    "failed": s.failed}}
    return {}


def _online_options(estimator: Estimator) -> tuple[int, str]:
    if estimator.name == "truncated":
        return int(estimator.options["window"]), estimator.options.get("hvp", "reverse")
    if estimator.name == "pes":
        return int(estimator.options["window"]), "reverse"
    raise ValueError("online tuning trains through windows of the run: pass "
                     "hg.estimators.truncated(window) or hg.estimators.pes(sigma, num_pairs, "
                     f"window), not {estimator.name}")


def _pes_core(estimator: Estimator):
    """PES's init and step with ``estimator``'s options, for online tuning."""
    o = estimator.options
    return pes_steps(o["sigma"], o["num_pairs"], o["window"], o.get("cap"))


def _stored(carry: PESState) -> PESState:
    """The PES carry with its training key as raw key data (the tuning state holds
    arrays that go to and from the host and checkpoints)."""
    return carry._replace(key=jax.random.key_data(carry.key))


def _live(carry: PESState) -> PESState:
    return carry._replace(key=jax.random.wrap_key_data(carry.key))


def online_weights(carry: Any) -> Any:
    """The inner states an online run has trained so far, stacked on a leading axis:
    one for ``truncated`` (the run's), ``2N`` for ``pes`` (its particles)."""
    if isinstance(carry, PESState):
        return carry.inner
    return jax.tree.map(lambda a: a[None], carry)


def init_state(task: Task, estimator: Estimator, outer: optax.GradientTransformation,
               phi: PyTree, key: jax.Array, *, online: bool = False) -> TuneState:
    """The state of one member before its first meta-step, starting at ``phi``."""
    dtype = jnp.result_type(*jax.tree.leaves(phi))
    carry: PyTree = ()
    if online and estimator.name == "pes":
        carry = _stored(_pes_core(estimator).init(task, phi, key))
    elif online:
        _online_options(estimator)
        carry = start(task, task.space.constrain(phi), key)[0]
    opt_state = outer.init(phi)
    i32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
    nan = jnp.asarray(jnp.nan, dtype)
    return TuneState(
        phi=phi, opt_state=opt_state, last_phi=phi, last_state=opt_state, last_value=nan,
        last_step=i32(-1), best_phi=phi, best_value=jnp.asarray(jnp.inf, dtype),
        best_step=i32(-1), carry=carry, inner_step=i32(0), scale=jnp.asarray(1.0, dtype),
        value_ref=nan, grad_ref=jnp.asarray(0.0, dtype), rejected=i32(0),
        rejected_in_row=i32(0), search_failures=i32(0), retired=i32(ACTIVE),
        meta_step=i32(0))


def make_step(estimator: Estimator, outer: optax.GradientTransformationExtraArgs, *,
              online: bool = False, clip: float = DEFAULT_CLIP, guard: Guard = DEFAULT_GUARD,
              resample: bool = False):
    """One member's meta-step ``(task, state, key) -> (state, metrics)``, not jitted.

    It evaluates ``state.phi`` (hypergradient, validation and training loss), takes the
    hyper-update (the hypergradient clipped to norm ``clip``, times ``state.scale``) and
    applies the guard. With ``online`` the evaluation trains the window of ``estimator``
    (a truncated estimator) from ``state.carry`` and differentiates through it; an accepted
    step keeps the trained weights. ``metrics`` holds the evaluated point's ``val_loss``,
    ``train_loss``, ``hparams``, ``hypergrad`` and ``hypergrad_norm``, the ``finite``,
    ``point_ok`` and ``accepted`` flags, and the line search's outcome for nonlinear CG.
    With ``resample`` meta-step ``t`` trains with ``fold_in(key, t)`` (a fresh minibatch
    order and fresh noise each meta-step) instead of ``key``.
    """
    window, hvp = _online_options(estimator) if online else (0, "reverse")
    pes = online and estimator.name == "pes"
    core = _pes_core(estimator) if pes else None

    def evaluate(task, s, key):
        if not online:
            value, grad, aux = estimator(task, s.phi, key)
            return value, grad, aux["train_loss"], s.carry, lambda p: objective(task, p, key)[0]
        if pes:
            # A fresh antithetic perturbation every meta-step; the particles keep theirs.
            noise = jax.random.fold_in(jax.random.fold_in(key, NOISE_STREAM), s.meta_step)
            live = _live(s.carry)
            carry, value, grad, aux = core.step(live, task, s.phi, noise, window)
            return (value, grad, aux["train_loss"], _stored(carry),
                    lambda p: core.step(live, task, p, noise, window)[1])
        _, data_key = jax.random.split(key)

        def f(p):
            hparams = task.space.constrain(p)
            inner, losses = segment(task, hparams, s.carry, data_key, s.inner_step, window,
                                    hvp=hvp)
            value = task.validation_loss(inner.params, hparams, inner.model_state)
            return value, (inner, losses)

        (value, (carry, losses)), grad = jax.value_and_grad(f, has_aux=True)(s.phi)
        return value, grad, losses[-1], carry, lambda p: f(p)[0]

    def step(task, s: TuneState, key):
        if resample:
            key = jax.random.fold_in(key, s.meta_step)
        value, grad, train_loss, carry, value_fn = evaluate(task, s, key)
        dtype = s.scale.dtype
        value = jnp.asarray(value).astype(dtype)
        gnorm = optax.tree.norm(grad).astype(dtype)
        first = s.last_step < 0
        ref = jnp.where(first, value, s.value_ref)
        finite = jnp.isfinite(value) & _all_finite(grad) & _all_finite(carry)
        calm = ((value - ref <= guard.value_ratio * jnp.abs(ref))
                & (gnorm <= guard.grad_ratio * jnp.maximum(jnp.abs(ref), s.grad_ref)))
        active = s.retired == ACTIVE
        point_ok = finite & calm & active

        clipped = grad
        if clip:
            clipped = optax.clip_by_global_norm(clip).update(grad, optax.EmptyState())[0]
        updates, new_state = outer.update(clipped, s.opt_state, s.phi, value=value, grad=grad,
                                          value_fn=value_fn)
        new_phi = optax.apply_updates(s.phi, jax.tree.map(lambda u: s.scale * u, updates))
        accepted = (point_ok & _all_finite(new_phi) & _all_finite(new_state)
                    & _within(new_phi, guard.max_phi))

        # The evaluated point, if accepted, is the last accepted point and maybe the best.
        last_phi = _select(point_ok, s.phi, s.last_phi)
        last_state = _select(point_ok, s.opt_state, s.last_state)
        better = point_ok & (value < s.best_value)
        # Next: the new point; or, after a rejected step, the evaluated point again; or,
        # after a rejected point, the last accepted one; with half the step.
        phi = _select(accepted, new_phi, last_phi)
        opt_state = _select(accepted, new_state, last_state)
        rejected = active & ~accepted
        in_row = jnp.where(rejected, s.rejected_in_row + 1, 0)
        search = _line_search(new_state).get("line_search")
        failures = s.search_failures
        if search is not None:
            # A failed search, or one whose best step is 0, leaves phi where it was; the
            # objective being deterministic, the next search would repeat it.
            stuck = search["failed"] | (search["step"] == 0)
            failures = jnp.where(accepted, jnp.where(stuck, failures + 1, 0), failures)
        retired = jnp.where(
            ~active, s.retired,
            jnp.where(first & ~point_ok, RETIRED_START,
                      jnp.where(in_row >= guard.max_rejections, RETIRED_REJECTED,
                                jnp.where(failures >= guard.max_search_failures,
                                          RETIRED_STALLED, ACTIVE))))
        state = TuneState(
            phi=phi, opt_state=opt_state, last_phi=last_phi, last_state=last_state,
            last_value=jnp.where(point_ok, value, s.last_value),
            last_step=jnp.where(point_ok, s.meta_step, s.last_step),
            best_phi=_select(better, s.phi, s.best_phi),
            best_value=jnp.where(better, value, s.best_value),
            best_step=jnp.where(better, s.meta_step, s.best_step),
            carry=_select(accepted, carry, s.carry),
            inner_step=s.inner_step + jnp.where(accepted, window, 0).astype(jnp.int32),
            scale=jnp.where(rejected, 0.5 * s.scale, s.scale),
            value_ref=jnp.where(point_ok & first, value, s.value_ref),
            grad_ref=jnp.where(point_ok, jnp.maximum(s.grad_ref, gnorm), s.grad_ref),
            rejected=s.rejected + rejected.astype(jnp.int32),
            rejected_in_row=in_row.astype(jnp.int32),
            search_failures=failures.astype(jnp.int32),
            retired=retired.astype(jnp.int32),
            meta_step=s.meta_step + 1,
        )
        metrics = {"val_loss": value, "train_loss": jnp.asarray(train_loss).astype(dtype),
                   "hparams": task.space.constrain(s.phi), "hypergrad": grad,
                   "hypergrad_norm": gnorm, "finite": finite, "point_ok": point_ok,
                   "accepted": accepted, "active": active, "scale": state.scale,
                   **_line_search(new_state)}
        return state, metrics

    return step


def make_final(estimator: Estimator, *, online: bool = False, resample: bool = False):
    """``(task, state, key) -> value``: the validation loss at ``state.phi`` (for online
    tuning: of the weights trained so far, with ``state.phi``'s hyperparameters); with
    ``resample``, trained with the key the next meta-step would use."""

    def final(task, s: TuneState, key):
        if resample:
            key = jax.random.fold_in(key, s.meta_step)
        if online:
            hparams = task.space.constrain(s.phi)
            values = jax.vmap(lambda w: task.validation_loss(w.params, hparams, w.model_state))(
                online_weights(s.carry))
            return jnp.mean(values)
        return objective(task, s.phi, key)[0]

    return final


# -- the loop ---------------------------------------------------------------------------


@dataclasses.dataclass
class History:
    """What a tuning run did, per meta-step, and its best and final points.

    Per-meta-step arrays have shape ``(meta_steps,)`` for a single run and
    ``(meta_steps, P)`` for a population: ``val_loss`` and ``train_loss`` of the point
    each meta-step evaluated (``hparams`` holds that point's hyperparameters in natural
    units, ``hypergrad`` its hypergradient in ``phi`` coordinates, each a pytree of
    arrays with those leading axes), ``hypergrad_norm``, ``accepted`` (the step was
    taken), ``point_ok`` (the point passed the guard; it may be the best or final one),
    ``scale`` (the step scale after the meta-step), ``seconds`` (wall time of each
    meta-step, ``(meta_steps,)``) and ``line_search`` (nonlinear CG's ``step``, ``evals``,
    ``failed``, or ``None``). A value the guard rejected is kept as evaluated (it may be
    NaN). ``records`` are the same meta-steps as JSON-ready dicts (as ``metrics.jsonl``
    holds them). ``best`` and ``final`` are :class:`Point`\\ s (of the best member for a
    population; ``bests`` and ``finals`` have one per member, ``None`` for a member with no
    accepted point); ``stopped`` says why the
    run ended early, if it did; ``state`` is the loop's last :class:`TuneState` (to
    continue it: ``tune(..., state=history.state)``); ``explored`` is the
    :class:`hypergrad.search.SearchResult` of ``tune(..., explore=N)``'s random phase
    (``None`` without one; not saved by :meth:`save`).
    """

    val_loss: np.ndarray
    train_loss: np.ndarray
    hypergrad_norm: np.ndarray
    accepted: np.ndarray
    point_ok: np.ndarray
    scale: np.ndarray
    seconds: np.ndarray
    hparams: dict[str, Any]
    hypergrad: dict[str, Any]
    line_search: dict[str, np.ndarray] | None
    records: list[dict[str, Any]]
    best: Point
    final: Point
    bests: list[Point | None]
    finals: list[Point | None]
    stopped: str | None = None
    explored: Any = None
    population: int | None = None
    state: TuneState | None = None

    def __len__(self) -> int:
        return len(self.records)

    def plot(self, out: str | Path | None = None) -> list[Any]:
        """The figures ``hypergrad run`` draws (validation loss and hyperparameters per
        meta-step). With ``out``, writes ``val_loss.png`` and ``hparams.png`` there and
        returns their paths; otherwise returns the matplotlib figures (a notebook shows
        them)."""
        from hypergrad import plots  # matplotlib only when something is drawn

        best = self.best.member
        return plots.plot_records(self.records, out, best_member=best)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite numbers as ``null``) that :meth:`from_json`
        reads back."""

        def point(p: Point) -> dict[str, Any]:
            return {"meta_step": p.meta_step, "val_loss": p.val_loss, "member": p.member,
                    "phi": _lists(p.phi), "hparams": _lists(p.hparams)}

        return json_safe({
            "records": self.records, "best": point(self.best), "final": point(self.final),
            "bests": [p and point(p) for p in self.bests],
            "finals": [p and point(p) for p in self.finals],
            "stopped": self.stopped, "population": self.population})

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path``; :meth:`load` reads it."""
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")
        return path

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> History:
        """The History :meth:`to_json` wrote. Per-step ``hparams`` come from the records,
        which keep scalars and the means of arrays; ``hypergrad``, ``scale``,
        ``line_search`` and ``state`` are not saved."""

        def point(d: Mapping[str, Any]) -> Point:
            return Point(d["meta_step"], d["val_loss"], _arrays(d["phi"]),
                         _arrays(d["hparams"]), d["member"])

        history = _from_records(list(data["records"]), data.get("population"))
        history.best, history.final = point(data["best"]), point(data["final"])
        history.bests = [p and point(p) for p in data["bests"]]
        history.finals = [p and point(p) for p in data["finals"]]
        history.stopped = data.get("stopped")
        return history

    @classmethod
    def load(cls, path: str | Path) -> History:
        """Read a History written by :meth:`save`."""
        return cls.from_json(json.loads(Path(path).read_text()))


def _lists(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: np.asarray(x).tolist(), tree)


def _arrays(tree: PyTree) -> PyTree:
    if isinstance(tree, dict):
        return {k: _arrays(v) for k, v in tree.items()}
    return np.asarray(np.nan if tree is None else tree, float)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _from_records(records: list[dict[str, Any]], population: int | None) -> History:
    """A History's per-step arrays from JSON records alone (no hypergradients)."""

    def column(key):
        if population is None:
            return np.asarray([r.get(key, np.nan) if r.get(key) is not None else np.nan
                               for r in records], float)
        return np.asarray([[m.get(key, np.nan) if m.get(key) is not None else np.nan
                            for m in r["members"]] for r in records], float)

    def summaries(entries):
        """Each hyperparameter per entry: its value, or its mean for an array (records
        hold summaries only); NaN where the entry was rejected."""
        names = next((list(e["hparams"]) for e in entries if "hparams" in e), [])
        return {n: np.asarray([_scalar(e["hparams"][n]) if "hparams" in e else np.nan
                               for e in entries], float) for n in names}

    if population is None:
        hparams = summaries(records)
    else:
        per_member = [summaries([r["members"][j] for r in records]) for j in range(population)]
        hparams = {n: np.stack([m[n] for m in per_member], axis=1) for n in per_member[0]} \
            if per_member and per_member[0] else {}
    accepted = ~np.isnan(column("val_loss"))
    empty = Point(-1, math.nan, {}, {})
    return History(val_loss=column("val_loss"), train_loss=column("train_loss"),
                   hypergrad_norm=column("hypergrad_norm"), accepted=accepted,
                   point_ok=accepted, scale=np.full(accepted.shape, np.nan),
                   seconds=np.asarray([r.get("seconds", np.nan) for r in records], float),
                   hparams=hparams, hypergrad={}, line_search=None, records=records,
                   best=empty, final=empty, bests=[], finals=[], population=population)


def _scalar(summary: Any) -> float:
    return summary["mean"] if isinstance(summary, dict) else summary


def _member_record(space, m: Mapping[str, Any], j: int, retired_before: bool,
                   state_retired: int, guard: Guard) -> dict[str, Any]:
    """Member ``j``'s part of a JSON record from the host copy of the metrics."""
    pick = lambda x: x[j]  # noqa: E731
    entry: dict[str, Any] = {}
    if retired_before:
        return {"retired": True}
    if bool(pick(m["accepted"])):
        entry |= {"val_loss": float(pick(m["val_loss"])),
                  "train_loss": float(pick(m["train_loss"])),
                  "hparams": space.summarize(jax.tree.map(pick, m["hparams"])),
                  "hypergrad_norm": float(pick(m["hypergrad_norm"]))}
        if "line_search" in m:
            ls = m["line_search"]
            entry["line_search"] = {"step": float(pick(ls["step"])),
                                    "evals": int(pick(ls["evals"])),
                                    "failed": bool(pick(ls["failed"]))}
    else:
        scale = float(pick(m["scale"]))
        if not bool(pick(m["finite"])):
            what = "non-finite validation loss or hypergradient"
        elif not bool(pick(m["point_ok"])):
            what = (f"divergent validation loss ({float(pick(m['val_loss'])):.4g}) or "
                    f"hypergradient (norm {float(pick(m['hypergrad_norm'])):.4g})")
        else:
            what = "non-finite or out-of-range new hyperparameters"
        entry["warning"] = f"{what}; step rejected, outer step scale now {scale:g}"
    if state_retired == RETIRED_START:
        entry["warning"] += ("; the starting point itself was rejected and re-evaluating it "
                             "gives the same result: this member stops")
    elif state_retired == RETIRED_REJECTED:
        entry["warning"] += f"; retired after {guard.max_rejections} rejections in a row"
    elif state_retired == RETIRED_STALLED:
        entry["stopped"] = (f"the line search found no step {guard.max_search_failures} "
                            "times in a row; no step along the hypergradient lowers the "
                            "validation loss measurably")
    return entry


def _record(space, i: int, m: Mapping[str, Any], retired_before: np.ndarray,
            retired: np.ndarray, guard: Guard, population: int | None,
            inner_step: np.ndarray | None) -> dict[str, Any]:
    """The JSON record of meta-step ``i`` (``metrics.jsonl``'s line)."""
    record: dict[str, Any] = {"meta_step": i}
    if population is None:
        record |= {**_member_record(space, m, 0, bool(retired_before[0]),
                                                    int(retired[0]), guard)}
        if inner_step is not None and "val_loss" in record:
            record["inner_step"] = int(inner_step[0])
        return record
    entries = [{"member": j, **_member_record(space, m, j, bool(retired_before[j]),
                                              int(retired[j]), guard)}
               for j in range(population)]
    vals = [e["val_loss"] if "val_loss" in e else math.inf for e in entries]
    if math.isfinite(min(vals)):
        b = int(np.argmin(vals))
        record |= {k: entries[b][k] for k in ("val_loss", "train_loss", "hparams",
                                              "hypergrad_norm")}
        record["best_member"] = b
    else:
        record["warning"] = "every member's step was rejected or retired"
    record["members"] = entries
    return record


def _stop_message(i: int, retired: np.ndarray, guard: Guard) -> str:
    codes = set(retired.tolist())
    if codes == {RETIRED_STALLED}:
        return (f"stopped after meta-step {i}: the line search found no step "
                f"{guard.max_search_failures} times in a row; no step along the "
                "hypergradient lowers the validation loss measurably")
    if codes == {RETIRED_START}:
        return (f"stopped after meta-step {i}: the starting point's validation loss or "
                "hypergradient is not finite or diverges; start from other hyperparameters "
                "(a smaller learning rate, say)")
    return (f"stopped after meta-step {i}: every member was rejected "
            f"{guard.max_rejections} times in a row (non-finite or divergent); lower the "
            "outer step or start from other hyperparameters")


def _natural(space, phi: PyTree) -> PyTree:
    return jax.tree.map(np.asarray, space.constrain(phi))


def _leaves_at(tree: PyTree, j: int | None) -> PyTree:
    return tree if j is None else jax.tree.map(lambda x: x[j], tree)


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
    outer = optax.with_extra_args_support(outer)
    keys = population_lib.member_keys(key, population)
    phi = task.space.init() if phi is None else phi

    # One compiled program: run eagerly, the draws and inits compile op by op, once per
    # leaf (17 s of 106 small compilations for a per-parameter weight decay).
    @jax.jit
    def states(task, phi, keys):
        phis = population_lib.member_phis(phi, population, spread,
                                          jax.random.wrap_key_data(keys[0]))
        init = lambda p, k: init_state(task, estimator, outer, p,  # noqa: E731
                                       jax.random.wrap_key_data(k), online=online)
        return jax.vmap(init)(phis, keys)

    return states(task, phi, keys)


def tune(task: Task, estimator: Estimator,
         outer: optax.GradientTransformation | str = "gd", *,
         key: jax.Array, meta_steps: int | None = None, phi: PyTree | None = None,
         population: int | None = None, spread: float = 0.5, devices: int = 0,
         online: bool = False, resample: bool = False, clip: float = DEFAULT_CLIP,
         explore: int = 0, guard: Guard = DEFAULT_GUARD,
         callback: Callable[[dict[str, Any], TuneState], None] | None = None,
         progress: bool = False, state: TuneState | None = None) -> History:
    """Tune ``task``'s hyperparameters with ``estimator``'s hypergradients and ``outer``.

    Args:
      task: the bilevel problem.
      estimator: a hypergradient method (``hg.estimators.reverse()``, ...).
      outer: the hyper-update on ``phi``: any optax transformation
        (``optax.adam(0.05)``), or ``"gd"``, ``"ncg"``, ``"adam"`` with the defaults of
        :func:`hypergrad.outer.by_name` (the command line's).
      key: the random key of every training run (initial weights where the task draws
        them, minibatch order); for a population, one key shared by all members or a
        stacked array of one key per member (``jax.random.split(key, P)``).
      meta_steps: hyper-updates to take; for online tuning at most (and by default)
        ``task.steps // window``.
      phi: the start, in unconstrained coordinates (default ``task.space.init()``).
      population: ``None`` for a single run; ``P`` tunes P starts as one vmapped program:
        member 0 at ``phi``, member ``m > 0`` at ``phi + spread * N(0, 1)`` drawn from
        ``fold_in(k, m)``, ``k`` the first member's key.
      spread: see ``population``.
      devices: shard the population over this many devices (0: the largest divisor of P
        that is at most the device count).
      online: tune while training (Franceschi et al. 2017's real-time HO, Shaban et al.
        2019): one training run of ``task.steps`` steps whose hyperparameters are updated
        after every window of ``estimator`` by the hypergradient through that window; the
        weights persist across windows. ``estimator`` is ``truncated(window)`` (exact
        through the window, biased by the truncation) or ``pes(sigma, num_pairs, window)``
        (``2 * num_pairs`` perturbed runs that keep their weights: unbiased for the
        smoothed objective, noisy; ``val_loss`` is their mean and ``state.carry`` a
        :class:`hypergrad.estimators.PESState` whose key is raw key data).
      resample: train meta-step ``t`` with ``fold_in(key, t)``: each meta-step sees a fresh
        minibatch order and fresh noise (dropout, augmentation), so a noisy task is tuned
        for its expected validation loss rather than for one draw; off, every meta-step
        trains with ``key`` (a deterministic objective, which a line search needs).
      clip: the hypergradient's global norm is clipped to this before ``outer`` sees it
        (0: no clipping); see :data:`DEFAULT_CLIP`.
      explore: before the first meta-step, train this many configurations drawn at
        random from :func:`hypergrad.search.box` and start from the best of them and
        ``phi`` (:func:`hypergrad.search.explore`; ``History.explored`` holds the search);
        0 starts at ``phi``. A single run only, and not with ``state``.
      guard: when meta-steps are rejected and members retire (:class:`Guard`).
      callback: called after every meta-step with its JSON-ready record (as
        ``metrics.jsonl`` holds it) and the new :class:`TuneState` (on the host's view of
        the devices); the command line writes its metrics and checkpoints here.
      progress: show a progress bar.
      state: continue from this state (``history.state``, or a checkpoint's) instead of
        starting; ``meta_steps`` counts from the run's start.

    Returns:
      a :class:`History`.

    Raises:
      TuneError: no meta-step was ever accepted (the start itself is not finite or
        diverges), so there is no point to report.
    """
    if isinstance(outer, str):
        outer = outer_lib.by_name(outer)
    outer = optax.with_extra_args_support(outer)
    size = 1 if population is None else int(population)
    if size < 1:
        raise ValueError(f"population must be at least 1, got {population}")
    if online:
        window, _ = _online_options(estimator)
        most = task.steps // window
        meta_steps = most if meta_steps is None else min(meta_steps, most)
    if meta_steps is None or meta_steps < 1:
        raise ValueError(f"meta_steps must be a positive integer, got {meta_steps}")
    explored = None
    if explore:
        if population is not None or state is not None:
            raise ValueError("explore picks one start: it needs a single run (population "
                             "None) that does not continue a state")
        phi, explored = search.explore(task, key, explore, phi=phi)
    mesh = population_lib.make_mesh(population_lib.device_count(size, devices))
    keys = population_lib.member_keys(key, size)
    step = population_lib.vmapped(
        with_key(make_step(estimator, outer, online=online, clip=clip, guard=guard,
                           resample=resample)), mesh, size)
    final = population_lib.vmapped(
        with_key(make_final(estimator, online=online, resample=resample)), mesh, size)
    if state is None:
        state = initial_state(task, estimator, outer, key=key, phi=phi, population=size,
                              spread=spread, online=online)
    task = population_lib.put(task, mesh, replicate=True)
    state = population_lib.put(population_lib.host(state), mesh)
    keys = population_lib.put(keys, mesh)

    from tqdm.auto import tqdm

    done = int(np.asarray(population_lib.host(state.meta_step))[0])
    space = task.space
    metrics_list: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    seconds: list[float] = []
    stopped = None
    retired = np.asarray(population_lib.host(state.retired))
    bar = tqdm(total=meta_steps, initial=done, desc="meta-step" if population is None
               else f"meta-step (P={size})", unit="step", disable=not progress,
               dynamic_ncols=True)
    with bar:
        for i in range(done, meta_steps):
            if (retired != ACTIVE).all():
                break
            t0 = time.perf_counter()
            state, m = step(task, state, keys)
            m = population_lib.host(m)
            before, retired = retired, np.asarray(population_lib.host(state.retired))
            inner = np.asarray(population_lib.host(state.inner_step)) if online else None
            record = _record(space, i, m, before != ACTIVE, retired, guard, population, inner)
            seconds.append(time.perf_counter() - t0)
            record["seconds"] = seconds[-1]
            if (retired != ACTIVE).all():
                stopped = record["stopped"] = _stop_message(i, retired, guard)
            metrics_list.append(m)
            records.append(record)
            if "val_loss" in record:
                bar.set_postfix_str(f"val={record['val_loss']:.4f}")
            bar.update(1)
            if callback is not None:
                callback(record, state)

    # The point after the last update, evaluated once and checked like any point.
    end_values = np.asarray(population_lib.host(final(task, state, keys)), float)
    history = _history(space, population_lib.host(state), metrics_list, records, seconds,
                       end_values, stopped, population, guard, state, online)
    return dataclasses.replace(history, explored=explored)


def _history(space, s: TuneState, metrics: list[dict[str, Any]], records, seconds,
             end_values: np.ndarray, stopped: str | None,
             population: int | None, guard: Guard, state: TuneState,
             online: bool) -> History:
    size = len(end_values)
    finals: list[Point | None] = []
    bests: list[Point | None] = []
    for j in range(size):
        last_step = int(s.last_step[j])
        if last_step < 0:
            finals.append(None)
            bests.append(None)
            continue
        member = None if population is None else j
        ref, value = float(s.value_ref[j]), float(end_values[j])
        calm = math.isfinite(value) and value - ref <= guard.value_ratio * abs(ref)
        # The point the last step moved to (for online tuning: the weights trained to the
        # end), evaluated after the loop; else the last accepted point (a rejected step
        # left phi there, or the new point failed the guard).
        phi_j, last_j = _leaves_at(s.phi, j), _leaves_at(s.last_phi, j)
        moved = online or not all(np.array_equal(a, b) for a, b in
                                  zip(jax.tree.leaves(phi_j), jax.tree.leaves(last_j),
                                      strict=True))
        if calm and moved:
            phi = _leaves_at(s.phi, j)
            finals.append(Point(int(s.meta_step[j]), value, phi, _natural(space, phi), member))
        else:
            phi = _leaves_at(s.last_phi, j)
            finals.append(Point(last_step, float(s.last_value[j]), phi, _natural(space, phi),
                                member))
        best_phi = _leaves_at(s.best_phi, j)
        best = Point(int(s.best_step[j]), float(s.best_value[j]), best_phi,
                     _natural(space, best_phi), member)
        final = finals[-1]
        bests.append(final if final is not None and final.val_loss < best.val_loss else best)
    if all(p is None for p in finals):
        raise TuneError(stopped or "no meta-step was accepted")
    pick = lambda points: min((p for p in points if p is not None),  # noqa: E731
                              key=lambda p: p.val_loss)

    def stack(key):
        if not metrics:
            return np.zeros((0,) if population is None else (0, size))
        out = np.stack([np.asarray(m[key]) for m in metrics])
        return out[:, 0] if population is None else out

    def stack_tree(key):
        if not metrics:
            return {}
        trees = [m[key] for m in metrics]
        out = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)
        return jax.tree.map(lambda x: x[:, 0], out) if population is None else out

    line_search = None
    if metrics and "line_search" in metrics[0]:
        line_search = {k: np.stack([np.asarray(m["line_search"][k]) for m in metrics])
                       for k in ("step", "evals", "failed")}
        if population is None:
            line_search = {k: v[:, 0] for k, v in line_search.items()}
    if stopped is not None and set(np.asarray(s.retired).tolist()) != {RETIRED_STALLED}:
        warnings.warn(stopped, TuneWarning, stacklevel=3)
    return History(
        val_loss=stack("val_loss"), train_loss=stack("train_loss"),
        hypergrad_norm=stack("hypergrad_norm"), accepted=stack("accepted").astype(bool),
        point_ok=stack("point_ok").astype(bool), scale=stack("scale"),
        seconds=np.asarray(seconds, float), hparams=stack_tree("hparams"),
        hypergrad=stack_tree("hypergrad"), line_search=line_search, records=records,
        best=pick(bests), final=pick(finals), bests=bests, finals=finals,
        stopped=stopped, population=population, state=state)
