"""A run's files around :func:`hypergrad.tune`: ``tune(..., workdir=PATH)`` from Python,
and the pieces ``hypergrad run`` (:mod:`hypergrad.run`) shares with it.

:class:`RunFiles` keeps a run's checkpoint (the loop's state and a JSON ``meta``), its
``metrics.jsonl`` and its ``hparams/`` files as the loop's callback goes, and resumes them;
:func:`summary_of` is ``summary.json``; :func:`tune_in` is ``tune``'s ``workdir=``. The files,
their names and formats are the command line's (:mod:`hypergrad.workdir`), so ``hypergrad
plot`` and :func:`hypergrad.plots.plot_run` read either; a Python run adds
``history.json`` (:meth:`History.save`) and its ``config.json`` describes the call.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hypergrad import population as population_lib
from hypergrad import validation
from hypergrad import workdir as files
from hypergrad.messages import clip as clip_text
from hypergrad.messages import show
from hypergrad.tune import checks, step
from hypergrad.tune.history import History, Point, json_safe
from hypergrad.tune.strategies import Plan

PyTree = Any
#: The arguments a resumed ``tune(..., workdir=)`` call may change.
RESUMABLE = ("meta_steps", "budget", "save_every")
#: A finished Python run's History (:meth:`History.save`).
HISTORY = "history.json"


class Interrupted(RuntimeError):
    """The run stopped on SIGINT/SIGTERM after saving a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class RunFiles:
    """A run's checkpoint, ``metrics.jsonl`` and ``hparams/`` files as the loop's callback
    writes them: the one implementation ``hypergrad run`` and ``tune(..., workdir=)`` share.

    ``meta`` (JSON, saved beside the state) holds ``meta_step`` (the meta-steps the state has
    taken), ``elapsed`` (seconds the run has taken, across resumes) and what the caller
    keeps there; ``plan`` is the strategy's :class:`Plan`, whose :meth:`Plan.snapshot` (a
    search's size and the loop's memory) is saved as ``meta["strategy"]`` for an exact
    resume, or, for a plan without a search that carries the loop's memory, that memory as
    ``meta["memory"]``.
    """

    def __init__(self, workdir: Path, space, population: int | None, *, save_every: int,
                 began: float, plan: Plan | None = None):
        self.workdir, self.space, self.population = workdir, space, population
        self.save_every, self.began, self.plan = save_every, began, plan
        self.path = workdir / files.CHECKPOINT
        self.log = files.MetricsLog(workdir)
        self.meta: dict[str, Any] = {}
        self.before = 0.0  # seconds the run took before this process (a resumed one)

    def start(self, state, meta: dict[str, Any]) -> None:
        """A new run: an empty log, the state before the first meta-step checkpointed (and
        its hyperparameters, where any is an array)."""
        self.meta = meta
        self._remember()
        self.log.start()
        files.save_checkpoint(self.path, population_lib.host(state), meta)
        if self.population is None:
            files.save_hparams(self.workdir, self.space, population_lib.member(state.phi, 0), 0)

    def resume(self, template) -> tuple[Any, dict[str, Any]]:
        """The checkpoint's state (shaped like ``template``) and meta; then :meth:`keep`."""
        state, self.meta = files.load_checkpoint(self.path, population_lib.host(template))
        self.before = float(self.meta["elapsed"])
        return state, self.meta

    def keep(self) -> list[dict[str, Any]]:
        """Drop the log's lines past the checkpoint; the records kept."""
        self.log.keep(self.meta["meta_step"])
        text = self.log.path.read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines()]

    def save(self, state, meta_step: int) -> None:
        """Checkpoint ``state`` after ``meta_step`` meta-steps (with its hyperparameters)."""
        self.meta["meta_step"] = meta_step
        self.meta["elapsed"] = self.before + time.perf_counter() - self.began
        self._remember()
        host = population_lib.host(state)
        if self.population is None:
            files.save_hparams(self.workdir, self.space, population_lib.member(host.phi, 0),
                               meta_step)
        files.save_checkpoint(self.path, host, self.meta)

    def write(self, record: dict[str, Any], state) -> bool:
        """Append a meta-step's record; checkpoint every ``save_every`` meta-steps. Whether
        it checkpointed."""
        self.log.write(record)
        done = record["meta_step"] + 1
        if done % self.save_every == 0:
            self.save(state, done)
            return True
        return False

    def _remember(self) -> None:
        plan = self.plan
        snapshot = None if plan is None else plan.snapshot()
        if snapshot is not None:
            self.meta["strategy"] = snapshot
        elif plan is not None and plan.memory is not None:
            self.meta["memory"] = plan.memory

    def __enter__(self) -> RunFiles:
        self.log.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.log.__exit__(*exc)


