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
are re-scored on :data:`~hypergrad.tune.result.RESCORE_KEYS` fresh keys and chosen by the
mean (:mod:`hypergrad.tune.result`); an online run is compared with its start trained
the same way and returns the start if it ended worse.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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
from hypergrad.tune import checks, saving
from hypergrad.tune import strategies as strategies_lib
from hypergrad.tune.guard import ACTIVE, DEFAULT_GUARD, Guard
from hypergrad.tune.history import History, record
from hypergrad.tune.reactions import Reactions
from hypergrad.tune.result import Result
from hypergrad.tune.step import (
    DEFAULT_CLIP,
    TuneState,
    make_final,
    make_step,
    online_of,
    states,
    with_key,
)
from hypergrad.tune.strategies import Local, Plan
from hypergrad.validation import keywords

PyTree = Any

#: The budget (seconds) of a run given neither ``budget`` nor ``meta_steps``.
DEFAULT_BUDGET = 60.0


def default_estimator(task: Task) -> Estimator:
    """The estimator :func:`tune` uses when given none: the exact reverse-mode
    hypergradient through the whole unroll, with the checkpoint policy measured fastest
    on the backend (:func:`hypergrad.estimators.reverse`). One object for every call, so
    a later call's meta-step is the one already compiled (:func:`_members_step`)."""
    del task  # every task supports it; memory is bounded by the checkpoint policy
    return _default_reverse()


@functools.cache
def _default_reverse() -> Estimator:
    # Made on first use, not at import: building it reads the backend, which a
    # multi-host run must not initialize before jax.distributed.initialize().
    return reverse()


@functools.lru_cache(maxsize=32)
def _members_step(estimator: Estimator, outer: Any, mesh: Any, size: int,
                  **options: Any) -> Callable[..., Any]:
    """The population's jitted meta-step (:func:`hypergrad.tune.step.make_step` with
    ``options``), made once per estimator and outer object and settings: a later
    :func:`tune` call with the same ones (the same task and shapes) runs the program
    already compiled instead of compiling it again (a configuration compiles once)."""
    return population_lib.vmapped(with_key(make_step(estimator, outer, **options)), mesh,
                                  size)


@functools.lru_cache(maxsize=32)
def _members_final(estimator: Estimator, mesh: Any, size: int,
                   **options: Any) -> Callable[..., Any]:
    """The population's jitted final evaluation (:func:`hypergrad.tune.step.make_final`),
    made once like :func:`_members_step`."""
    return population_lib.vmapped(with_key(make_final(estimator, **options)), mesh, size)


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
        # The files around this loop: saving runs ``tune`` (given, so that it does not
        # import this module) with workdir=None and its own callback.
        return saving.tune_in(
            workdir, tune, save_every=save_every, began=began, task=task, estimator=estimator,
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


class _Run(Reactions, Result):
    """One call of :func:`tune` after its arguments are settled: the compiled steps and
    the host loop; the reactions while it goes (sharing time with the search, members
    that stop) are :class:`~hypergrad.tune.reactions.Reactions`', and the points and the
    History at the end :class:`~hypergrad.tune.result.Result`'s."""

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
        self.final = _members_final(estimator, mesh, size, online=online,
                                    resample=resample, keys=keys_n)
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


    def build(self, sigma: float, cap: float | None) -> None:
        if sigma != self.sigma:
            self.sigma = sigma
            jitted = _members_step(self.estimator, self.outer, self.mesh, self.size,
                                   online=self.online, clip=self.clip, guard=self.guard,
                                   resample=self.resample, keys=self.keys_n, sigma=sigma,
                                   cap=cap)
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
    fn = _members_step(estimator, outer, None, size, online=options["online"],
                       clip=options["clip"], guard=options["guard"],
                       resample=options["resample"], keys=options["keys"], sigma=0.0,
                       cap=None)
    final = _members_final(estimator, None, size, online=options["online"],
                           resample=options["resample"], keys=options["keys"])
    placed = population_lib.put(task, None, replicate=True)
    # The programs are fixed by the functions and the arguments' structure and shapes
    # (the task's functions and space among them): an earlier call's are reused.
    leaves, tree = jax.tree.flatten((placed, template, keys))
    signature = (fn, final, tree, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves))
    if signature in _EARLY:
        done: Future = Future()
        done.set_result(_EARLY[signature])
        return done

    def build():
        try:
            compiled = (fn.lower(placed, template, keys).compile(),
                        final.lower(placed, template, keys).compile())
        except Exception:  # noqa: BLE001 - the loop compiles them the usual way instead
            return None
        _EARLY[signature] = compiled
        while len(_EARLY) > 8:
            _EARLY.pop(next(iter(_EARLY)))
        return compiled

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hypergrad-compile")
    future = pool.submit(build)
    pool.shutdown(wait=False)
    return future


#: The meta-steps :func:`_compile_early` compiled, by functions and argument shapes.
_EARLY: dict[Any, Any] = {}


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


def _stop_message(i: int, retired: np.ndarray, guard: Guard) -> str:
    codes = set(retired.tolist())
    code = codes.pop() if len(codes) == 1 else None
    if code is not None and code != ACTIVE:
        return f"stopped after meta-step {i}: {guard.retirement(code)}"
    return (f"stopped after meta-step {i}: every member stopped ("
            + "; ".join(sorted({guard.retirement(c) for c in retired.tolist() if c})) + ")")
