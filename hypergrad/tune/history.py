"""What a tuning run did: :class:`History` and :class:`Point`, the JSON records of its
meta-steps, and their JSON codec (``History.save`` / ``History.load``)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from hypergrad.tune.guard import (
    OK,
    RETIRED_CHAOTIC,
    RETIRED_CONVERGED,
    RETIRED_STALLED,
    RETIRED_START,
    Guard,
)

PyTree = Any


class Point(NamedTuple):
    """An evaluated point: the meta-step it was evaluated at (``meta_steps`` for the point
    after the last update, ``-1`` for a point of the exploration phase), its validation
    loss, ``phi`` and ``hparams`` (natural units); ``member`` is the population member
    (``None`` for a single run); ``stderr`` the standard error of ``val_loss`` where it is
    a mean over fresh keys (a stochastic task's re-scored point), else ``None``."""

    meta_step: int
    val_loss: float
    phi: PyTree
    hparams: PyTree
    member: int | None = None
    stderr: float | None = None


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
    meta-step, ``(meta_steps,)``), ``clock`` (seconds from the call of :func:`tune` to
    the end of each meta-step, compilation and exploration included) and ``line_search``
    (nonlinear CG's ``step``, ``evals``, ``failed``, or ``None``). A value the guard
    rejected is kept as evaluated (it may be NaN). ``records`` are the same meta-steps as
    JSON-ready dicts (as ``metrics.jsonl`` holds them).

    ``best`` and ``final`` are :class:`Point`\\ s, finite and never worse than the start
    (of the best member for a population; ``bests`` and ``finals`` have one per member,
    ``None`` for a member with no accepted point); for a stochastic task they are
    re-scored on fresh keys (``Point.stderr``). ``start`` is the starting point as the
    run scored it. ``stopped`` says why the run ended early, if it did (``None`` when it
    ran its meta-steps); ``stop_reason`` why it ended in any case (``"meta_steps"``,
    ``"budget"``, ``"retired"``); ``diagnosis`` what the run saw and did, one sentence
    each (converged members, chaos and the smoothing that answered it, restarts, a better
    explored region than the refinement reached, an online run that ended worse than its
    start). ``state`` is the loop's last :class:`~hypergrad.tune.step.TuneState` (to
    continue it: ``tune(..., state=history.state)``); ``explored`` the
    :class:`hypergrad.search.SearchResult` of an exploration phase (``None`` without one;
    not saved by :meth:`save`); ``strategy`` the strategy's name. ``groups`` names, for
    each hyperparameter with one value per group of weights (``per="layer"``, a
    function, pairs), its groups in the order of the value's last axis: see
    :meth:`by_group`.
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
    state: Any = None
    start: Point | None = None
    clock: np.ndarray | None = None
    stop_reason: str = "meta_steps"
    diagnosis: list[str] = dataclasses.field(default_factory=list)
    strategy: str = "local"
    phis: PyTree = None
    groups: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def by_group(self, name: str, value: Any = None) -> dict[str, np.ndarray]:
        """A grouped hyperparameter's values labelled by group (layer).

        Without ``value``, its value at each meta-step (``hparams[name]``); with one
        (``history.best.hparams[name]``), that value. Each group's entry is the value's
        last axis at that group's index (a schedule's steps and a population's members
        stay in front). A History read by :meth:`load` has the records' summaries: each
        group's value per meta-step, or its mean over a schedule's steps.
        """
        if name not in self.groups:
            grouped = ", ".join(self.groups) or "none"
            raise KeyError(f"{name!r} has no groups (grouped hyperparameters: {grouped}); "
                           "per-parameter values are trees labelled by the weights' paths")
        array = np.asarray(self.hparams[name] if value is None else value)
        return {g: array[..., i] for i, g in enumerate(self.groups[name])}

    def then(self, later: History) -> History:
        """This run followed by ``later``, the run that went on from it
        (``tune(..., state=history.state)``): one History over every meta-step.

        Per-step arrays and records are joined (``later``'s clock counted from the end of
        this run's), ``best``/``bests`` are the better of the two, and ``final``,
        ``finals``, ``state`` and how the run ended are ``later``'s; ``start`` and
        ``explored`` are this run's, ``diagnosis`` both runs' in order.
        """
        if later.population != self.population:
            raise ValueError(f"later has population {later.population}, this run "
                             f"{self.population}: it did not go on from this run")
        if not len(self):
            return later

        def join(a: Any, b: Any) -> Any:
            if a is None or b is None or (isinstance(a, dict) and not a) or \
                    (isinstance(b, dict) and not b):
                return b if a is None or (isinstance(a, dict) and not a) else a
            return jax.tree.map(lambda x, y: np.concatenate([np.asarray(x), np.asarray(y)]),
                                a, b)

        def better(a: Point | None, b: Point | None) -> Point | None:
            if a is None or b is None:
                return a if b is None else b
            return b if b.val_loss <= a.val_loss else a

        offset = float(self.clock[-1]) if self.clock is not None and len(self.clock) else 0.0
        clock = None if self.clock is None or later.clock is None else \
            np.concatenate([self.clock, later.clock + offset])
        best = better(self.best, later.best)
        assert best is not None
        return dataclasses.replace(
            later, val_loss=join(self.val_loss, later.val_loss),
            train_loss=join(self.train_loss, later.train_loss),
            hypergrad_norm=join(self.hypergrad_norm, later.hypergrad_norm),
            accepted=join(self.accepted, later.accepted),
            point_ok=join(self.point_ok, later.point_ok), scale=join(self.scale, later.scale),
            seconds=join(self.seconds, later.seconds), clock=clock,
            hparams=join(self.hparams, later.hparams),
            hypergrad=join(self.hypergrad, later.hypergrad),
            line_search=join(self.line_search, later.line_search),
            phis=join(self.phis, later.phis), records=self.records + later.records,
            best=best, bests=[better(a, b) for a, b in zip(self.bests, later.bests,
                                                           strict=True)],
            start=self.start, explored=self.explored,
            diagnosis=self.diagnosis + later.diagnosis,
            groups=later.groups or self.groups)

    def __len__(self) -> int:
        return len(self.records)

    def __eq__(self, other: object) -> bool:
        """Equal when what :meth:`save` writes is equal (so a History equals the one
        :meth:`load` reads back; ``state``, ``explored`` and the per-step hypergradients,
        which it does not write, are not compared). The generated comparison would test
        NumPy arrays for truth and raise."""
        if not isinstance(other, History):
            return NotImplemented
        canonical = lambda h: json.dumps(h.to_json(), sort_keys=True)  # noqa: E731
        return canonical(self) == canonical(other)

    __hash__ = None  # type: ignore[assignment]  # mutable, as the generated one

    def trace(self) -> Any:
        """Every point the run evaluated, in order, as a
        :class:`hypergrad.search.SearchResult` (``method="hypergrad"``): the exploration
        search's configurations and each meta-step's points (every member's; a point the
        guard rejected for a non-finite or divergent loss counts as ``inf``), ordered by
        the seconds since :func:`tune` was called at which each was known. Comparable with a
        black-box search's result under the same budget."""
        from hypergrad.search import SearchResult

        phis, losses, seconds = [], [], []
        if self.explored is not None:
            n = len(self.explored.val_loss)
            phis += [jax.tree.map(lambda a, i=i: np.asarray(a[i]), self.explored.phi)
                     for i in range(n)]
            losses += np.asarray(self.explored.val_loss, float).tolist()
            seconds += np.asarray(self.explored.seconds, float).tolist()
        clock = self.clock if self.clock is not None else np.cumsum(self.seconds)
        if self.phis is not None and len(self.records):
            size = 1 if self.population is None else self.population
            for i in range(len(self.records)):
                for j in range(size):
                    at = (i,) if self.population is None else (i, j)
                    phis.append(jax.tree.map(lambda a, at=at: np.asarray(a[at]), self.phis))
                    v = np.asarray(self.val_loss)[at]
                    reason = self.records[i].get("reason") if self.population is None \
                        else self.records[i]["members"][j].get("reason")
                    bad = not np.isfinite(v) or reason in ("non-finite", "divergent")
                    losses.append(math.inf if bad else float(v))
                    seconds.append(float(clock[i]))
        if not phis:
            phis, losses, seconds = [self.best.phi], [self.best.val_loss], [0.0]
        # The black-box search may run between meta-steps: in the order they were known.
        order = np.argsort(np.asarray(seconds, float), kind="stable")
        phis = [phis[k] for k in order]
        losses = [losses[k] for k in order]
        seconds = [seconds[k] for k in order]
        stacked = jax.tree.map(lambda *a: np.stack(a), *phis)
        return SearchResult("hypergrad", stacked, np.asarray(losses, float),
                            np.asarray(seconds, float))

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
        return json_safe({
            "records": self.records, "best": _point_json(self.best),
            "final": _point_json(self.final),
            "bests": [p and _point_json(p) for p in self.bests],
            "finals": [p and _point_json(p) for p in self.finals],
            "start": self.start and _point_json(self.start),
            "stopped": self.stopped, "stop_reason": self.stop_reason,
            "diagnosis": self.diagnosis, "strategy": self.strategy,
            "population": self.population, "groups": self.groups})

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
        history = cls.from_records(data["records"], data.get("population"),
                                   data.get("groups", {}))
        history.best, history.final = _point(data["best"]), _point(data["final"])
        history.bests = [p and _point(p) for p in data["bests"]]
        history.finals = [p and _point(p) for p in data["finals"]]
        history.start = data.get("start") and _point(data["start"])
        history.stopped = data.get("stopped")
        history.stop_reason = data.get("stop_reason", "meta_steps")
        history.diagnosis = list(data.get("diagnosis", []))
        history.strategy = data.get("strategy", "local")
        return history

    @classmethod
    def from_records(cls, records: list[dict[str, Any]], population: int | None = None,
                     groups: Mapping[str, list[str]] | None = None) -> History:
        """The per-step part of a History from its JSON records alone (``metrics.jsonl``'s
        lines): ``val_loss`` (NaN where rejected), ``train_loss``, ``hypergrad_norm``,
        ``accepted``, ``seconds`` and each hyperparameter's value or mean (each group's,
        for the hyperparameters ``groups`` names); no points."""
        history = _from_records(list(records), population)
        history.groups = {n: list(g) for n, g in (groups or {}).items()}
        for name, g in history.groups.items():  # (meta_steps, [P,] groups)
            history.hparams[name] = _grouped(history.records, population, name, g)
        return history

    @classmethod
    def load(cls, path: str | Path) -> History:
        """Read a History written by :meth:`save`."""
        return cls.from_json(json.loads(Path(path).read_text()))


