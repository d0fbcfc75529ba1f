"""Datasets: deterministic train / validation / test splits held on the device.

The embedded default is scikit-learn's 8x8 handwritten digits (1797 images, no network).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np


class Dataset(NamedTuple):
    """Three splits, each ``(x, y)`` with x ``float[n, H, W, C]`` in [0, 1], y ``int32[n]``."""

    train: tuple[Any, Any]
    val: tuple[Any, Any]
    test: tuple[Any, Any]
    num_classes: int
    name: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example, e.g. ``(8, 8, 1)``."""
        return tuple(self.train[0].shape[1:])


class DataError(ValueError):
    """A dataset cannot be loaded as asked; the message says why and what to do."""


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # ships with scikit-learn, no download

    bunch = load_digits()
    x = (bunch.images / 16.0)[..., None]
    return x, bunch.target.astype(np.int32)


SOURCES = {"digits": _digits}


def split(
    x: np.ndarray, y: np.ndarray, *, seed: int, train_size: int, val_size: int,
    test_size: int | None = None,
) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Shuffle with ``seed`` and cut into train / validation / test (the rest by default)."""
    n = len(x)
    test_size = n - train_size - val_size if test_size is None else test_size
    sizes = {"train_size": train_size, "val_size": val_size, "test_size": test_size}
    for name, size in sizes.items():
        if size < 1:
            raise DataError(f"{name} must be at least 1 (the dataset has {n} examples)")
    if train_size + val_size + test_size > n:
        raise DataError(
            f"train_size + val_size + test_size = {train_size + val_size + test_size} "
            f"exceeds the {n} examples available"
        )
    order = np.random.default_rng(seed).permutation(n)
    cuts = np.cumsum([train_size, val_size, test_size])
    parts = np.split(order, cuts)[:3]
    return tuple((x[p], y[p]) for p in parts)


def load(
    name: str = "digits", *, seed: int = 0, train_size: int = 1000, val_size: int = 400,
    test_size: int | None = None, dtype: Any = jnp.float32,
) -> Dataset:
    """Load a dataset and split it deterministically by ``seed``; arrays go to the device.

    Args:
      name: the dataset; one of :data:`SOURCES`.
      seed: decides the split.
      train_size, val_size, test_size: split sizes; the test split takes the rest by
        default (digits: 1000 / 400 / 397).
      dtype: the images' floating dtype.
    """
    if name not in SOURCES:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(sorted(SOURCES))}")
    x, y = SOURCES[name]()
    parts = split(x, y, seed=seed, train_size=train_size, val_size=val_size,
                  test_size=test_size)
    train, val, test = ((jnp.asarray(a, dtype=dtype), jnp.asarray(b)) for a, b in parts)
    return Dataset(train, val, test, int(y.max()) + 1, name)
