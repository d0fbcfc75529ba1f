"""seed-recurrence: the source article's slope recurrence beside gradient descent.

Run:  hypergrad run seed-recurrence        (about 1 minute on 2 CPU cores)

The source article proposes to update a ReLU parameter, the leaky slope ``a``, by
``a_t = a_{t-1} + a_{t-2} (exp(b_t) - b_{t-1})`` with ``b_t`` the hypergradient at meta-step
t (:func:`hypergrad.outer.fibonacci_recurrence`, with ``a_{-1} = b_0 = 0``). This runs it
beside plain gradient descent on the slope (``a <- a - outer_lr * b``) on the seed CNN
(:class:`hypergrad.models.SeedCNN`, digits, MSE), each for ``meta_steps`` meta-steps of
reverse-mode hypergradients through ``steps`` SGD steps; learning rate, momentum and
weight decay stay fixed at their initial values. The slope is a ``real`` hyperparameter,
so ``phi`` is the slope itself and ``b_t = dL_val / da``.

A meta-step whose validation loss or hypergradient is not finite, or whose update would
make the slope non-finite or larger than ``max_slope`` in magnitude, is refused (the
slope keeps its last value) and ends that trajectory; the reason is in ``results.json``.

Writes ``results.json`` and ``trajectories.png``. Measured (seed 0, T = 40, 15 meta-steps):
the recurrence's slope went 0.01, 0.01, 0.02, 0.03, 0.05, 0.08, 0.13, 0.21, 0.33, 0.53,
0.87 -- the Fibonacci numbers times 0.01 to two digits, because the hypergradients were
small (|b| < 0.15) -- and at slope 0.87 training diverged (non-finite validation loss),
so the run stopped after 10 updates; its validation loss fell from 0.484 to 0.439 on the
way, only because a larger slope happened to help here. Gradient descent moved the slope
from 0.01 to -0.53 and the validation loss from 0.484 to 0.462, oscillating at the end.
The recurrence does not descend: its step is ``a_{t-2}`` times ``exp(b_t) - b_{t-1}``,
which is positive whenever ``|b| < 0.5`` (here ``|b| < 0.15``), so a positive slope grows
whatever the sign of the hypergradient.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import hypergrad as hg
from hypergrad.config import Config, ConfigError, parse_widths
from hypergrad.experiment import Experiment, Problem
from hypergrad.plots import save_figure
from hypergrad.task import classification

UPDATES = {"gd": "gradient descent", "recurrence": "recurrence (article)"}


@dataclasses.dataclass(frozen=True)
class SeedRecurrenceConfig(Config):
    """The seed CNN with a short horizon; ``outer_lr`` is gradient descent's step on the
    slope; ``max_slope`` bounds the slope's magnitude (a step beyond ends the run)."""

    steps: int = 40
    meta_steps: int = 15
    outer_lr: float | None = 1.0
    learning_rate: float = 0.01
    momentum: float = 0.5
    weight_decay: float = 0.001
    leaky_slope: float = 0.01
    max_slope: float = 100.0
    channels: str = "8,16,16"

    def validate(self) -> SeedRecurrenceConfig:
        super().validate()
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate:g}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum:g}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay:g}")
        if not self.max_slope > abs(self.leaky_slope):
            raise ConfigError(f"max_slope must exceed |leaky_slope|, got {self.max_slope:g}")
        self.widths()
        return self

    def widths(self) -> tuple[int, ...]:
        """The convolutions' output channels, from ``channels`` such as ``"8,16,16"``."""
        return parse_widths("channels", self.channels)

    def space(self) -> hg.HyperSpace:
        return hg.HyperSpace({"leaky_slope": hg.real(self.leaky_slope)})


def build(config: SeedRecurrenceConfig) -> Problem:
    """The seed CNN tuning only its slope; SGD's hyperparameters fixed."""
    dtype = jnp.dtype(config.dtype)
    data = config.load_data()
    *image_shape, in_channels = data.input_shape
    model = hg.models.SeedCNN(nnx.Rngs(config.seed), in_channels=in_channels,
                              channels=config.widths(), num_classes=data.num_classes,
                              image_shape=tuple(image_shape), param_dtype=dtype)
    optimizer = hg.inner.sgd(config.learning_rate, config.momentum, config.weight_decay)
    task, predict = classification(model, data, config.hyperspace(), steps=config.steps,
                                   batch_size=config.batch_size or None, loss=config.loss,
                                   optimizer=optimizer)
    evaluate = hg.classification_scores(task, predict, data.test)

    return Problem(task, evaluate)


def hyper_update(name: str, config: SeedRecurrenceConfig) -> optax.GradientTransformationExtraArgs:
    """``gd`` (gradient descent with ``outer_lr``, 1.0 if none) or the ``recurrence``."""
    if name == "gd":
        return hg.outer.gradient_descent(1.0 if config.outer_lr is None else config.outer_lr)
    return hg.outer.fibonacci_recurrence()


