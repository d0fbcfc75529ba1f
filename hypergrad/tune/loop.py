"""``hg.tune``: the host loop over any strategy, its budget, callbacks and progress.

``history = hg.tune(task, key=key, budget=60)`` tunes with the defaults: the exact
reverse-mode hypergradient, Adam with step 0.2 on ``phi`` and the
:class:`~hypergrad.tune.strategies.ExploreRefine` strategy, in 60 seconds of wall time
(compilation included). ``hg.tune(task, estimator, outer, key=key, meta_steps=30)`` is a
single local run, as before. Each meta-step is one jitted function
(:func:`hypergrad.tune.step.make_step`), compiled once per smoothing mode; a single run
is a population of one, so a population runs the same function vmapped over its members
(and sharded over the devices).

After the last meta-step the point it moved to is evaluated once more (a training run,
no hypergradient) and checked like any point. :attr:`History.final` is the last accepted
point, that one if it passed; :attr:`History.best` the accepted point with the lowest
validation loss; both finite and never worse than the start. For a stochastic task they
are re-scored on :data:`RESCORE_KEYS` fresh keys and chosen by the mean; an online run
is compared with its start trained the same way and returns the start if it ended worse.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hypergrad import outer as outer_lib
from hypergrad import population as population_lib
from hypergrad import validation
from hypergrad.estimators.base import Estimator
from hypergrad.estimators.reverse import reverse
from hypergrad.task import Task
from hypergrad.tune import checks
from hypergrad.tune import strategies as strategies_lib
from hypergrad.tune.guard import (
    ACTIVE,
    DEFAULT_GUARD,
    RETIRED_CHAOTIC,
    RETIRED_CONVERGED,
    RETIRED_STALLED,
    RETIRED_START,
    Guard,
)
from hypergrad.tune.history import History, Point, record
from hypergrad.tune.step import (
    DEFAULT_CLIP,
    SMOOTH_PAIRS,
    TuneState,
    init_state,
    make_final,
    make_step,
    online_of,
    with_key,
)
from hypergrad.tune.strategies import Local, Plan
from hypergrad.unroll import objective
from hypergrad.validation import keywords

PyTree = Any

#: The budget (seconds) of a run given neither ``budget`` nor ``meta_steps``.
DEFAULT_BUDGET = 60.0
#: Fresh keys a stochastic task's chosen points are re-scored on.
RESCORE_KEYS = 4
#: The search's best configurations re-scored beside the refinement's points.
RESCORE_CANDIDATES = 5
_RESCORE_STREAM = 0x5C0E  # folded into the key: the re-scoring keys train nothing else
_RESTART_SPREAD = 0.5
#: The last part of a run (of its meta-steps or budget) in which :meth:`_Run.exploit`
#: moves a member to the search's best point where that is better.
LATE = 0.75
#: Without a budget, the search's share of the run is counted in trainings: a meta-step
#: counts as this many (the seed CNN's reverse-mode hypergradient took 4.45 trainings'
#: time on a 2-core CPU: docs/benchmarks/memory.md, ``scripts/bench_unroll.py``).
STEP_TRAININGS = 4
#: Each round of sharing time with the black-box search, the gains and seconds so far
#: are multiplied by this: the recent rounds count most.
_DECAY = 0.8


class TuneError(RuntimeError):
    """No point of the run was ever accepted (its start diverged or was not finite)."""


class TuneWarning(RuntimeWarning):
    """The run stopped early because every member was rejected too often, or an online
    run ended worse than its start."""


def default_estimator(task: Task) -> Estimator:
    """The estimator :func:`tune` uses when given none: the exact reverse-mode
    hypergradient through the whole unroll, with the checkpoint policy measured fastest
    on the backend (:func:`hypergrad.estimators.reverse`)."""
    del task  # every task supports it; memory is bounded by the checkpoint policy
    return reverse()


def _strategy(strategy: Any, *, explicit: bool, population: int | None, spread: float,
              explore: int, online: bool, state: Any) -> Any:
    given = strategy is not None
    strategy = strategies_lib.chosen(strategy, local=explicit or state is not None,
                                     population=population, spread=spread, explore=explore,
                                     online=online)
    if given and (population is not None or explore):
        raise ValueError("population and explore belong to the strategy: pass "
                         "strategy=hg.Local(population=..., explore=...) or "
                         "hg.ExploreRefine(members=..., explore=...), not both")
    if online and not isinstance(strategy, Local):
        raise ValueError("online tuning is one training run: it takes strategy=None or "
                         "Local(), not " + type(strategy).__name__)
    return strategy


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
    outer = optax.with_extra_args_support(outer)

    # One compiled program: run eagerly, the inits compile op by op, once per leaf.
    @jax.jit
    def build(task, phis, keys):
        init = lambda p, k: init_state(task, estimator, outer, p,  # noqa: E731
                                       jax.random.wrap_key_data(k), online=online)
        return jax.vmap(init)(phis, keys)

    return build(task, phis, keys)


@keywords
def tune(task: Task, estimator: Estimator | None = None,
         outer: optax.GradientTransformation | str | None = None, *,
         key: jax.Array, budget: float | None = None, meta_steps: int | None = None,
         strategy: Any = None, phi: PyTree | None = None,
         population: int | None = None, spread: float = 0.5, devices: int = 0,
         online: bool = False, resample: bool | None = None, clip: float = DEFAULT_CLIP,
         explore: int = 0, guard: Guard = DEFAULT_GUARD,
         callback: Callable[[dict[str, Any], TuneState], None] | None = None,
         progress: bool = False, state: TuneState | None = None,
         plan: Plan | None = None, workdir: str | os.PathLike | None = None,
         save_every: int = 1) -> History:
    """Tune ``task``'s hyperparameters by hypergradient.

    ``tune(task, key=key, budget=60)`` uses every default; ``tune(task, estimator, outer,
    key=key, meta_steps=30)`` is one local run with those (as before the default strategy
    existed).

    Args:
      task: the bilevel problem.
      estimator: a hypergradient method (``hg.estimators.reverse()``, ...); ``None``:
        :func:`default_estimator`.
      outer: the hyper-update on ``phi``: any optax transformation
        (``optax.adam(0.05)``), or ``"gd"``, ``"ncg"``, ``"adam"`` with the defaults of
        :func:`hypergrad.outer.by_name` (the command line's); ``None``:
        :data:`hypergrad.outer.DEFAULT` (Adam, step 0.2), as ``hypergrad run``.
      key: the random key of every training run (initial weights where the task draws
        them, minibatch order); for a population, one key shared by all members or a
        stacked array of one key per member (``jax.random.split(key, P)``); a legacy
        ``jax.random.PRNGKey`` is one key too.
      budget: wall-clock seconds from this call, compilation and exploration included;
        the loop starts no meta-step it expects to end past it.
      meta_steps: at most this many meta-steps (for online tuning at most, and by
        default, ``task.steps // window``). With neither ``budget`` nor ``meta_steps``
        the default strategy runs for :data:`DEFAULT_BUDGET` seconds.
      strategy: where the meta-steps start and what replaces a member that stops
        (:mod:`hypergrad.tune.strategies`, or its name): ``None`` picks
        :data:`~hypergrad.tune.strategies.DEFAULT` (explore, then refine) when neither
        ``estimator`` nor ``outer`` is given, else :class:`Local` with ``population``,
        ``spread`` and ``explore``.
      phi: the start, in unconstrained coordinates (default ``task.space.init()``).
      population: ``None`` for a single run; ``P`` tunes P starts as one vmapped program:
        member 0 at ``phi``, member ``m > 0`` at ``phi + spread * N(0, 1)`` drawn from
        ``fold_in(k, m)``, ``k`` the first member's key (:class:`Local`).
      spread: see ``population``.
      devices: shard the population over this many devices (0: the largest divisor of P
        that is at most the device count).
      online: tune while training (Franceschi et al. 2017's real-time HO, Shaban et al.
        2019): one training run of ``task.steps`` steps whose hyperparameters are updated
        after every window of ``estimator`` by the hypergradient through that window; the
        weights persist across windows. ``estimator`` is ``truncated(window)`` or
        ``pes(sigma, num_pairs, window)``. The result is compared with the start trained
        the same way (without updates); if it is worse the start is returned.
      resample: train meta-step ``t`` with ``fold_in(key, t)``: each meta-step sees a fresh
        minibatch order and fresh noise (and, for a task with ``tasks``, fresh tasks);
        the trust region is off (the values are noisy). ``None`` (default): on for a
        task with a distribution of tasks (meta-training), off otherwise.
      clip: the hypergradient's global norm is clipped to this before ``outer`` sees it
        (0: no clipping); see :data:`DEFAULT_CLIP`.
      explore: before the first meta-step, train this many random configurations and
        start from the best of them and ``phi`` (:class:`Local`'s ``explore``).
      guard: when meta-steps are rejected and members retire (:class:`Guard`).
      callback: called after every meta-step with its JSON-ready record (as
        ``metrics.jsonl`` holds it) and the new :class:`TuneState`.
      progress: show a progress bar.
      state: continue from this state (``history.state``, or a checkpoint's) instead of
        starting; ``meta_steps`` counts from the run's start. A state made for another
        run (other hyperparameters, population size, outer optimizer, online or not) is
        refused (:func:`hypergrad.tune.checks.state`).
      plan: with ``state``, the strategy's plan it was made from (its queue of starts,
        exploration and scored start), where the caller made it beforehand
        (``hypergrad run`` checkpoints the start before the first meta-step).
      workdir: a run directory, written as ``hypergrad run`` writes one
        (:mod:`hypergrad.tune.saving`): ``config.json`` (this call), ``metrics.jsonl``,
        ``checkpoint.npz``, ``hparams/``, and at the end ``history.json``,
        ``summary.json`` and the figures. A new or empty one starts a run; one holding a
        run of this call resumes it from its checkpoint (killed, interrupted, or stopped
        by a raising ``callback``) and returns the History of the whole run, equal to an
        uninterrupted run's; a finished one returns its History without training (or,
        with a larger ``meta_steps``, goes on). Only ``meta_steps``, ``budget`` and
        ``save_every`` may change between the calls (``budget`` counts the whole run's
        time); another call's directory is refused before anything is written. ``None``
        (the default): no files.
      save_every: with ``workdir``, checkpoint every this many meta-steps (and at the end,
        and on SIGINT/SIGTERM). 1: a checkpoint is the loop's state (``phi``-sized arrays,
        the weights only for online tuning), far cheaper to write than a meta-step's
        training is to redo.

    Returns:
      a :class:`History`.

    Raises:
      TypeError, ValueError: an argument is wrong; every one is checked before anything
        compiles, and the message names it (:mod:`hypergrad.validation`: the rules the
        command line shares, with the same messages).
      TuneError: no meta-step was ever accepted (the start itself is not finite or
        diverges), so there is no point to report.
    """
    began = time.perf_counter()
    # Every argument is checked here, before anything compiles (hypergrad.validation
    # holds the rules the command line shares).
    key = validation.random_key("key", key)
    if not isinstance(guard, Guard):
        raise TypeError(f"guard must be a hg.Guard, got {type(guard).__name__}")
    guard = guard.validate()
    clip = validation.clip("clip", clip)
    spread = validation.spread("spread", spread)
    devices = validation.integer("devices", devices)
    explore = validation.integer("explore", explore)
    if population is not None:
        population = validation.integer("population", population, low=1)
    if meta_steps is not None:
        meta_steps = validation.integer("meta_steps", meta_steps, low=1)
    if callback is not None:
        validation.function("callback", callback, "(record, state) -> None")
    if phi is not None:
        checks.phi(phi, task.space)
    if task.tasks is not None and online:
        raise ValueError("online tuning trains one run; a task with a distribution of tasks "
                         "(tasks=) trains one per drawn task: tune it with online=False")
    # A distribution of tasks draws fresh tasks every meta-step (MAML's meta-training).
    resample = task.tasks is not None if resample is None else bool(resample)
    explicit = estimator is not None or outer is not None
    strategy = _strategy(strategy, explicit=explicit, population=population, spread=spread,
                         explore=explore, online=online, state=state)
    if plan is not None and state is None:
        raise ValueError("plan comes with the state made from it: pass state= too")
    estimator = default_estimator(task) if estimator is None else estimator
    outer = outer_lib.DEFAULT if outer is None else outer
    if isinstance(outer, str):
        outer = outer_lib.by_name(outer)
    outer = optax.with_extra_args_support(outer)
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int | float)
                               or not 0 < budget < math.inf):
        raise ValueError(f"budget must be a positive number of seconds, got {budget!r}")
    size = checks.members(strategy, plan)
    checks.population(size, outer, task.space, online)
    if online:
        window = online_of(estimator).window
        most = task.steps // window
        if most < 1:
            raise ValueError(f"online tuning trains windows of {window} steps, longer than the "
                             f"task's {task.steps} steps: use a window of at most "
                             f"{task.steps}")
        meta_steps = most if meta_steps is None else min(meta_steps, most)
    if meta_steps is None and budget is None:
        if isinstance(strategy, Local):
            raise ValueError("meta_steps must be a positive integer, got None (or give "
                             "budget, in seconds)")
        budget = DEFAULT_BUDGET
    if state is None:
        checks.start(task.space.init() if phi is None else phi, task.space, guard.max_phi)
    else:
        checks.state(state, task.space, size, key, lambda phis, keys: states(
            task, estimator, outer, phis, keys, online))
    if workdir is not None:
        from hypergrad.tune import saving  # file IO, only when asked (it wraps this loop)

        return saving.tune_in(
            workdir, save_every=save_every, began=began, task=task, estimator=estimator,
            outer=outer, key=key, budget=budget, meta_steps=meta_steps, strategy=strategy,
            phi=phi, devices=devices, online=online, resample=resample, clip=clip,
            guard=guard, callback=callback, progress=progress, state=state, plan=plan)
    keys_n = strategy.keys
    phi0 = task.space.init() if phi is None else phi

    early = None
    if state is None:
        early = _compile_early(task, estimator, outer, strategy, phi0, key, devices,
                               online=online, resample=resample, clip=clip, guard=guard,
                               keys=keys_n)
        plan = strategy.plan(task, key, phi0, budget=budget, began=began, keys=keys_n)
    elif plan is None:
        n = int(np.shape(state.meta_step)[0])
        plan = Plan(None, None if n == 1 and population is None else n, None, [], None)
    size = 1 if plan.population is None else int(plan.population)
    if size < 1:
        raise ValueError(f"population must be at least 1, got {plan.population}")
    mesh = population_lib.make_mesh(population_lib.device_count(size, devices))
    keys = population_lib.member_keys(key, size)
    if state is None:
        state = states(task, estimator, outer, plan.phis, keys, online)
    run = _Run(task, estimator, outer, strategy, guard, mesh, size, plan, key, keys,
               online=online, resample=resample, clip=clip, keys_n=keys_n, early=early)
    return run.loop(state, meta_steps=meta_steps, budget=budget, began=began,
                    callback=callback, progress=progress, phi0=phi0)


class _Run:
    """One call of :func:`tune` after its arguments are settled: the compiled steps, the
    reactions to members that stop, and the History at the end."""

    def __init__(self, task, estimator, outer, strategy, guard, mesh, size, plan, key, keys,
                 *, online, resample, clip, keys_n, early=None):
        self.task, self.estimator, self.outer = task, estimator, outer
        self.strategy, self.guard, self.mesh, self.size = strategy, guard, mesh, size
        self.plan, self.key, self.online, self.resample = plan, key, online, resample
        self.clip, self.keys_n = clip, keys_n
        self.population = plan.population
        # What the run has done with its plan, kept in the plan's memory (JSON-ready) so a
        # checkpoint carries it (Plan.snapshot); a resumed plan's memory restores it.
        memory = self.memory = plan.memory if plan.memory is not None else {}
        memory.setdefault("queue_used", 0)
        self.queue = list(plan.queue)[memory["queue_used"]:]
        self.diagnosis: list[str] = memory.setdefault("diagnosis", [])
        self.placed = population_lib.put(task, mesh, replicate=True)
        self.keys = population_lib.put(keys, mesh)
        self.raw_keys = keys
        self.final = population_lib.vmapped(
            with_key(make_final(estimator, online=online, resample=resample, keys=keys_n)),
            mesh, size)
        self.sigma = -1.0
        self.step: Any = None
        self.done = 0
        self.early = early
        self.gains = memory.setdefault(
            "gains", {"refine": 0.0, "refine_s": 0.0, "explore": 0.0, "explore_s": 0.0})
        searcher = plan.searcher
        found = math.inf if searcher is None else float(searcher.best()[1])
        # each side's best so far (JSON has no inf: a restored None is inf)
        own = memory.setdefault("own", {"refine": math.inf, "explore": found})
        for k, v in own.items():
            own[k] = math.inf if v is None else v
        self.own = own
        if memory.get("restarted_at") is None:
            memory["restarted_at"] = math.inf

    def _step_fn(self, sigma: float, cap: float | None):
        return with_key(make_step(
            self.estimator, self.outer, online=self.online, clip=self.clip, guard=self.guard,
            resample=self.resample, keys=self.keys_n, sigma=sigma, cap=cap))

    def build(self, sigma: float, cap: float | None) -> None:
        if sigma != self.sigma:
            self.sigma = sigma
            jitted = population_lib.vmapped(self._step_fn(sigma, cap), self.mesh, self.size)
            self.step = jitted
            if sigma == 0 and self.early is not None:
                compiled = self.early.result()
                if compiled is not None:
                    self.step = _Fallback(compiled[0], jitted)
                    self.final = _Fallback(compiled[1], self.final)

    def loop(self, state, *, meta_steps, budget, began, callback, progress, phi0) -> History:
        from tqdm.auto import tqdm

        space, guard = self.task.space, self.guard
        state = population_lib.put(population_lib.host(state), self.mesh)
        done = self.done = int(np.asarray(population_lib.host(state.meta_step))[0])
        limit = sys.maxsize if meta_steps is None else meta_steps
        metrics_list: list[dict[str, Any]] = []
        records: list[dict[str, Any]] = []
        seconds: list[float] = []
        clock: list[float] = []
        stopped, stop_reason = None, "meta_steps"
        retired = np.asarray(population_lib.host(state.retired))
        bar = tqdm(total=meta_steps, initial=done, desc="meta-step" if self.population is None
                   else f"meta-step (P={self.size})", unit="step", disable=not progress,
                   dynamic_ncols=True)
        i = done
        with bar:
            while i < limit:
                if (retired != ACTIVE).all():
                    break
                # A meta-step like the last, and the evaluation after the loop.
                if budget is not None and seconds and \
                        time.perf_counter() - began + 1.5 * seconds[-1] > budget:
                    stop_reason = "budget"
                    break
                if budget is not None and time.perf_counter() - began >= budget and (
                        seconds or self.plan.explored is not None):
                    stop_reason = "budget"  # (a run with nothing scored yet takes one step)
                    break
                if self.step is None:  # built when needed: waits for an early compilation
                    self.build(float(np.max(population_lib.host(state.sigma))),
                               self._cap(state))
                t0 = time.perf_counter()
                state, m = self.step(self.placed, state, self.keys)
                m = population_lib.host(m)
                before, retired = retired, np.asarray(population_lib.host(state.retired))
                inner = np.asarray(population_lib.host(state.inner_step)) \
                    if self.online else None
                rec = record(space, i, m, before != ACTIVE, retired, guard, self.population,
                             inner)
                seconds.append(time.perf_counter() - t0)
                clock.append(time.perf_counter() - began)
                rec["seconds"] = seconds[-1]
                if (retired != ACTIVE).all() and not self._can_react(before, retired):
                    stopped = rec["stopped"] = _stop_message(i, retired, guard)
                    stop_reason = "retired"
                metrics_list.append(m)
                records.append(rec)
                if "val_loss" in rec:
                    bar.set_postfix_str(f"val={rec['val_loss']:.4f}")
                bar.update(1)
                newly = np.nonzero((before == ACTIVE) & (retired != ACTIVE))[0]
                if newly.size and stopped is None:
                    state = self.react(state, newly, i)
                    retired = np.asarray(population_lib.host(state.retired))
                if self.plan.searcher is not None and stopped is None:
                    state = self.share(state, m, seconds[-1], i, budget, began)
                    if self._late(i, meta_steps, budget, began):
                        state = self.exploit(state, i)
                    retired = np.asarray(population_lib.host(state.retired))
                # After the strategy's reactions: a checkpoint made here resumes exactly.
                if callback is not None:
                    callback(rec, state)
                i += 1
        if stop_reason == "budget":
            self.diagnosis.append(f"budget spent: {budget:g} s after {i} meta-steps")
        if metrics_list:
            end_values = np.asarray(population_lib.host(
                self.final(self.placed, state, self.keys)), float)
        else:  # no step was taken: nothing moved
            end_values = np.full(self.size, np.nan)
        return self.history(population_lib.host(state), metrics_list, records, seconds, clock,
                            end_values, stopped, stop_reason, state, phi0)

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
                            _at(host.phi, 0))

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

    # -- the result -----------------------------------------------------------------

    def history(self, s: TuneState, metrics, records, seconds, clock, end_values,
                stopped, stop_reason, state, phi0) -> History:
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
            phi_j, last_j = _at(s.phi, j), _at(s.last_phi, j)
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
            best_phi = _at(s.best_phi, j)
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
        best, final = _pick(bests + extra), _pick(finals)
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
        return _assemble(space, metrics, records, seconds, clock, population, self.size,
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
                p = _at(self.plan.phis, 0)
                return Point(0, v, p, _natural(self.task.space, p),
                             None if self.population is None else 0)
        return None

    def _rescore(self, finals, bests, start, extra):
        """Every candidate (each member's final and best point, the start, the search's
        best few) scored on :data:`RESCORE_KEYS` fresh keys: the mean and its standard
        error."""
        ks = strategies_lib.scoring_keys(jax.random.fold_in(self.key, _RESCORE_STREAM),
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


def _compile_early(task, estimator, outer, strategy, phi0, key, devices, **options):
    """The meta-step of a strategy's refinement, compiled in a thread while the strategy
    explores (on a CPU, compiling a CNN's reverse-mode meta-step takes longer than
    tens of training runs, and the exploration leaves a core to it); ``None`` where the
    shapes are not known in advance (a population sharded over devices)."""
    members = getattr(strategy, "members", None)
    if members is None or not getattr(strategy, "explore", 0):
        return None  # nothing to overlap the compilation with
    size = int(members)
    try:
        if population_lib.device_count(size, devices) > 1:
            return None
    except population_lib.DeviceError:
        return None  # the loop says what is wrong with the devices
    keys = population_lib.member_keys(key, size)
    phis = jax.tree.map(lambda a: jnp.broadcast_to(a, (size, *jnp.shape(a))), phi0)
    template = jax.eval_shape(lambda: states(task, estimator, outer, phis, keys,
                                              options["online"]))
    fn = population_lib.vmapped(with_key(make_step(estimator, outer, **options)), None, size)
    final = population_lib.vmapped(with_key(make_final(
        estimator, online=options["online"], resample=options["resample"],
        keys=options["keys"])), None, size)
    placed = population_lib.put(task, None, replicate=True)

    def build():
        try:
            return (fn.lower(placed, template, keys).compile(),
                    final.lower(placed, template, keys).compile())
        except Exception:  # noqa: BLE001 - the loop compiles them the usual way instead
            return None

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hypergrad-compile")
    future = pool.submit(build)
    pool.shutdown(wait=False)
    return future


class _Fallback:
    """A compiled meta-step, or the jitted one where the arguments' shapes differ."""

    def __init__(self, compiled, jitted):
        self.compiled, self.jitted = compiled, jitted

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except (TypeError, ValueError):
                self.compiled = None
        return self.jitted(*args)


def _at(tree: PyTree, j: int | None) -> PyTree:
    return tree if j is None else jax.tree.map(lambda x: np.asarray(x)[j], tree)


def _natural(space, phi: PyTree) -> PyTree:
    return jax.tree.map(np.asarray, space.constrain(phi))


def _pick(points: list[Point | None]) -> Point:
    return min((p for p in points if p is not None), key=lambda p: p.val_loss)


def _stop_message(i: int, retired: np.ndarray, guard: Guard) -> str:
    codes = set(retired.tolist())
    code = codes.pop() if len(codes) == 1 else None
    if code is not None and code != ACTIVE:
        return f"stopped after meta-step {i}: {guard.retirement(code)}"
    return (f"stopped after meta-step {i}: every member stopped ("
            + "; ".join(sorted({guard.retirement(c) for c in retired.tolist() if c})) + ")")


def _assemble(space, metrics, records, seconds, clock, population, size, best, final, bests,
              finals, stopped, stop_reason, diagnosis, explored, start, state,
              strategy) -> History:
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
    return History(
        val_loss=stack("val_loss"), train_loss=stack("train_loss"),
        hypergrad_norm=stack("hypergrad_norm"), accepted=stack("accepted").astype(bool),
        point_ok=stack("point_ok").astype(bool), scale=stack("scale"),
        seconds=np.asarray(seconds, float), hparams=stack_tree("hparams"),
        hypergrad=stack_tree("hypergrad"), line_search=line_search, records=records,
        best=best, final=final, bests=bests, finals=finals, stopped=stopped,
        explored=explored, population=population, state=state, start=start,
        clock=np.asarray(clock, float), stop_reason=stop_reason, diagnosis=diagnosis,
        strategy=strategy, phis=stack_tree("phi") if metrics else None,
        groups={n: list(c.layout.groups) for n, c in space.constraints.items()
                if c.layout is not None and c.layout.groups is not None})
