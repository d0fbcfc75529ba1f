"""Populations: P hyperparameter initializations tuned at once, sharded across devices.

``--set population=P`` runs :func:`hypergrad.run.make_meta_step` under ``jax.vmap`` over
a leading population axis of ``phi``, the hyper-update's state, the key and the step
scale: one compiled program trains and updates every member. Member 0 starts at the
configured hyperparameters; member ``m > 0`` at ``phi + population_spread * z_m`` with
``z_m ~ N(0, 1)`` drawn elementwise, in the run's dtype, from ``fold_in(key(seed), m)`` in
the unconstrained coordinates (log for positive, logit for unit interval), so a member's
start does not depend on ``P``. With ``population_seeds=true`` member ``m`` uses the key
``key(seed + m)``; otherwise all use ``key(seed)``.

With several devices the population axis is sharded across a one-axis ``Mesh`` named
``"population"`` (:data:`AXIS`); the task (weights, data) is replicated. The same code
runs across hosts after ``jax.distributed.initialize()``: ``jax.devices()`` is then every
host's devices, arrays are built with ``jax.make_array_from_callback`` and read back with
``process_allgather``.

The guard of :func:`hypergrad.run.make_meta_step` acts per member: a non-finite value in
one member rejects that member's step only. A member rejected ``max_rejections`` times in
a row is retired (it stays at its last finite point); the run stops when every member is.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hypergrad.config import Config, ConfigError
from hypergrad.task import Task

PyTree = Any
AXIS = "population"


# -- members ---------------------------------------------------------------------------


def member_phis(phi: PyTree, size: int, spread: float, seed: int) -> PyTree:
    """``size`` starting points stacked on a leading axis: ``phi`` itself first, then
    ``phi + spread * N(0, 1)`` with member ``m``'s draws from ``fold_in(key(seed), m)``."""
    leaves, treedef = jax.tree.flatten(phi)

    def draw(m):
        keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), m), len(leaves))
        return [x + spread * jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
                for k, x in zip(keys, leaves, strict=True)]

    members = jnp.arange(size)
    drawn = jax.vmap(draw)(members)
    first = members == 0
    out = [jnp.where(first.reshape((-1,) + (1,) * jnp.ndim(x)), jnp.asarray(x)[None], d)
           for x, d in zip(leaves, drawn, strict=True)]
    return jax.tree.unflatten(treedef, out)


def member_keys(seed: int, size: int, seeds: bool) -> jax.Array:
    """One key per member, as raw key data (``jax.random.key_data``; plain integer arrays
    shard across processes): ``key(seed + m)`` if ``seeds``, else ``key(seed)`` for all."""
    offsets = jnp.arange(size) if seeds else jnp.zeros(size, int)
    return jax.vmap(lambda s: jax.random.key_data(jax.random.key(s)))(seed + offsets)


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
        raise ConfigError(f"devices={devices} but JAX sees {available} "
                          f"({jax.devices()[0].platform}); set devices=0 to use them all")
    if size % devices:
        raise ConfigError(f"population={size} is not divisible by devices={devices}; "
                          "choose a population that is a multiple of the device count")
    return devices


def make_mesh(devices: int) -> Mesh | None:
    """A one-axis mesh over the first ``devices`` devices, or ``None`` for one device."""
    if devices <= 1:
        return None
    return Mesh(np.asarray(jax.devices()[:devices]), (AXIS,))


