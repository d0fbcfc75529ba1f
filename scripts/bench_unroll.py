"""Time a reverse hypergradient of the seed CNN against plain training, in one process.

Run:  python scripts/bench_unroll.py [--steps 50 200] [--conv matmul native] [--json FILE]

For each horizon T, convolution form and checkpoint policy it prints the time of T plain
training steps, of the reverse hypergradient through them, their ratio, and the compile
time of the hypergradient; every time is the median of several runs after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

import hypergrad as hg
from hypergrad.task import seed_cnn
from hypergrad.unroll import unroll


def _median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(steps: int, conv: str, checkpoint, repeats: int, batch_size: int) -> dict:
    data = hg.data.load("digits", seed=0)
    space = hg.HyperSpace({"learning_rate": hg.positive(0.01), "momentum": hg.unit(0.5),
                           "weight_decay": hg.positive(1e-3),
                           "leaky_slope": hg.bounded(0.01, 0.0, 1.0)})
    task, _ = seed_cnn(data, space, steps=steps, batch_size=batch_size, conv=conv)
    phi, key = space.init(jnp.float32), jax.random.key(0)

    train = jax.jit(lambda t, p, k: unroll(t, t.space.constrain(p), k)[0])
    est = jax.jit(hg.estimators.reverse(checkpoint))

    t0 = time.perf_counter()
    est_compiled = est.lower(task, phi, key).compile()
    compile_seconds = time.perf_counter() - t0
    train_compiled = train.lower(task, phi, key).compile()
    jax.block_until_ready(train_compiled(task, phi, key))  # warm-up
    jax.block_until_ready(est_compiled(task, phi, key))

    train_seconds = _median_seconds(lambda: train_compiled(task, phi, key), repeats)
    hypergrad_seconds = _median_seconds(lambda: est_compiled(task, phi, key)[1], repeats)
    return {"estimator": "reverse", "checkpoint": checkpoint, "conv": conv, "T": steps,
            "batch_size": batch_size, "train_seconds": train_seconds,
            "hypergrad_seconds": hypergrad_seconds,
            "ratio": hypergrad_seconds / train_seconds, "compile_seconds": compile_seconds,
            "backend": jax.default_backend()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, nargs="+", default=[50, 200])
    p.add_argument("--conv", nargs="+", default=["matmul", "native"],
                   choices=["matmul", "native"])
    p.add_argument("--checkpoint", nargs="+", default=["none", "10"],
                   help="'none', 'step', 'nested' or an integer k")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()

    rows = []
    header = (f"{'T':>4} {'conv':>7} {'ckpt':>5} {'train s':>9} {'hypergrad s':>12} "
              f"{'ratio':>6} {'compile s':>10}")
    print(f"backend: {jax.default_backend()}, batch {args.batch_size}")
    print(header)
    for steps in args.steps:
        for conv in args.conv:
            for ck in args.checkpoint:
                checkpoint = None if ck == "none" else (ck if ck in ("step", "nested") else int(ck))
                row = bench(steps, conv, checkpoint, args.repeats, args.batch_size)
                rows.append(row)
                print(f"{steps:>4} {conv:>7} {ck:>5} {row['train_seconds']:9.3f} "
                      f"{row['hypergrad_seconds']:12.3f} {row['ratio']:6.2f} "
                      f"{row['compile_seconds']:10.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
