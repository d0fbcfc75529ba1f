"""The tuning suite: hypergradients, black-box search and learning-rate-free optimizers.

Each method's best validation loss against wall time, on eight problems.

Run:  python scripts/bench_hpo.py [--budget 60] [--json bench_hpo.json] [--figure FILE]
      python scripts/bench_hpo.py --quick            (a smoke run: tiny problems, 2 s each)
      python scripts/bench_hpo.py --data idx:../shared/data/mnist-10k --problems b,d

Eight problems, all float32, one key per problem shared by every method (same initial
weights, same minibatch order, same noise). ``--data SOURCE`` runs the seed-CNN problems
(a, b, d, f; the default with ``--data``) on that dataset instead, at ``seed-mnist``'s
sizes (``bench_problems.MNIST_SIZES``); the others run on their own data. The problems
are built in ``scripts/bench_problems.py``; the digits are 1000 train / 400 validation /
397 test:

- ``a``: the seed CNN's four scalar hyperparameters (learning rate, momentum, weight
  decay, leaky slope), as ``hypergrad run seed-cnn`` (T = 100, batch 100);
- ``b``: the seed CNN with one learning rate and one weight decay per layer (three
  convolutions and the head; a layer's kernel and bias share them) plus the shared
  momentum and leaky slope: 10 hyperparameters;
- ``c``: logistic regression with one L2 penalty per input feature (64 hyperparameters),
  ``sum_f l2_f |W[f, :]|^2``, trained by full-batch gradient descent (step 0.1, T = 1000
  steps, cross-entropy), as ``hypergrad run grazzi-hierarchy`` builds it;
- ``d``: the seed CNN with a learning rate per layer and per inner step (4 x 100) and a
  weight decay per parameter (13 818), plus momentum and slope: 14 220 hyperparameters.
  The hypergradient methods tune all of them. The black-box searches cannot search
  14 220 dimensions; they search the best reduction they can handle, ``b``'s 10 (a
  constant learning rate and one weight decay per layer, which is the subspace of ``d``
  where every step's learning rate and every weight decay of a layer are equal). Both
  spaces start at the same values and score a configuration with the same training run.
  When ``b`` runs in the same invocation, ``d``'s black-box results are ``b``'s runs
  (the same space, key and budget), reported again rather than run twice;
- ``e``: a regression MLP (Flax NNX, 1-32-32-1, tanh) on ``y = sin x + 0.1 N(0, 1)``, x
  uniform in [-3, 3] (NumPy seed 0; 200 train / 100 validation / 200 test), MSE, trained
  by full-batch SGD (``hg.inner.sgd()``, T = 200) whose learning rate (0.01), momentum
  (0.9) and L2 weight decay (0.01) are tuned: 3 hyperparameters. No test accuracy;
- ``f``: the seed CNN (ReLU, momentum 0.5 and weight decay 1e-3 fixed; T = 100, batch
  100) trained with Gaussian dropout after every activation and Gaussian noise added to
  the inputs, drawn afresh at every step from the run's key: the learning rate (0.01),
  the dropout rate (0.05) and the noise's standard deviation (0.05) are tuned. Stochastic:
  every method's choice is also trained on 4 fresh keys (``RESCORE_KEYS``: keys no
  search used) and reported as the mean and standard error of its validation and test
  loss over them;
- ``g``: ``e``'s MLP and data trained by ``hg.inner.from_optax(optax.adamw)`` for T = 200
  full-batch steps with a warm-up cosine schedule whose peak learning rate (0.01), the
  AdamW weight decay (0.01) and the warm-up fraction (0.1) are tuned. optax's
  ``warmup_cosine_decay_schedule`` takes the warm-up as an integer number of steps, which
  no gradient reaches, so the schedule is written in ``bench_problems.warmup_cosine``
  with a real warm-up length ``fraction * T`` (``hg.inner.schedule`` rebuilds it from the
  hyperparameters at every inner step);
- ``h``: hyper-cleaning (``hypergrad run hyper-cleaning``'s build): softmax regression on
  1000 training digits, half their labels corrupted, one weight per training example
  (1000 hyperparameters, 0 to start), clean validation set of 300, 497 test digits,
  T = 500 full-batch steps of gradient descent (step 0.5, fixed L2 1e-3 on the weights).
  The black-box methods search one weight shared by every example instead (a
  one-dimensional subspace of the same start).

Methods, each under the same wall-clock budget (``--budget`` seconds per method and
problem), compilation included:

- ``hypergrad-default``: ``hg.tune(task, key=key, budget=budget)``, the default tuner;
  its trace is ``History.trace()``, every point it evaluated (exploration included), and
  its choice is ``History.best``. A ``TuneError`` (no accepted point, as when the budget
  is spent before the first meta-step) is reported as the method's ``error``, with no
  choice. Left out of the default method list, with a note, where the installed
  hypergrad has no ``History.trace``;
- hypergradient meta-steps (reverse-mode hypergradient through the whole unroll,
  :func:`hypergrad.tune`) with gradient-descent, nonlinear-CG and Adam hyper-updates
  (``hypergrad run``'s norm clip 0.5 for gd and adam): ``hypergrad-adam`` is Adam with
  step 0.05 in log / logit units (the default until these runs chose 0.2),
  ``hypergrad-adam-0.2`` Adam with step 0.2, and ``hypergrad-explore`` 20 random draws
  then Adam with step 0.2, all starting from the initial values;
- random search; Optuna TPE (sequential); and, on ``a`` only, a coarse grid (3 values per
  hyperparameter, 81 configurations). Random and grid search score ``--batch``
  configurations per ``vmap``-ed call; the default is 1 because on the 2-core CPU a batch
  of 8 took longer per configuration than one at a time (0.66 s against 0.41 s for the
  CNN, 0.061 s against 0.042 s for logistic regression, measured once while the machine
  was shared);
- ``optuna-hyperband``: Optuna's TPE sampler with its ``HyperbandPruner``, as an Optuna
  user would run it: each trial trains in ``RUNGS`` chunks of the horizon
  (:func:`hypergrad.unroll.segment`, the same steps as one unroll) and reports the
  validation loss after each; a pruned trial stops there. Its trace records a completed
  trial's final validation loss and a pruned (or diverged) one as ``inf``, so its best
  counts full trainings only;
- learning-rate-free optimizers from ``optax.contrib`` (``optax-prodigy``,
  ``optax-dadapt-adamw``, ``optax-dog``, ``optax-dowg``, ``optax-cocob``) and
  schedule-free AdamW (``optax-schedule-free-adamw``, its default step 0.0025, scored at
  its averaged weights), each with optax's defaults: one training run of the same T
  steps from the same weights, data and key, through ``hg.inner.from_optax``, with no
  search. The problem's optimizer hyperparameters (learning rate, momentum, weight decay,
  schedule) are replaced by the optimizer's own; the others (leaky slope, dropout, noise,
  per-feature L2, example weights) keep their initial values.

Random search, TPE and Hyperband search the default box of :mod:`hypergrad.search` around
the initial values (positive: /100 to x100; unit and bounded: logit +-4); the
hypergradient runs start from its centre.

A method's choice is its best evaluated configuration (lowest validation loss;
``hypergrad-default``'s is the History's best); it is trained again with the problem's
key to report its test loss. The table gives each method's time to reach the best
validation loss TPE reached with its whole budget; ``time_fraction`` in the JSON is the
best hypergradient method's such time divided by TPE's whole time (``null`` if none
reaches it). After the table, per problem, targets for ``hypergrad-default`` (never
asserted): within 2% of TPE's best validation loss, a test loss no worse than TPE's
choice's, a validation loss below every learning-rate-free optimizer's, and not worse
than the start (``task.space.init()``, scored once per problem). On ``f`` they compare
the means over the fresh keys.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hypergrad as hg
from hypergrad import search
from hypergrad.config import Config, ConfigError
from hypergrad.data import DataError
from hypergrad.experiment import Problem, outer_for
from hypergrad.plots import save_figure
from hypergrad.task import Task
from hypergrad.unroll import segment, start

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # when tests load this file
from bench_problems import (  # noqa: E402
    DATA_PROBLEMS,
    OWN_DATA,
    PROBLEMS,
    REDUCTION,
    RESCORE_KEYS,
    choice_scores,
    json_number,
    scorer,
    size,
)

PyTree = Any
HYPERGRAD = ("hypergrad-gd", "hypergrad-ncg", "hypergrad-adam", "hypergrad-adam-0.2",
             "hypergrad-explore", "hypergrad-default")
#: Searches that score configurations by training them (run in a reduction's space).
BLACK_BOX = ("random", "tpe", "grid", "optuna-hyperband")
#: ``hypergrad-adam``: Adam with step ``SHORT_LR``, the default before these runs;
#: ``hypergrad-adam-0.2``: Adam with step ``LONG_LR``, the default since.
SHORT_LR, LONG_LR = 0.05, 0.2
#: ``hypergrad-explore``: ``explore=EXPLORE`` random configurations pick the start, then
#: Adam with step ``EXPLORE_LR`` (in log / logit units) refines it; chosen by measurement
#: on (a) and (b) (docs/benchmarks/search.md).
EXPLORE, EXPLORE_LR = 20, 0.2
#: ``optuna-hyperband``: the chunks a trial trains in, a validation loss after each.
RUNGS = 4
#: A target's tolerance: ``hypergrad-default`` within this fraction of TPE's best.
WITHIN = 0.02


def _schedule_free_weights(state):
    """Schedule-free AdamW's averaged weights, at which it is evaluated."""
    return optax.contrib.schedule_free_eval_params(state.opt_state, state.params)


