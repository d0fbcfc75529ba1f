"""Tuning strategies: where the meta-steps start, and what replaces a member that stops.

A strategy is a small frozen object with one method, :meth:`plan`, that returns the
starting points of the refinement (one, or a population), a queue of further starts and,
optionally, a :class:`Searcher` that goes on between meta-steps; and two switches the
loop reads: ``restart`` (replace a member that converged, stalled or was retired with
the search's best point, the next start of the queue, then a perturbation of the best
point so far) and ``smooth`` (when a member finds the objective chaotic at the step's
scale, switch every member to the hypergradient of the loss smoothed at that scale).
The loop (:func:`hypergrad.tune.tune`) is the same for all of them: a new strategy is a
new object, not a branch in the loop.

- :class:`Local`: today's run: one start (``phi``) or a population around it, an
  optional random phase choosing the start (``explore``), nothing replaced.
- :class:`ExploreRefine` (the default): a black-box search of the box first (15% of
  the budget), then hypergradient refinement from the given start (and the best
  explored starts, for a population) while the search goes on between meta-steps, each
  side getting time by its recent progress (in seconds with a budget, in trainings
  without one, so a run of ``meta_steps`` is the same on every machine); restarts from
  the search's best point when a member settles, and once in the last quarter of the
  run where the search's best is below every member's best (the refinement is stuck in
  a worse basin); smoothing where the objective is chaotic. A stochastic task (a train
  loss that takes a ``key``) has its best candidates re-scored on fresh keys.

Chosen by ``scripts/bench_hpo.py`` (docs/benchmarks/search.md):
starting the refinement at the explored best lost to the given start on (d) (0.19 against
0.13: the search's one-value-per-name reduction of 14 220 hyperparameters misleads), and
restarting a member whenever the search found better threw Adam's state away each time.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hypergrad import population as population_lib
from hypergrad import search
from hypergrad.task import Task
from hypergrad.unroll import objective
from hypergrad.validation import keywords

PyTree = Any

#: Hyperparameter arrays with more scalars than this, in all, are explored with one value
#: per name (broadcast to every coordinate), as the black-box methods search a reduction.
TIED_ABOVE = 32


class Plan(NamedTuple):
    """What a strategy starts from.

    Attributes:
      phis: the refinement's starts, stacked on a leading member axis.
      population: ``None`` for a single run, else the number of members.
      explored: the exploration phase as a :class:`hypergrad.search.SearchResult`
        (``seconds`` from the call of :func:`hypergrad.tune.tune`), or ``None``.
      queue: further starts, best first, for members that stop.
      start: the validation loss of the run's starting point (``phi``) where the plan
        scored it, else ``None``.
      searcher: the black-box search that explored, to go on between meta-steps (the
        loop shares the time between it and the refinement by their recent gains), or
        ``None``.
      memory: what the loop has done with the plan so far (starts taken from the queue,
        the time shared, the diagnosis), a JSON-ready dict the loop updates in place;
        with the search's size, :meth:`snapshot` saves it in a checkpoint and
        :meth:`ExploreRefine.resume` rebuilds the plan from it.
    """

    phis: PyTree
    population: int | None
    explored: search.SearchResult | None
    queue: list[PyTree]
    start: float | None
    searcher: Any = None
    memory: dict[str, Any] | None = None

    def snapshot(self) -> dict[str, Any] | None:
        """The plan's state for a checkpoint (``None`` without a search): the loop's
        memory and the number of configurations the search has scored."""
        if self.searcher is None or self.memory is None:
            return None
        return dict(self.memory, evaluations=len(self.searcher.losses))


@dataclasses.dataclass(frozen=True)
class Local:
    """A local run from ``phi``: a single run, or ``population`` members at ``phi`` and
    ``phi + spread * N(0, 1)``; with ``explore``, the best of ``explore`` random
    configurations and ``phi`` is the start (:func:`hypergrad.search.explore`)."""

    population: int | None = None
    spread: float = 0.5
    explore: int = 0
    smooth: bool = False
    restart: bool = False
    keys: int | None = 1
    name: str = "local"

    def plan(self, task: Task, key: jax.Array, phi: PyTree, *, budget: float | None,
             began: float, keys: int) -> Plan:
        """The start (after the random phase, with ``explore``) and the population around
        it; nothing queued, no search between meta-steps."""
        del budget
        explored = None
        if self.explore:
            if self.population is not None:
                raise ValueError("explore picks one start: it needs a single run (population "
                                 "None) that does not continue a state")
            phi, explored = search.explore(task, key, self.explore, phi=phi)
            explored = explored._replace(
                seconds=explored.seconds + (time.perf_counter() - began
                                            - float(explored.seconds[-1])))
        size = 1 if self.population is None else int(self.population)
        first = jax.random.wrap_key_data(population_lib.member_keys(key, size)[0])
        phis = jax.jit(population_lib.member_phis, static_argnums=(1,))(
            phi, size, self.spread, first)
        return Plan(phis, self.population, explored, [], None)


@dataclasses.dataclass(frozen=True)
class ExploreRefine:
    """Explore the search box, then refine the best starts by hypergradient.

    Attributes:
      explore: the exploration's size: a number of configurations (an ``int``), or the
        fraction of the budget it may take (a ``float`` below 1; without a budget,
        ``explore_default`` configurations). The start (``phi``) is scored first, so the
        run never starts worse than it.
      members: starts refined at once, as one vmapped population (1: one at a time).
      smooth: answer chaos at the step's scale by smoothing (see the module docstring).
      restart: replace a member that stops by the next start, and late in the run move
        the worst member to the search's best point where that is better than every
        member's best (``Reactions.exploit`` in :mod:`hypergrad.tune.reactions`).
      keys: keys each configuration is scored on, and the meta-step's hypergradient
        averaged over (1: the run's key; a stochastic task is searched on that one draw
        of its noise, cheaply, and its best candidates are then re-scored on fresh keys,
        so the choice is not the minimum of single draws; more keys cost as many
        training runs per evaluation).
      bounds: the search box in natural units (:func:`hypergrad.search.box`).
      explore_default: configurations explored when there is no budget to size it.
    """

    explore: int | float = 0.15
    members: int = 1
    smooth: bool = True
    restart: bool = True
    keys: int = 1
    bounds: Any = None
    explore_default: int = 24
    name: str = "explore-refine"

    def plan(self, task: Task, key: jax.Array, phi: PyTree, *, budget: float | None,
             began: float, keys: int) -> Plan:
        """Search the box for the first part of the budget, then return the given start
        (and, for a population, the best explored starts), the other explored starts as
        a queue, and the :class:`Searcher` to go on between meta-steps."""
        if isinstance(self.explore, float) and not 0 < self.explore < 1:
            raise ValueError(f"explore as a fraction of the budget must be in (0, 1), got "
                             f"{self.explore}")
        if isinstance(self.explore, float):
            count, until = (None, began + self.explore * budget) if budget else \
                (self.explore_default, math.inf)
        else:
            count, until = int(self.explore), math.inf
        return self._plan(task, key, phi, began, keys, count, until)

    def resume(self, task: Task, key: jax.Array, phi: PyTree, memory: dict[str, Any], *,
               began: float, keys: int) -> Plan:
        """The plan of a run continued from a checkpoint: the exploration and the search
        between meta-steps scored again, as many configurations as ``memory`` (a
        :meth:`Plan.snapshot`) says they had scored, so the search and its queue are as
        they were (the search is deterministic given its key and the number of draws);
        the loop's memory restored."""
        explored, total = int(memory["explored"]), int(memory["evaluations"])
        plan = self._plan(task, key, phi, began, keys, explored - 1, math.inf)
        plan.searcher.run(count=total - explored)
        assert plan.memory is not None
        plan.memory.update(memory)
        return plan

    def _plan(self, task: Task, key: jax.Array, phi: PyTree, began: float, keys: int,
              count: int | None, until: float) -> Plan:
        low, high = search.box(task.space, self.bounds, jnp.result_type(
            *jax.tree.leaves(phi)))
        searcher = Searcher(task, key, keys, low, high, began)
        searcher.add(jax.device_get(phi))
        searcher.run(count=count, until=until)
        explored = searcher.result()
        phis, loss = searcher.phis, explored.val_loss
        order = [int(j) for j in np.argsort(loss, kind="stable") if np.isfinite(loss[j])]
        starts = _distinct([phis[j] for j in order], low, high)
        if not starts:
            starts = [phis[0]]
        size = max(1, int(self.members))
        # The first member refines from the given start (a hypergradient run from a
        # worse-scoring start can end far lower: on 14 220 hyperparameters the search's
        # one-value-per-name reduction misleads), the others from the best explored
        # starts; fewer distinct starts than members: the best ones again (a
        # population's shape is fixed before the exploration ends).
        given = jax.device_get(phi)
        rest = [p for p in starts if p is not phis[0]] or [given]
        chosen = [given] + [rest[m % len(rest)] for m in range(size - 1)]
        queue = rest[size - 1:]
        like = lambda p: jax.tree.map(  # noqa: E731
            lambda a, b: jnp.asarray(a, jnp.result_type(b)), p, phi)
        stacked_starts = jax.tree.map(lambda *a: jnp.stack(a), *[like(p) for p in chosen])
        return Plan(stacked_starts, None if size == 1 else size, explored,
                    [like(p) for p in queue], float(loss[0]), searcher,
                    {"explored": len(loss)})