def put(tree: PyTree, mesh: Mesh | None, spec: PartitionSpec) -> PyTree:
    """Place host values on ``mesh`` with ``spec`` (every process passes the same values)."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, tree)
    sharding = NamedSharding(mesh, spec)

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


# -- compiled steps --------------------------------------------------------------------


def make_population_step(est, opt, mesh: Mesh | None = None):
    """:func:`hypergrad.run.make_meta_step` vmapped over the population, jitted once.

    Returns ``step(task, phi, opt_state, keys, scale) -> (phi, opt_state, metrics)`` where
    every argument but ``task`` and every output has a leading population axis (``keys``
    holds raw key data, as :func:`member_keys` makes it); with a ``mesh`` that axis is
    sharded over it and the task is replicated.
    """
    from hypergrad.run import make_meta_step

    meta_step = make_meta_step(est, opt)

    def one(task, phi, opt_state, key_data, scale):
        return meta_step(task, phi, opt_state, jax.random.wrap_key_data(key_data), scale)

    step = jax.vmap(one, in_axes=(None, 0, 0, 0, 0))
    if mesh is None:
        return jax.jit(step)
    rep, mem = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(AXIS))
    return jax.jit(step, in_shardings=(rep, mem, mem, mem, mem), out_shardings=mem)


def make_population_evaluate(problem, mesh: Mesh | None = None):
    """:func:`hypergrad.run.make_evaluate` vmapped over ``(phi, keys)``, jitted once."""
    from hypergrad.run import make_evaluate

    evaluate_one = make_evaluate(problem)

    def one(task, phi, key_data):
        return evaluate_one(task, phi, jax.random.wrap_key_data(key_data))

    evaluate = jax.vmap(one, in_axes=(None, 0, 0))
    if mesh is None:
        return jax.jit(evaluate)
    rep, mem = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(AXIS))
    return jax.jit(evaluate, in_shardings=(rep, mem, mem), out_shardings=mem)


@jax.jit
def _select(mask: jax.Array, a: PyTree, b: PyTree) -> PyTree:
    """Per member: ``a`` where ``mask``, else ``b``."""
    return jax.tree.map(
        lambda x, y: jnp.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), x, y), a, b)


# -- the loop --------------------------------------------------------------------------


def _spread(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"min": math.nan, "median": math.nan, "max": math.nan}
    return {"min": min(finite), "median": float(np.median(finite)), "max": max(finite)}


def _per_member(metrics: dict[str, np.ndarray], size: int) -> list[dict[str, float]]:
    return [{k: float(v[m]) for k, v in metrics.items()} for m in range(size)]


def run(experiment, config: Config, workdir: Path, *, progress: bool, out: TextIO | None,
        max_rejections: int, resume: bool, began: float) -> dict[str, Any]:
    """The run loop of :func:`hypergrad.run.run` for ``config.population > 1``.

    Files as a single run's; each ``metrics.jsonl`` line adds ``members`` (one entry per
    member: its ``val_loss``, ``train_loss``, ``hparams`` and ``hypergrad_norm``, or a
    ``warning``) and takes ``val_loss``, ``train_loss``, ``hparams`` and
    ``hypergrad_norm`` from its ``best_member``, the accepted member with the lowest
    validation loss at that meta-step. The summary reports the member with the lowest
    final validation loss under the single run's keys, the spread of the members'
    initial and final validation losses, and every member.
    """
    from hypergrad import checkpoint
    from hypergrad import run as run_lib

    problem = run_lib.build(experiment, config)
    task: Task = problem.task
    size = config.population
    devices = device_count(size, config.devices)
    mesh = make_mesh(devices)
    if not resume:
        run_lib.prepare_workdir(workdir)
        (workdir / "config.json").write_text(
            json.dumps({"experiment": experiment.name, **config.to_dict()}, indent=2) + "\n")
    dtype = jnp.dtype(config.dtype)
    opt = run_lib.outer_for(config)
    step = make_population_step(run_lib.estimator_for(config), opt, mesh)
    evaluate = make_population_evaluate(problem, mesh)
    members = PartitionSpec(AXIS)
    task = put(task, mesh, PartitionSpec())
    keys = put(member_keys(config.seed, size, config.population_seeds), mesh, members)
    phi = member_phis(task.space.init(dtype), size, config.population_spread, config.seed)
    opt_state = jax.vmap(opt.init)(phi)
    arrays = {"phi": phi, "opt_state": opt_state, "good_phi": phi, "good_state": opt_state,
              "best_phi": phi}
    ckpt_path = workdir / run_lib.CHECKPOINT
    metrics_path = workdir / "metrics.jsonl"
    if resume and ckpt_path.exists():
        loaded, meta = checkpoint.load(ckpt_path, host(arrays))
        arrays = put(loaded, mesh, members)
        run_lib._truncate_lines(metrics_path, meta["meta_step"])
    else:
        arrays = put(host(arrays), mesh, members)
        initial = _per_member(host(evaluate(task, arrays["phi"], keys)), size)
        hp = host(task.space.constrain(arrays["phi"]))
        meta = {"meta_step": 0, "scale": [1.0] * size, "rejected": [0] * size,
                "rejected_in_row": [0] * size, "retired": [False] * size, "stopped": None,
                "elapsed": 0.0, "initial": initial,
                "initial_hparams": [task.space.summarize(member(hp, m)) for m in range(size)],
                "best": [{"val_loss": None, "meta_step": None} for _ in range(size)]}
        metrics_path.write_text("")
        checkpoint.save(ckpt_path, host(arrays), meta)
    elapsed_before = meta["elapsed"]

    def save():
        meta["elapsed"] = elapsed_before + time.perf_counter() - began
        checkpoint.save(ckpt_path, host(arrays), meta)

    from tqdm.auto import tqdm

    total = config.meta_steps
    bar = tqdm(total=total, initial=meta["meta_step"], desc=f"meta-step (P={size})",
               unit="step", disable=not progress, dynamic_ncols=True)
    with bar, run_lib._Signals() as signals, open(metrics_path, "a") as log:
        while meta["meta_step"] < total and not meta["stopped"]:
            i = meta["meta_step"]
            t0 = time.perf_counter()
            scale = put(np.asarray(meta["scale"], dtype), mesh, members)
            new_phi, new_state, m = step(task, arrays["phi"], arrays["opt_state"], keys, scale)
            m = host(m)
            active = ~np.asarray(meta["retired"])
            accepted = np.asarray(m["accepted"]) & active
            finite = np.asarray(m["finite"]) & active
            entries: list[dict[str, Any]] = []
            for j in range(size):
                entry: dict[str, Any] = {"member": j}
                if not active[j]:
                    entry["retired"] = True
                elif accepted[j]:
                    val = float(m["val_loss"][j])
                    best = meta["best"][j]
                    if best["val_loss"] is None or val < best["val_loss"]:
                        meta["best"][j] = {"val_loss": val, "meta_step": i}
                    meta["rejected_in_row"][j] = 0
                    entry |= {"val_loss": val, "train_loss": float(m["train_loss"][j]),
                              "hparams": task.space.summarize(member(m["hparams"], j)),
                              "hypergrad_norm": float(m["hypergrad_norm"][j])}
                else:
                    meta["scale"][j] *= 0.5
                    meta["rejected"][j] += 1
                    meta["rejected_in_row"][j] += 1
                    what = ("new hyperparameters" if finite[j]
                            else "validation loss or hypergradient")
                    entry["warning"] = (f"non-finite {what}; step rejected, outer step scale "
                                        f"now {meta['scale'][j]:g}")
                    if meta["rejected_in_row"][j] >= max_rejections:
                        meta["retired"][j] = True
                        entry["warning"] += (f"; retired after {max_rejections} rejections "
                                             "in a row")
                entries.append(entry)
            # Bookkeeping as in the single run, per member: the best point so far, the
            # last point that evaluated finitely, and the next point.
            improved = np.asarray([meta["best"][j]["meta_step"] == i for j in range(size)])
            accepted_d = put(accepted, mesh, members)
            arrays["best_phi"] = _select(put(improved & accepted, mesh, members),
                                         arrays["phi"], arrays["best_phi"])
            keep = put(accepted | finite, mesh, members)
            good_phi = _select(keep, arrays["phi"], arrays["good_phi"])
            good_state = _select(keep, arrays["opt_state"], arrays["good_state"])
            arrays["phi"] = _select(accepted_d, new_phi, good_phi)
            arrays["opt_state"] = _select(accepted_d, new_state, good_state)
            arrays["good_phi"], arrays["good_state"] = good_phi, good_state

            record: dict[str, Any] = {"meta_step": i}
            if accepted.any():
                vals = np.where(accepted, np.asarray(m["val_loss"], float), np.inf)
                b = int(np.argmin(vals))
                record |= {k: entries[b][k] for k in
                           ("val_loss", "train_loss", "hparams", "hypergrad_norm")}
                record["best_member"] = b
                bar.set_postfix_str(f"best val={record['val_loss']:.4f} (member {b}) "
                                    f"{run_lib._fmt(record['hparams'])}")
            else:
                record["warning"] = "every member's step was rejected or retired"
            record["members"] = entries
            if all(meta["retired"]):
                meta["stopped"] = record["stopped"] = (
                    f"stopped after meta-step {i}: every member was rejected "
                    f"{max_rejections} times in a row")
            record["seconds"] = time.perf_counter() - t0
            log.write(json.dumps(record) + "\n")
            log.flush()
            meta["meta_step"] = i + 1
            bar.update(1)
            if meta["stopped"]:
                save()
                raise run_lib.RunError(
                    f"every member of the population had {max_rejections} meta-steps in a "
                    "row rejected as non-finite; lower outer_lr or population_spread")
            if signals.received is not None:
                save()
                raise run_lib.Interrupted(
                    f"stopped by signal {signals.received} after meta-step {i}; checkpoint "
                    f"saved, continue with --resume --workdir {workdir}", signals.received)
            if meta["meta_step"] % config.save_every == 0:
                save()
    save()

    final = _per_member(host(evaluate(task, arrays["phi"], keys)), size)
    final_hp = host(task.space.constrain(arrays["phi"]))
    best_hp = host(task.space.constrain(arrays["best_phi"]))
    rows = []
    for j in range(size):
        rows.append({
            "member": j,
            "initial_val_loss": meta["initial"][j]["val_loss"],
            "final_val_loss": final[j]["val_loss"],
            "initial_hparams": meta["initial_hparams"][j],
            "final_hparams": task.space.summarize(member(final_hp, j)),
            "best_val_loss": meta["best"][j]["val_loss"],
            "best_meta_step": meta["best"][j]["meta_step"],
            "best_hparams": task.space.summarize(member(best_hp, j)),
            "initial_test_loss": meta["initial"][j]["test_loss"],
            "initial_test_accuracy": meta["initial"][j]["test_accuracy"],
            "test_loss": final[j]["test_loss"],
            "test_accuracy": final[j]["test_accuracy"],
            "rejected_meta_steps": meta["rejected"][j],
            "retired": meta["retired"][j],
        })
    finals = [r["final_val_loss"] for r in rows]
    b = int(np.argmin([v if math.isfinite(v) else np.inf for v in finals]))
    summary = {
        "experiment": experiment.name,
        **{k: v for k, v in rows[b].items() if k not in ("member", "retired")},
        "rejected_meta_steps": sum(meta["rejected"]),
        "meta_steps_run": meta["meta_step"],
        "stopped_early": meta["stopped"],
        "population": size,
        "devices": devices,
        "best_member": b,
        "initial_val_loss_spread": _spread([r["initial_val_loss"] for r in rows]),
        "final_val_loss_spread": _spread(finals),
        "members": rows,
        "seconds": elapsed_before + time.perf_counter() - began,
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    from hypergrad import plots

    plots.plot_run(workdir)
    run_lib.print_summary(summary, out)
    s = summary["final_val_loss_spread"]
    print(f"population {size} on {devices} device(s): best member {b}; final val loss "
          f"min {s['min']:.4g} median {s['median']:.4g} max {s['max']:.4g}",
          file=out)
    return summary