#: Learning-rate-free baselines: method -> (optax factory, the weights to score from the
#: final :class:`hypergrad.inner.InnerState`; ``None``: its ``params``).
LR_FREE: dict[str, tuple[Callable[..., Any], Callable[[Any], PyTree] | None]] = {
    "optax-prodigy": (optax.contrib.prodigy, None),
    "optax-dadapt-adamw": (optax.contrib.dadapt_adamw, None),
    "optax-dog": (optax.contrib.dog, None),
    "optax-dowg": (optax.contrib.dowg, None),
    "optax-cocob": (optax.contrib.cocob, None),
    "optax-schedule-free-adamw": (optax.contrib.schedule_free_adamw, _schedule_free_weights),
}


def default_tuner_ready() -> bool:
    """Whether ``hg.tune(task, key=key, budget=...)`` and ``History.trace()`` exist."""
    return hasattr(hg.History, "trace")


def methods_for(name: str) -> list[str]:
    """Every method that runs on problem ``name`` by default."""
    methods = [*HYPERGRAD, "random", "tpe", *(["grid"] if name == "a" else []),
               "optuna-hyperband", *LR_FREE]
    return [m for m in methods if m != "hypergrad-default" or default_tuner_ready()]


class Run(NamedTuple):
    """A method's outcome: what it evaluated, and how its choice is scored.

    Attributes:
      trace: every configuration it evaluated, with its validation loss and time.
      task: the task its configurations train (a reduction's for a black-box search).
      choice: the configuration it reports (``phi``); ``None``: the trace's best.
      finish: the final :class:`hypergrad.inner.InnerState` -> the weights to score;
        ``None``: its ``params``.
      error: why the method reported no point (its trace is then the start, ``inf``).
    """

    trace: search.SearchResult
    task: Task
    choice: PyTree = None
    finish: Callable[[Any], PyTree] | None = None
    error: str | None = None

    @property
    def phi(self) -> PyTree:
        return self.trace.best_phi if self.choice is None else self.choice


