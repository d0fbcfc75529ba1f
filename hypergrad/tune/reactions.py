"""How a tuning run reacts while it goes (:class:`Reactions`, a part of the loop's run):
it shares the time with the strategy's black-box search, moves a member stuck in a worse
basin to the search's best point late in the run, and restarts or smooths members that
stop."""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hypergrad import population as population_lib
from hypergrad.tune.guard import (
    ACTIVE,
    RETIRED_CHAOTIC,
    RETIRED_CONVERGED,
    RETIRED_STALLED,
    RETIRED_START,
)
from hypergrad.tune.result import at
from hypergrad.tune.step import SMOOTH_PAIRS, TuneState, states

PyTree = Any

_RESTART_SPREAD = 0.5
#: The last part of a run (of its meta-steps or budget) in which :meth:`Reactions.exploit`
#: moves a member to the search's best point where that is better.
LATE = 0.75
#: Without a budget, the search's share of the run is counted in trainings: a meta-step
#: counts as this many (the seed CNN's reverse-mode hypergradient took 4.45 trainings'
#: time on a 2-core CPU: docs/benchmarks/memory.md, ``scripts/bench_unroll.py``).
STEP_TRAININGS = 4
#: Each round of sharing time with the black-box search, the gains and seconds so far
#: are multiplied by this: the recent rounds count most.
_DECAY = 0.8


