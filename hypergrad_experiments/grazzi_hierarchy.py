"""grazzi-hierarchy: how fast each hypergradient method approaches the exact one.

Run:  hypergrad run grazzi-hierarchy        (about 90 s on 2 CPU cores)

Mirrors Grazzi et al. (2020), "On the Iteration Complexity of Hypergradient
Computation", Fig. 2: L2-regularized multinomial logistic regression on the embedded
digits with one penalty per input feature (64 hyperparameters), trained by full-batch
gradient descent. For t = 1 ... 100 iterations it measures the relative error of each
hypergradient against a tightly converged conjugate-gradient reference, and its time:

- iterative differentiation (``reverse``): backpropagation through t inner steps;
- approximate implicit differentiation at the trained weights (``steps`` inner steps):
  ``implicit`` with t iterations of conjugate gradient, of the fixed-point iteration,
  and t terms of the Neumann series (both with the inner learning rate as step).

Writes ``results.json`` (every error and time) and ``hierarchy.png``. Grazzi et al. found
conjugate gradient < fixed point <= iterative differentiation in error at equal t; the
numbers we measured are in docs/gallery/grazzi_hierarchy.md.

``grazzi-mnist`` is the same on real MNIST with one penalty per pixel (784
hyperparameters; ``features=784``), 2000 training images and 1000 inner steps; at t = 100
the relative errors were CG 7.5e-13, fixed point 0.14, reverse 0.31.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import hypergrad as hg
from hypergrad.config import Config, ConfigError
from hypergrad.estimators import NotConvergedWarning
from hypergrad.experiment import Experiment, Problem
from hypergrad.plots import save_figure
from hypergrad.task import classification


@dataclasses.dataclass(frozen=True)
class GrazziConfig(Config):
    """``steps`` trains the weights the implicit methods start from; ``iterations`` are the
    t at which every method is measured; ``l2`` is each feature's initial penalty;
    ``features`` is the data's input size (64 for the 8x8 digits, 784 for MNIST): one
    penalty each."""

    steps: int = 3000
    batch_size: int = 0
    dtype: str = "float64"
    loss: str = "ce"
    inner_lr: float = 0.1
    l2: float = 0.05
    iterations: str = "1,2,5,10,20,50,100"
    repeats: int = 3
    features: int = 64

    def space(self) -> hg.HyperSpace:
        return hg.HyperSpace({"l2": hg.positive(np.full(self.features, self.l2))})

    def validate(self) -> GrazziConfig:
        super().validate()
        if not self.inner_lr > 0:
            raise ConfigError(f"inner_lr must be > 0, got {self.inner_lr:g}")
        if self.repeats < 1:
            raise ConfigError(f"repeats must be at least 1, got {self.repeats}")
        self.ts()
        return self

    def ts(self) -> list[int]:
        """The iteration counts t, from ``iterations`` such as ``"1,10,100"``."""
        try:
            ts = [int(t) for t in self.iterations.split(",")]
        except ValueError:
            ts = []
        if not ts or min(ts) < 1:
            raise ConfigError(f"iterations must be positive integers separated by commas, "
                              f"got {self.iterations!r}")
        return ts


def build(config: GrazziConfig) -> Problem:
    """Logistic regression with a penalty ``sum_j l2_j |W_j|^2`` per input feature j."""
    dtype = jnp.dtype(config.dtype)
    data = config.load_data()
    if config.features != math.prod(data.input_shape):
        raise ConfigError(f"features must be {math.prod(data.input_shape)} (one penalty per "
                          f"input of {config.data}), got {config.features}")
    model = hg.models.LogisticRegression(nnx.Rngs(config.seed), config.features,
                                         data.num_classes,
                                         param_dtype=dtype)
    # The penalty is added below: the plain task tunes nothing yet.
    task, predict = classification(model, data, hg.HyperSpace({}), steps=config.steps,
                                   batch_size=config.batch_size or None, loss=config.loss,
                                   optimizer=hg.inner.sgd(learning_rate=config.inner_lr))
    data_loss = task.train_loss

    def penalized(params, hparams, batch):
        w = params["linear"]["kernel"]
        return data_loss(params, hparams, batch) + jnp.sum(hparams["l2"][:, None] * w**2)

    task = task.replace(train_loss=penalized, space=config.hyperspace())
    evaluate = hg.classification_scores(task, predict, data.test, loss=data_loss)

    return Problem(task, evaluate)


def _timed(fn, repeats):
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def main(config: GrazziConfig, workdir: Path, progress: bool) -> dict:
    """Measure every method's error and time at each t; write results and the figure."""
    if config.dtype == "float64":
        jax.config.update("jax_enable_x64", True)  # errors down to 1e-12 need float64
    task = build(config).task
    phi, key = task.space.init(jnp.dtype(config.dtype)), jax.random.key(config.seed)
    reference = hg.estimators.implicit("cg", maxiter=1000, tol=1e-12)
    _, g_ref, aux = jax.jit(reference)(task, phi, key)
    g_ref = np.asarray(g_ref["l2"])
    if not bool(aux["converged"]):
        raise ConfigError("the reference CG solve did not converge; raise steps")

    def methods(t):
        return {
            "reverse": (task.replace(steps=t), hg.estimators.reverse()),
            "cg": (task, hg.estimators.implicit("cg", maxiter=t, tol=1e-30)),
            "fixed_point": (task, hg.estimators.implicit(
                "fixed_point", maxiter=t, tol=1e-30, alpha=config.inner_lr)),
            "neumann": (task, hg.estimators.implicit(
                "neumann", maxiter=t, tol=1e-30, alpha=config.inner_lr)),
        }

    results = {name: {"t": [], "rel_error": [], "seconds": []} for name in methods(1)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotConvergedWarning)  # unconverged on purpose
        for t in config.ts():
            for name, (task_t, est) in methods(t).items():
                f = jax.jit(est)
                (_, g, _), seconds = _timed(lambda f=f, task_t=task_t: f(task_t, phi, key),
                                            config.repeats)
                err = float(np.linalg.norm(np.asarray(g["l2"]) - g_ref) /
                            np.linalg.norm(g_ref))
                results[name]["t"].append(t)
                results[name]["rel_error"].append(err)
                results[name]["seconds"].append(seconds)
                if progress:
                    print(f"t={t:4d} {name:12s} rel error {err:9.2e}  {seconds * 1e3:8.2f} ms",
                          flush=True)
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _plot(results, workdir / "hierarchy.png")
    t_max = config.ts()[-1]
    return {"reference_norm": float(np.linalg.norm(g_ref)), "t_max": t_max,
            "rel_error_at_t_max": {n: r["rel_error"][-1] for n, r in results.items()},
            "seconds_at_t_max": {n: r["seconds"][-1] for n, r in results.items()}}


