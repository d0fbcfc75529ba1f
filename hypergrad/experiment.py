"""Experiments: a config, how to build its problem, the registry, and scoring.

An experiment is registered under the ``hypergrad.experiments`` entry points; ``hypergrad
run NAME`` builds its :class:`Problem` from the config and tunes it with
:func:`hypergrad.tune` (:mod:`hypergrad.run` keeps the run's files).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hypergrad import estimators, outer
from hypergrad.config import Config, ConfigError
from hypergrad.estimators import Estimator
from hypergrad.inner import batch_mean
from hypergrad.messages import show
from hypergrad.models import accuracy
from hypergrad.task import Task
from hypergrad.unroll import objective

PyTree = Any
ENTRY_POINTS = "hypergrad.experiments"


class Problem(NamedTuple):
    """What an experiment builds from its config: the task, and how to score a test set.

    ``evaluate(params, hparams) -> {"test_loss": ..., ...}`` is jittable; classification
    experiments add ``test_accuracy`` (:func:`classification_scores` builds it), others
    report what fits (a regression task only its test loss).
    """

    task: Task
    evaluate: Callable[[PyTree, Any], dict[str, jax.Array]]


class Experiment(NamedTuple):
    """A named, runnable experiment: its default config and how to build the problem.

    Most experiments are tuned by :func:`hypergrad.tune` through :func:`hypergrad.run.run`.
    One that measures something else (a comparison of estimators, say) gives ``main(config,
    workdir, progress) -> summary``, which :func:`hypergrad.run.run` calls instead, after
    writing ``config.json``; such a run cannot be resumed. Its ``plot(workdir, out) ->
    paths`` redraws its figures from what ``main`` wrote (``hypergrad plot WORKDIR``).
    """

    name: str
    config: Config
    build: Callable[[Config], Problem]
    description: str
    main: Callable[[Config, Path, bool], dict[str, Any]] | None = None
    plot: Callable[[Path, Path], list[Path]] | None = None


def classification_scores(task: Task, predict: Callable[..., jax.Array], test: PyTree,
                          batch_size: int | None = None,
                          loss: Callable[..., jax.Array] | None = None):
    """``evaluate(params, hparams) -> {"test_loss", "test_accuracy"}`` on the ``(x, y)``
    pairs of ``test``: ``loss(params, hparams, batch)`` (default the task's validation
    loss) and the accuracy of ``predict(params, hparams, x)``, means over examples taken
    ``batch_size`` at a time (all at once when ``None``; a 10 000-image test split at once
    needs gigabytes)."""
    loss = task.val_loss if loss is None else loss

    def evaluate(params, hparams):
        def metrics(chunk):
            return {"test_loss": loss(params, hparams, chunk),
                    "test_accuracy": accuracy(predict(params, hparams, chunk[0]), chunk[1])}

        return batch_mean(metrics, test, batch_size)

    return evaluate


def trained_scores(problem: Problem) -> Callable[..., dict[str, jax.Array]]:
    """``scores(task, phi, key) -> {"val_loss", **problem.evaluate(...)}``: train from the
    task's start with ``phi`` (:func:`hypergrad.unroll.objective`, the same run a
    hypergradient differentiates) and score the trained weights, with the hyperparameters
    of the last inner step. Not jitted: jit it, or vmap it over many ``phi`` first."""

    def scores(task, phi, key):
        value, aux = objective(task, phi, key)
        hparams = task.space.at_step(task.space.constrain(phi), task.steps - 1)
        return {"val_loss": value, **problem.evaluate(aux["params"], hparams)}

    return scores


def experiments() -> dict[str, Experiment]:
    """Every experiment registered under the ``hypergrad.experiments`` entry points."""
    found = {}
    for ep in metadata.entry_points(group=ENTRY_POINTS):
        found[ep.name] = ep.load()
    return dict(sorted(found.items()))


def get_experiment(name: str) -> Experiment:
    """The experiment called ``name``; a :class:`ConfigError` names the valid ones."""
    available = experiments()
    if not isinstance(name, str):  # a hand-edited config.json can hold any JSON there
        name_ok, close = False, []
    else:
        name_ok, close = name in available, difflib.get_close_matches(name, available, n=1)
    if not name_ok:
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(
            f"unknown experiment {show(name)}{hint} (available: {', '.join(available)}; "
            "see `hypergrad list`)"
        )
    return available[name]


def estimator_for(config: Config) -> Estimator:
    """The hypergradient estimator a config asks for (``estimator`` and its options)."""
    name = config.estimator
    if config.online and name != "pes":  # online tuning is truncated or pes
        name = "truncated"
    return estimators.by_name(name, checkpoint=config.checkpoint_policy(), hvp=config.hvp,
                              window=config.window, solver=config.solver,
                              maxiter=config.maxiter, tol=config.tol, alpha=config.solver_step,
                              sigma=config.sigma, num_pairs=config.num_pairs, cap=config.cap)


def outer_for(config: Config) -> optax.GradientTransformationExtraArgs:
    """The hyper-update a config asks for, with the step of ``outer_lr`` (or its default).
    Clipping (``clip``) is :func:`hypergrad.tune`'s."""
    return outer.by_name(config.outer, config.outer_lr)