# --------------------------------------------------------------------------------------
# Methods


class _Spent(Exception):
    """The time budget of a hypergradient run is spent."""


def hypergradient(problem: Problem, outer: str, key: jax.Array, budget: float, *,
                  explore: int = 0, outer_lr: float | None = None, label: str | None = None
                  ) -> search.SearchResult:
    """:func:`hg.tune` with the command line's defaults from the initial values, stopped
    once ``budget`` seconds have passed (or when it stops itself: nonlinear CG after two
    failed line searches in a row).

    Each meta-step's validation loss is that of the ``phi`` it evaluated (``inf`` for a
    point the guard rejected). With ``explore``, :func:`hg.tune`'s random phase picks the
    start; its evaluations come first in the trace, at the times they finished.
    """
    phis, losses, seconds = [], [], []
    began = time.perf_counter()

    def callback(record, state):
        accepted = "val_loss" in record
        phis.append(jax.tree.map(lambda x: np.asarray(x)[0], jax.device_get(state.last_phi)))
        losses.append(record["val_loss"] if accepted else np.inf)
        seconds.append(time.perf_counter() - began)
        if seconds[-1] >= budget:
            raise _Spent

    task = problem.task
    phi = task.space.init(jnp.float32)
    if explore:  # as hg.tune(explore=...) does, with its evaluations kept for the trace
        phi, found = search.explore(task, key, explore, phi=phi)
        phis.extend(jax.tree.map(lambda a, i=i: a[i], found.phi) for i in range(explore))
        losses.extend(found.val_loss.tolist())
        offset = time.perf_counter() - began - float(found.seconds[-1])
        seconds.extend((found.seconds + offset).tolist())
    try:
        hg.tune(task, hg.estimators.reverse(), outer_for(Config(outer=outer, outer_lr=outer_lr)),
                key=key, phi=phi, meta_steps=1_000_000, callback=callback)
    except (_Spent, hg.TuneError):
        pass
    stacked = jax.tree.map(lambda *a: np.stack(a), *phis)
    return search.SearchResult(label or f"hypergrad-{outer}", stacked, np.array(losses),
                               np.array(seconds))


