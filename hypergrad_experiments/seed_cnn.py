"""seed-cnn: the seed CNN on the embedded digits, its hyperparameters tuned by hypergradient.

Run:  hypergrad run                      (or: hypergrad run seed-cnn --set outer=ncg)

Every hyperparameter can be spread over the layers and the steps, for example
``--set hparams.learning_rate.per=layer --set hparams.learning_rate.schedule=per_step``;
``--set optimizer=adam`` trains with a differentiable Adam (``b1``, ``b2``, ``eps`` tuned
too), and ``--set loss_mix=0.5``, ``label_smoothing=0.05`` or ``init_scale=1`` tunes
those as well.

The reference example: three 3x3 convolutions with leaky ReLU and a dense head, MSE loss
on one-hot targets, SGD with learning rate 0.01, momentum 0.5 and weight decay 0.001 and
leaky-ReLU slope 0.01 to start; all four are tuned by reverse-mode hypergradients
through T inner steps, with gradient-descent (``gd``), nonlinear-CG (``ncg``) or Adam
(``adam``) hyper-updates.

seed-mnist: the same setup on real MNIST, tuned by GD, nonlinear CG and Adam.

Run:  hypergrad run seed-mnist --set data=idx:../shared/data/mnist-10k
      (MNIST-format files, no network; ``data=mnist`` reads tfds's MNIST)

The seed CNN (three 3x3 convolutions 8, 16, 16 with leaky ReLU and a dense head, MSE on
one-hot targets) on 28x28 MNIST: SGD from learning rate 0.01, momentum 0.5, weight decay
0.001 and leaky slope 0.01, T = 100 steps of minibatches of 100 from 5000 training
images, validated on 1000 and tested on 2000 others. The four hyperparameters are tuned
three times from that same start, by ``meta_steps`` hyper-updates each of gradient descent
(``gd``), nonlinear conjugate gradient with a line search (``ncg``) and Adam (``adam``) on
reverse-mode hypergradients (checkpointed every 10 steps: one meta-step is about 45 s on
2 CPU cores). Every method scores its incumbent (the best validation loss it evaluated) and
its last point by training again and testing on the held-out images.

Writes ``results.json`` and ``methods.png`` (validation loss per meta-step and the
learning rate's trajectory per method); the numbers measured are in docs/gallery/seed_cnn.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import hypergrad as hg
from hypergrad.config import Config, ConfigError, parse_widths
from hypergrad.experiment import (
    Experiment,
    Problem,
    trained_scores,
    tune_options,
)
from hypergrad.plots import save_figure
from hypergrad.task import seed_cnn


@dataclasses.dataclass(frozen=True)
class SeedCnnConfig(Config):
    """The seed CNN's config: the common keys plus each hyperparameter's initial value."""

    meta_steps: int = 40
    optimizer: str = "sgd"
    learning_rate: float = 0.01
    momentum: float = 0.5
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.001
    leaky_slope: float = 0.01
    loss_mix: float | None = None
    label_smoothing: float | None = None
    init_scale: float | None = None
    channels: str = "8,16,16"
    conv: str = "auto"

    def validate(self) -> SeedCnnConfig:
        if self.conv not in hg.models.CONVS:
            raise ConfigError(f"conv must be one of {', '.join(hg.models.CONVS)}; got "
                              f"{self.conv!r} (auto: hypergrad.models.conv_form's rule)")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got "
                              f"{self.optimizer!r}")
        super().validate()
        self.widths()
        return self

    def widths(self) -> tuple[int, ...]:
        """The convolutions' output channels, from ``channels`` such as ``"8,16,16"``."""
        return parse_widths("channels", self.channels)

    def space(self) -> hg.HyperSpace:
        """The inner optimizer's hyperparameters (SGD: learning rate, momentum, weight
        decay; Adam: learning rate, b1, b2, eps, weight decay), the leaky slope, and those
        of ``loss_mix``, ``label_smoothing`` and ``init_scale`` that are set (a value
        turns tuning on and is the initial value)."""
        decl = {"learning_rate": hg.positive(self.learning_rate)}
        if self.optimizer == "sgd":
            decl["momentum"] = hg.unit(self.momentum)
        else:
            decl |= {"b1": hg.unit(self.b1), "b2": hg.unit(self.b2), "eps": hg.positive(self.eps)}
        decl["weight_decay"] = hg.positive(self.weight_decay)
        decl["leaky_slope"] = hg.bounded(self.leaky_slope, 0.0, 1.0)
        optional = {"loss_mix": hg.unit, "label_smoothing": hg.unit, "init_scale": hg.positive}
        for name, kind in optional.items():
            value = getattr(self, name)
            if value is not None:
                decl[name] = kind(value)
        return hg.HyperSpace(decl)


OPTIMIZERS = ("sgd", "adam")


def build(config: SeedCnnConfig) -> Problem:
    """The seed CNN on the configured data; test metrics on the held-out split."""
    dtype = jnp.dtype(config.dtype)
    data = config.load_data()
    task, predict = seed_cnn(data, config.hyperspace(), steps=config.steps,
                             batch_size=config.batch_size or None, loss=config.loss,
                             seed=config.seed, channels=config.widths(), dtype=dtype,
                             conv=config.conv,
                             optimizer=hg.inner.by_name(config.optimizer))
    evaluate = hg.classification_scores(task, predict, data.test,
                                        config.val_batch_size or None)

    return Problem(task, evaluate)


EXPERIMENT = Experiment("seed-cnn", SeedCnnConfig(), build,
                        "the seed CNN on digits; learning rate, momentum, weight decay and "
                        "leaky slope tuned by hypergradient (default)")


OUTERS = ("gd", "ncg", "adam")


