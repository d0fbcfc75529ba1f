"""The bilevel problem: :class:`Task`, and builders for the built-in tasks.

A ``Task`` is a pytree: its arrays (initial weights, training and validation data) are
leaves, so a jitted estimator receives them as arguments instead of baking them into the
compiled program as constants; everything else (functions, the space, the horizon) is
static.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from hypergrad.hparams import HyperSpace
from hypergrad.inner import InnerOptimizer

PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """A bilevel problem: train on ``train_data``, score on ``val_data``.

    Attributes:
      params: initial weights (a pytree), or a function ``(key, hparams) -> params`` so the
        initialization itself can depend on hyperparameters.
      train_loss: ``f(params, hparams, batch) -> scalar``, minimized by the inner loop.
      val_loss: ``g(params, hparams, batch) -> scalar``, the outer objective at the
        trained weights (evaluated on all of ``val_data``).
      train_data, val_data: pytrees of arrays whose leading axis indexes examples.
      space: the :class:`HyperSpace` of tuned hyperparameters.
      optimizer: the differentiable inner optimizer (:func:`hypergrad.inner.sgd`).
      steps: the horizon T, the number of inner steps.
      batch_size: examples per inner step, drawn without replacement within an epoch;
        ``None`` trains on the full batch.
    """

    params: PyTree | Callable[[jax.Array, Any], PyTree]
    train_loss: Callable[[PyTree, Any, PyTree], jax.Array]
    val_loss: Callable[[PyTree, Any, PyTree], jax.Array]
    train_data: PyTree
    val_data: PyTree
    space: HyperSpace
    optimizer: InnerOptimizer
    steps: int
    batch_size: int | None = None

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not isinstance(self.space, HyperSpace):
            raise TypeError(f"space must be a HyperSpace, got {type(self.space).__name__}")
        n = self.num_examples
        for name, data in (("train_data", self.train_data), ("val_data", self.val_data)):
            sizes = {leaf.shape[0] if leaf.ndim else None for leaf in jax.tree.leaves(data)}
            if len(sizes) != 1 or None in sizes:
                raise ValueError(f"{name} leaves must share one leading (example) axis")
        if self.batch_size is not None:
            b = self.batch_size
            if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= n:
                raise ValueError(f"batch_size must be an integer in [1, {n}] or None, got {b!r}")

    @property
    def num_examples(self) -> int:
        """The number of training examples."""
        leaves = jax.tree.leaves(self.train_data)
        if not leaves:
            raise ValueError("train_data holds no arrays")
        return leaves[0].shape[0]

    def init_params(self, key: jax.Array, hparams: Any) -> PyTree:
        """The initial weights, from ``params`` or by calling it with ``(key, hparams)``."""
        return self.params(key, hparams) if callable(self.params) else self.params

    def replace(self, **changes: Any) -> Task:
        """A copy with some fields replaced (validated again)."""
        return dataclasses.replace(self, **changes)


def _flatten(task: Task):
    fn = task.params if callable(task.params) else None
    arrays = None if fn is not None else task.params
    static = (fn, task.train_loss, task.val_loss, task.space, task.optimizer,
              task.steps, task.batch_size)
    return (arrays, task.train_data, task.val_data), static


def _unflatten(static, children) -> Task:
    # Bypass __post_init__: under a transformation the leaves may be tracers or objects.
    task = object.__new__(Task)
    fn, train_loss, val_loss, space, optimizer, steps, batch_size = static
    arrays, train_data, val_data = children
    values = dict(params=fn if fn is not None else arrays, train_loss=train_loss,
                  val_loss=val_loss, train_data=train_data, val_data=val_data, space=space,
                  optimizer=optimizer, steps=steps, batch_size=batch_size)
    for name, value in values.items():
        object.__setattr__(task, name, value)
    return task


jax.tree_util.register_pytree_node(Task, _flatten, _unflatten)


def classification(
    model: Any, data: Any, space: HyperSpace, *, steps: int, batch_size: int | None = None,
    loss: str = "mse", optimizer: InnerOptimizer | None = None, slope: float = 0.0,
) -> tuple[Task, Callable[[PyTree, Any, jax.Array], jax.Array]]:
    """A classification task from an NNX model called as ``model(x, slope)``.

    The leaky-ReLU slope is read from ``hparams["leaky_slope"]`` when the space tunes it,
    and is ``slope`` otherwise. Training and validation use the same loss.

    Args:
      model: an NNX module (see :mod:`hypergrad.models`).
      data: a :class:`hypergrad.data.Dataset`.
      space: the tuned hyperparameters.
      steps, batch_size: the horizon and the minibatch size (``None`` = full batch).
      loss: ``"mse"`` on one-hot targets or ``"ce"``.
      optimizer: the inner optimizer; :func:`hypergrad.inner.sgd` by default.
      slope: the fixed leaky-ReLU slope when the space does not tune it.

    Returns:
      ``(task, predict)`` with ``predict(params, hparams, x) -> logits``.
    """
    from hypergrad import models
    from hypergrad.inner import lookup, sgd

    apply, params = models.functional(model)
    loss_fn = models.loss_by_name(loss)

    def predict(params, hparams, x):
        return apply(params, x, lookup(hparams, "leaky_slope", slope, "the model"))

    def data_loss(params, hparams, batch):
        x, y = batch
        return loss_fn(predict(params, hparams, x), y)

    task = Task(params=params, train_loss=data_loss, val_loss=data_loss,
                train_data=data.train, val_data=data.val, space=space,
                optimizer=optimizer or sgd(), steps=steps, batch_size=batch_size)
    return task, predict


def seed_cnn(
    data: Any, space: HyperSpace, *, steps: int, batch_size: int | None = None,
    loss: str = "mse", seed: int = 0, channels: tuple[int, ...] = (8, 16, 16),
    conv: str = "auto", dtype: Any = None,
) -> tuple[Task, Callable[[PyTree, Any, jax.Array], jax.Array]]:
    """The seed CNN (three 3x3 convolutions with leaky ReLU, a dense head) on ``data``.

    Trained by :func:`hypergrad.inner.sgd`, which reads learning rate, momentum and
    weight decay from ``hparams``; see :func:`classification` for the rest.
    """
    from flax import nnx

    from hypergrad.models import SeedCNN

    *image_shape, in_channels = data.input_shape
    model = SeedCNN(nnx.Rngs(seed), in_channels=in_channels, channels=channels,
                    num_classes=data.num_classes, image_shape=tuple(image_shape), conv=conv,
                    param_dtype=dtype or data.train[0].dtype)
    return classification(model, data, space, steps=steps, batch_size=batch_size, loss=loss)