Local.__init__ = keywords(Local.__init__, "Local")  # type: ignore[method-assign]
ExploreRefine.__init__ = keywords(  # type: ignore[method-assign]
    ExploreRefine.__init__, "ExploreRefine")


class Searcher:
    """A black-box search of the box ``[low, high]`` (in ``phi`` coordinates) that keeps
    every evaluation: Latin-hypercube draws over the whole box first, then a mixture of
    those (a quarter) and Gaussian perturbations of the best points so far (a parent
    drawn by rank among the best five, a radius drawn log-uniformly between 1% and 30% of
    the box's width: several scales at once, nothing to adapt; half of them move every
    coordinate, half about two), clipped to the box. Large
    spaces (more than :data:`TIED_ABOVE` scalars) are searched one value per
    hyperparameter name, as the black-box baselines search a reduction."""

    def __init__(self, task: Task, key: jax.Array, keys: int, low: PyTree, high: PyTree,
                 began: float):
        self.evaluate = scorer(task, key, keys)
        self.low, self.high = jax.device_get(low), jax.device_get(high)
        self.tied = _size(low) > TIED_ABOVE
        self.key, self.began = key, began
        self.rng = np.random.default_rng(
            np.asarray(jax.random.key_data(key)).ravel().tolist() + [0x5EA]).spawn(1)[0]
        self.global_first = max(8, min(2 * _size(low), 32))
        self.phis: list[PyTree] = []
        self.losses: list[float] = []
        self.seconds: list[float] = []
        self.block: PyTree = None
        self.drawn = 0

    def add(self, phi: PyTree) -> float:
        """Score ``phi`` and keep it; its loss (``inf`` where not finite)."""
        loss = self.evaluate(phi)
        self.phis.append(phi)
        self.losses.append(loss)
        self.seconds.append(time.perf_counter() - self.began)
        return loss

    def best(self) -> tuple[PyTree, float]:
        """The best configuration scored so far and its loss."""
        i = int(np.argmin(self.losses))
        return self.phis[i], self.losses[i]

    def draw(self) -> PyTree:
        """The next configuration to score."""
        local = len(self.losses) > self.global_first and self.rng.uniform() >= 0.25
        if local and np.isfinite(np.min(self.losses)):
            ranked = np.argsort(self.losses, kind="stable")[:5]
            weights = 1.0 / (1.0 + np.arange(len(ranked)))
            parent = self.phis[int(self.rng.choice(ranked, p=weights / weights.sum()))]
            radius = math.exp(self.rng.uniform(math.log(0.01), math.log(0.3)))
            leaves, treedef = jax.tree.flatten(parent)
            shapes = [() if self.tied else np.shape(x) for x in leaves]
            sizes = [int(np.prod(sh)) for sh in shapes]
            n = sum(sizes)
            # Half the perturbations move every coordinate, half a few of them (about
            # two, at least one): in ten or more dimensions most good moves change few.
            mask = np.ones(n, bool)
            if self.rng.uniform() < 0.5 and n > 2:
                mask = self.rng.uniform(size=n) < 2.0 / n
                mask[self.rng.integers(n)] = True
            noise = self.rng.normal(size=n) * mask
            out, at = [], 0
            for x, lo, hi, sh, size in zip(leaves, jax.tree.leaves(self.low),
                                           jax.tree.leaves(self.high), shapes, sizes,
                                           strict=True):
                x, lo, hi = np.asarray(x), np.asarray(lo), np.asarray(hi)
                step = radius * (hi - lo) * noise[at:at + size].reshape(sh)
                out.append(np.clip(x + step, lo, hi).astype(x.dtype))
                at += size
            return jax.tree.unflatten(treedef, out)
        size = 64
        if self.drawn % size == 0:
            self.block = space_filling(self.low, self.high, size,
                                       jax.random.fold_in(self.key, self.drawn // size),
                                       tied=self.tied)
        phi = jax.tree.map(lambda a, j=self.drawn % size: np.asarray(a[j]), self.block)
        self.drawn += 1
        return phi

    def run(self, *, count: int | None = None, until: float = math.inf) -> list[float]:
        """Score ``count`` draws, or draws until the clock reads ``until`` (at least one
        when ``count`` is None); their losses. The draws depend on the key and on the
        losses scored so far, not on the clock: two searches that scored the same number
        of configurations are in the same state."""
        out: list[float] = []
        while True:
            if count is not None and len(out) >= count:
                break
            if count is None and out and time.perf_counter() >= until:
                break
            out.append(self.add(self.draw()))
        return out

    def result(self) -> search.SearchResult:
        """Every configuration scored, in order, as a search's result."""
        stacked = jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]), *self.phis)
        return search.SearchResult("explore", stacked, np.asarray(self.losses, float),
                                   np.asarray(self.seconds, float))


