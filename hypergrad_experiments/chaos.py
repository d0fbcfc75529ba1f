"""chaos: reverse, truncated, ES and PES hypergradients where the meta-objective is chaotic.

Run:  hypergrad run chaos        (about 7 minutes on 2 shared CPU cores)

The seed CNN (channels 4, 4, 4) on 500 digits, minibatches of 50, trained by SGD with
momentum 0.9 (no weight decay, leaky slope 0.1) for ``steps`` = 300 steps. Near
learning rate 0.1 training sits at the edge of stability: the validation loss is a
jagged function of the learning rate and reverse-mode hypergradients of the long unroll
grow by orders of magnitude, then turn NaN where training diverges (Metz et al. 2019).

1. The slice: for ``points`` learning rates spaced evenly in log on ``[slice_low,
   slice_high]`` (the other hyperparameters fixed), the validation loss and its
   derivative in log learning rate by ``reverse()``, ``truncated(window)``,
   ``es(sigma, num_pairs, cap=cap)`` and ``pes(sigma, num_pairs, window, cap=cap)`` (with
   the standard error of the ES and PES estimates and how many of their ``2 num_pairs``
   perturbed runs diverged or passed ``cap``). Every run trains with the same key.
2. Tuning: :func:`hypergrad.tune` from the same start (learning rate ``learning_rate``,
   momentum, leaky slope all tuned) with the same outer optimizer (``outer``,
   ``outer_lr``, ``clip``): ``meta_steps`` hyper-updates with each of reverse, truncated
   and ES (one or ``2 num_pairs + 1`` training runs per hyper-update), and one training
   run tuned online by PES (``steps // window`` hyper-updates, one per window, its
   ``2 num_pairs`` particles keeping their weights); the validation loss per meta-step,
   which meta-steps the guard rejected, and the test loss and accuracy of training from
   scratch at the final and the best point.

Writes ``results.json`` and ``chaos.png`` (the slice with the four derivatives; the
tuning curves). The numbers measured with the defaults are in docs/gallery/chaos.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import hypergrad as hg
from hypergrad.config import Config, ConfigError, parse_widths
from hypergrad.experiment import Experiment, Problem, tune_options
from hypergrad.plots import save_figure
from hypergrad.task import seed_cnn
from hypergrad.unroll import objective

ESTIMATORS = ("reverse", "truncated", "es", "pes")
SMOOTHED = ("es", "pes")  # estimators with a standard error and perturbed runs


@dataclasses.dataclass(frozen=True)
class ChaosConfig(Config):
    """``learning_rate``, ``momentum``, ``weight_decay`` and ``leaky_slope`` are the SGD
    run's (the slice varies the learning rate; tuning starts from all of them and tunes
    all but the weight decay); ``points`` learning rates log-spaced on ``[slice_low,
    slice_high]`` make the slice; ``window`` is truncated's and pes's window, ``sigma``,
    ``num_pairs`` and ``cap`` are es's and pes's (``cap`` 1.0: the MSE of predicting zeros,
    standing in for a diverged run); ``channels`` the CNN's widths."""

    # What this experiment measures: one local run from the configured values (``--set
    # strategy=default`` explores first, as ``hypergrad run`` does by default).
    strategy: str = "local"

    steps: int = 300
    meta_steps: int = 30
    batch_size: int = 50
    outer: str = "adam"
    outer_lr: float | None = 0.05
    data_train_size: int = dataclasses.field(default=500, metadata={"key": "data.train_size"})
    data_val_size: int = dataclasses.field(default=200, metadata={"key": "data.val_size"})
    data_test_size: int = dataclasses.field(default=400, metadata={"key": "data.test_size"})
    window: int = 20
    sigma: float = 0.05
    num_pairs: int = 8
    cap: float | None = 1.0
    learning_rate: float = 0.09
    momentum: float = 0.9
    weight_decay: float = 0.0
    leaky_slope: float = 0.1
    points: int = 13
    slice_low: float = 0.04
    slice_high: float = 0.12
    channels: str = "4,4,4"

    def space(self) -> hg.HyperSpace:
        return hg.HyperSpace({"learning_rate": hg.positive(self.learning_rate),
                              "momentum": hg.unit(self.momentum),
                              "leaky_slope": hg.bounded(self.leaky_slope, 0.0, 1.0)})

    def validate(self) -> ChaosConfig:
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate:g}")
        if not 0 < self.momentum < 1:
            raise ConfigError(f"momentum must be in (0, 1), got {self.momentum:g}")
        if not 0 < self.leaky_slope < 1:
            raise ConfigError(f"leaky_slope must be in (0, 1), got {self.leaky_slope:g}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay:g}")
        super().validate()
        if self.window > self.steps:
            raise ConfigError(f"window must be at most steps ({self.steps}), got {self.window}")
        if self.points < 1:
            raise ConfigError(f"points must be at least 1, got {self.points}")
        if not 0 < self.slice_low <= self.slice_high:
            raise ConfigError(f"need 0 < slice_low <= slice_high, got {self.slice_low:g} and "
                              f"{self.slice_high:g}")
        self.widths()
        return self

    def widths(self) -> tuple[int, ...]:
        """The convolutions' output channels, from ``channels`` such as ``"4,4,4"``."""
        return parse_widths("channels", self.channels)


