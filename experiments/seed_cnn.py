"""seed-cnn: the seed CNN on the embedded digits, its hyperparameters tuned by hypergradient.

Run:  hypergrad run                      (or: hypergrad run seed-cnn --set outer=ncg)

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
from hypergrad.config import Config, ConfigError
from hypergrad.models import accuracy
from hypergrad.run import Experiment, Problem
from hypergrad.task import seed_cnn


@dataclasses.dataclass(frozen=True)
class SeedCnnConfig(Config):
    """The seed CNN's config: the common keys plus each hyperparameter's initial value."""

    meta_steps: int = 40
    learning_rate: float = 0.01
    momentum: float = 0.5
    weight_decay: float = 0.001
    leaky_slope: float = 0.01
    channels: str = "8,16,16"

    def validate(self) -> SeedCnnConfig:
        super().validate()
        self.widths()
        return self

    def widths(self) -> tuple[int, ...]:
        """The convolutions' output channels, from ``channels`` such as ``"8,16,16"``."""
        try:
            widths = tuple(int(c) for c in self.channels.split(","))
        except ValueError:
            widths = ()
        if not widths or min(widths) < 1:
            raise ConfigError(f"channels must be positive integers separated by commas, "
                              f"got {self.channels!r}")
        return widths

    def space(self) -> hg.HyperSpace:
        return hg.HyperSpace({
            "learning_rate": hg.positive(self.learning_rate),
            "momentum": hg.unit(self.momentum),
            "weight_decay": hg.positive(self.weight_decay),
            "leaky_slope": hg.bounded(self.leaky_slope, 0.0, 1.0),
        })


def build(config: SeedCnnConfig) -> Problem:
    """The seed CNN on the configured data; test metrics on the held-out split."""
    dtype = jnp.dtype(config.dtype)
    data = hg.data.load(config.data, seed=config.seed, train_size=config.data_train_size,
                        val_size=config.data_val_size, test_size=config.data_test_size or None,
                        data_dir=config.data_dir or None, dtype=dtype)
    task, predict = seed_cnn(data, config.space(), steps=config.steps,
                             batch_size=config.batch_size or None, loss=config.loss,
                             seed=config.seed, channels=config.widths(), dtype=dtype)
    x_test, y_test = data.test

    def evaluate(params, hparams):
        logits = predict(params, hparams, x_test)
        return {"test_loss": task.val_loss(params, hparams, data.test),
                "test_accuracy": accuracy(logits, y_test)}

    return Problem(task, evaluate)


EXPERIMENT = Experiment("seed-cnn", SeedCnnConfig(), build,
                        "the seed CNN on digits; learning rate, momentum, weight decay and "
                        "leaky slope tuned by hypergradient (default)")