@jax.jit
def losses(task: Task, phi: PyTree, keys: jax.Array) -> jax.Array:
    """The validation loss after training with ``phi``, once per key of ``keys`` (a
    stacked key array): one compiled program per task and number of keys, shared by the
    exploration and the re-scoring of a stochastic task's points."""
    return jax.vmap(lambda k: objective(task, phi, k)[0])(keys)


def scoring_keys(key: jax.Array, keys: int) -> jax.Array:
    """The keys a configuration is scored on: ``key`` alone, or ``fold_in(key, k)`` for
    ``k < keys`` (as the meta-step's mean over keys)."""
    if keys == 1:
        return key[None]
    return jax.vmap(lambda k: jax.random.fold_in(key, k))(jnp.arange(keys))


def scorer(task: Task, key: jax.Array, keys: int):
    """``evaluate(phi) -> float``: the validation loss after training (the mean over
    :func:`scoring_keys`; ``inf`` where not finite), compiled once."""
    ks = scoring_keys(key, keys)

    def evaluate(phi) -> float:
        v = float(np.mean(np.asarray(losses(task, phi, ks))))
        return v if math.isfinite(v) else math.inf

    return evaluate


def space_filling(low: PyTree, high: PyTree, n: int, key: jax.Array, *,
                  tied: bool = False) -> PyTree:
    """``n`` points of a Latin hypercube in the box ``[low, high]`` (each coordinate's
    range cut into ``n`` strata, one point in each, strata paired at random), stacked on
    a leading axis; with ``tied``, one coordinate per leaf, broadcast to its shape."""
    leaves, treedef = jax.tree.flatten(low)
    highs = jax.tree.leaves(high)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    out = []
    for lo, hi in zip(leaves, highs, strict=True):
        lo, hi = np.asarray(lo), np.asarray(hi)
        shape = () if tied else lo.shape
        m = int(np.prod(shape))
        strata = np.stack([rng.permutation(n) for _ in range(m)], axis=-1) if m else \
            np.zeros((n, 0))
        u = (strata + rng.uniform(size=strata.shape)) / n
        u = u.reshape((n, *shape))
        out.append((lo + u * (hi - lo)).astype(lo.dtype) if not tied else
                   (lo + u.reshape((n,) + (1,) * lo.ndim) * (hi - lo)).astype(lo.dtype))
    return jax.tree.unflatten(treedef, out)