def _plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_err, ax_time) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=100)
    for name, r in results.items():
        ax_err.loglog(r["t"], np.maximum(r["rel_error"], 1e-16), marker=".", label=name)
        ax_time.loglog(r["t"], r["seconds"], marker=".", label=name)
    ax_err.set(xlabel="iterations t", ylabel="relative error of the hypergradient")
    ax_time.set(xlabel="iterations t", ylabel="seconds")
    for ax in (ax_err, ax_time):
        ax.grid(alpha=0.3, which="both")
    ax_err.legend(fontsize=8)
    save_figure(fig, path)


def redraw(workdir: Path, out: Path) -> list[Path]:
    """``hierarchy.png`` in ``out`` from ``workdir/results.json``."""
    _plot(json.loads((workdir / "results.json").read_text()), out / "hierarchy.png")
    return [out / "hierarchy.png"]


EXPERIMENT = Experiment(
    "grazzi-hierarchy", GrazziConfig(), build,
    "hypergradient error and time against iterations: reverse, CG, fixed point, Neumann "
    "(Grazzi et al. 2020)", main, redraw)

MNIST = Experiment(
    "grazzi-mnist",
    dataclasses.replace(GrazziConfig(), data="mnist", features=784, steps=1000, repeats=1,
                        data_train_size=2000,
                        data_val_size=1000, data_test_size=1000),
    build,
    "the hierarchy of hypergradient approximations on real MNIST: one L2 penalty per pixel "
    "(784 hyperparameters) of logistic regression", main, redraw)