def build(config: ChaosConfig) -> Problem:
    """The seed CNN on digits with SGD at ``weight_decay`` (fixed); test metrics on the
    held-out split."""
    dtype = jnp.dtype(config.dtype)
    data = config.load_data()
    sgd = hg.inner.sgd(weight_decay=config.weight_decay)
    task, predict = seed_cnn(data, config.hyperspace(), steps=config.steps,
                             batch_size=config.batch_size or None, loss=config.loss,
                             seed=config.seed, channels=config.widths(), dtype=dtype,
                             optimizer=sgd)
    return Problem(task, hg.classification_scores(task, predict, data.test))


def estimators(config: ChaosConfig) -> dict[str, hg.estimators.Estimator]:
    """The four estimators compared, by name."""
    return {"reverse": hg.estimators.reverse(),
            "truncated": hg.estimators.truncated(config.window),
            "es": hg.estimators.es(config.sigma, config.num_pairs, cap=config.cap),
            "pes": hg.estimators.pes(config.sigma, config.num_pairs, config.window,
                                     cap=config.cap)}


def _finite(x: float) -> float | None:
    """``x``, or ``None`` (JSON null) where it is NaN or infinite."""
    return float(x) if math.isfinite(x) else None


def slice_(config: ChaosConfig, problem: Problem, progress: bool = False) -> dict[str, Any]:
    """The validation loss and each estimator's derivative in log learning rate along
    ``points`` learning rates (the other hyperparameters at their configured values);
    ``progress`` prints a line per learning rate."""
    task = problem.task
    key = jax.random.key(config.seed)
    jitted = {name: jax.jit(est) for name, est in estimators(config).items()}
    phi0 = task.space.init(jnp.dtype(config.dtype))
    lrs = np.geomspace(config.slice_low, config.slice_high, config.points)
    out: dict[str, Any] = {"learning_rate": lrs.tolist(), "val_loss": [],
                           **{name: [] for name in ESTIMATORS},
                           **{f"{n}_{k}": [] for n in SMOOTHED for k in ("stderr", "capped")},
                           "seconds": {name: 0.0 for name in ESTIMATORS}}
    for lr in lrs:
        phi = {**phi0, "learning_rate": jnp.log(jnp.asarray(lr, phi0["learning_rate"].dtype))}
        for name, est in jitted.items():
            began = time.perf_counter()
            value, grad, aux = jax.block_until_ready(est(task, phi, key))
            out["seconds"][name] += time.perf_counter() - began
            if name == "reverse":
                out["val_loss"].append(_finite(float(value)))
            out[name].append(_finite(float(grad["learning_rate"])))
            if name in SMOOTHED:
                out[f"{name}_stderr"].append(_finite(float(aux["stderr"]["learning_rate"])))
                out[f"{name}_capped"].append(int(aux["capped"]))
        if progress:
            print(f"slice lr {lr:.4g}: val_loss {out['val_loss'][-1]}, "
                  + ", ".join(f"{n} {out[n][-1]}" for n in ESTIMATORS)
                  + "".join(f" ({n} stderr {out[n + '_stderr'][-1]}, capped "
                            f"{out[n + '_capped'][-1]})" for n in SMOOTHED), flush=True)
    return out


