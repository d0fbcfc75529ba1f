"""The problems of ``scripts/bench_hpo.py``: each a :class:`hypergrad.Problem` built from a
``quick`` flag (a tiny variant for smoke runs) and an optional dataset.

``PROBLEMS`` maps a letter to ``(description, build)``; ``REDUCTION`` the problems whose
black-box searches run in a subspace (too many hyperparameters for them) to that
subspace's build; ``RESCORE_KEYS`` the stochastic problems whose choices are scored as a
mean over fresh keys; ``DATA_PROBLEMS`` those that run on ``--data``. The module
docstring of ``bench_hpo.py`` describes every problem and its sizes. :func:`choice_scores`
trains a configuration and scores it as the benchmark reports it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hypergrad as hg
from hypergrad.config import Config
from hypergrad.experiment import Problem
from hypergrad.task import Task

PyTree = Any

#: ``--data SOURCE`` (for example ``idx:../shared/data/mnist-10k``) runs the seed-CNN
#: problems on 28 x 28 digits at ``seed-mnist``'s sizes: 5000 training, 1000 validation
#: and 2000 test images, weights checkpointed every 10 steps, scored 500 at a time.
MNIST_SIZES = dict(data_train_size=5000, data_val_size=1000, data_test_size=2000,
                   checkpoint="10", val_batch_size=500)
QUICK_MNIST_SIZES = dict(data_train_size=200, data_val_size=100, data_test_size=100)


def _sizes(quick: bool, data: str | None) -> dict[str, Any]:
    return {} if data is None else dict(data=data, **(QUICK_MNIST_SIZES if quick
                                                      else MNIST_SIZES))


def _seed_cnn(quick: bool, data: str | None, options=()) -> Problem:
    from hypergrad_experiments.seed_cnn import SeedCnnConfig, build

    tiny: dict[str, Any] = dict(steps=10, channels="4,4,4") if quick else {}
    return build(SeedCnnConfig(hparam_options=tuple(options), **tiny, **_sizes(quick, data)))


def problem_a(quick: bool, data: str | None = None) -> Problem:
    return _seed_cnn(quick, data)


def problem_b(quick: bool, data: str | None = None) -> Problem:
    # One learning rate and one weight decay per layer (convs/0..2 and head), declared in
    # the space: `--set hparams.learning_rate.per=layer` on the command line.
    return _seed_cnn(quick, data, (("learning_rate", "per", "layer"),
                                   ("weight_decay", "per", "layer")))


def problem_c(quick: bool, data: str | None = None) -> Problem:
    from hypergrad_experiments.grazzi_hierarchy import GrazziConfig, build

    assert data is None, "problem c runs on the embedded digits only"
    return build(GrazziConfig(steps=100 if quick else 1000, dtype="float32"))


def problem_d(quick: bool, data: str | None = None) -> Problem:
    # `--set hparams.learning_rate.per=layer --set hparams.learning_rate.schedule=per_step
    #  --set hparams.weight_decay.per=parameter` on the command line.
    return _seed_cnn(quick, data, (("learning_rate", "per", "layer"),
                                   ("learning_rate", "schedule", "per_step"),
                                   ("weight_decay", "per", "parameter")))


# --------------------------------------------------------------------------------------
# (e) and (g): a regression MLP on y = sin x + noise

#: Examples of the sine data: training, validation, test.
SINE_SIZES = (200, 100, 200)


def sine_data(seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """``(train, val, test)`` pairs ``(x, y)``, float32 of shape ``(n, 1)``: ``x`` uniform
    in [-3, 3], ``y = sin x + 0.1 N(0, 1)``, from NumPy's generator seeded ``seed``."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-3.0, 3.0, (sum(SINE_SIZES), 1))
    y = np.sin(x) + 0.1 * rng.normal(size=x.shape)
    x, y = x.astype(np.float32), y.astype(np.float32)
    cuts = np.cumsum(SINE_SIZES)[:-1]
    return tuple(zip(np.split(x, cuts), np.split(y, cuts), strict=True))


def _mlp_problem(space: hg.HyperSpace, optimizer: hg.inner.InnerOptimizer,
                 steps: int) -> Problem:
    """The 1-32-32-1 tanh MLP (Flax NNX) on :func:`sine_data`, MSE, full batch."""
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.first = nnx.Linear(1, 32, rngs=rngs)
            self.second = nnx.Linear(32, 32, rngs=rngs)
            self.out = nnx.Linear(32, 1, rngs=rngs)

        def __call__(self, x):
            return self.out(jnp.tanh(self.second(jnp.tanh(self.first(x)))))

    graph, params = nnx.split(MLP(nnx.Rngs(0)))

    def mse(params, hparams, batch):
        del hparams  # the model reads none; the optimizer reads them all
        x, y = batch
        return jnp.mean((nnx.merge(graph, params)(x) - y) ** 2)

    train, val, test = sine_data()
    task = hg.Task(params=params, train_loss=mse, val_loss=mse, train_data=train,
                   val_data=val, space=space, optimizer=optimizer, steps=steps)
    # A regression task reports its test loss only (no accuracy).
    return Problem(task, lambda params, hparams: {"test_loss": mse(params, hparams, test)})