def trajectory(task: hg.Task, opt, config: SeedRecurrenceConfig, key) -> dict:
    """Run ``meta_steps`` meta-steps of :func:`hg.tune`, unclipped; stop at the first
    refused one (a guard that retires after one rejection, with no divergence checks and
    no trust region: the recurrence is watched, not steered).

    Returns per meta-step t the slope ``a_t``, the validation loss at it, the
    hypergradient ``b_t`` and the seconds taken; after the last meta-step the final slope
    and its validation loss; ``stopped`` says why a run ended early (else ``None``).
    """
    guard = hg.Guard(max_rejections=1, value_ratio=math.inf, grad_ratio=math.inf,
                     max_phi=config.max_slope, tolerance=math.inf)
    phi = task.space.init(jnp.dtype(config.dtype))
    try:
        with warnings.catch_warnings():  # a stop is an outcome here, reported below
            warnings.simplefilter("ignore", hg.TuneWarning)
            history = hg.tune(task, hg.estimators.reverse(), opt, key=key, phi=phi,
                              meta_steps=config.meta_steps, clip=0.0, guard=guard)
    except hg.TuneError:  # the start itself: nothing was ever accepted
        return {"slope": [float(phi["leaky_slope"])], "val_loss": [None], "hypergrad": [None],
                "seconds": [], "stopped": f"meta-step 0: non-finite validation loss or "
                                          f"hypergradient at slope {config.leaky_slope:.4g}; "
                                          "stopped"}

    def finite(v):
        return float(v) if math.isfinite(v) else None

    out = {"slope": [float(a) for a in history.hparams["leaky_slope"]],
           "val_loss": [finite(v) for v in history.val_loss],
           "hypergrad": [finite(b) for b in history.hypergrad["leaky_slope"]],
           "seconds": history.seconds.tolist(), "stopped": None}
    if history.stopped is None:
        out["slope"].append(float(history.final.hparams["leaky_slope"]))
        out["val_loss"].append(finite(history.final.val_loss))
        out["hypergrad"].append(None)
    elif history.point_ok[-1]:
        out["stopped"] = (f"meta-step {len(history) - 1}: the update would move the slope "
                          f"beyond max_slope = {config.max_slope:g}; refused and stopped")
    else:
        out["stopped"] = (f"meta-step {len(history) - 1}: non-finite validation loss or "
                          f"hypergradient at slope {out['slope'][-1]:.4g}; stopped")
    return out


def main(config: SeedRecurrenceConfig, workdir: Path, progress: bool) -> dict:
    """Both hyper-updates from the same start; write results and the figure."""
    task = build(config).task
    key = jax.random.key(config.seed)
    results = {}
    for name in UPDATES:
        t0 = time.perf_counter()
        results[name] = trajectory(task, hyper_update(name, config), config, key)
        results[name]["total_seconds"] = time.perf_counter() - t0
        if progress:
            print(f"{name:10s} {results[name]['total_seconds']:6.1f} s", flush=True)
    results["fibonacci"] = _fibonacci(config.leaky_slope, config.meta_steps + 1)
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(workdir / "results.json", workdir / "trajectories.png")
    summary = {}
    for name in UPDATES:
        r = results[name]
        finite = [v for v in r["val_loss"] if v is not None]
        summary[name] = {"initial_slope": r["slope"][0], "final_slope": r["slope"][-1],
                         "initial_val_loss": finite[0] if finite else None,
                         "final_val_loss": finite[-1] if finite else None,
                         "best_val_loss": min(finite) if finite else None,
                         "meta_steps_run": len(r["slope"]) - (r["stopped"] is None),
                         "stopped": r["stopped"]}
    return summary


def _fibonacci(a0: float, n: int) -> list[float]:
    """``a_t = F_{t+1} a0`` for t = 0 ... n - 1: the recurrence with zero hypergradients."""
    a, b, out = 1, 1, []
    for _ in range(n):
        out.append(a * a0)
        a, b = b, a + b
    return out


def plot(results_path: Path, path: Path) -> None:
    """Slope and validation loss per meta-step for both hyper-updates, from
    ``results.json``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(Path(results_path).read_text())
    fig, (ax_s, ax_v) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=90)
    for name, label in UPDATES.items():
        r = results[name]
        steps = list(range(len(r["slope"])))
        ax_s.plot(steps, r["slope"], marker=".", label=label)
        pts = [(i, v) for i, v in enumerate(r["val_loss"]) if v is not None]
        ax_v.plot([i for i, _ in pts], [v for _, v in pts], marker=".", label=label)
    fib = results["fibonacci"]
    ax_s.plot(range(len(fib)), fib, "k--", linewidth=1, label=r"$F_{t+1}\,a_0$ (zero $b$)")
    ax_s.set_yscale("symlog", linthresh=0.01)  # the slope may cross zero
    ax_s.set_ylim(top=max(1.0, *(abs(s) for n in UPDATES for s in results[n]["slope"])) * 3)
    ax_s.set(xlabel="meta-step t", ylabel="leaky-ReLU slope a_t (symlog)")
    for name in UPDATES:  # mark where a run was stopped
        if results[name]["stopped"]:
            t = len(results[name]["slope"]) - 1
            ax_s.plot([t], [results[name]["slope"][-1]], "rx", markersize=8)
            ax_s.annotate("stopped: validation\nloss not finite here" if "non-finite" in
                          results[name]["stopped"] else "stopped here",
                          (t, results[name]["slope"][-1]), textcoords="offset points",
                          xytext=(8, -22), fontsize=7)
    ax_v.set(xlabel="meta-step t", ylabel="validation loss (MSE)")
    for ax in (ax_s, ax_v):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def redraw(workdir: Path, out: Path) -> list[Path]:
    """``trajectories.png`` in ``out`` from ``workdir/results.json``."""
    plot(workdir / "results.json", out / "trajectories.png")
    return [out / "trajectories.png"]


EXPERIMENT = Experiment(
    "seed-recurrence", SeedRecurrenceConfig(), build,
    "the source article's Fibonacci-like slope recurrence beside gradient descent on the "
    "seed CNN", main, redraw)