def _point_json(p: Point) -> dict[str, Any]:
    return {"meta_step": p.meta_step, "val_loss": p.val_loss, "member": p.member,
            "stderr": p.stderr, "phi": _lists(p.phi), "hparams": _lists(p.hparams)}


def _point(d: Mapping[str, Any]) -> Point:
    return Point(d["meta_step"], d["val_loss"], _arrays(d["phi"]), _arrays(d["hparams"]),
                 d["member"], d.get("stderr"))


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


def _grouped(records: list[dict[str, Any]], population: int | None, name: str,
             groups: list[str]) -> np.ndarray:
    """A grouped hyperparameter per meta-step from the records' summaries (each group's
    value, or its mean over a schedule's steps; NaN where the step was rejected)."""

    def entry(e: Mapping[str, Any]) -> list[float]:
        h = e.get("hparams", {}).get(name)
        if not (isinstance(h, dict) and "groups" in h):
            return [math.nan] * len(groups)
        return [_scalar(h["groups"][g]) for g in groups]

    if population is None:
        return np.asarray([entry(r) for r in records], float).reshape(-1, len(groups))
    return np.asarray([[entry(m) for m in r["members"]] for r in records],
                      float).reshape(-1, population, len(groups))


def _scalar(summary: Any) -> float:
    return summary["mean"] if isinstance(summary, dict) else summary