class Reactions:
    """The loop run's reactions (:class:`hypergrad.tune.loop` composes it into its run
    with :class:`hypergrad.tune.result.Result`): they read and write the run's state
    (``plan``, ``memory``, ``own``, ``gains``, ``queue``, ``diagnosis``, the compiled
    ``step``) and return the population's new :class:`TuneState`."""

    # The run's, set by its __init__ (hypergrad.tune.loop._Run).
    task: Any
    estimator: Any
    outer: Any
    strategy: Any
    guard: Any
    mesh: Any
    size: Any
    plan: Any
    key: Any
    raw_keys: Any
    online: Any
    population: Any
    memory: Any
    queue: Any
    diagnosis: Any
    gains: Any
    own: Any
    sigma: Any
    build: Any

    # -- sharing the time with the black-box search ----------------------------------

    def share(self, state, m, seconds: float, i: int, budget, began):
        """After a meta-step of ``seconds``, let the strategy's black-box search run for
        ``seconds * share / (1 - share)``, ``share`` its part of the time: the fraction of
        the recent progress per second (each side's own best lowered, decayed by
        :data:`_DECAY` each round) that was the search's, kept within [0.2, 0.8] so neither
        side starves. Without a budget the time is counted in trainings instead of
        seconds (a meta-step as :data:`STEP_TRAININGS`, a configuration as one), so the
        run does not depend on the machine's speed and resumes exactly. A member that
        stops restarts from the search's best point where that is below every member's
        best (:meth:`react`)."""
        searcher, acc = self.plan.searcher, self.gains
        ok = np.asarray(m["point_ok"], bool)
        values = np.where(ok, np.asarray(m["val_loss"], float), np.inf)
        if values.min() < self.own["refine"]:
            if math.isfinite(self.own["refine"]):
                acc["refine"] += self.own["refine"] - values.min()
            self.own["refine"] = float(values.min())
        counted = budget is None
        acc["refine_s"] += STEP_TRAININGS if counted else seconds
        rate = {k: acc[k] / max(acc[k + "_s"], 1e-9) for k in ("refine", "explore")}
        total = rate["refine"] + rate["explore"]
        part = 0.5 if total <= 0 else min(0.8, max(0.2, rate["explore"] / total))
        if counted:
            slot = float(max(1, round(STEP_TRAININGS * part / (1.0 - part))))
        else:
            slot = min(seconds * part / (1.0 - part),
                       budget - (time.perf_counter() - began) - 1.5 * seconds)
        if slot > 0:
            t0 = time.perf_counter()
            found = min(searcher.run(count=int(slot)) if counted else
                        searcher.run(until=t0 + slot))
            acc["explore_s"] += slot if counted else time.perf_counter() - t0
            if found < self.own["explore"]:
                acc["explore"] += self.own["explore"] - found
                self.own["explore"] = found
            for k in list(acc):
                acc[k] *= _DECAY
        return state

    def _late(self, i: int, meta_steps: int | None, budget: float | None,
              began: float) -> bool:
        """Whether the run is in its last part (:data:`LATE`) of its meta-steps or budget."""
        if meta_steps is not None and i + 1 >= LATE * meta_steps:
            return True
        return budget is not None and time.perf_counter() - began >= LATE * budget

    def exploit(self, state, i: int):
        """Once, late in the run: where the search's best point is below every member's
        best by more than the guard's tolerance, the member with the worst best goes on
        from it, so the run's last meta-steps refine the best region it knows and its
        final point is not left behind its best (a refinement that settled in a worse
        basin without stopping would otherwise end there)."""
        if self.memory.get("exploited") or not self.strategy.restart:
            return state
        value = float(self.plan.searcher.best()[1])
        # The members' bests alone decide; the whole state comes to the host only to move.
        members = float(np.min(population_lib.host(state.best_value)))
        margin = 0.0 if not math.isfinite(self.guard.tolerance) else self.guard.tolerance
        if not value < members - margin * abs(members):
            return state
        host = population_lib.host(state)
        phi = self._searched(host)
        if phi is None:
            return state
        self.memory["exploited"] = True
        j = int(np.argmax(np.where(host.retired == ACTIVE, host.best_value, -np.inf)))
        who = "the run" if self.population is None else f"member {j}"
        self.diagnosis.append(
            f"meta-step {i}: stuck in a basin: the search's best point ({value:.6g}) is "
            f"below the refinement's best ({members:.6g}); {who} refines it for the last "
            f"meta-steps")
        return population_lib.put(self._restart(host, j, phi), self.mesh)

    def _searched(self, host: TuneState) -> PyTree | None:
        """The search's best point, where it is below every member's best and no member
        restarted from it yet (a member that stops restarts there first)."""
        searcher = self.plan.searcher
        if searcher is None:
            return None
        phi, value = searcher.best()
        if not value < float(np.min(host.best_value)) or \
                not value < self.memory["restarted_at"]:
            return None
        self.memory["restarted_at"] = value
        return jax.tree.map(lambda a, b: np.asarray(a, np.asarray(b).dtype), phi,
                            at(host.phi, 0))

    # -- members that stop ----------------------------------------------------------

    def _can_react(self, before, retired) -> bool:
        newly = (before == ACTIVE) & (retired != ACTIVE)
        codes = set(retired[newly].tolist())
        if self.strategy.smooth and RETIRED_CHAOTIC in codes and self.sigma == 0:
            return True
        return bool(self.strategy.restart and codes)

    def _cap(self, state) -> float | None:
        ref = np.asarray(population_lib.host(state.value_ref), float)
        ref = ref[np.isfinite(ref)]
        start = self.plan.start if self.plan.start is not None else \
            (float(np.max(np.abs(ref))) if ref.size else None)
        return None if start is None or not math.isfinite(start) else 4.0 * abs(start) + 1e-3

    def react(self, state, newly: np.ndarray, i: int):
        """Smooth (a chaotic member) or restart (a member that stopped), as the strategy
        says; note what was seen and done in the diagnosis."""
        host = population_lib.host(state)
        explored = self.plan.explored
        for j in newly.tolist():
            code = int(host.retired[j])
            who = "the run" if self.population is None else f"member {j}"
            if code == RETIRED_CHAOTIC and self.strategy.smooth and self.sigma == 0:
                sigma = float(host.step0[j])
                sigma = sigma if math.isfinite(sigma) and sigma > 0 else 0.1
                self.diagnosis.append(
                    f"meta-step {i}: {who} found the objective chaotic at the step's scale "
                    f"{sigma:.3g} (halving the step did not shrink the change in validation "
                    f"loss); switched to the hypergradient of the loss smoothed at that scale "
                    f"(ES, sigma {sigma:.3g}, {SMOOTH_PAIRS} antithetic pairs)")
                host = self._smoothed(host, sigma)
                self.build(sigma, self._cap(state))
                break
            if code == RETIRED_CONVERGED and explored is not None and \
                    float(host.best_value[j]) > explored.best_val_loss:
                self.diagnosis.append(
                    f"meta-step {i}: {who} converged in a basin at {float(host.best_value[j]):.6g}"
                    f", worse than the best explored point ({explored.best_val_loss:.6g})")
            if not self.strategy.restart:
                self.diagnosis.append(f"meta-step {i}: {who} stopped: "
                                      f"{self.guard.retirement(code)}")
                continue
            searched = self._searched(host)
            if searched is not None:
                phi = searched
                where = f"the search's best point ({self.memory['restarted_at']:.6g})"
            elif self.queue:
                phi, where = self.queue.pop(0), "the next best explored start"
                self.memory["queue_used"] += 1
            else:
                b = int(np.argmin(host.best_value))
                k = jax.random.fold_in(self.key, 1_000_003 + i * self.size + j)
                best = jax.tree.map(lambda a, b=b: a[b], host.best_phi)
                leaves, treedef = jax.tree.flatten(best)
                ks = jax.random.split(k, len(leaves))
                phi = jax.tree.unflatten(treedef, [
                    x + _RESTART_SPREAD * np.asarray(jax.random.normal(kk, x.shape, x.dtype))
                    for kk, x in zip(ks, leaves, strict=True)])
                where = "a perturbation of the best point so far"
            why = {RETIRED_START: "started at a point that is not finite or diverges",
                   RETIRED_CONVERGED: "converged", RETIRED_STALLED: "stalled",
                   RETIRED_CHAOTIC: "found the objective chaotic"}.get(code, "was retired")
            self.diagnosis.append(f"meta-step {i}: {who} {why}; restarted from {where}")
            host = self._restart(host, j, phi)
        return population_lib.put(host, self.mesh)

    def _restart(self, host: TuneState, j: int, phi: PyTree) -> TuneState:
        fresh = population_lib.host(states(
            self.task, self.estimator, self.outer,
            jax.tree.map(lambda a: jnp.asarray(a)[None], phi), self.raw_keys[j:j + 1],
            self.online))
        keep = {"best_phi", "best_value", "best_step", "meta_step", "rejected", "sigma"}
        out = {}
        for name in TuneState._fields:
            old = getattr(host, name)
            if name in keep:
                out[name] = old
                continue
            new = getattr(fresh, name)

            def put(a, f):
                a = np.array(a)
                a[j] = f[0]
                return a

            out[name] = jax.tree.map(put, old, new)
        return TuneState(**out)

    def _smoothed(self, host: TuneState, sigma: float) -> TuneState:
        """Every member that is active or chaotic, back at its last accepted point with a
        fresh outer state and step, re-anchored (the smoothed loss is another objective)."""
        opt = jax.jit(jax.vmap(self.outer.init))(host.last_phi)
        live = (host.retired == ACTIVE) | (host.retired == RETIRED_CHAOTIC)
        def sel(a: Any, b: Any) -> Any:
            return np.where(live.reshape((-1,) + (1,) * (np.ndim(a) - 1)), a, b)

        opt = population_lib.host(opt)
        return host._replace(
            phi=jax.tree.map(sel, host.last_phi, host.phi),
            opt_state=jax.tree.map(sel, opt, host.opt_state),
            scale=sel(np.ones_like(host.scale), host.scale),
            value_ref=sel(np.full_like(host.value_ref, np.nan), host.value_ref),
            last_value=sel(np.full_like(host.last_value, np.nan), host.last_value),
            rejected_in_row=sel(np.zeros_like(host.rejected_in_row), host.rejected_in_row),
            retired=sel(np.full_like(host.retired, ACTIVE), host.retired),
            sigma=sel(np.full_like(host.sigma, sigma), host.sigma))