@dataclasses.dataclass(frozen=True)
class SeedMnistConfig(SeedCnnConfig):
    """The seed CNN's keys at MNIST sizes; ``outers`` are the hyper-updates compared,
    comma-separated, each run from the same start for ``meta_steps``."""

    # What this experiment measures: one local run from the configured values (``--set
    # strategy=default`` explores first, as ``hypergrad run`` does by default).
    strategy: str = "local"

    data: str = "mnist"
    data_train_size: int = dataclasses.field(default=5000, metadata={"key": "data.train_size"})
    data_val_size: int = dataclasses.field(default=1000, metadata={"key": "data.val_size"})
    data_test_size: int = dataclasses.field(default=2000, metadata={"key": "data.test_size"})
    meta_steps: int = 8
    checkpoint: str = "10"
    val_batch_size: int = 500
    outers: str = "gd,ncg,adam"

    def outer_list(self) -> list[str]:
        """The hyper-updates of ``outers``, in order."""
        names = [n.strip() for n in self.outers.split(",") if n.strip()]
        bad = [n for n in names if n not in OUTERS]
        if not names or bad:
            raise ConfigError(f"outers must be a comma-separated list of {', '.join(OUTERS)}; "
                              f"got {self.outers!r}")
        return names

    def validate(self) -> SeedMnistConfig:
        super().validate()
        self.outer_list()
        if self.population != 1 or self.online:
            raise ConfigError("seed-mnist compares hyper-updates on one run each; population "
                              "and online are not used (try seed-cnn)")
        return self


def _floats(tree) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def _hparams(space: hg.HyperSpace, phi) -> dict[str, float]:
    return {k: float(np.asarray(v).ravel()[0])
            for k, v in jax.device_get(space.constrain(phi)).items()}


def main(config: SeedMnistConfig, workdir: Path, progress: bool) -> dict:
    """Tune the seed CNN's four hyperparameters with each hyper-update; score; write
    ``results.json`` and ``methods.png``."""
    problem = build(config)
    task = problem.task
    key = jax.random.key(config.seed)
    scores = jax.jit(trained_scores(problem))
    phi0 = task.space.init(jnp.dtype(config.dtype))
    start = _floats(scores(task, phi0, key))
    results: dict = {"start": {**start, "hparams": _hparams(task.space, phi0)}, "methods": {}}
    if progress:
        print(f"start: val {start['val_loss']:.4f}  test acc {start['test_accuracy']:.4f}",
              flush=True)
    for name in config.outer_list():
        run = dataclasses.replace(config, outer=name)
        history = hg.tune(task, **tune_options(run) | {"key": key}, progress=progress)
        best, final = history.best, history.final
        entry = {
            "val_loss": [None if not math.isfinite(v) else float(v) for v in history.val_loss],
            "accepted": history.accepted.tolist(),
            "seconds": np.cumsum(history.seconds).tolist(),
            "learning_rate": np.asarray(history.hparams["learning_rate"],
                                        np.float64).reshape(len(history), -1)[:, 0].tolist(),
            "best_meta_step": best.meta_step, "final_meta_step": final.meta_step,
            "best": {**_floats(scores(task, best.phi, key)),
                     "hparams": _hparams(task.space, best.phi)},
            "final": {**_floats(scores(task, final.phi, key)),
                      "hparams": _hparams(task.space, final.phi)},
        }
        results["methods"][name] = entry
        (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        if progress:
            b = entry["best"]
            print(f"{name:5s} best val {b['val_loss']:.4f} (meta-step {best.meta_step})  test "
                  f"acc {b['test_accuracy']:.4f}  lr {b['hparams']['learning_rate']:.4g}  "
                  f"{entry['seconds'][-1]:.0f} s", flush=True)
    plot(workdir / "results.json", workdir / "methods.png")
    return {"start_val_loss": start["val_loss"], "start_test_accuracy": start["test_accuracy"],
            "methods": {name: {"best_val_loss": m["best"]["val_loss"],
                               "best_test_accuracy": m["best"]["test_accuracy"],
                               "final_test_accuracy": m["final"]["test_accuracy"],
                               "best_hparams": m["best"]["hparams"],
                               "seconds": m["seconds"][-1]}
                        for name, m in results["methods"].items()}}


def plot(results_path: Path, path: Path) -> None:
    """Validation loss per meta-step and the learning rate's trajectory, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(Path(results_path).read_text())
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3), dpi=90)
    for i, (name, m) in enumerate(results["methods"].items()):
        steps = np.arange(1, len(m["val_loss"]) + 1)
        val = np.asarray([np.nan if v is None else v for v in m["val_loss"]])
        acc = m["best"]["test_accuracy"]
        axes[0].plot(steps, val, marker=".", color=f"C{i}",
                     label=f"{name} (best: test acc {acc:.3f})")
        axes[1].plot(steps, m["learning_rate"], marker=".", color=f"C{i}", label=name)
    start = results["start"]
    axes[0].axhline(start["val_loss"], color="gray", ls="--", lw=0.8,
                    label=f"start (test acc {start['test_accuracy']:.3f})")
    axes[0].set(xlabel="meta-step", ylabel="validation MSE", title="seed CNN on MNIST")
    axes[1].set(xlabel="meta-step", ylabel="learning rate", yscale="log",
                title="learning rate evaluated")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def redraw(workdir: Path, out: Path) -> list[Path]:
    """``methods.png`` in ``out`` from ``workdir/results.json``."""
    plot(workdir / "results.json", out / "methods.png")
    return [out / "methods.png"]


MNIST = Experiment(
    "seed-mnist", SeedMnistConfig(), build,
    "the source article's seed CNN on real MNIST from lr 0.01, momentum 0.5, weight decay "
    "0.001, slope 0.01, tuned by gradient descent, nonlinear CG and Adam", main, redraw)
