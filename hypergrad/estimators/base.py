"""What every hypergradient estimator is: a named function with one signature."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from hypergrad import tasks as tasks_lib


class Online(NamedTuple):
    """How an estimator tunes while training (``hg.tune(..., online=True)``): one run of
    ``task.steps`` inner steps, cut into windows, the hyperparameters updated between
    them. The estimator owns its carry; the tuning loop only stores it.

    Attributes:
      window: the inner steps per window (the meta-step).
      init: ``(task, phi, key) -> carry``, the run at inner step 0 trained with ``key``;
        the carry holds arrays only (it is checkpointed and vmapped over members).
      step: ``(carry, task, phi, key, meta_step, inner_step) -> (carry, value, grad,
        train_loss, value_at)``: train the window from ``inner_step`` (the steps the
        accepted windows trained) at ``phi`` and estimate the hypergradient of the
        window's end validation loss ``value``; ``value_at(phi')`` is that loss for
        another ``phi'`` from the same carry. ``key`` is the run's; ``meta_step`` counts
        every window tried, accepted or not (fresh noise per window).
      weights: ``carry -> inner states``, the weights trained so far stacked on a leading
        axis (one run for truncated, the particles for PES), to score the run.
    """

    window: int
    init: Callable[..., Any]
    step: Callable[..., tuple[Any, Any, Any, Any, Callable[[Any], Any]]]
    weights: Callable[[Any], Any]


@dataclasses.dataclass(frozen=True, eq=False)
class Estimator:
    """A hypergradient method: ``est(task, phi, key) -> (value, grad, aux)``.

    ``value`` is the validation loss after training with ``space.constrain(phi)``, ``grad``
    its gradient with respect to ``phi`` (shaped and typed like ``phi``: calling the
    estimator casts it, so a float64 loss cannot promote a float32 ``phi``'s gradient and,
    through it, the outer optimizer's state) and ``aux`` a dict of diagnostics. ``name``
    and ``options`` describe the method for logs and configs; ``online``, where the
    method can tune while training, says how (:class:`Online`). For a task with a
    distribution of tasks (``task.tasks``) the call draws them and averages ``fn`` over
    them (:func:`hypergrad.tasks.mean`), so ``fn`` always sees one task.
    """

    fn: Callable[..., tuple[Any, Any, dict[str, Any]]]
    name: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    online: Online | None = None

    def __call__(self, task, phi, key):
        if task.tasks is not None:  # each drawn task estimated alone, then averaged
            value, grad, aux = tasks_lib.mean(self.fn, task, phi, key)
        else:
            value, grad, aux = self.fn(task, phi, key)
        grad = jax.tree.map(lambda g, p: jnp.asarray(g, jnp.result_type(p)), grad, phi)
        return value, grad, aux