def summary_of(history: History, space, meta: dict[str, Any], state, *, done: int,
            seconds: float, head: dict[str, Any] | None = None,
            scores: tuple[list, list] | None = None, online: bool = False,
            devices: int = 1) -> dict[str, Any]:
    """``summary.json``: the best member's initial, final and best validation loss and
    hyperparameters, how the run ended and, for a population, every member's.

    ``meta["initial"]`` and ``meta["initial_hparams"]`` hold each member's start;
    ``scores`` (``hypergrad run``'s) each member's final and best points' other scores
    (``test_loss``, ...), written beside them.
    """
    host = population_lib.host(state)
    size = len(history.finals)
    initials = meta.get("initial") or [{}] * size
    rows = []
    for m in range(size):
        final, best = history.finals[m], history.bests[m]
        initial = initials[m]
        row: dict[str, Any] = {
            "initial_val_loss": initial.get("val_loss"),
            "final_val_loss": final.val_loss if final else None,
            "final_meta_step": final.meta_step if final else None,
            "initial_hparams": meta["initial_hparams"][m],
            "final_hparams": space.summarize(final.hparams) if final else None,
            "best_val_loss": best.val_loss if best else None,
            "best_meta_step": best.meta_step if best else None,
            "best_hparams": space.summarize(best.hparams) if best else None,
        }
        if scores is not None:
            finals, bests = scores
            for k in finals[m]:
                if k != "val_loss":
                    row[f"initial_{k}"] = initial[k]
                    row[k] = finals[m][k] if final else None
                    if not online:
                        row[f"best_{k}"] = bests[m][k] if best else None
            row["test_scores"] = (
                f"{', '.join(k for k in finals[m] if k != 'val_loss')} are the final point's "
                f"(meta-step {final.meta_step})" + ("" if online else
                                                     "; best_* the best point's")
                if final else "no accepted point")
        row["rejected_meta_steps"] = int(host.rejected[m])
        rows.append(row)
    b = history.final.member or 0
    out: dict[str, Any] = {**(head or {}), **rows[int(b)], "meta_steps_run": done,
                           "stopped_early": history.stopped,
                           "stop_reason": history.stop_reason,
                           "strategy": history.strategy, "diagnosis": history.diagnosis}
    if "explored" in meta:
        out["explored"] = meta["explored"]
    if history.population is not None:
        finite = [r["final_val_loss"] for r in rows if r["final_val_loss"] is not None]
        out |= {
            "rejected_meta_steps": int(np.sum(host.rejected)), "population": size,
            "devices": devices, "best_member": int(b),
            "final_val_loss_spread": {"min": min(finite), "median": float(np.median(finite)),
                                      "max": max(finite)},
            "members": [{"member": m, **r, "retired": int(host.retired[m]) != 0}
                        for m, r in enumerate(rows)]}
    out["seconds"] = seconds
    return out


# -- tune(..., workdir=PATH) ---------------------------------------------------------------