def hypergrad_default(problem: Problem, key: jax.Array, budget: float) -> Run:
    """The default tuner, ``hg.tune(task, key=key, budget=budget)``: its trace (every point
    it evaluated, exploration included) and its best point as the choice."""
    began = time.perf_counter()
    try:
        history = hg.tune(problem.task, key=key, budget=budget)
    except hg.TuneError as e:  # no accepted point: the start, as infinitely bad
        phi = problem.task.space.init(jnp.float32)
        trace = search.SearchResult("hypergrad-default", jax.tree.map(
            lambda a: np.asarray(a)[None], phi), np.array([math.inf]),
            np.array([time.perf_counter() - began]))
        return Run(trace, problem.task, phi, error=f"TuneError: {e}")
    trace = history.trace()
    return Run(trace._replace(method="hypergrad-default"), problem.task, history.best.phi)


def optuna_space(space: hg.HyperSpace, dtype: Any = None
                 ) -> tuple[dict[str, Any], Callable[[dict[str, float]], PyTree]]:
    """:func:`hypergrad.search.optuna_space` over the default box."""
    return search.optuna_space(space, dtype=dtype)


@jax.jit
def _begin(task, phi, key):
    return start(task, task.space.constrain(phi), key)


@functools.partial(jax.jit, static_argnames="length")
def _chunk(task, phi, state, data_key, begin, length):
    """``length`` inner steps from step ``begin`` (traced: one compile per length) and
    the validation loss after them."""
    hparams = task.space.constrain(phi)
    state, _ = segment(task, hparams, state, data_key, begin, length)
    return state, task.validation_loss(state.params, hparams, state=state.model_state)