def problem_e(quick: bool, data: str | None = None) -> Problem:
    assert data is None, "problem e runs on its synthetic data only"
    space = hg.HyperSpace({"learning_rate": hg.positive(0.01), "momentum": hg.unit(0.9),
                           "weight_decay": hg.positive(1e-2)})
    return _mlp_problem(space, hg.inner.sgd(), 20 if quick else 200)


def warmup_cosine(peak_learning_rate: Any, warmup_fraction: Any, steps: int) -> Callable:
    """A linear warm-up from 0 to ``peak_learning_rate`` over the first
    ``warmup_fraction * steps`` steps, then cosine decay to 0 at ``steps``.

    ``optax.warmup_cosine_decay_schedule`` takes the warm-up length as an integer number
    of steps, which no gradient reaches; here it is ``warmup_fraction * steps``, a real
    number, so the schedule is differentiable in the fraction as well as in the peak.
    With an integer warm-up length the values are optax's (``init_value=0``,
    ``end_value=0``).
    """

    def schedule(count):
        t = jnp.asarray(count).astype(jnp.result_type(peak_learning_rate))
        warm = warmup_fraction * steps
        progress = jnp.clip((t - warm) / (steps - warm), 0.0, 1.0)
        cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return peak_learning_rate * jnp.minimum(t / warm, 1.0) * cosine

    return schedule


def problem_g(quick: bool, data: str | None = None) -> Problem:
    assert data is None, "problem g runs on its synthetic data only"
    steps = 20 if quick else 200
    schedule = hg.inner.schedule(warmup_cosine, peak_learning_rate=0.01, warmup_fraction=0.1,
                                 steps=steps)
    optimizer = hg.inner.from_optax(optax.adamw, learning_rate=schedule, weight_decay=1e-2)
    space = hg.HyperSpace({"peak_learning_rate": hg.positive(0.01),
                           "weight_decay": hg.positive(1e-2),
                           "warmup_fraction": hg.unit(0.1)})
    return _mlp_problem(space, optimizer, steps)


# --------------------------------------------------------------------------------------
# (f): the seed CNN with dropout and input noise


def problem_f(quick: bool, data: str | None = None) -> Problem:
    from hypergrad.task import seed_cnn

    config = Config(**_sizes(quick, data))
    loaded = config.load_data()
    space = hg.HyperSpace({"learning_rate": hg.positive(0.01), "dropout": hg.unit(0.05),
                           "augment_noise": hg.positive(0.05)})
    task, predict = seed_cnn(loaded, space, steps=10 if quick else 100, batch_size=100,
                             loss="mse", channels=(4, 4, 4) if quick else (8, 16, 16),
                             dtype=jnp.float32,
                             optimizer=hg.inner.sgd(momentum=0.5, weight_decay=1e-3),
                             val_batch_size=config.val_batch_size or None)
    return Problem(task, hg.classification_scores(task, predict, loaded.test,
                                                  config.val_batch_size or None))


# --------------------------------------------------------------------------------------
# (h): hyper-cleaning, one weight per training example

#: Hyper-cleaning's training examples (one weight each) and validation examples; the
#: rest of the 1797 embedded digits, 497, are the test set.
CLEANING_SIZES = (1000, 300)


def problem_h(quick: bool, data: str | None = None) -> Problem:
    from hypergrad_experiments.hyper_cleaning import CleaningConfig, build

    assert data is None, "problem h runs on the embedded digits only"
    train, val = CLEANING_SIZES
    return build(CleaningConfig(steps=20 if quick else 500, dtype="float32",
                                data_train_size=train, data_val_size=val))


def problem_h_shared(quick: bool, data: str | None = None) -> Problem:
    """(h) with one weight shared by every training example: the subspace of (h)'s space
    where all weights are equal, from the same start (0: every example weighs 1/2)."""
    problem = problem_h(quick, data)
    task = problem.task
    weighted, n = task.train_loss, task.num_examples

    def train_loss(params, hparams, batch):
        shared = jnp.broadcast_to(hparams["example_weight"], (n,))
        return weighted(params, {**hparams, "example_weight": shared}, batch)

    space = hg.HyperSpace({"example_weight": hg.real(0.0)})
    return problem._replace(task=task.replace(train_loss=train_loss, space=space))


