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
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

import hypergrad as hg
from hypergrad.config import Config, ConfigError, parse_widths
from hypergrad.experiment import Experiment, Problem
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
        if self.conv not in CONVS:
            raise ConfigError(f"conv must be one of {', '.join(CONVS)}; got {self.conv!r}")
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
#: How the convolutions run: ``auto`` (the im2col matrix product on CPU, XLA's native
#: convolution elsewhere), ``matmul`` or ``native`` (see hypergrad.models.Conv3x3).
CONVS = ("auto", "matmul", "native")


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
