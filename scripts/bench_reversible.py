"""Buffer size and time of the reversible estimator against reverse mode, in one process.

Run:  python scripts/bench_reversible.py [--steps 200] [--momentum 0.9 0.5] [--task cnn]

Runs in float64 (x64). For each momentum it prints the buffer's bits per parameter per
step: ``marginal`` (growth over the second half of the run, which tends to
``log2(1/momentum)``) and ``total`` (all bits held at the end / (P T), which includes the
one-off ``momentum_bits`` of the first push), the memory ratio against storing every
step's weights in 32 and 64 bits, whether the backward pass recovered the initial state
bit for bit, the largest relative hypergradient difference from ``reverse()``, and the
time of one hypergradient of each (median after a warm-up) with their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import hypergrad as hg  # noqa: E402
from hypergrad.estimators.reversible import reversible  # noqa: E402
from hypergrad.task import classification, seed_cnn  # noqa: E402


def _median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_task(kind: str, steps: int, batch_size: int):
    data = hg.data.load("digits", seed=0, dtype=jnp.float64)
    space = hg.HyperSpace({"learning_rate": hg.positive(0.05), "momentum": hg.unit(0.9),
                           "weight_decay": hg.positive(1e-3)})
    if kind == "cnn":
        task, _ = seed_cnn(data, space, steps=steps, batch_size=batch_size,
                           channels=(4, 8, 8), dtype=jnp.float64)
    else:
        model = hg.models.LogisticRegression(nnx.Rngs(0), 64, 10, param_dtype=jnp.float64)
        task, _ = classification(model, data, space, steps=steps, batch_size=batch_size,
                                 loss="ce")
    return task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--momentum", type=float, nargs="+", default=[0.9, 0.5])
    parser.add_argument("--task", choices=["logreg", "cnn"], default="logreg")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bits-per-step", type=float, default=4.0,
                        help="buffer capacity allocated per parameter per step")
    args = parser.parse_args()

    task = make_task(args.task, args.steps, args.batch_size)
    key = jax.random.key(0)
    est = jax.jit(reversible(bits_per_step=args.bits_per_step))
    ref = jax.jit(hg.estimators.reverse())
    size = sum(p.size for p in jax.tree.leaves(task.params))
    print(f"task={args.task} P={size} T={args.steps} batch={args.batch_size} "
          f"device={jax.devices()[0].platform}")
    for momentum in args.momentum:
        phi = task.space.unconstrain({**task.space.constrain(task.space.init()),
                                      "momentum": momentum})
        value, grad, aux = est(task, phi, key)
        r_value, r_grad, _ = ref(task, phi, key)
        bits = np.asarray(aux["buffer_bits"], dtype=np.float64)
        half = args.steps // 2
        marginal = (bits[-1] - bits[half - 1]) / (size * (args.steps - half))
        total = float(aux["bits_per_param_step"])
        diff = max(float(jnp.max(jnp.abs(grad[n] - r_grad[n]) / jnp.abs(r_grad[n])))
                   for n in phi)
        t_rev = _median_seconds(lambda: est(task, phi, key), args.repeats)  # noqa: B023
        t_ref = _median_seconds(lambda: ref(task, phi, key), args.repeats)  # noqa: B023
        print(f"momentum={momentum}: bits/param/step marginal={marginal:.3f} "
              f"(log2(1/mu)={np.log2(1 / momentum):.3f}) total={total:.3f}; "
              f"vs storing weights: {32 / total:.0f}x (f32) {64 / total:.0f}x (f64) total, "
              f"{32 / marginal:.0f}x (f32) marginal; capacity={int(aux['capacity_bits'])} "
              f"bits/param ({int(aux['capacity_bits']) / args.steps:.2f}/step allocated), "
              f"max used={int(aux['max_param_bits'])}; storage "
              f"{float(aux['storage_bits_per_param_step']):.2f} bits/param/step "
              f"(1/{32 / float(aux['storage_bits_per_param_step']):.0f} of f32 weights); "
              f"exact={bool(aux['exact'])} overflow={bool(aux['overflow'])}; "
              f"max rel diff vs reverse={diff:.1e}; value diff={float(value - r_value):.1e}")
        print(f"  time: reversible {t_rev:.3f}s, reverse {t_ref:.3f}s, "
              f"ratio {t_rev / t_ref:.2f}")


if __name__ == "__main__":
    main()