def _scores(problem: Problem):
    """A jitted ``(task, phi, key) -> {val_loss, test_loss, test_accuracy}``."""

    def scores(task, phi, key):
        value, aux = objective(task, phi, key)
        return {"val_loss": value,
                **problem.evaluate(aux["params"], task.space.constrain(phi))}

    return jax.jit(scores)


def tune_each(config: ChaosConfig, problem: Problem, progress: bool,
              scores=None) -> dict[str, Any]:
    """:func:`hypergrad.tune` with each estimator from the same start and outer optimizer
    (``meta_steps`` hyper-updates; pes: one run tuned online); the curves and the final
    and best points' scores, trained from scratch (by ``scores``, default
    :func:`_scores`)."""
    task = problem.task
    key = jax.random.key(config.seed)
    scores = scores or _scores(problem)
    out = {}
    for name, est in estimators(config).items():
        online = name == "pes"
        with warnings.catch_warnings():  # a stop or a returned start is reported below
            warnings.simplefilter("ignore", hg.TuneWarning)
            history = hg.tune(task, **tune_options(config) | {
                "estimator": est, "key": key, "online": online,
                "meta_steps": None if online else config.meta_steps}, progress=progress)
        val_loss = [_finite(float(v)) for v in history.val_loss]
        best_phi, best_step = history.best.phi, history.best.meta_step
        extra: dict[str, Any] = {}
        if online:
            # The window's loss is of weights still training: the curve and the best point
            # are by a full run from scratch at each meta-step's hyperparameters instead,
            # as the other estimators' are.
            extra["window_val_loss"] = val_loss
            phis = [task.space.unconstrain({n: np.asarray(v)[k]
                                            for n, v in history.hparams.items()})
                    for k in range(len(val_loss))]
            val_loss = [_finite(float(scores(task, phi, key)["val_loss"])) for phi in phis]
            ranked = [(v, k) for k, v in enumerate(val_loss)
                      if v is not None and history.accepted[k]]
            if ranked:
                best_step = min(ranked)[1]
                best_phi = phis[best_step]
        final = jax.device_get(scores(task, history.final.phi, key))
        best = jax.device_get(scores(task, best_phi, key))
        out[name] = {
            "val_loss": val_loss, **extra,
            "accepted": np.asarray(history.accepted).tolist(),
            "learning_rate": [float(v) for v in np.asarray(history.hparams["learning_rate"])],
            "seconds": float(np.sum(history.seconds)),
            "stopped": history.stopped,
            "diagnosis": history.diagnosis,
            "online": online,
            "final_meta_step": history.final.meta_step,
            "best_meta_step": best_step,
            "final_hparams": {k: float(v) for k, v in history.final.hparams.items()},
            "best_hparams": {k: float(v) for k, v in task.space.constrain(best_phi).items()},
            **{f"final_{k}": float(v) for k, v in final.items()},
            **{f"best_{k}": float(v) for k, v in best.items()},
        }
    return out


def main(config: ChaosConfig, workdir: Path, progress: bool) -> dict[str, Any]:
    """The slice, then a tuning run with each estimator; ``results.json`` and the figure."""
    problem = build(config)
    began = time.perf_counter()
    sliced = slice_(config, problem, progress)
    slice_seconds = time.perf_counter() - began
    began = time.perf_counter()
    scores = _scores(problem)
    tuned = tune_each(config, problem, progress, scores)
    tune_seconds = time.perf_counter() - began
    phi0 = problem.task.space.init(jnp.dtype(config.dtype))
    start = jax.device_get(scores(problem.task, phi0, jax.random.key(config.seed)))
    results = {"slice": sliced, "tune": tuned,
               "start": {k: float(v) for k, v in start.items()},
               "slice_seconds": slice_seconds, "tune_seconds": tune_seconds}
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(workdir / "results.json", workdir / "chaos.png")
    nan = {name: sum(v is None for v in sliced[name]) for name in ESTIMATORS}
    return {
        "start_val_loss": results["start"]["val_loss"],
        **{f"{name}_best_val_loss": tuned[name]["best_val_loss"] for name in ESTIMATORS},
        **{f"{name}_best_test_accuracy": tuned[name]["best_test_accuracy"]
           for name in ESTIMATORS},
        **{f"{name}_final_val_loss": tuned[name]["final_val_loss"] for name in ESTIMATORS},
        **{f"{name}_slice_nan": nan[name] for name in ESTIMATORS},
        "slice_seconds": slice_seconds,
        "tune_seconds": tune_seconds,
    }


