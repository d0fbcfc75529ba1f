"""A distribution of tasks: the task axis of meta-learning.

A :class:`Tasks` draws one task's data, ``(train_data, val_data)`` (a support and a query
set, in the words of few-shot learning), from a random key. A :class:`hypergrad.Task`
given ``tasks=`` trains on ``tasks.batch`` tasks drawn afresh from each key, one
``vmap``, and its meta-objective is the mean over them of the validation loss after
training (adaptation): MAML's objective (Finn et al. 2017) when the initial weights are
a hyperparameter (:func:`hypergrad.meta.maml`).

:func:`each` is the one place the task axis is taken, and :func:`mean` averages over it:
every estimator goes through it (:class:`hypergrad.estimators.Estimator`), and so does
the plain objective (:func:`hypergrad.unroll.objective`), with the same split of the key,
so an estimate's value is the objective's value for the same key. A per-task score (the
few-shot experiment's accuracy per episode) goes through :func:`each` with that split.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hypergrad.messages import show

PyTree = Any

#: Entries of an estimator's ``aux`` that stay per task (a leading task axis) instead of
#: being averaged over the tasks: the adapted weights and model state.
PER_TASK = ("params", "model_state")


class Tasks:
    """Where a task's data come from, and how many tasks one estimate averages.

    Attributes:
      sample: ``sample(key) -> (train_data, val_data)``, or ``sample(key, pool)`` when
        ``pool`` is given; every draw has the same shapes. It runs under ``jit`` and
        ``vmap``: the draws of one estimate are one batched call.
      batch: the tasks drawn per estimate (the meta-batch).
      pool: arrays the sampler reads (a dataset episodes are cut from), or ``None``. They
        are data, a leaf of the task: another pool of the same shapes does not compile
        again.
    """

    def __init__(self, sample: Callable[..., tuple[PyTree, PyTree]], batch: int,
                 pool: PyTree = None):
        if not callable(sample):
            raise TypeError(f"sample must be a function key -> (train_data, val_data), "
                            f"got {type(sample).__name__}")
        if isinstance(batch, bool) or not isinstance(batch, int | np.integer) or batch < 1:
            raise ValueError(f"batch (tasks per estimate) must be a positive integer, got "
                             f"{show(batch)}")
        self.sample, self.batch, self.pool = sample, int(batch), pool
        self._with_pool = _takes_two(sample)
        if pool is not None and not self._with_pool:
            raise TypeError("a pool is given but sample takes one argument; write "
                            "sample(key, pool) -> (train_data, val_data)")
        if pool is None and self._with_pool:
            raise TypeError("sample takes (key, pool) but no pool is given; pass pool=")

    def draw(self, key: jax.Array) -> tuple[PyTree, PyTree]:
        """One task's ``(train_data, val_data)``."""
        out = self.sample(key, self.pool) if self._with_pool else self.sample(key)
        if not (isinstance(out, tuple | list) and len(out) == 2):
            raise TypeError(f"sample must return (train_data, val_data), got "
                            f"{type(out).__name__}")
        return tuple(out)  # type: ignore[return-value]

    def draws(self, key: jax.Array) -> tuple[PyTree, PyTree]:
        """``batch`` tasks from ``key``, stacked on a leading task axis."""
        return jax.vmap(self.draw)(jax.random.split(key, self.batch))

    def replace(self, *, batch: int | None = None, pool: PyTree = None) -> Tasks:
        """A copy with another ``batch`` (evaluate on more tasks) or ``pool`` (held-out
        data: the test classes of a few-shot benchmark)."""
        return Tasks(self.sample, self.batch if batch is None else batch,
                     self.pool if pool is None else pool)

    def __repr__(self) -> str:
        name = getattr(self.sample, "__name__", type(self.sample).__name__)
        return f"Tasks({name}, batch={self.batch}{', pool' if self.pool is not None else ''})"


def _takes_two(fn: Callable) -> bool:
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY,
                                                       p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2


jax.tree_util.register_pytree_node(
    Tasks, lambda t: ((t.pool,), (t.sample, t.batch, t._with_pool)),
    lambda static, children: _rebuilt(static, children))


def _rebuilt(static, children) -> Tasks:
    # Bypass __init__: under a transformation the pool's leaves are tracers or objects.
    tasks = object.__new__(Tasks)
    tasks.sample, tasks.batch, tasks._with_pool = static
    (tasks.pool,) = children
    return tasks


def stacked(train_data: PyTree, val_data: PyTree, batch: int) -> Tasks:
    """Tasks given as arrays: ``train_data`` and ``val_data`` with a leading task axis
    (``[num_tasks, examples, ...]``); each estimate draws ``batch`` of them uniformly
    (with replacement)."""
    leaves = jax.tree.leaves((train_data, val_data))
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) >= 2 else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError("stacked tasks need arrays with a leading task axis and an example "
                         "axis, [num_tasks, examples, ...], the same number of tasks in each; "
                         f"got shapes {show([np.shape(x) for x in leaves])}")
    (n,) = sizes
    pool = jax.tree.map(jnp.asarray, (train_data, val_data))

    def pick(key, pool):
        i = jax.random.randint(key, (), 0, n)
        return jax.tree.map(lambda a: a[i], pool)

    return Tasks(pick, batch, pool=pool)


def each(fn: Callable[..., Any], task: Any, phi: PyTree, key: jax.Array) -> Any:
    """``fn(one_task, phi, k)`` for each of ``task.tasks.batch`` tasks drawn from ``key``,
    one ``vmap``: its outputs with a leading task axis.

    ``key`` splits into the draw of the tasks and one training key per task; ``one_task``
    is ``task`` with one drawn task's data (:meth:`hypergrad.Task.one`), so ``fn`` reads
    it as ``one_task.train_data`` and ``one_task.val_data``.
    """
    tasks = task.tasks
    draw, run = jax.random.split(key)
    train, val = tasks.draws(draw)
    keys = jax.random.split(run, tasks.batch)
    return jax.vmap(lambda tr, va, k: fn(task.one(tr, va), phi, k))(train, val, keys)


def mean(fn: Callable[..., Any], task: Any, phi: PyTree, key: jax.Array) -> Any:
    """``fn(one_task, phi, k)`` over ``task.tasks.batch`` tasks drawn from ``key``
    (:func:`each`), averaged.

    ``fn`` returns ``(value, aux)`` or ``(value, grad, aux)``: the value and the gradient
    are averaged over the tasks, and so is every entry of ``aux`` but :data:`PER_TASK`,
    which keeps a leading task axis (each task's adapted weights).
    """
    *numbers, aux = each(fn, task, phi, key)
    average = lambda tree: jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)  # noqa: E731
    aux = {k: v if k in PER_TASK else average(v) for k, v in aux.items()}
    return (*[average(x) for x in numbers], aux)
