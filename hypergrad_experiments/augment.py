"""augment: learn the strength of data augmentation (and a dropout rate) by hypergradient.

Run:  hypergrad run augment                      (digits, 200 training images)
      hypergrad run augment --set data=idx:../shared/data/mnist-10k --set data.train_size=1000

The seed CNN trains on few images, each inner step seeing them randomly translated by up to
``augment_shift`` pixels (bilinear, a uniform real shift per image and axis) with Gaussian
noise of standard deviation ``augment_noise`` added, and Gaussian dropout at rate
``dropout`` after every activation; the noise is drawn afresh at every inner step from the
run's key. Those strengths (the ones named in ``tune``; the others stay at their
configured values) and the learning rate are tuned by reverse-mode hypergradients
of the clean validation loss (Lorraine et al. 2020 learn augmentation by hypergradient,
with a network; here it is three numbers). ``--set dropout=`` (or the other two) with a
value sets the start; ``--set tune=shift`` tunes the translation alone. docs/gallery/augment.md
has the numbers measured with it.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

import hypergrad as hg
from hypergrad.config import Config, ConfigError
from hypergrad.experiment import Experiment, Problem
from hypergrad.task import seed_cnn

KINDS = {"shift": "augment_shift", "noise": "augment_noise", "dropout": "dropout"}


@dataclasses.dataclass(frozen=True)
class AugmentConfig(Config):
    """The common keys, the strengths' initial values and which of them are tuned."""

    # What this experiment measures: one local run from the configured values (``--set
    # strategy=default`` explores first, as ``hypergrad run`` does by default).
    strategy: str = "local"

    meta_steps: int = 30
    steps: int = 100
    batch_size: int = 50
    data_train_size: int = dataclasses.field(default=200, metadata={"key": "data.train_size"})
    outer: str = "adam"
    outer_lr: float | None = 0.1
    loss: str = "ce"
    learning_rate: float = 0.05
    momentum: float = 0.9
    augment_shift: float = 0.3
    augment_noise: float = 0.05
    dropout: float = 0.05
    tune: str = "shift,noise,dropout"
    channels: str = "8,16,16"

    def validate(self) -> AugmentConfig:
        super().validate()
        self.kinds()
        for name in ("augment_shift", "augment_noise"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0 (a positive starting strength), got "
                                  f"{getattr(self, name)!r}")
        if not 0 < self.dropout < 1:
            raise ConfigError(f"dropout must lie in (0, 1), got {self.dropout!r}")
        return self

    def kinds(self) -> tuple[str, ...]:
        """The tuned strengths' hyperparameter names, from ``tune`` such as ``"shift,noise"``."""
        parts = [p.strip() for p in self.tune.split(",") if p.strip()]
        unknown = [p for p in parts if p not in KINDS]
        if unknown or not parts:
            raise ConfigError(f"tune must name some of {', '.join(KINDS)} separated by commas, "
                              f"got {self.tune!r}")
        return tuple(KINDS[p] for p in parts)

    def space(self) -> hg.HyperSpace:
        """The learning rate and the tuned strengths (momentum stays fixed)."""
        decl = {"learning_rate": hg.positive(self.learning_rate)}
        for name in self.kinds():
            kind = hg.unit if name == "dropout" else hg.positive
            decl[name] = kind(getattr(self, name))
        return hg.HyperSpace(decl)


def build(config: AugmentConfig) -> Problem:
    """The seed CNN with noisy training; clean test metrics on the held-out split."""
    data = config.load_data()
    widths = tuple(int(c) for c in config.channels.split(","))
    # Strengths that are not tuned stay on at their configured values.
    fixed = {name: getattr(config, name) for name in KINDS.values()
             if name not in config.kinds()}
    task, predict = seed_cnn(
        data, config.hyperspace(), steps=config.steps, batch_size=config.batch_size or None,
        loss=config.loss, seed=config.seed, channels=widths, dtype=jnp.dtype(config.dtype),
        optimizer=hg.inner.sgd(momentum=config.momentum),
        val_batch_size=config.val_batch_size or None, **fixed)

    evaluate = hg.classification_scores(task, predict, data.test,
                                        config.val_batch_size or None)
    return Problem(task, evaluate)


EXPERIMENT = Experiment("augment", AugmentConfig(), build,
                        "augmentation strength (translation, input noise) and dropout "
                        "learned by hypergradient on few digits")
