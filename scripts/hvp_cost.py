"""What one inner step's gradient and its Hessian-vector products cost, and the floor that
sets for a reverse hypergradient.

Run:  python scripts/hvp_cost.py [--batch-size 100] [--steps 50] [--repeats 7]

Reverse mode through T inner steps runs the T steps forward (each a gradient of the
training loss) and then, once per step going back, a Hessian-vector product ``H u`` of
the training loss at that step's weights (``hvp="forward"`` of
:func:`hypergrad.estimators.reverse`; plain autodiff computes the same product by
reverse-over-reverse). Its cost over plain training is therefore at least
``1 + cost(H u) / cost(gradient)``, and nested checkpointing adds one more forward pass.
This script measures, for the seed CNN (the four scalar hyperparameters, float32):

- ``gradient``: one step's ``grad_w L(w, h, batch)``;
- ``hvp``: what ``hvp="forward"`` runs per step: ``jax.jvp`` of ``grad_(w,h) L`` along
  ``(u, 0)``, which recomputes the step's forward pass and its gradient's backward pass
  (the primal) along with the tangents;
- ``hvp, tangent only``: the same product from values stored by the forward pass
  (``jax.linearize``), the fewest operations any exact method needs per step; storing
  those values is the ``residual bytes`` per step.

FLOPs are XLA's own count (``compiled.cost_analysis()``) for one step; seconds are the
fastest of ``--repeats`` runs of a ``lax.scan`` over ``--steps`` steps with fresh batches,
each timed alternately in this process. The floors printed are the FLOP ratios; measured
hypergradient ratios are in ``scripts/bench_unroll.py``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import hypergrad as hg
from hypergrad.task import seed_cnn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--steps", type=int, default=50, help="steps per timed scan")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()

    space = hg.HyperSpace({"learning_rate": hg.positive(0.01), "momentum": hg.unit(0.5),
                           "weight_decay": hg.positive(1e-3),
                           "leaky_slope": hg.bounded(0.01, 0.0, 1.0)})
    data = hg.data.load("digits", seed=0)
    task, _ = seed_cnn(data, space, steps=1, batch_size=args.batch_size)
    key = jax.random.key(0)
    hp = space.constrain(space.init(jnp.float32))
    w = task.init_params(key, hp)
    leaves, tree = jax.tree.flatten(w)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    u = jax.tree.unflatten(tree, [1e-3 * jax.random.normal(k, a.shape, a.dtype)
                                  for k, a in zip(keys, leaves, strict=True)])
    idx = jax.random.randint(key, (args.steps, args.batch_size), 0, task.num_examples)
    loss = task.train_loss

    def batch(i):
        return jax.tree.map(lambda a: a[i], task.train_data)

    def joint(w, b):
        return jax.grad(loss, argnums=(0, 1))(w, hp, b)

    def gradient(w, b):
        return jax.grad(loss)(w, hp, b)

    def hvp(w, b, u):
        return jax.jvp(lambda w: joint(w, b), (w,), (u,))[1]

    # The tangent-only product: linearize at one batch (eagerly) and keep the linear map's
    # jaxpr; the values it reads (its constants) are what a forward pass would store.
    b0 = batch(idx[0])
    closed = jax.make_jaxpr(jax.linearize(lambda w: joint(w, b0), w)[1])(u)
    res = [jnp.asarray(c) for c in closed.consts]
    residual_bytes = sum(c.nbytes for c in res)

    def tangent_only(consts, u):
        return jax.core.eval_jaxpr(closed.jaxpr, list(consts), *jax.tree.leaves(u))

    # Each function compiled once (not run primitive by primitive), for XLA's FLOP count
    # and the check below.
    compiled = {name: jax.jit(f).lower(*a).compile() for name, f, a in (
        ("gradient", gradient, (w, b0)), ("hvp", hvp, (w, b0, u)),
        ("hvp, tangent only", tangent_only, (res, u)))}

    def flops(name):
        cost = compiled[name].cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost["flops"])

    counts = {name: flops(name) for name in compiled}

    # Both products are H u: check that before timing them.
    a = jax.tree.leaves(compiled["hvp, tangent only"](res, u))
    b = jax.tree.leaves(compiled["hvp"](w, b0, u))
    scale = max(float(jnp.max(jnp.abs(y))) for y in b)
    err = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(a, b, strict=True)) / scale
    if not err < 1e-4:
        raise SystemExit(f"the two Hessian-vector products differ: {err:.2e} of the largest")

    # Timed scans over --steps steps: each step reads its own batch (or its own stored
    # values) and feeds a tiny multiple of its result back into the carry, so nothing is
    # hoisted out of the loop or left unused.
    def timed(step, carry, xs):
        def body(c, x):
            total = sum(jnp.sum(o) for o in jax.tree.leaves(step(c, x)))
            return jax.tree.map(lambda a: a + 1e-9 * total, c), None
        return jax.jit(lambda c: jax.lax.scan(body, c, xs)[0]), carry

    stored = [jnp.repeat(c[None], args.steps, axis=0) for c in res]
    runs = {"gradient": timed(lambda c, i: gradient(c, batch(i)), w, idx),
            "hvp": timed(lambda c, i: hvp(w, batch(i), c), u, idx),
            "hvp, tangent only": timed(lambda c, r: tangent_only(r, c), u, stored)}
    for f, a in runs.values():
        jax.block_until_ready(f(a))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, (f, a) in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(a))
            times[name].append((time.perf_counter() - t0) / args.steps)

    g_flops, g_time = counts["gradient"], min(times["gradient"])
    print(f"seed CNN, batch {args.batch_size}, {jax.default_backend()}; per inner step:")
    print(f"{'':>18} {'MFLOP':>8} {'x grad':>7} {'ms':>7} {'x grad':>7}")
    for name in runs:
        t = min(times[name])
        print(f"{name:>18} {counts[name] / 1e6:8.1f} {counts[name] / g_flops:7.2f} "
              f"{t * 1e3:7.3f} {t / g_time:7.2f}")
    print(f"the two products agree to {err:.1e} of the largest entry ({scale:.2e})")
    print(f"residual bytes per step for the tangent-only product: {residual_bytes / 2**20:.1f} MiB")
    r_min = 1 + counts["hvp, tangent only"] / g_flops
    r_fwd = 1 + counts["hvp"] / g_flops
    print(f"floor of reverse / training, in FLOPs: {r_min:.2f} storing every step's values "
          f"({residual_bytes * 1000 / 2**30:.1f} GiB at T = 1000), {r_fwd:.2f} recomputing "
          f"them (hvp='forward'); nested checkpointing adds one forward pass: "
          f"{r_min + 1:.2f} / {r_fwd + 1:.2f}")


if __name__ == "__main__":
    main()