#: A rejected point's ``reason`` in its record.
REASON_NAMES = {1: "non-finite", 2: "divergent", 3: "increase", 4: "out-of-range"}


def member_record(space, m: Mapping[str, Any], j: int, retired_before: bool,
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
        rho = float(pick(m["rho"]))
        if math.isfinite(rho):
            entry["rho"] = rho
        if "line_search" in m:
            ls = m["line_search"]
            entry["line_search"] = {"step": float(pick(ls["step"])),
                                    "evals": int(pick(ls["evals"])),
                                    "failed": bool(pick(ls["failed"]))}
    else:
        reason = int(pick(m["reason"]))
        scale = float(pick(m["scale"]))
        sigma = float(pick(m["sigma"])) if "sigma" in m else 0.0
        # While smoothing, the guard compares the loss smoothed at scale sigma.
        loss = f"validation loss smoothed at scale {sigma:.3g}" if sigma > 0 else \
            "validation loss"
        what = guard.rejection(reason if reason != OK else 4,
                               value=float(pick(m["judged"])),
                               gnorm=float(pick(m["hypergrad_norm"])),
                               last=float(pick(m["last_value"])), loss=loss)
        entry["reason"] = REASON_NAMES.get(reason, "out-of-range")
        entry["rejected_val_loss"] = float(pick(m["val_loss"]))
        entry["warning"] = f"{what}; step rejected, outer step scale now {scale:g}"
    if state_retired == RETIRED_START:
        entry["warning"] = entry.get("warning", "") + (
            "; the starting point itself was rejected and re-evaluating it gives the same "
            "result: this member stops")
    elif state_retired in (RETIRED_STALLED, RETIRED_CONVERGED, RETIRED_CHAOTIC):
        entry["stopped"] = guard.retirement(state_retired)
    elif state_retired:
        entry["warning"] = entry.get("warning", "") + (
            f"; retired after {guard.max_rejections} rejections in a row")
    return entry


def record(space, i: int, m: Mapping[str, Any], retired_before: np.ndarray,
           retired: np.ndarray, guard: Guard, population: int | None,
           inner_step: np.ndarray | None) -> dict[str, Any]:
    """The JSON record of meta-step ``i`` (``metrics.jsonl``'s line)."""
    out: dict[str, Any] = {"meta_step": i}
    if population is None:
        out |= member_record(space, m, 0, bool(retired_before[0]), int(retired[0]), guard)
        if inner_step is not None and "val_loss" in out:
            out["inner_step"] = int(inner_step[0])
        return out
    entries = [{"member": j, **member_record(space, m, j, bool(retired_before[j]),
                                             int(retired[j]), guard)}
               for j in range(population)]
    vals = [e["val_loss"] if "val_loss" in e else math.inf for e in entries]
    if math.isfinite(min(vals)):
        b = int(np.argmin(vals))
        out |= {k: entries[b][k] for k in ("val_loss", "train_loss", "hparams",
                                           "hypergrad_norm")}
        out["best_member"] = b
    else:
        out["warning"] = "every member's step was rejected or retired"
    out["members"] = entries
    return out


def assemble(space, metrics, records, seconds, clock, population, size, best, final, bests,
              finals, stopped, stop_reason, diagnosis, explored, start, state,
              strategy) -> History:
    """The :class:`History` of a finished loop from its per-meta-step metrics and records
    and the points it chose."""
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
