"""Black-box baselines: grid search, random search and Optuna's TPE.

Every method scores a configuration exactly as the hypergradient runs do: the validation
loss of :func:`hypergrad.unroll.objective` (train ``task.steps`` inner steps from the
task's initial weights with ``space.constrain(phi)``, then the validation loss), with the
same ``key``, so the weights' initialization and the minibatch order are the same for
every configuration and every method. Configurations are drawn in the unconstrained
coordinates ``phi`` and scored a batch at a time by one ``jax.vmap``-ed, jitted training
run (one compile per batch size).

The search box is uniform in ``phi`` between two bounds given in natural units (see
:func:`box`): log-uniform for a positive hyperparameter, logit-uniform for one in the
unit interval or a bounded interval, uniform for a real one. Default bounds, around each
hyperparameter's initial value ``v``:

- positive: ``v / 100`` to ``100 v`` (four decades);
- unit, bounded: ``logit`` of the value ``+-4`` (momentum 0.5: 0.018 to 0.982);
- real: ``v - 1`` to ``v + 1``.

Each method returns a :class:`SearchResult`: every configuration it scored, in order,
with its validation loss and the wall time at which that loss was known, so a best-so-far
curve against time can be drawn and compared with a hypergradient run's.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hypergrad.hparams import HyperSpace
from hypergrad.task import Task
from hypergrad.unroll import objective

PyTree = Any

_WIDTH = {"positive": math.log(100.0), "unit": 4.0, "bounded": 4.0, "real": 1.0}


class SearchResult(NamedTuple):
    """The configurations a search scored, in the order it scored them.

    Attributes:
      method: the method's name (``"grid"``, ``"random"``, ``"tpe"``, ...).
      phi: the configurations in unconstrained coordinates, stacked: each leaf has a
        leading axis of length ``n`` (numpy arrays).
      val_loss: ``float64[n]``, each configuration's validation loss (``inf`` where the
        training run was not finite).
      seconds: ``float64[n]``, wall time from the start of the search until that loss was
        known, compilation included (a batch's configurations share its finish time).
    """

    method: str
    phi: PyTree
    val_loss: np.ndarray
    seconds: np.ndarray

    @property
    def best_index(self) -> int:
        """The index of the lowest validation loss (the first, on ties)."""
        return int(np.argmin(self.val_loss))

    @property
    def best_val_loss(self) -> float:
        return float(self.val_loss[self.best_index])

    @property
    def best_phi(self) -> PyTree:
        """The best configuration, in unconstrained coordinates."""
        i = self.best_index
        return jax.tree.map(lambda a: a[i], self.phi)

    def best_so_far(self) -> np.ndarray:
        """``float64[n]``: the lowest validation loss among the first ``i + 1``."""
        return np.minimum.accumulate(self.val_loss)


def box(space: HyperSpace, bounds: Mapping[str, tuple[Any, Any]] | None = None,
        dtype: Any = None) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """The search box ``(low, high)`` in unconstrained coordinates, shaped like ``phi``.

    Args:
      space: the hyperparameters.
      bounds: ``{name: (low, high)}`` in natural units (scalars or arrays that broadcast
        to the hyperparameter's shape), each strictly inside the constraint's interval;
        a name left out gets the default range in the module docstring.
      dtype: as in :meth:`HyperSpace.init`.
    """
    bounds = dict(bounds or {})
    unknown = sorted(set(bounds) - set(space.names))
    if unknown:
        raise KeyError(f"bounds for unknown hyperparameter(s) {unknown}; this space has "
                       f"{space.names}")
    phi0 = space.init(dtype)
    low, high = {}, {}
    for name, c in space.constraints.items():
        if name in bounds:
            lo, hi = bounds[name]
            c.check(lo, f"the lower bound of {name}")
            c.check(hi, f"the upper bound of {name}")
            lo, hi = _like(c, lo, phi0[name]), _like(c, hi, phi0[name])
            if not all(bool(jnp.all(a < b)) for a, b in zip(jax.tree.leaves(lo),
                                                            jax.tree.leaves(hi), strict=True)):
                raise ValueError(f"bounds of {name} need low < high, got {bounds[name]}")
        else:
            width = _WIDTH[c.kind]
            lo = jax.tree.map(lambda p, w=width: p - w, phi0[name])
            hi = jax.tree.map(lambda p, w=width: p + w, phi0[name])
        low[name], high[name] = lo, hi
    return low, high


def _like(c: Any, value: Any, phi: PyTree) -> PyTree:
    """``phi`` coordinates of the natural ``value``, broadcast to every leaf of ``phi``."""
    return jax.tree.map(
        lambda p: c.to_phi(jnp.broadcast_to(jnp.asarray(value, p.dtype), p.shape)), phi)


def make_evaluate(task: Task, key: jax.Array, *, checkpoint: Any = None
                  ) -> Callable[[PyTree], np.ndarray]:
    """``evaluate(phis) -> float64[n]``: the validation loss of each stacked configuration.

    ``phis`` is ``phi`` with a leading axis of length ``n`` on every leaf. All ``n``
    training runs are one ``jax.vmap`` of :func:`hypergrad.unroll.objective` under one
    ``jax.jit``, so each batch size compiles once. A non-finite loss comes back as ``inf``.
    """

    @jax.jit
    def losses(task, phis, key):
        return jax.vmap(lambda p: objective(task, p, key, checkpoint=checkpoint)[0])(phis)

    def evaluate(phis: PyTree) -> np.ndarray:
        out = np.asarray(jax.device_get(losses(task, phis, key)), dtype=np.float64)
        return np.where(np.isfinite(out), out, np.inf)

    return evaluate


def _check_limits(num: int | None, budget: float | None, what: str) -> None:
    if num is None and budget is None:
        raise ValueError(f"give {what} or budget (seconds), or both")
    if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num <= 0):
        raise ValueError(f"{what} must be a positive integer, got {num!r}")
    if budget is not None and not budget > 0:
        raise ValueError(f"budget must be a positive number of seconds, got {budget!r}")


def _check_batch(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _stack(phis: Sequence[PyTree]) -> PyTree:
    return jax.tree.map(lambda *a: np.stack(a), *phis)


def _run_batches(method: str, evaluate, batches, budget: float | None) -> SearchResult:
    """Score each batch from the iterator ``batches`` until it ends or ``budget`` passes.

    ``batches`` yields stacked ``phi`` and receives (by ``send``) each batch's losses.
    """
    began = time.perf_counter()
    phis, losses, seconds = [], [], []
    try:
        batch = next(batches)
        while True:
            loss = evaluate(batch)
            now = time.perf_counter() - began
            phis.append(jax.tree.map(np.asarray, batch))
            losses.append(loss)
            seconds.append(np.full(loss.shape, now))
            if budget is not None and now >= budget:
                break
            batch = batches.send(loss)
    except StopIteration:
        pass
    phi = jax.tree.map(lambda *a: np.concatenate(a), *phis)
    return SearchResult(method, phi, np.concatenate(losses), np.concatenate(seconds))


def grid_search(
    task: Task, key: jax.Array, values: Mapping[str, Sequence[Any]] | None = None, *,
    points: int = 3, bounds: Mapping[str, tuple[Any, Any]] | None = None,
    batch_size: int = 8, budget: float | None = None, checkpoint: Any = None,
    dtype: Any = None,
) -> SearchResult:
    """Score every combination of the given values (their Cartesian product, in order).

    Args:
      task, key: the problem and the key every training run uses.
      values: ``{name: [value, ...]}`` in natural units; an array hyperparameter takes
        each value for all its entries. ``None`` grids every hyperparameter at ``points``
        values evenly spaced in ``phi`` across :func:`box` (``bounds``): the centres of
        ``points`` equal cells (with the default box, an odd ``points`` includes the
        initial value). A hyperparameter
        left out of ``values`` keeps its initial value.
      batch_size: configurations per ``vmap``-ed evaluation (the last batch may be short).
      budget: stop after the batch during which this many seconds have passed.
    """
    space = task.space
    _check_batch(batch_size)
    if budget is not None and not budget > 0:
        raise ValueError(f"budget must be a positive number of seconds, got {budget!r}")
    phi0 = space.init(dtype)
    if values is None:
        if isinstance(points, bool) or not isinstance(points, int) or points < 1:
            raise ValueError(f"points must be a positive integer, got {points!r}")
        low, high = box(space, bounds, dtype)
        axes = {n: [low[n] + (high[n] - low[n]) * (i + 0.5) / points for i in range(points)]
                for n in space.names}
    else:
        if not values:
            raise ValueError("the grid is empty: give values for at least one hyperparameter")
        unknown = sorted(set(values) - set(space.names))
        if unknown:
            raise KeyError(f"grid values for unknown hyperparameter(s) {unknown}; this space "
                           f"has {space.names}")
        axes = {}
        for name, vals in values.items():
            vals = list(vals)
            if not vals:
                raise ValueError(f"the grid of {name} is empty; give at least one value")
            c = space.constraints[name]
            for v in vals:
                c.check(v, f"grid value of {name}")
            axes[name] = [_like(c, v, phi0[name]) for v in vals]
    names = list(axes)

    def configs():
        for combo in itertools.product(*(axes[n] for n in names)):
            yield {**phi0, **dict(zip(names, combo, strict=True))}

    def batches():
        it = configs()
        while chunk := list(itertools.islice(it, batch_size)):
            yield _stack(chunk)

    return _run_batches("grid", make_evaluate(task, key, checkpoint=checkpoint), batches(),
                        budget)


def random_search(
    task: Task, key: jax.Array, num_samples: int | None = None, *, seed: int = 0,
    bounds: Mapping[str, tuple[Any, Any]] | None = None, batch_size: int = 8,
    budget: float | None = None, checkpoint: Any = None, dtype: Any = None,
) -> SearchResult:
    """Score configurations drawn uniformly in ``phi`` over :func:`box` (log-uniform for
    positive hyperparameters), until ``num_samples`` are scored or ``budget`` seconds pass.

    The draws depend only on ``seed`` and ``batch_size`` (not on ``key``), so the same
    seed gives the same configurations in the same order; with ``budget`` alone, how
    many are scored depends on the machine.

    Args:
      task, key: the problem and the key every training run uses.
      num_samples: how many configurations at most.
      seed: seeds the draws.
      bounds: see :func:`box`.
      batch_size: configurations per ``vmap``-ed evaluation.
      budget: stop after the batch during which this many seconds have passed.
    """
    _check_limits(num_samples, budget, "num_samples")
    _check_batch(batch_size)
    return _run_batches("random", make_evaluate(task, key, checkpoint=checkpoint),
                        _random_draws(task.space, num_samples, seed, bounds, batch_size, dtype),
                        budget)


def _random_draws(space: HyperSpace, num_samples: int | None, seed: int,
                  bounds: Mapping[str, tuple[Any, Any]] | None, batch_size: int, dtype: Any):
    """:func:`random_search`'s configurations, ``batch_size`` stacked at a time."""
    low, high = box(space, bounds, dtype)
    draw_key = jax.random.key(seed)

    @jax.jit
    def draw(k):
        lows, treedef = jax.tree.flatten(low)
        keys = jax.random.split(k, len(lows))
        draws = [jax.random.uniform(kk, (batch_size, *lo.shape), lo.dtype, lo, hi)
                 for kk, lo, hi in zip(keys, lows, jax.tree.leaves(high), strict=True)]
        return jax.tree.unflatten(treedef, draws)

    done = 0
    while num_samples is None or done < num_samples:
        n = batch_size if num_samples is None else min(batch_size, num_samples - done)
        draw_key, k = jax.random.split(draw_key)
        # A short last batch is a full draw, cut: the same configurations either way.
        yield jax.tree.map(lambda a, n=n: a[:n], jax.device_get(draw(k)))
        done += n


def explore(task: Task, key: jax.Array, num_samples: int, *, phi: PyTree | None = None,
            seed: int | None = None, bounds: Mapping[str, tuple[Any, Any]] | None = None,
            dtype: Any = None) -> tuple[PyTree, SearchResult]:
    """A start for hypergradient refinement: the best of ``phi`` (default the space's
    initial values) and ``num_samples`` configurations of :func:`random_search` (same
    box, ``bounds`` and ``key``), by validation loss; and the search's result.

    A hypergradient run moves from its start by small steps; a random phase first finds
    the region a black-box search would, and the hypergradient then descends from there
    (:func:`hypergrad.tune`'s ``explore``). The start is scored too (one more training
    run, by the same compiled program), so exploring never starts worse than not
    exploring. ``seed`` seeds the draws; ``None`` derives it from ``key``, so one key
    gives the same draws from Python and from ``hypergrad run``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    if seed is None:
        seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    evaluate = make_evaluate(task, key)  # batches of one: a single compile
    found = _run_batches("random", evaluate,
                         _random_draws(task.space, num_samples, seed, bounds, 1, dtype), None)
    phi = task.space.init(dtype) if phi is None else phi
    start = float(evaluate(_stack([jax.device_get(phi)]))[0])
    if math.isfinite(found.best_val_loss) and not found.best_val_loss >= start:
        phi = jax.tree.map(lambda a, like: jnp.asarray(a, jnp.result_type(like)),
                           found.best_phi, phi)
    return phi, found


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ImportError('tpe_search needs optuna: pip install -e ".[bench]"') from None
    return optuna


def param_label(path: tuple) -> str:
    """``name``, or ``name/part/...`` for a leaf inside a hyperparameter's tree."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                    for k in path)


def optuna_space(space: HyperSpace, bounds: Mapping[str, tuple[Any, Any]] | None = None,
                 dtype: Any = None) -> tuple[dict[str, Any], Callable[[dict[str, float]], PyTree]]:
    """Optuna distributions over :func:`box`, one per entry of every leaf of ``phi``
    (named ``name`` or ``name[i]``), and ``params -> phi``."""
    optuna = _optuna()
    low, high = box(space, bounds, dtype)
    flat_low, treedef = jax.tree_util.tree_flatten_with_path(jax.device_get(low))
    flat_high = jax.tree.leaves(jax.device_get(high))
    entries: list[tuple[str, int, int]] = []  # (label, leaf index, flat index)
    for j, (path, leaf) in enumerate(flat_low):
        label = param_label(path)
        entries.extend((label if leaf.ndim == 0 else f"{label}[{i}]", j, i)
                       for i in range(leaf.size))
    dists = {label: optuna.distributions.FloatDistribution(
        float(np.ravel(flat_low[j][1])[i]), float(np.ravel(flat_high[j])[i]))
        for label, j, i in entries}

    def to_phi(params):
        flat = [np.array(np.ravel(leaf), copy=True) for _, leaf in flat_low]
        for label, j, i in entries:
            flat[j][i] = params[label]
        return jax.tree.unflatten(
            treedef, [f.reshape(leaf.shape) for f, (_, leaf) in zip(flat, flat_low, strict=True)])

    return dists, to_phi


def tpe_search(
    task: Task, key: jax.Array, num_trials: int | None = None, *, seed: int = 0,
    bounds: Mapping[str, tuple[Any, Any]] | None = None, batch_size: int = 1,
    budget: float | None = None, checkpoint: Any = None, dtype: Any = None,
    n_startup_trials: int = 10,
) -> SearchResult:
    """Optuna's Tree-structured Parzen Estimator over :func:`box`, one parameter per entry.

    Each entry of each hyperparameter is one Optuna float parameter (``name`` for a
    scalar, ``name[i]`` for entry ``i`` of an array, ``name/path[i]`` inside a tree),
    uniform in ``phi`` over the box.
    TPE asks ``batch_size`` configurations at a time (1 = fully sequential, the usual
    TPE), scores them in one ``vmap``-ed evaluation and tells Optuna the losses; a
    non-finite loss is told as a failed trial. Needs the ``[bench]`` extra (optuna).

    Args:
      task, key: the problem and the key every training run uses.
      num_trials: how many configurations at most.
      seed: seeds the sampler.
      bounds: see :func:`box`.
      batch_size: configurations asked and scored together.
      budget: stop after the batch during which this many seconds have passed.
      n_startup_trials: random trials before TPE starts modelling.
    """
    optuna = _optuna()
    _check_limits(num_trials, budget, "num_trials")
    _check_batch(batch_size)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials)
    study = optuna.create_study(sampler=sampler, direction="minimize")
    dists, to_phi = optuna_space(task.space, bounds, dtype)

    def batches():
        done = 0
        while num_trials is None or done < num_trials:
            n = batch_size if num_trials is None else min(batch_size, num_trials - done)
            trials = [study.ask(dists) for _ in range(n)]
            losses = yield _stack([to_phi(t.params) for t in trials])
            for trial, loss in zip(trials, losses, strict=True):
                if np.isfinite(loss):
                    study.tell(trial, float(loss))
                else:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
            done += n

    return _run_batches("tpe", make_evaluate(task, key, checkpoint=checkpoint), batches(),
                        budget)
