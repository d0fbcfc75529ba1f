"""Time one population meta-step of P members against P sequential single meta-steps.

Run:  python scripts/bench_population.py [--quick] [--json FILE]
      python scripts/bench_population.py --sizes 1 4 16 64 --steps 50

The seed CNN on digits, or on 28x28 MNIST with ``--data idx:DIR`` (channels 8,16,16, batch
100, float32, reverse-mode hypergradient
with ``--checkpoint`` (default ``step``: each step's weights are stored and its
activations recomputed, so P = 64 fits in a few GiB), gd hyper-update, T = ``--steps``
inner steps, default 50). For each population size P it
compiles the meta-step of :func:`hypergrad.tune` vmapped over P members
(:func:`hypergrad.population.vmapped`, sharded when several devices divide P) and the
single meta-step, warms both up, then reports the median over repeats of

- ``population_s``: one population meta-step of P members (members start as
  ``--set population=P`` starts them, spread 0.5);
- ``sequential_s``: P single meta-steps one after another, each read back to the host as
  the run loop does;
- ``ratio``: population_s / sequential_s (below 1: the population is faster);
- ``compile_s`` of the population step and XLA's ``temp_bytes`` for it.

Repeats are chosen so each measurement takes about ``--budget`` seconds (between 1 and
``--repeats``). The machine's load average (``os.getloadavg()``) is recorded before and
after: on a shared CPU the timings move with it. ``--quick``: P = 1, 4 at T = 10.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def _median_time(fn, budget: float, repeats: int) -> float:
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    n = max(1, min(repeats, int(budget / max(first, 1e-9))))
    times = [first]
    for _ in range(n - 1):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(sizes: list[int], steps: int, budget: float, repeats: int,
          checkpoint: str, conv: str = "auto", data: str = "digits") -> dict:
    import jax
    import jax.numpy as jnp

    from hypergrad import population as pop
    from hypergrad.config import override
    from hypergrad.experiment import build, estimator_for, get_experiment, outer_for
    from hypergrad.models import conv_form
    from hypergrad.tune import initial_state, make_step, with_key

    experiment = get_experiment("seed-cnn")
    config = override(experiment.config, [f"steps={steps}", f"checkpoint={checkpoint}",
                                          f"conv={conv}", f"data={data}"])
    task = build(experiment, config).task
    est, opt = estimator_for(config), outer_for(config)
    one = with_key(make_step(est, opt))
    single = pop.vmapped(one, None, 1)  # what a single run compiles
    key = jax.random.key(config.seed)
    load_before = os.getloadavg()
    rows = []
    for size in sizes:
        devices = pop.device_count(size)
        mesh = pop.make_mesh(devices)
        step = pop.vmapped(one, mesh, size)
        state = initial_state(task, est, opt, key=key, phi=task.space.init(jnp.float32),
                              population=size)
        keys = pop.member_keys(key, size)
        args = (pop.put(task, mesh, replicate=True), pop.put(pop.host(state), mesh),
                pop.put(keys, mesh))
        t0 = time.perf_counter()
        jax.block_until_ready(step(*args))  # compile and warm up
        compile_s = time.perf_counter() - t0
        temp_bytes = None
        if mesh is None:
            memory = jax.jit(step).lower(*args).compile().memory_analysis()
            temp_bytes = int(memory.temp_size_in_bytes) if memory is not None else None

        def population(step=step, args=args):
            jax.device_get(step(*args)[1]["val_loss"])

        members = [(jax.tree.map(lambda x, m=m: x[m:m + 1], state), keys[m:m + 1])
                   for m in range(size)]
        jax.device_get(single(task, *members[0])[1]["val_loss"])  # compile and warm up

        def sequential(members=members):
            for s, k in members:
                jax.device_get(single(task, s, k)[1]["val_loss"])

        population_s = _median_time(population, budget, repeats)
        sequential_s = _median_time(sequential, budget, repeats)
        row = {"population": size, "devices": devices, "steps": steps,
               "population_s": population_s, "sequential_s": sequential_s,
               "ratio": population_s / sequential_s,
               "population_per_member_s": population_s / size,
               "compile_s": compile_s, "temp_bytes": temp_bytes}
        rows.append(row)
        print(f"P={size:3d} devices={devices} T={steps}: population {population_s:8.3f} s  "
              f"sequential {sequential_s:8.3f} s  ratio {row['ratio']:.3f}  "
              f"(compile {compile_s:.1f} s, temp {(temp_bytes or 0) / 2**20:.0f} MiB)", flush=True)
    return {"jax": jax.__version__, "device": str(jax.devices()[0]),
            "device_count": len(jax.devices()), "cpu_count": os.cpu_count(),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "model": f"seed CNN 8,16,16, batch 100, float32, reverse (checkpoint="
                     f"{checkpoint}), gd, conv={conv}, data={data}",
            "conv_form": conv_form(conv, tuple(task.train_data[0].shape[1:3])),
            "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--steps", type=int, default=50, help="inner steps T")
    p.add_argument("--checkpoint", default="step", help="checkpoint policy (none, step, k)")
    p.add_argument("--conv", default="auto", choices=["auto", "matmul", "native"],
                   help="the seed CNN's convolution (auto: hypergrad.models.conv_form)")
    p.add_argument("--data", default="digits",
                   help="the dataset (digits: 8x8; idx:DIR with MNIST files: 28x28)")
    p.add_argument("--budget", type=float, default=10.0, help="seconds per measurement")
    p.add_argument("--repeats", type=int, default=5, help="most timed calls per measurement")
    p.add_argument("--quick", action="store_true", help="P = 1, 4 at T = 10")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    if args.quick:
        args.sizes, args.steps, args.budget, args.repeats = [1, 4], 10, 2.0, 3
    result = bench(args.sizes, args.steps, args.budget, args.repeats, args.checkpoint,
                   args.conv, args.data)
    print(f"load average before {result['loadavg_before']}, after {result['loadavg_after']} "
          f"({result['cpu_count']} CPUs, {result['device']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