def keys_for(config: Config) -> jax.Array:
    """One key, or with ``population_seeds`` one per member (``key(seed + m)``)."""
    if config.population > 1 and config.population_seeds:
        return jax.vmap(jax.random.key)(config.seed + jnp.arange(config.population))
    return jax.random.key(config.seed)


def strategy_for(config: Config) -> Any:
    """The strategy a config asks for: ``None`` for a local run (:func:`hypergrad.tune`
    then runs :class:`~hypergrad.tune.strategies.Local` with ``population`` and
    ``explore``), else :class:`~hypergrad.tune.strategies.ExploreRefine` refining
    ``population`` starts at once after ``explore`` configurations (0: its default size).
    ``strategy=default`` follows :func:`hypergrad.tune.strategies.chosen`, the rule of
    ``hg.tune``."""
    from hypergrad.tune.strategies import DEFAULT, ExploreRefine, Local, chosen

    if config.strategy == "local":
        return None
    if config.strategy == "default":
        picked = chosen(population=None if config.population == 1 else config.population,
                        explore=config.explore, online=config.online)
        return None if isinstance(picked, Local) else picked
    return ExploreRefine(members=config.population,
                         explore=config.explore if config.explore else DEFAULT.explore)


def tune_options(config: Config) -> dict[str, Any]:
    """The keyword arguments of :func:`hypergrad.tune` a config asks for: the one mapping
    from a config to the tuning loop (``hypergrad run`` and the experiments use it, so
    none drops a key): ``hg.tune(task, **tune_options(config))``."""
    strategy = strategy_for(config)
    if strategy is not None:
        return {"estimator": estimator_for(config), "outer": outer_for(config),
                "key": keys_for(config), "meta_steps": config.meta_steps,
                "budget": config.budget, "strategy": strategy, "devices": config.devices,
                "resample": config.resample, "clip": config.clip}
    return {"estimator": estimator_for(config), "outer": outer_for(config),
            "key": keys_for(config),
            "meta_steps": None if config.online else config.meta_steps,
            "budget": config.budget,
            "population": None if config.population == 1 else config.population,
            "spread": config.population_spread, "devices": config.devices,
            "online": config.online, "resample": config.resample, "clip": config.clip,
            "explore": config.explore}


def build(experiment: Experiment, config: Config) -> Problem:
    """Build the experiment's problem; a value the data or model rejects (a batch larger
    than the training set, say) becomes a :class:`ConfigError`."""
    try:
        problem = experiment.build(config)
    except ValueError as e:  # DataError included
        raise ConfigError(str(e)) from None
    # Every experiment's losses are means over examples (plus, for training, penalties
    # that do not depend on the batch), which chunking them needs.
    chunks = {name: getattr(config, name) for name in ("val_batch_size", "hvp_batch_size")
              if getattr(config, name)}
    if chunks:
        problem = problem._replace(task=problem.task.replace(**chunks))
    reads = problem.task.optimizer.reads
    tuned = [n for n in problem.task.space.names if n in reads]
    if config.estimator == "implicit" and not config.online and tuned:
        raise ConfigError(
            f"the implicit estimator cannot differentiate {', '.join(tuned)}: optimizer "
            "hyperparameters do not appear in the stationarity condition; use --set "
            "estimator=reverse, forward or truncated")
    return problem