def tune_in(workdir: str | os.PathLike, tune: Callable[..., History], *, save_every: int,
            began: float, task, estimator, outer, key: jax.Array, budget: float | None,
            meta_steps: int | None, strategy, phi: PyTree | None, devices: int,
            online: bool, resample: bool, clip: float, guard, callback: Callable | None,
            progress: bool, state, plan) -> History:
    """:func:`hypergrad.tune` with ``workdir``, its arguments checked and resolved (the
    strategy, estimator and outer optimizer chosen; ``meta_steps`` and ``budget`` as the
    loop reads them): a new run in a new or empty ``workdir``; the run there resumed from
    its checkpoint; or a finished run's History read back. ``tune`` is
    :func:`hypergrad.tune` itself, run with ``workdir=None`` (passed in: the loop imports
    this module)."""
    if state is not None or plan is not None:
        raise ValueError("workdir= resumes a run from its checkpoint: pass it without state= "
                         "and plan= (or continue a History in memory without workdir=)")
    if not isinstance(workdir, str | os.PathLike):
        raise TypeError(f"workdir must be a path (str or os.PathLike), got "
                        f"{type(workdir).__name__}")
    workdir = Path(workdir)
    files.check_path(workdir, "workdir")
    save_every = validation.integer("save_every", save_every, low=1)
    phi0 = task.space.init() if phi is None else phi
    config = describe(task, estimator, outer, strategy, key, phi, devices=devices,
                      online=online, resample=resample, clip=clip, guard=guard,
                      meta_steps=meta_steps, budget=budget, save_every=save_every)
    path = workdir / "config.json"
    made = _made(path, config) if path.is_file() else None
    if made is None:
        files.check_new(workdir, "workdir", hint="it holds no hg.tune run (no "
                        "config.json): choose another workdir")
        files.create(workdir)
    run = _Resumable(workdir, task, estimator, outer, strategy, key, phi0, online, began,
                     save_every)
    # From here on Ctrl-C (and SIGTERM) only sets a flag, checked when the meta-step in
    # flight ends: the run checkpoints, then raises Interrupted.
    with files.Lock(workdir), files.Signals() as signals:
        saved = run.finished(meta_steps)
        if saved is not None:
            return saved
        files.write_json(path, config)  # (a resumed call may change meta_steps)
        state, plan, records = run.open(budget)
        if signals.received is not None:  # while it planned (explored)
            run.keeper.save(state, run.keeper.meta["meta_step"])
            raise Interrupted(f"stopped by signal {signals.received} before the first "
                              f"meta-step; call hg.tune again with the same arguments and "
                              f"workdir={str(workdir)!r} to go on", signals.received)
        left = None if budget is None else max(
            budget - run.keeper.before - (time.perf_counter() - began), 1e-9)
        clock = run.keeper.meta.setdefault("clock", [])

        def on_step(record, state):
            if record["meta_step"] == 0:
                run.at_first(record, state)
            clock.append(run.keeper.before + time.perf_counter() - began)
            saved = run.keeper.write(record, state)
            if signals.received is not None:
                if not saved:
                    run.keeper.save(state, record["meta_step"] + 1)
                raise Interrupted(
                    f"stopped by signal {signals.received} after meta-step "
                    f"{record['meta_step']}; checkpoint saved: call hg.tune again with the "
                    f"same arguments and workdir={str(workdir)!r} to go on",
                    signals.received)
            if callback is not None:
                callback(record, state)

        with run.keeper:
            later = tune(task, estimator, outer, key=key, budget=left,
                         meta_steps=meta_steps, strategy=strategy, phi=phi, devices=devices,
                         online=online, resample=resample, clip=clip, guard=guard,
                         callback=on_step, progress=progress, state=state, plan=plan)
        return run.finish(later, records, devices)