PROBLEMS = {
    "a": ("seed CNN, 4 scalar hyperparameters", problem_a),
    "b": ("seed CNN, per-layer lr and wd + momentum, slope (10)", problem_b),
    "c": ("logistic regression, 64 per-feature L2 penalties", problem_c),
    "d": ("seed CNN, per-layer x per-step lr, per-parameter wd (14 220)", problem_d),
    "e": ("regression MLP on sin x, SGD lr, momentum, wd (3)", problem_e),
    "f": ("seed CNN with dropout and input noise, lr + both strengths (3)", problem_f),
    "g": ("regression MLP, AdamW warm-up cosine: peak lr, wd, warm-up fraction (3)",
          problem_g),
    "h": ("hyper-cleaning, one weight per training example (1000)", problem_h),
}
#: The space the black-box methods search instead, where a problem has too many
#: hyperparameters for them (a subspace of the problem's, with the same start).
REDUCTION: dict[str, Callable[..., Problem]] = {"d": problem_b, "h": problem_h_shared}
#: Stochastic problems: every method's choice is trained and scored again on this many
#: fresh keys (never used by a search), reported as a mean and its standard error.
RESCORE_KEYS = {"f": 4}
#: The problems ``--data`` applies to (the seed CNN ones); the others say what they run on.
DATA_PROBLEMS = ("a", "b", "d", "f")
OWN_DATA = {"c": "the embedded digits", "e": "its synthetic data", "g": "its synthetic data",
            "h": "the embedded digits"}


def size(problem: Problem) -> int:
    """The number of hyperparameters (entries of ``phi``)."""
    return sum(int(np.size(v)) for v in jax.tree.leaves(problem.task.space.init()))


# --------------------------------------------------------------------------------------
# Scoring a configuration


def json_number(x: Any) -> float | None:
    """A finite float, or None (JSON's null) for inf and NaN."""
    x = float(x)
    return x if math.isfinite(x) else None


def trained(task: Task, phi: PyTree, key: jax.Array,
            finish: Callable[[Any], PyTree] | None = None) -> tuple[jax.Array, PyTree, Any]:
    """Train ``task`` with ``phi`` from its start (:func:`hypergrad.unroll.train`, the
    run :func:`hypergrad.unroll.objective` scores): the validation loss, the weights
    (``finish(state)`` or the final params) and the hyperparameters of the last step."""
    hparams = task.space.constrain(phi)
    state, _ = hg.unroll.train(task, hparams, key)
    params = state.params if finish is None else finish(state)
    value = task.validation_loss(params, hparams, state=state.model_state)
    return value, params, task.space.at_step(hparams, task.steps - 1)


@functools.lru_cache(maxsize=8)
def scorer(problem: Problem) -> Callable[..., dict[str, Any]]:
    """``score(task, phi, key, finish) -> {"val_loss", **problem.evaluate(...)}``, jitted
    (one compile per task and ``finish``)."""

    def score(task, phi, key, finish=None):
        value, params, hparams = trained(task, phi, key, finish)
        return {"val_loss": value, **problem.evaluate(params, hparams)}

    return jax.jit(score, static_argnames="finish")


def fresh_keys(seed: int, n: int) -> jax.Array:
    """``n`` keys no search uses: split from ``fold_in(key(seed), 2**31 - 1)`` (searches
    train with ``key(seed)``; resampling tuners with ``fold_in(key(seed), t)`` for
    meta-step ``t``)."""
    return jax.random.split(jax.random.fold_in(jax.random.key(seed), 2**31 - 1), n)


def choice_scores(problem: Problem, task: Task, phi: PyTree, seed: int, rescore: int = 0,
                  finish: Callable[[Any], PyTree] | None = None) -> dict[str, Any]:
    """``phi`` trained and scored with the problem's key (``val_loss``, ``test_loss`` and
    ``test_accuracy`` where the problem has one) and, with ``rescore``, on that many
    fresh keys: ``rescored`` holds the mean and standard error of each over them."""
    score = scorer(problem)
    out: dict[str, Any] = {k: json_number(v) for k, v in
           jax.device_get(score(task, phi, jax.random.key(seed), finish)).items()}
    if rescore:
        runs = [jax.device_get(score(task, phi, k, finish)) for k in fresh_keys(seed, rescore)]
        rescored: dict[str, Any] = {"keys": rescore}
        for name in runs[0]:
            v = np.array([float(r[name]) for r in runs])
            rescored[f"{name}_mean"] = json_number(np.mean(v))
            rescored[f"{name}_stderr"] = json_number(np.std(v, ddof=1) / math.sqrt(len(v)))
        out["rescored"] = rescored
    return out
