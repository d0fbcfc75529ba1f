"""What every hypergradient estimator is: a named function with one signature."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True, eq=False)
class Estimator:
    """A hypergradient method: ``est(task, phi, key) -> (value, grad, aux)``.

    ``value`` is the validation loss after training with ``space.constrain(phi)``, ``grad``
    its gradient with respect to ``phi`` (shaped like ``phi``) and ``aux`` a dict of
    diagnostics. ``name`` and ``options`` describe the method for logs and configs.
    """

    fn: Callable[..., tuple[Any, Any, dict[str, Any]]]
    name: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __call__(self, task, phi, key):
        return self.fn(task, phi, key)