class _Resumable:
    """One ``tune(..., workdir=)`` call's work in its locked workdir."""

    def __init__(self, workdir, task, estimator, outer, strategy, key, phi0, online, began,
                 save_every):
        self.workdir, self.task, self.estimator, self.outer = workdir, task, estimator, outer
        self.strategy, self.key, self.phi0, self.online = strategy, key, phi0, online
        self.began = began
        self.keeper = RunFiles(workdir, task.space, None, save_every=save_every, began=began)
        self.resumed = False

    def template(self, size: int):
        """A state shaped like the run's (its values are the checkpoint's)."""
        phis = jax.tree.map(lambda a: jnp.broadcast_to(a, (size, *jnp.shape(a))), self.phi0)
        return step.states(self.task, self.estimator, self.outer, phis,
                           population_lib.member_keys(self.key, size), self.online)

    def size(self) -> int:
        size = checks.members(self.strategy, None)
        if size is None:
            raise ValueError(f"workdir= resumes runs of hg.Local and hg.ExploreRefine; "
                             f"{type(self.strategy).__name__} does not say its population "
                             "before it plans")
        return size

    def finished(self, meta_steps: int | None) -> History | None:
        """A finished run's History (its state from the checkpoint), where the call asks
        for no more meta-steps than it ran; ``None`` otherwise (``history.json`` removed:
        the run goes on)."""
        path = self.workdir / HISTORY
        if not path.is_file() or not self.keeper.path.is_file():
            return None
        try:
            saved = History.load(path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise files.WorkdirError(f"{path} is unreadable ({type(e).__name__}); remove it "
                                     "to finish the run again from its checkpoint") from None
        if meta_steps is not None and meta_steps > len(saved) and \
                saved.stop_reason != "retired":
            path.unlink()
            return None
        size = 1 if saved.population is None else saved.population
        saved.state, _ = files.load_checkpoint(self.keeper.path, population_lib.host(
            self.template(size)))
        return saved

    def open(self, budget):
        """The state and plan to go on from, and the records kept: the checkpoint's, or a
        new run's (planned, its start checkpointed)."""
        task, strategy, keeper = self.task, self.strategy, self.keeper
        if keeper.path.is_file():
            state, meta = keeper.resume(self.template(self.size()))
            if meta["meta_step"] > 0:
                self.resumed = True
                population = meta["population"]
                if meta.get("strategy") is not None:
                    if not hasattr(strategy, "resume"):
                        raise ValueError(f"{type(strategy).__name__} cannot resume its plan "
                                         "(it has no resume method)")
                    plan = strategy.resume(task, self.key, self.phi0, meta["strategy"],
                                           began=self.began, keys=strategy.keys)
                else:  # no search to score again: the loop's memory alone
                    plan = Plan(None, population, None, [], None, None,
                                meta.get("memory") or {})
                keeper.population, keeper.plan = population, plan
                return state, plan, keeper.keep()
            keeper.before = 0.0  # nothing done yet: start again
        plan = strategy.plan(task, self.key, self.phi0, budget=budget, began=self.began,
                             keys=strategy.keys)
        if plan.memory is None:  # kept in the checkpoint, the loop's memory resumes
            plan = plan._replace(memory={})
        size = 1 if plan.population is None else int(plan.population)
        state = step.states(task, self.estimator, self.outer, plan.phis,
                            population_lib.member_keys(self.key, size), self.online)
        hp = population_lib.host(task.space.constrain(state.phi))
        meta: dict[str, Any] = {
            "meta_step": 0, "elapsed": 0.0, "population": plan.population, "initial": None,
            "initial_hparams": [task.space.summarize(population_lib.member(hp, m))
                                for m in range(size)], "clock": []}
        if plan.explored is not None:
            explored = plan.explored
            meta["explored"] = {"evaluations": len(explored.val_loss),
                                "best_val_loss": explored.best_val_loss,
                                "seconds": float(explored.seconds[-1])}
        keeper.population, keeper.plan = plan.population, plan
        keeper.start(state, meta)
        return state, plan, []

    def at_first(self, record: dict[str, Any], state) -> None:
        """At meta-step 0: each member's initial validation loss (the start's, the point
        meta-step 0 evaluated) and the start as the loop scores it (member 0's point where
        it passed the guard), for a History resumed later."""
        entries = [record] if self.keeper.population is None else record["members"]
        values = [e.get("val_loss", e.get("rejected_val_loss")) for e in entries]
        self.keeper.meta["initial"] = [{"val_loss": v} for v in values]
        first = entries[0]
        ok = "val_loss" in first or first.get("reason") == "out-of-range"
        if ok and values[0] is not None and math.isfinite(values[0]):
            p = population_lib.member(population_lib.host(state.last_phi), 0)
            self.keeper.meta["start"] = {"val_loss": values[0], "phi": jax.tree.map(
                lambda a: np.asarray(a).tolist(), p)}

    def finish(self, later: History, records: list[dict[str, Any]], devices: int) -> History:
        """The final checkpoint, ``history.json``, ``summary.json`` and the figures; the
        History of the whole run."""
        keeper, state = self.keeper, later.state
        done = int(np.asarray(population_lib.host(state.meta_step))[0])
        keeper.save(state, done)
        whole = self._joined(records, later) if self.resumed else later
        files.write_text(self.workdir / HISTORY,
                         json.dumps(whole.to_json(), indent=1, allow_nan=False) + "\n")
        size = len(whole.finals)
        files.write_json(self.workdir / "summary.json", summary_of(
            whole, self.task.space, keeper.meta, state, done=done,
            seconds=keeper.before + time.perf_counter() - self.began, online=self.online,
            devices=population_lib.device_count(size, devices) if size > 1 else 1))

        from hypergrad import plots  # matplotlib only once there is something to draw

        plots.plot_run(self.workdir)
        return whole

    def _joined(self, records: list[dict[str, Any]], later: History) -> History:
        """The run before the resume, rebuilt from its records and checkpoint, followed by
        ``later`` (:meth:`History.then`). What the records do not hold (the hypergradients,
        ``phi`` and the step scale of each meta-step before the resume) is NaN."""
        meta, population = self.keeper.meta, self.keeper.population
        size = 1 if population is None else population
        k = len(records)
        first = History.from_records(records, population, later.groups)
        entries = [[r] if population is None else r["members"] for r in records]
        rejected = np.asarray([[e.get("rejected_val_loss", math.nan) for e in row]
                               for row in entries], float).reshape(first.val_loss.shape)
        ok = np.asarray([[("val_loss" in e or e.get("reason") == "out-of-range")
                          for e in row] for row in entries], bool).reshape(first.val_loss.shape)
        first.val_loss = np.where(np.isnan(first.val_loss), rejected, first.val_loss)
        first.point_ok = ok

        def nans(tree):  # later's per-step leaves, k rows of NaN
            return jax.tree.map(lambda a: np.full((k, *np.shape(a)[1:]), np.nan), tree)

        if len(later):
            first.hparams = {n: first.hparams[n] if n in first.hparams and isinstance(
                v, np.ndarray) and np.shape(first.hparams[n])[1:] == np.shape(v)[1:]
                else nans(v) for n, v in later.hparams.items()}
            first.hypergrad = nans(later.hypergrad)
            first.phis = None if later.phis is None else nans(later.phis)
            if later.line_search is not None:
                first.line_search = _line_search(entries, first.val_loss.shape)
        first.clock = np.asarray(meta.get("clock", [])[:k], float)
        first.explored = later.explored
        start = later.start
        if start is None and meta.get("start") is not None:
            leaves, treedef = jax.tree.flatten(self.phi0)  # the start's structure, dtypes
            stored = jax.tree.leaves(meta["start"]["phi"],
                                     is_leaf=lambda x: isinstance(x, list))
            p = jax.tree.unflatten(treedef, [np.asarray(s, np.asarray(t).dtype)
                                             for s, t in zip(stored, leaves, strict=True)])
            start = Point(0, meta["start"]["val_loss"], p, jax.tree.map(
                np.asarray, self.task.space.constrain(p)), None if population is None else 0)
        first.start = start
        # The best points are in the state the later run went on from (and the loop's
        # memory holds the diagnosis so far): later's, not joined again.
        first.best = None  # type: ignore[assignment]  # (then() takes later's)
        first.bests, first.finals = [None] * size, [None] * size
        first.diagnosis = []
        return first.then(later)


def _line_search(entries, shape) -> dict[str, np.ndarray]:
    """Nonlinear CG's line search per meta-step from the records (NaN, 0 and False where
    the step was rejected)."""
    def column(key, missing, dtype):
        return np.asarray([[e["line_search"][key] if "line_search" in e else missing
                            for e in row] for row in entries], dtype).reshape(shape)

    return {"step": column("step", math.nan, float), "evals": column("evals", 0, int),
            "failed": column("failed", False, bool)}


def _made(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The config of the run in ``path``'s folder, checked against this call's: a
    :class:`~hypergrad.workdir.WorkdirError` naming each difference but
    :data:`RESUMABLE`, before anything is written."""
    try:
        made = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise files.WorkdirError(f"{path} is unreadable ({type(e).__name__}); the run there "
                                 "cannot be resumed: choose another workdir") from None
    if not isinstance(made, dict) or made.get("call") != "hypergrad.tune":
        what = f"a `hypergrad run` of {made['experiment']!r}" if isinstance(made, dict) and \
            "experiment" in made else "not a hg.tune(..., workdir=) run"
        raise files.WorkdirError(f"{path.parent} holds {what}; choose another workdir "
                                 "(a command-line run resumes with hypergrad run --resume)")
    changed = [f"{k} {show(made.get(k), 40)} -> {show(config.get(k), 40)}"
               for k in dict.fromkeys([*made, *config])
               if k not in RESUMABLE and made.get(k) != config.get(k)]
    if changed:
        raise files.WorkdirError(
            f"{path.parent} holds a run of another call ({'; '.join(changed)}): pass the "
            "arguments it was made with to resume it, or choose another workdir")
    return made


def describe(task, estimator, outer, strategy, key, phi, *, devices, online, resample, clip,
             guard, meta_steps, budget, save_every) -> dict[str, Any]:
    """``config.json`` of ``tune(..., workdir=)``: the call, as far as JSON can say it.

    The space (its repr, and every ``phi`` leaf's shape and dtype), the task's horizon,
    batch size and data shapes, the estimator's name and options, the outer optimizer as
    the names and values its functions close over (optax keeps a transformation's
    arguments there: ``optax.adam(0.05)`` and ``optax.adam(0.1)`` differ), the strategy's
    fields, the key's data, a digest of a given start ``phi``, and the other arguments.
    The data's values and the losses' code are not compared.
    """
    phi0 = task.space.init() if phi is None else phi
    flat = jax.tree_util.tree_flatten_with_path(phi0)[0]
    data = {name: [list(np.shape(x)) for x in jax.tree.leaves(getattr(task, name))]
            for name in ("train_data", "val_data") if getattr(task, name, None) is not None}
    config = {
        "call": "hypergrad.tune",
        "space": repr(task.space),
        "phi": {jax.tree_util.keystr(p): [list(np.shape(x)), str(jnp.result_type(x))]
                for p, x in flat},
        "start": "space.init()" if phi is None else _digest(phi),
        "task": {"steps": task.steps, "batch_size": task.batch_size, "data": data},
        "estimator": {"name": estimator.name, "options": _plain(estimator.options)},
        "outer": _plain(outer),
        "strategy": {"type": type(strategy).__name__, **_plain(
            dataclasses.asdict(strategy) if dataclasses.is_dataclass(strategy)
            and not isinstance(strategy, type) else {})},
        "key": np.asarray(jax.random.key_data(key)).tolist(),
        "devices": devices, "online": online, "resample": resample, "clip": clip,
        "guard": _plain(guard._asdict()),
        "meta_steps": meta_steps, "budget": budget, "save_every": save_every}
    return json.loads(json.dumps(json_safe(config)))


def _digest(tree: PyTree) -> str:
    h = hashlib.sha256()
    for x in jax.tree.leaves(tree):
        x = np.asarray(x)
        h.update(f"{x.dtype}{x.shape}".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    return "sha256:" + h.hexdigest()[:16]


def _plain(x: Any, depth: int = 0) -> Any:
    """``x`` as JSON can say it: numbers, strings and small arrays as they are; a function
    as its qualified name and what its closure holds (to a depth); containers item by
    item; anything else by its type's name (never a repr with an address in it)."""
    if x is None or isinstance(x, bool | int | float | str):
        return x
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray | jax.Array):
        return np.asarray(x).tolist() if np.size(x) <= 16 else _digest(x)
    if depth > 8:
        return "…"
    if isinstance(x, dict):
        return {str(k): _plain(v, depth + 1) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return [_plain(v, depth + 1) for v in x]
    if isinstance(x, functools.partial):
        return {"partial": _plain(x.func, depth + 1), "args": _plain(x.args, depth + 1),
                "keywords": _plain(x.keywords, depth + 1)}
    if callable(x) and hasattr(x, "__code__"):
        out: dict[str, Any] = {"function": f"{x.__module__}.{x.__qualname__}"}
        cells = []
        for cell in x.__closure__ or ():
            try:
                cells.append(_plain(cell.cell_contents, depth + 1))
            except ValueError:  # an empty cell
                cells.append(None)
        if cells:
            out["closure"] = cells
        return out
    return clip_text(type(x).__name__)
