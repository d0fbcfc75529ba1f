"""How a tuning run ends (:class:`Result`, a part of the loop's run): its final and best
points, checked against the start, re-scored on fresh keys where the objective is noisy,
and the :class:`hypergrad.History`."""

from __future__ import annotations

import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hypergrad.tune import strategies as strategies_lib
from hypergrad.tune.guard import RETIRED_CONVERGED, RETIRED_STALLED
from hypergrad.tune.history import History, Point, assemble
from hypergrad.tune.step import TuneState
from hypergrad.unroll import objective

PyTree = Any

#: Fresh keys a stochastic task's chosen points are re-scored on.
RESCORE_KEYS = 4
#: The search's best configurations re-scored beside the refinement's points.
RESCORE_CANDIDATES = 5
#: Folded into the key: the re-scoring keys train nothing else.
RESCORE_STREAM = 0x5C0E


class TuneError(RuntimeError):
    """No point of the run was ever accepted (its start diverged or was not finite)."""


class TuneWarning(RuntimeWarning):
    """The run stopped early because every member was rejected too often, or an online
    run ended worse than its start."""


class Result:
    """The end of the loop's run (composed with :class:`hypergrad.tune.reactions.Reactions`
    into it): reads the run's ``task``, ``guard``, ``plan``, ``online``, ``resample`` and
    ``diagnosis``."""

    # The run's, set by its __init__ (hypergrad.tune.loop._Run).
    task: Any
    guard: Any
    plan: Any
    key: Any
    online: Any
    resample: Any
    population: Any
    size: Any
    strategy: Any
    done: Any
    diagnosis: Any

    # -- the result -----------------------------------------------------------------

    def history(self, s: TuneState, metrics, records, seconds, clock, end_values,
                stopped, stop_reason, state, phi0) -> History:
        """The run's :class:`History`: each member's final point (the point it moved to,
        where ``end_values`` passes the guard, else its last accepted one) and best
        point, never worse than the start; for a noisy objective every candidate is
        re-scored on fresh keys first and ``best`` is the lowest of them all."""
        space, guard, population = self.task.space, self.guard, self.population
        deterministic = not self.online and not self.resample
        trust = deterministic and guard.tolerance != math.inf
        finals: list[Point | None] = []
        bests: list[Point | None] = []
        for j in range(self.size):
            last_step = int(s.last_step[j])
            if last_step < 0 and not math.isfinite(float(s.best_value[j])):
                finals.append(None)
                bests.append(None)
                continue
            member = None if population is None else j
            ref, value = float(s.value_ref[j]), float(end_values[j])
            calm = math.isfinite(value) and not (value - ref > guard.value_ratio * abs(ref))
            if trust and int(s.sigma[j] == 0):
                last = float(s.last_value[j])
                calm = calm and (not math.isfinite(last)
                                 or value <= last + guard.tolerance * abs(last)) \
                    and not value > ref
            phi_j, last_j = at(s.phi, j), at(s.last_phi, j)
            moved = self.online or not all(
                np.array_equal(a, b) for a, b in zip(jax.tree.leaves(phi_j),
                                                     jax.tree.leaves(last_j), strict=True))
            if last_step >= 0 and calm and moved:
                finals.append(Point(int(s.meta_step[j]), value, phi_j, _natural(space, phi_j),
                                    member))
            elif last_step >= 0:
                finals.append(Point(last_step, self._plain(metrics, last_step, j,
                                                           float(s.last_value[j])),
                                    last_j, _natural(space, last_j), member))
            else:
                finals.append(None)
            best_phi = at(s.best_phi, j)
            best = Point(int(s.best_step[j]), float(s.best_value[j]), best_phi,
                         _natural(space, best_phi), member)
            final = finals[-1]
            if final is None:
                finals[-1] = final = best
            bests.append(final if final.val_loss < best.val_loss else best)
        explored = self.plan.explored if self.plan.searcher is None else \
            self.plan.searcher.result()
        if explored is not None and np.isfinite(explored.best_val_loss):
            # The exploration's best is a scored point too: the answer when the budget
            # ended before the refinement found better (or took a step).
            i = explored.best_index
            p = jax.tree.map(lambda a: np.asarray(a[i]), explored.phi)
            seen = Point(-1, explored.best_val_loss, p, _natural(space, p))
            if all(f is None for f in finals):
                finals[0] = seen
            if bests[0] is None or bests[0].val_loss > seen.val_loss:
                bests[0] = seen
        if all(p is None for p in finals):
            raise TuneError(stopped or "no meta-step was accepted")
        start = self._start(metrics, phi0)
        diagnosis = self.diagnosis
        if trust and start is not None:
            # Never worse than the start: where a final point is (the smoothed objective
            # accepted it), the member's best stands in. (Without the trust region the
            # run is watched, not steered: its final point is where it went.)
            for j, (f, b) in enumerate(zip(finals, bests, strict=True)):
                if f is not None and b is not None and f.val_loss > start.val_loss:
                    finals[j] = b
        extra: list[Point | None] = []
        if (self.task.stochastic or self.resample) and not self.online:
            if explored is not None:  # the search's best few compete on fresh keys too
                for k in np.argsort(explored.val_loss, kind="stable")[:RESCORE_CANDIDATES]:
                    if np.isfinite(explored.val_loss[k]):
                        p = jax.tree.map(lambda a, k=k: np.asarray(a[k]), explored.phi)
                        extra.append(Point(-1, float(explored.val_loss[k]), p,
                                           _natural(space, p)))
            finals, bests, start, extra = self._rescore(finals, bests, start, extra)
        # Re-scored, a member's final point can come out below its best one (a best
        # chosen on one lucky draw): the best is the lowest of every scored point.
        best, final = _pick(bests + extra + finals), _pick(finals)
        if start is not None and (self.online or self.task.stochastic or self.resample) \
                and final.val_loss > start.val_loss:
            how = "trained the same way" if self.online else "re-scored on fresh keys"
            msg = (f"the tuned point ({final.val_loss:.6g}) is worse than the start {how} "
                   f"({start.val_loss:.6g}): returning the start")
            diagnosis.append(msg)
            warnings.warn(msg, TuneWarning, stacklevel=3)
            final = start
            if best.val_loss > start.val_loss or self.online:
                best = start
        if stopped is not None and set(np.asarray(s.retired).tolist()) - {
                RETIRED_STALLED, RETIRED_CONVERGED}:
            warnings.warn(stopped, TuneWarning, stacklevel=3)
        elif stopped is not None:
            diagnosis.append(stopped)
        return assemble(space, metrics, records, seconds, clock, population, self.size,
                         best, final, bests, finals, stopped, stop_reason, diagnosis,
                         explored, start, state, self.strategy.name)

    def _plain(self, metrics, step: int, j: int, fallback: float) -> float:
        """The plain validation loss evaluated at meta-step ``step`` (member ``j``) by this
        call (whose first meta-step is ``self.done``), else ``fallback``."""
        index = step - self.done
        if 0 <= index < len(metrics):
            return float(np.asarray(metrics[index]["val_loss"])[j])
        return fallback

    def _start(self, metrics, phi0) -> Point | None:
        """The starting point as this run scored it (``None`` when it continued a state)."""
        if self.online:
            value = float(jax.jit(lambda t, p, k: objective(t, p, k)[0])(
                self.task, phi0, self.key))
            return Point(0, value, phi0, _natural(self.task.space, phi0))
        if self.plan.start is not None:
            return Point(-1, self.plan.start, phi0, _natural(self.task.space, phi0))
        if metrics and self.plan.phis is not None:
            v = float(np.asarray(metrics[0]["val_loss"])[0])
            if bool(np.asarray(metrics[0]["point_ok"])[0]) and math.isfinite(v):
                p = at(self.plan.phis, 0)
                return Point(0, v, p, _natural(self.task.space, p),
                             None if self.population is None else 0)
        return None

    def _rescore(self, finals, bests, start, extra):
        """Every candidate (each member's final and best point, the start, the search's
        best few) scored on :data:`RESCORE_KEYS` fresh keys: the mean and its standard
        error."""
        ks = strategies_lib.scoring_keys(jax.random.fold_in(self.key, RESCORE_STREAM),
                                         RESCORE_KEYS)

        def again(p: Point | None) -> Point | None:
            if p is None:
                return None
            v = np.asarray(strategies_lib.losses(self.task, jax.tree.map(jnp.asarray, p.phi),
                                                 ks), float)
            v = np.where(np.isfinite(v), v, np.inf)
            se = float(np.std(v, ddof=1) / math.sqrt(len(v))) if np.isfinite(v).all() \
                else math.inf
            return p._replace(val_loss=float(np.mean(v)), stderr=se)

        return ([again(p) for p in finals], [again(p) for p in bests], again(start),
                [again(p) for p in extra])


def at(tree: PyTree, j: int | None) -> PyTree:
    """Member ``j`` of a stacked tree (the tree itself for ``None``)."""
    return tree if j is None else jax.tree.map(lambda x: np.asarray(x)[j], tree)


def _natural(space, phi: PyTree) -> PyTree:
    return jax.tree.map(np.asarray, space.constrain(phi))


def _pick(points: list[Point | None]) -> Point:
    return min((p for p in points if p is not None), key=lambda p: p.val_loss)
