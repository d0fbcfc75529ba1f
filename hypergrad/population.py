"""Populations: the member axis of :func:`hypergrad.tune`, its starts, keys and devices.

A run of :func:`hypergrad.tune` carries every member's state with a leading population axis
(a single run is a population of one) and runs one member's meta-step under ``jax.vmap``
(:func:`vmapped`): one compiled program trains and updates every member. Member 0 starts
at the given ``phi``; member ``m > 0`` at ``phi + spread * z_m`` with ``z_m ~ N(0, 1)``
drawn elementwise, in ``phi``'s dtype, from ``fold_in(key, m)`` in the unconstrained
coordinates (log for positive, logit for unit interval), so a member's start does not
depend on ``P``.

With several devices the population axis is sharded across a one-axis ``Mesh`` named
``"population"`` (:data:`AXIS`); the task (weights, data) is replicated. The same code
runs across hosts after ``jax.distributed.initialize()``: ``jax.devices()`` is then every
host's devices, arrays are built with ``jax.make_array_from_callback`` and read back with
``process_allgather``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any
AXIS = "population"


class DeviceError(ValueError):
    """The population cannot be laid out on the devices asked for."""


# -- members ---------------------------------------------------------------------------


def member_phis(phi: PyTree, size: int, spread: float, key: jax.Array) -> PyTree:
    """``size`` starting points stacked on a leading axis: ``phi`` itself first, then
    ``phi + spread * N(0, 1)`` with member ``m``'s draws from ``fold_in(key, m)``."""
    leaves, treedef = jax.tree.flatten(phi)

    def draw(m):
        keys = jax.random.split(jax.random.fold_in(key, m), len(leaves))
        return [x + spread * jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
                for k, x in zip(keys, leaves, strict=True)]

    members = jnp.arange(size)
    drawn = jax.vmap(draw)(members)
    first = members == 0
    out = [jnp.where(first.reshape((-1,) + (1,) * jnp.ndim(x)), jnp.asarray(x)[None], d)
           for x, d in zip(leaves, drawn, strict=True)]
    return jax.tree.unflatten(treedef, out)


def member_keys(key: jax.Array, size: int) -> jax.Array:
    """One key per member as raw key data (``jax.random.key_data``: plain integer arrays
    shard across processes): ``key`` for every member, or ``key`` itself when it already
    holds ``size`` keys (``jax.random.split(key, size)``, say)."""
    data = jax.random.key_data(key)
    if jnp.shape(key) == (size,):
        return data
    if jnp.shape(key) != ():
        raise ValueError(f"key must be one key or {size} keys (one per member), got "
                         f"shape {jnp.shape(key)}")
    return jnp.broadcast_to(data, (size, *data.shape))


def member(tree: PyTree, m: int) -> PyTree:
    """Member ``m`` of a tree whose leaves have a leading population axis."""
    return jax.tree.map(lambda x: x[m], tree)


# -- devices ---------------------------------------------------------------------------


def device_count(size: int, devices: int = 0) -> int:
    """How many devices a population of ``size`` is sharded across.

    ``devices=0`` takes the largest divisor of ``size`` that is at most
    ``len(jax.devices())``; an explicit count must divide ``size`` and be available.
    """
    available = len(jax.devices())
    if devices == 0:
        return max(d for d in range(1, min(size, available) + 1) if size % d == 0)
    if devices > available:
        raise DeviceError(f"devices={devices} but JAX sees {available} "
                          f"({jax.devices()[0].platform}); set devices=0 to use them all")
    if size % devices:
        raise DeviceError(f"population={size} is not divisible by devices={devices}; "
                          "choose a population that is a multiple of the device count")
    return devices


def make_mesh(devices: int) -> Mesh | None:
    """A one-axis mesh over the first ``devices`` devices, or ``None`` for one device."""
    if devices <= 1:
        return None
    return Mesh(np.asarray(jax.devices()[:devices]), (AXIS,))


def put(tree: PyTree, mesh: Mesh | None, replicate: bool = False) -> PyTree:
    """Place host values on ``mesh``: split along the member axis, or ``replicate``d
    (every process passes the same values). Without a mesh, non-array leaves stay as
    they are (a task's static fields)."""
    if mesh is None:
        return jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, tree)
    sharding = NamedSharding(mesh, PartitionSpec() if replicate else PartitionSpec(AXIS))

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(one, tree)


def host(tree: PyTree) -> PyTree:
    """NumPy copies of a tree's arrays, gathered from every process where needed."""
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


# -- the vmapped step ------------------------------------------------------------------


def vmapped(fn: Callable[..., Any], mesh: Mesh | None = None,
            size: int | None = None) -> Callable[..., Any]:
    """``fn(task, *member_args)`` vmapped over the member axis of every argument but the
    task, jitted once; with a ``mesh`` that axis is sharded over it and the task is
    replicated.

    For ``size == 1`` (a single run) the member axis is dropped inside the jitted program
    and ``fn`` runs unbatched: the same results as the vmapped program up to float
    rounding, and the computation an unbatched training run compiles.
    """
    if size == 1 and mesh is None:
        # The axis is dropped and restored inside the program: done eagerly, every leaf's
        # slice compiled on its own (10 s of the first meta-step for a per-parameter
        # weight decay).
        @jax.jit
        def one(task, *args):
            out = fn(task, *jax.tree.map(lambda x: x[0], args))
            return jax.tree.map(lambda x: jnp.expand_dims(x, 0), out)

        return one

    def batched(task, *args):
        return jax.vmap(fn, in_axes=(None,) + (0,) * len(args))(task, *args)

    if mesh is None:
        return jax.jit(batched)
    rep, mem = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(AXIS))
    compiled: dict[int, Callable[..., Any]] = {}  # one jit per argument count

    def sharded(task, *args):
        if len(args) not in compiled:
            compiled[len(args)] = jax.jit(batched, in_shardings=(rep,) + (mem,) * len(args),
                                          out_shardings=mem)
        return compiled[len(args)](task, *args)

    return sharded