STYLES = {"reverse": "C3", "truncated": "C0", "es": "C2", "pes": "C1"}
NAN_MARKERS = {"reverse": "x", "truncated": "+", "es": "1", "pes": "2"}


def _array(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _draw_slice(sliced: dict[str, Any], loss_ax, deriv_ax) -> None:
    """The validation loss along the learning rate on ``loss_ax``; each estimator's
    derivative in log learning rate on ``deriv_ax`` (symlog; a NaN is a cross at 0; the
    bands are ES's and PES's two standard errors)."""
    lr = np.asarray(sliced["learning_rate"])
    loss_ax.plot(lr, _array(sliced["val_loss"]), "k.-")
    loss_ax.set(xscale="log", xlabel="learning rate", ylabel="validation loss",
                title="the meta-objective along log lr")
    loss_ax.grid(alpha=0.3, which="both")
    for name in ESTIMATORS:
        d = _array(sliced[name])
        deriv_ax.plot(lr, d, ".-", color=STYLES[name], label=name)
        missing = ~np.isfinite(d)
        if missing.any():
            deriv_ax.plot(lr[missing], np.zeros(missing.sum()), NAN_MARKERS[name],
                          color=STYLES[name], ms=10, mew=1.5)
    for name in SMOOTHED:
        d, se = _array(sliced[name]), _array(sliced[f"{name}_stderr"])
        deriv_ax.fill_between(lr, d - 2 * se, d + 2 * se, color=STYLES[name], alpha=0.2)
    deriv_ax.set_yscale("symlog", linthresh=1.0)
    deriv_ax.set(xscale="log", xlabel="learning rate", ylabel="d val_loss / d log lr",
                 title="derivatives (crosses at 0: NaN)")
    deriv_ax.grid(alpha=0.3, which="both")
    deriv_ax.legend(fontsize=7)


def plot_slice(sliced: dict[str, Any], path: Path) -> None:
    """The slice alone (:func:`slice_`'s result), as two panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5), dpi=90)
    _draw_slice(sliced, *axes)
    save_figure(fig, path)


def plot(results_path: Path, path: Path) -> None:
    """The slice (left: the validation loss; middle: the four derivatives) and the
    validation loss per meta-step of each tuning run (right; a cross marks a meta-step the
    guard rejected, on the start's level where its loss was NaN), from ``results.json``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(Path(results_path).read_text())
    tuned, start = results["tune"], results["start"]["val_loss"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5), dpi=90)
    _draw_slice(results["slice"], axes[0], axes[1])
    ax = axes[2]
    for name in ESTIMATORS:
        r = tuned[name]
        v = _array(r["val_loss"])
        steps = np.arange(len(v))
        ok = np.asarray(r["accepted"], bool)
        ax.plot(steps, v, "-", color=STYLES[name],
                label=f"{name}{', online' if r.get('online') else ''} "
                      f"(best {r['best_val_loss']:.3f})")
        ax.plot(steps[~ok], np.where(np.isfinite(v), v, start)[~ok], NAN_MARKERS[name],
                color=STYLES[name], ms=10, mew=1.5)
    ax.axhline(start, color="gray", ls=":", lw=0.8)
    ax.set(xlabel="meta-step", ylabel="validation loss", title="tuning from the same start")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def redraw(workdir: Path, out: Path) -> list[Path]:
    """``chaos.png`` in ``out`` from ``workdir/results.json``."""
    plot(workdir / "results.json", out / "chaos.png")
    return [out / "chaos.png"]


EXPERIMENT = Experiment(
    "chaos", ChaosConfig(), build,
    "reverse, truncated and ES hypergradients on the seed CNN at the edge of stability: "
    "the jagged meta-objective along log lr, the three derivatives along it, and a tuning "
    "run with each", main, redraw)