def optuna_hyperband(task: Task, key: jax.Array, *, seed: int, budget: float | None = None,
                     num_trials: int | None = None, rungs: int = RUNGS,
                     dtype: Any = jnp.float32) -> search.SearchResult:
    """Optuna TPE with Hyperband pruning: trials until ``budget`` seconds have passed or
    ``num_trials`` have run.

    A trial trains ``task.steps`` steps in ``rungs`` chunks of ``ceil(T / rungs)`` steps
    (the last may be shorter) and reports the validation loss after each to the pruner,
    which may stop it. Completed trials are told their final validation loss; pruned
    ones are told pruned and diverged ones failed, and the trace records both as ``inf``.
    """
    import optuna

    dists, to_phi = optuna_space(task.space, dtype)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=10),
        pruner=optuna.pruners.HyperbandPruner(min_resource=1, max_resource=rungs,
                                              reduction_factor=3),
        direction="minimize")
    every = -(-task.steps // rungs)
    ends = [min(task.steps, every * (r + 1)) for r in range(-(-task.steps // every))]
    states = optuna.trial.TrialState
    phis: list[PyTree] = []
    losses: list[float] = []
    seconds: list[float] = []
    began = time.perf_counter()
    while not seconds or ((budget is None or seconds[-1] < budget)
                          and (num_trials is None or len(seconds) < num_trials)):
        trial = study.ask(dists)
        phi = to_phi(trial.params)
        state, data_key = _begin(task, phi, key)
        done, outcome, loss = 0, states.COMPLETE, math.inf
        for rung, end in enumerate(ends, 1):
            state, value = _chunk(task, phi, state, data_key, done, end - done)
            done, loss = end, float(value)
            if not math.isfinite(loss):
                outcome = states.FAIL
                break
            trial.report(loss, rung)
            if rung < len(ends) and trial.should_prune():
                outcome = states.PRUNED
                break
        if outcome == states.COMPLETE:
            study.tell(trial, loss)
        else:
            study.tell(trial, state=outcome)
        phis.append(phi)
        losses.append(loss if outcome == states.COMPLETE else math.inf)
        seconds.append(time.perf_counter() - began)
    stacked = jax.tree.map(lambda *a: np.stack(a), *phis)
    return search.SearchResult("optuna-hyperband", stacked, np.array(losses),
                               np.array(seconds))


def lr_free_task(task: Task, factory: Callable[..., Any]) -> Task:
    """``task`` trained by ``hg.inner.from_optax(factory)`` with optax's defaults: the
    hyperparameters the task's optimizer read leave the space; the others (read by the
    model or the loss) stay, at their initial values when trained from ``init()``."""
    optimizer = hg.inner.from_optax(factory)
    space = task.space
    kept = {n: c for n, c in space.constraints.items() if n not in task.optimizer.reads}
    clash = sorted(set(kept) & set(optimizer.reads))
    if clash:
        raise ValueError(f"{optimizer.name} would read the task's {', '.join(clash)}")
    targets = {n: t for n, t in space.targets.items() if n in kept}
    return task.replace(space=hg.HyperSpace(kept, targets), optimizer=optimizer)


def lr_free(problem: Problem, method: str, key: jax.Array) -> Run:
    """One untuned training run of ``problem`` by the ``LR_FREE`` optimizer ``method``."""
    factory, finish = LR_FREE[method]
    began = time.perf_counter()
    task = lr_free_task(problem.task, factory)
    phi = task.space.init(jnp.float32)
    value = float(scorer(problem)(task, phi, key, finish)["val_loss"])
    trace = search.SearchResult(
        method, jax.tree.map(lambda a: np.asarray(a)[None], phi),
        np.array([value if math.isfinite(value) else math.inf]),
        np.array([time.perf_counter() - began]))
    return Run(trace, task, phi, finish)


def run_methods(name: str, problem: Problem, budget: float, seed: int, quick: bool,
                batch: int, log, only: list[str] | None = None,
                reduced: Problem | None = None, reuse: dict[str, Run] | None = None
                ) -> dict[str, Run]:
    """Every method on ``problem`` (``only`` those named, and TPE); the black-box ones on
    ``reduced`` where given, and taken from ``reuse`` where it holds them (runs in the
    same space, same key)."""
    key = jax.random.key(seed)
    task = (reduced or problem).task

    def hyper(outer, **kw):
        return lambda: Run(hypergradient(problem, outer, key, budget, **kw), problem.task)

    def black_box(fn):
        return lambda: Run(fn(), task)

    methods: dict[str, Callable[[], Run]] = {
        "hypergrad-gd": hyper("gd"),
        "hypergrad-ncg": hyper("ncg"),
        "hypergrad-adam": hyper("adam", outer_lr=SHORT_LR, label="hypergrad-adam"),
        "hypergrad-adam-0.2": hyper("adam", outer_lr=LONG_LR, label="hypergrad-adam-0.2"),
        "hypergrad-explore": hyper("adam", explore=2 if quick else EXPLORE,
                                   outer_lr=EXPLORE_LR, label="hypergrad-explore"),
        "hypergrad-default": lambda: hypergrad_default(problem, key, budget),
        "random": black_box(lambda: search.random_search(
            task, key, seed=seed, batch_size=batch, budget=budget, dtype=jnp.float32)),
        "tpe": black_box(lambda: search.tpe_search(task, key, seed=seed, budget=budget,
                                                   dtype=jnp.float32)),
        "grid": black_box(lambda: search.grid_search(
            task, key, points=2 if quick else 3, batch_size=batch, budget=budget,
            dtype=jnp.float32)),
        "optuna-hyperband": black_box(lambda: optuna_hyperband(task, key, seed=seed,
                                                               budget=budget)),
        **{m: functools.partial(lr_free, problem, m, key) for m in LR_FREE},
    }
    chosen = methods_for(name)
    if "hypergrad-default" not in chosen and (not only or "hypergrad-default" in only):
        log(f"  {name} hypergrad-default skipped: this hypergrad has no hg.tune(task, key=, "
            f"budget=) with History.trace() yet")
    if only:
        chosen = [m for m in chosen if m in only or m == "tpe"]
    results = {}
    for method in chosen:
        reused = method in (reuse or {})
        results[method] = run = reuse[method] if reuse and reused else methods[method]()
        r = run.trace
        log(f"  {name} {method:25s} {len(r.val_loss):5d} evaluations in {r.seconds[-1]:6.1f} s,"
            f" best val loss {r.best_val_loss:.4f}{' (the same run as above)' if reused else ''}"
            f"{f' ({run.error})' if run.error else ''}")
    return results


# --------------------------------------------------------------------------------------
# Scoring


def time_to_reach(result: search.SearchResult, target: float) -> float | None:
    """Seconds until ``result`` first evaluated a loss <= ``target``; None if never."""
    hit = np.nonzero(result.val_loss <= target)[0]
    return float(result.seconds[hit[0]]) if hit.size else None


def summarize(problem: Problem, results: dict[str, Run], seed: int,
              rescore: int = 0) -> dict[str, Any]:
    """Per method: trace, best, the scores of its choice, time to reach TPE's best; the
    start's scores; and the targets of ``hypergrad-default`` (:func:`targets`)."""
    tpe = results["tpe"].trace
    target, tpe_time = tpe.best_val_loss, float(tpe.seconds[-1])
    out: dict[str, Any] = {"methods": {}, "tpe_best_val_loss": target, "tpe_seconds": tpe_time}
    out["start"] = choice_scores(problem, problem.task, problem.task.space.init(jnp.float32),
                                 seed, rescore)
    for method, run in results.items():
        r = run.trace
        scores = {"val_loss": None, "test_loss": None} if run.error else \
            choice_scores(problem, run.task, run.phi, seed, rescore, run.finish)
        reach = time_to_reach(r, target)
        out["methods"][method] = {
            "seconds": r.seconds.tolist(),
            "val_loss": [json_number(v) for v in r.val_loss.tolist()],
            "best_so_far": [json_number(v) for v in r.best_so_far().tolist()],
            "evaluations": len(r.val_loss),
            "best_val_loss": json_number(r.best_val_loss),
            "choice_val_loss": scores.pop("val_loss"),
            **scores,
            "time_to_tpe_best": reach,
            "fraction_of_tpe_time": None if reach is None else reach / tpe_time,
            "best_hparams": hg.hparams.summarize(run.task.space.constrain(run.phi)),
        }
        if run.error:
            out["methods"][method]["error"] = run.error
    reaches = [out["methods"][m]["time_to_tpe_best"] for m in HYPERGRAD if m in out["methods"]]
    reaches = [t for t in reaches if t is not None]
    out["time_fraction"] = min(reaches) / tpe_time if reaches else None
    out["targets"] = targets(out)
    return out


def _loss(entry: dict[str, Any], which: str) -> float | None:
    """``entry``'s (a method's or the start's) ``val`` or ``test`` loss: the mean over
    fresh keys where rescored; ``None`` for a method that failed."""
    if "error" in entry:
        return None
    if "rescored" in entry:
        return entry["rescored"][f"{which}_loss_mean"]
    if which == "test":
        return entry["test_loss"]
    return entry["choice_val_loss"] if "choice_val_loss" in entry else entry["val_loss"]


def targets(p: dict[str, Any]) -> dict[str, Any] | None:
    """``hypergrad-default`` against TPE, the learning-rate-free optimizers and the start
    (never asserted): each target's values and whether it was met (``None``: no
    learning-rate-free optimizer ran). ``None`` where ``hypergrad-default`` did not run."""
    methods = p["methods"]
    if "hypergrad-default" not in methods:
        return None
    ours, tpe = methods["hypergrad-default"], methods["tpe"]
    val, test = _loss(ours, "val"), _loss(ours, "test")
    tpe_val, tpe_test, start = _loss(tpe, "val"), _loss(tpe, "test"), _loss(p["start"], "val")
    free = {m: _loss(methods[m], "val") for m in LR_FREE if m in methods}

    def at_most(a: float | None, b: float | None) -> bool:
        """``a <= b``, where ``None`` (a failed or diverged method) is infinitely bad."""
        return a is not None and (b is None or a <= b)

    return {
        "val_loss": val, "test_loss": test,
        "tpe_val_loss": tpe_val, "tpe_test_loss": tpe_test,
        "within_2pct_of_tpe": at_most(val, None if tpe_val is None else (1 + WITHIN) * tpe_val),
        "test_no_worse_than_tpe": at_most(test, tpe_test),
        "lr_free_val_loss": free,
        "below_every_lr_free": None if not free else val is not None and all(
            v is None or val < v for v in free.values()),
        "start_val_loss": start,
        "not_worse_than_start": at_most(val, start),
    }


# --------------------------------------------------------------------------------------
# Output


def _f(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def table(report: dict[str, Any]) -> str:
    """A Markdown table: per problem and method, best val/test loss, time to TPE's best;
    then, for the problems scored on fresh keys, a table of their means."""
    lines = ["| problem | method | evaluations | best val loss | test loss of choice | "
             "time to TPE's best (s) | / TPE's time |",
             "|---|---|---|---|---|---|---|"]
    rescored = ["", "| problem | method | keys | val loss (mean ± s.e.) | "
                "test loss (mean ± s.e.) |", "|---|---|---|---|---|"]
    for name in PROBLEMS:
        if name not in report:
            continue
        p = report[name]
        for method, m in p["methods"].items():
            t = m["time_to_tpe_best"]
            reach = "never" if t is None else f"{t:.1f}"
            frac = "" if t is None else f"{m['fraction_of_tpe_time']:.2f}"
            lines.append(f"| {name} | {method} | {m['evaluations']} | "
                         f"{_f(m['best_val_loss'])} | {_f(m['test_loss'])} | {reach} | {frac} |")
        for method, m in [("start", p.get("start", {})), *p["methods"].items()]:
            if "rescored" in m:
                s = m["rescored"]
                rescored.append(
                    f"| {name} | {method} | {s['keys']} | {_f(s['val_loss_mean'])} ± "
                    f"{_f(s['val_loss_stderr'])} | {_f(s['test_loss_mean'])} ± "
                    f"{_f(s['test_loss_stderr'])} |")
    return "\n".join(lines + (rescored if len(rescored) > 3 else []))


def targets_text(report: dict[str, Any]) -> str:
    """One line per problem: which of ``hypergrad-default``'s targets were met."""

    def yes(ok: bool | None) -> str:
        return "n/a" if ok is None else "yes" if ok else "NO"

    lines = []
    for name in PROBLEMS:
        if name not in report:
            continue
        t = report[name].get("targets")
        if t is None:
            lines.append(f"({name}) targets: hypergrad-default did not run")
            continue
        if "error" in report[name]["methods"]["hypergrad-default"]:
            lines.append(f"({name}) targets: none met, hypergrad-default failed: "
                         f"{report[name]['methods']['hypergrad-default']['error']}")
            continue
        over = "" if t["val_loss"] is None or not t["tpe_val_loss"] else \
            f" ({100 * (t['val_loss'] / t['tpe_val_loss'] - 1):+.1f}%)"
        free = {m: v for m, v in t["lr_free_val_loss"].items() if v is not None}
        best_free = min(free, key=free.__getitem__) if free else None
        lines.append(
            f"({name}) hypergrad-default val {_f(t['val_loss'])} vs TPE {_f(t['tpe_val_loss'])}"
            f"{over}: within 2%: {yes(t['within_2pct_of_tpe'])}; test {_f(t['test_loss'])} "
            f"vs TPE's choice {_f(t['tpe_test_loss'])}: no worse: "
            f"{yes(t['test_no_worse_than_tpe'])}; below every lr-free optimizer"
            f"{f' (best {best_free} {free[best_free]:.4f})' if best_free else ''}: "
            f"{yes(t['below_every_lr_free'])}; start {_f(t['start_val_loss'])}: not worse: "
            f"{yes(t['not_worse_than_start'])}")
    return "\n".join(lines)


def figure(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    names = [n for n in PROBLEMS if n in report]
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), dpi=90,
                             squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for method, m in report[name]["methods"].items():
            best = [np.nan if v is None else v for v in m["best_so_far"]]
            if method in LR_FREE:  # one training run: a point
                ax.plot(m["seconds"], best, marker="x", ls="none", label=method)
                continue
            ax.step(m["seconds"], best, where="post", label=method,
                    linestyle="-" if method.startswith("hypergrad") else "--")
        ax.axhline(report[name]["tpe_best_val_loss"], color="grey", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"({name}) {report[name]['description']}", fontsize=7)
        ax.set(xlabel="wall time (s), compilation included",
               ylabel="best validation loss so far")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=6)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=60.0,
                    help="wall-clock seconds per method and problem (default 60)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: tiny problems, a 2 s budget unless --budget is given")
    ap.add_argument("--problems", default=None,
                    help=f"comma-separated subset of {','.join(PROBLEMS)} (default all; with "
                         f"--data, {','.join(DATA_PROBLEMS)})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=1,
                    help="configurations per vmapped evaluation in random and grid search")
    ap.add_argument("--data", metavar="SOURCE",
                    help=f"run the seed-CNN problems ({', '.join(DATA_PROBLEMS)}) on this "
                         "dataset at MNIST sizes, for example idx:../shared/data/mnist-10k "
                         "(default: embedded digits)")
    ap.add_argument("--methods", default="",
                    help="comma-separated subset of the methods (tpe always runs; default all)")
    ap.add_argument("--json", help="write the traces and summary here")
    ap.add_argument("--figure", help="write the figure (PNG) here")
    ap.add_argument("--from-json", metavar="FILE",
                    help="run nothing: print the table and draw --figure from a saved --json")
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as fh:
            saved = json.load(fh)
        print(table(saved))
        print(targets_text(saved))
        if args.figure:
            figure(saved, args.figure)
        return saved
    budget = 2.0 if args.quick and "--budget" not in (argv or sys.argv) else args.budget
    if not budget > 0:
        ap.error(f"--budget must be positive, got {budget:g}")
    default = DATA_PROBLEMS if args.data else PROBLEMS
    chosen = [p for p in (args.problems or ",".join(default)).split(",") if p]
    unknown = sorted(set(chosen) - set(PROBLEMS))
    if unknown or not chosen:
        ap.error(f"--problems takes a comma-separated subset of {','.join(PROBLEMS)}, got "
                 f"{args.problems!r}")
    own = [p for p in chosen if p not in DATA_PROBLEMS]
    if args.data and own:
        ap.error("; ".join(f"problem {p} runs on {OWN_DATA[p]} only" for p in own)
                 + f": drop {','.join(own)} from --problems (for example --problems b,d) "
                 "or drop --data")

    only = [m for m in args.methods.split(",") if m]
    known = [*HYPERGRAD, *BLACK_BOX, *LR_FREE]
    unknown = sorted(set(only) - set(known))
    if unknown:
        ap.error(f"--methods takes a comma-separated subset of {', '.join(known)}; got "
                 f"{', '.join(unknown)}")
    if "hypergrad-default" in only and not default_tuner_ready():
        ap.error("hypergrad-default needs hg.tune(task, key=, budget=) and History.trace(), "
                 "which this hypergrad does not have yet")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    report: dict[str, Any] = {"settings": {
        "budget_seconds": budget, "quick": args.quick, "seed": args.seed, "batch": args.batch,
        "compile_time_included": True, "machine": platform.platform(),
        "data": args.data or "digits",
        "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
        "loadavg_start": list(os.getloadavg())}}
    # Black-box results per searched space. d's reduction is b's space from the same start
    # and key, so where b ran, d's black-box methods are b's runs (the same program and
    # draws), not reruns that differ only by timing noise; the JSON says so.
    done: dict[Any, tuple[str, dict[str, Run]]] = {}
    for name in chosen:
        description, build = PROBLEMS[name]
        try:
            problem = build(args.quick, args.data)
            reduced = REDUCTION[name](args.quick, args.data) if name in REDUCTION else None
        except (DataError, ConfigError) as e:
            ap.exit(2, f"bench_hpo.py: error: {e}\n")
        log(f"({name}) {description}: {problem.task.space}")
        space = REDUCTION.get(name, build)
        source, reuse = done.get(space, (name, {}))
        results = run_methods(name, problem, budget, args.seed, args.quick, args.batch, log,
                              only, reduced, reuse)
        done.setdefault(space, (name, {m: r for m, r in results.items() if m in BLACK_BOX}))
        report[name] = {"description": description, "num_hparams": size(problem),
                        **summarize(problem, results, args.seed, RESCORE_KEYS.get(name, 0))}
        if reduced is not None:
            report[name]["black_box_num_hparams"] = size(reduced)
        if reuse:
            report[name]["black_box_runs_of"] = source
    report["settings"]["loadavg_end"] = list(os.getloadavg())
    print(table(report))
    for name in chosen:
        f = report[name]["time_fraction"]
        print(f"({name}) time_fraction = {'null' if f is None else f'{f:.3f}'}")
    print(targets_text(report))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1, allow_nan=False)
            fh.write("\n")
    if args.figure:
        figure(report, args.figure)
    return report


if __name__ == "__main__":
    main()