def _size(phi: PyTree) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(phi))


def _distinct(points: list[PyTree], low: PyTree, high: PyTree,
              fraction: float = 0.05) -> list[PyTree]:
    """``points`` without those within ``fraction`` of the box's width (root mean square
    per coordinate) of an earlier one."""
    width = np.concatenate([np.ravel(np.asarray(h) - np.asarray(lo)) for lo, h in
                            zip(jax.tree.leaves(low), jax.tree.leaves(high), strict=True)])
    flat = [np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(p)])
            for p in points]
    kept: list[int] = []
    for i, f in enumerate(flat):
        if all(np.sqrt(np.mean(((f - flat[j]) / width) ** 2)) > fraction for j in kept):
            kept.append(i)
    return [points[i] for i in kept]


#: The default strategy of :func:`hypergrad.tune.tune` and ``hypergrad run``.
DEFAULT = ExploreRefine()

#: Strategies by the name a config gives (``--set strategy=NAME``).
BY_NAME = {"explore-refine": DEFAULT, "local": Local()}


def chosen(strategy: Any = None, *, local: bool = False, population: int | None = None,
           spread: float = 0.5, explore: int = 0, online: bool = False) -> Any:
    """The strategy a run asks for: the one rule of :func:`hypergrad.tune.tune` and
    ``hypergrad run`` (``--set strategy=default``).

    ``strategy`` is an object, or a name of :data:`BY_NAME`, taken as given. ``None``
    (the default) is :data:`DEFAULT`, except where the run sets one of :class:`Local`'s
    own options: a ``population`` around the start, an ``explore`` phase that picks the
    start, ``online`` tuning (one training run), or ``local`` (``hg.tune`` given an
    estimator or a hyper-update, or a state to continue: a run as before the default
    strategy existed); then ``Local(population, spread, explore)``.
    """
    if strategy is None:
        if local or population is not None or explore or online:
            return Local(population=population, spread=spread, explore=explore)
        return DEFAULT
    if isinstance(strategy, str):
        try:
            return BY_NAME[strategy]
        except KeyError:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of "
                             f"{', '.join(BY_NAME)}") from None
    return strategy
