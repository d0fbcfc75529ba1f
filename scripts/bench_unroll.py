"""Time and size every hypergradient estimator against plain training, one subprocess per case.

Run:  python scripts/bench_unroll.py [--quick] [--json FILE]
      python scripts/bench_unroll.py --steps 50 200 --conv matmul native --checkpoint none 10

The default grid is the seed CNN at T = 100, 200 and 1000 and an MLP (64-50-50-10) on digits at
T = 10 000, batch 100, with: plain training; reverse without checkpointing, every 10 steps
and "nested"; truncated (window 20); forward; implicit; reversible. ``--hvp reverse
forward`` (the default) times reverse and truncated with both ways of backpropagating
through a step's gradient (``hvp`` of :func:`hypergrad.estimators.reverse`);
``--val-batch-size N`` chunks the validation loss (default: all at once) and
``--hvp-batch-size N`` the Hessian-vector products of the hvp=forward rows. With ``--granular``,
reverse also runs on the CNN with a per-layer x per-step learning rate and a per-parameter
weight decay (rows marked ``*``), and ``granular_over_scalar`` is its time over the
all-scalar space's with the same checkpoint policy. Each case runs in a
fresh Python process (the script re-invokes itself with ``--case JSON``) and reports

- time: the fastest of the repeats after a warm-up (repeats chosen so a case runs about
  ``--budget`` seconds, between 1 and ``--repeats``; medians are in the JSON), and the
  ratio to plain training
  compiled in the same process and timed alternately with the estimator (so a machine
  that is busier this minute than the last does not move the ratio);
- compile time of the jitted function;
- XLA's own memory numbers, ``jax.jit(f).lower(...).compile().memory_analysis()``:
  argument + output + temp bytes, exact and independent of the allocator;
- ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after setup (data, task, jax imported),
  after compiling and after running; ``rss_run_bytes`` is the growth of the high-water
  mark during the run over the larger of the first two.

``peak_memory_ratio`` is XLA's argument + output + temp bytes over those of plain
training at the same T (same model and dtype mode); ``rss_ratio`` the same for
``rss_run_bytes``, which is coarse for small cases (allocator pages, compile peaks).

Notes: ``implicit`` cannot differentiate sgd's learning rate, momentum or weight decay
(they are not in the stationarity condition), so its rows tune only the leaky-ReLU slope
(the others fixed at their initial values), with Neumann iterations (alpha = the learning
rate, ``--implicit-iters`` of them). ``reversible`` needs int64 fixed point, so its rows
run with ``jax_enable_x64`` (float32 weights and data) and are compared with plain
training also run under x64. A case whose compiled program would need more than
``--max-bytes`` is compiled and sized but not run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

LR, MOMENTUM, WD, SLOPE = 0.01, 0.5, 1e-3, 0.01


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# --------------------------------------------------------------------------------------
# One case, in its own process


def run_case(case: dict) -> dict:
    import jax

    if case["x64"]:
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from flax import nnx

    import hypergrad as hg
    from hypergrad.task import classification, seed_cnn
    from hypergrad.unroll import unroll

    est_name = case["estimator"]
    if est_name == "implicit":
        space = hg.HyperSpace({"leaky_slope": hg.bounded(SLOPE, 0.0, 1.0)})
        optimizer = hg.inner.sgd(learning_rate=LR, momentum=MOMENTUM, weight_decay=WD)
    else:
        granular = case.get("space") == "granular"
        space = hg.HyperSpace({
            "learning_rate": (hg.positive(LR, per="layer", schedule="per_step") if granular
                              else hg.positive(LR)),
            "momentum": hg.unit(MOMENTUM),
            "weight_decay": hg.positive(WD, per="parameter" if granular else None),
            "leaky_slope": hg.bounded(SLOPE, 0.0, 1.0)})
        optimizer = None
    data = hg.data.load("digits", seed=0)
    if case["model"] == "cnn":
        task, _ = seed_cnn(data, space, steps=case["T"], batch_size=case["batch_size"],
                           channels=tuple(case["channels"]), conv=case["conv"],
                           val_batch_size=case["val_batch_size"] or None,
                           optimizer=optimizer)
    else:
        model = hg.models.MLP(nnx.Rngs(0), sizes=(64, 50, 50, 10))
        task, _ = classification(model, data, space, steps=case["T"],
                                 batch_size=case["batch_size"], optimizer=optimizer,
                                 val_batch_size=case["val_batch_size"] or None)
    if case["hvp"] == "forward" and case["hvp_batch_size"]:
        task = task.replace(hvp_batch_size=case["hvp_batch_size"])
    phi, key = task.space.init(jnp.float32), jax.random.key(0)

    ck = case["checkpoint"]
    checkpoint = None if ck in (None, "none") else (ck if ck in ("auto", "step", "nested")
                                                     else int(ck))
    extras = {}

    def train(t, p, k):
        return unroll(t, t.space.constrain(p), k)[0]

    if est_name == "train":
        fn = train
    else:
        if est_name == "reverse":
            est = hg.estimators.reverse(checkpoint, hvp=case["hvp"])
        elif est_name == "truncated":
            est = hg.estimators.truncated(case["window"], checkpoint, hvp=case["hvp"])
        elif est_name == "forward":
            est = hg.estimators.forward()
        elif est_name == "implicit":
            est = hg.estimators.implicit("neumann", maxiter=case["implicit_iters"], alpha=LR,
                                         tol=0.0)
        elif est_name == "reversible":
            est = hg.estimators.reversible()
        else:
            raise ValueError(est_name)
        keep = {"implicit": ("iterations",),
                "reversible": ("exact", "overflow", "bits_per_param_step",
                               "capacity_bits")}.get(est_name, ())

        def fn(t, p, k):
            _, grad, aux = est(t, p, k)
            return grad, {name: aux[name] for name in keep}

    rss_setup = _rss()
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(task, phi, key).compile()
    compile_seconds = time.perf_counter() - t0
    rss_compiled = _rss()
    ma = compiled.memory_analysis()
    xla = {name: int(getattr(ma, f"{name}_size_in_bytes"))
           for name in ("argument", "output", "temp", "alias")}
    xla_total = xla["argument"] + xla["output"] + xla["temp"]
    row = {"compile_seconds": compile_seconds, "xla_bytes": xla_total,
           **{f"xla_{k}_bytes": v for k, v in xla.items()},
           "rss_setup_bytes": rss_setup, "rss_compiled_bytes": rss_compiled,
           "num_params": int(sum(x.size for x in jax.tree.leaves(task.init_params(key, None))))}
    if xla_total > case["max_bytes"]:
        row.update(skipped=f"needs {xla_total / 2**30:.1f} GiB > --max-bytes", seconds=None,
                   rss_peak_bytes=None, rss_run_bytes=None)
        return row

    # Plain training is compiled and timed in this process too, alternating with the
    # estimator, so the ratio does not depend on how fast the machine is this minute.
    plain = compiled if est_name == "train" else jax.jit(train).lower(task, phi, key).compile()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # implicit's NotConvergedWarning (tol=0 on purpose)
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(task, phi, key))  # warm-up
        first = time.perf_counter() - t0
        jax.block_until_ready(plain(task, phi, key))
        repeats = max(1, min(case["repeats"], int(case["budget"] / max(first, 1e-6))))
        times, train_times = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(plain(task, phi, key))
            train_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = jax.block_until_ready(compiled(task, phi, key))
            times.append(time.perf_counter() - t0)
    rss_peak = _rss()
    if est_name != "train":
        extras = {k: v.item() for k, v in out[1].items()}
        grad = jax.tree.leaves(out[0])
        extras["grad_finite"] = bool(all(bool(jnp.all(jnp.isfinite(g))) for g in grad))
    # The fastest of the repeats: on a shared machine other work only ever adds time, and
    # even two alternating runs of one compiled function differ by up to 1.5x in median.
    row.update(seconds=min(times), repeats=repeats, rss_peak_bytes=rss_peak,
               seconds_median=statistics.median(times),
               train_seconds_same_process=min(train_times),
               train_seconds_median=statistics.median(train_times),
               rss_run_bytes=max(0, rss_peak - max(rss_setup, rss_compiled)), **extras)
    return row


# --------------------------------------------------------------------------------------
# The grid, in the parent


def _label(ck) -> str:
    return "none" if ck in (None, "none") else ("every 10" if str(ck) == "10" else str(ck))


def grid(args) -> list[dict]:
    """All cases, each plain-training case first within its (model, T, x64) group."""
    base = {"batch_size": args.batch_size, "repeats": args.repeats, "budget": args.budget,
            "max_bytes": args.max_bytes, "implicit_iters": args.implicit_iters,
            "window": args.window, "val_batch_size": args.val_batch_size,
            "hvp_batch_size": args.hvp_batch_size, "channels": list(args.channels)}
    groups = [("cnn", t, conv) for t in args.steps for conv in args.conv]
    groups += [("mlp", t, None) for t in args.mlp_steps]
    cases = []
    for model, T, conv in groups:
        common = dict(base, model=model, T=T, conv=conv)
        ests = [("train", None, False, None)]
        for e in args.estimators:
            if e == "reverse":
                ests += [("reverse", ck, False, h) for h in args.hvp for ck in args.checkpoint]
                if args.granular and model == "cnn":
                    ests += [("reverse", ck, False, h, "granular") for h in args.hvp
                             for ck in args.checkpoint]
            elif e == "truncated":
                # Within its window truncated takes the per-step policies only.
                per_step = [ck for ck in args.checkpoint if ck in ("none", "step", "auto")]
                ests += [("truncated", ck, False, h) for h in args.hvp
                         for ck in per_step or ["none"]]
            elif e == "reversible":
                ests += [("train", None, True, None), ("reversible", None, True, None)]
            else:
                ests.append((e, None, False, None))
        for e, ck, x64, hvp, *space in ests:
            cases.append(dict(common, estimator=e, checkpoint=ck, x64=x64, hvp=hvp,
                              space=space[0] if space else "scalar"))
    return cases


def _channels(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers such as 16,32, got {text!r}")
    return widths


def run_in_subprocess(case: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--case", json.dumps(case)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout:.0f} s", "seconds": None}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"skipped": f"failed (rc {p.returncode}): {tail[:200]}", "seconds": None}
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, nargs="+", default=[100, 200, 1000],
                   help="seed-CNN horizons T")
    p.add_argument("--mlp-steps", type=int, nargs="*", default=[10000],
                   help="MLP (64-50-50-10) horizons T; none to skip the MLP")
    p.add_argument("--channels", type=_channels, default=(8, 16, 16),
                   help="the CNN's convolution widths, e.g. 16,32 (default 8,16,16, the seed CNN)")
    p.add_argument("--conv", nargs="+", default=["auto"], choices=["auto", "matmul", "native"])
    p.add_argument("--checkpoint", nargs="+", default=["none", "10", "nested"],
                   help="reverse's policies: 'none', 'step', 'nested', an integer k or "
                        "'auto' (the default's rule); truncated takes none, step and auto")
    p.add_argument("--estimators", nargs="+",
                   default=["reverse", "truncated", "forward", "implicit", "reversible"],
                   choices=["reverse", "truncated", "forward", "implicit", "reversible"])
    p.add_argument("--hvp", nargs="+", default=["reverse", "forward"],
                   choices=["reverse", "forward"],
                   help="how reverse and truncated backpropagate through each step's gradient")
    p.add_argument("--val-batch-size", type=int, default=0,
                   help="the validation loss's chunk size (0: all at once, the default)")
    p.add_argument("--hvp-batch-size", type=int, default=0,
                   help="with hvp=forward, run each step's Hessian-vector product in chunks "
                        "of this many examples (Task.hvp_batch_size; 0: the whole batch)")
    p.add_argument("--granular", action="store_true",
                   help="also time reverse on the CNN with a per-layer x per-step learning "
                        "rate and a per-parameter weight decay (ratio to the scalar space)")
    p.add_argument("--window", type=int, default=20, help="truncated's window")
    p.add_argument("--implicit-iters", type=int, default=50, help="implicit's Neumann terms")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5, help="most timed runs per case")
    p.add_argument("--budget", type=float, default=6.0,
                   help="seconds of timed runs to aim for per case")
    p.add_argument("--max-bytes", type=float, default=6 * 2**30,
                   help="do not run a case whose XLA argument+output+temp bytes exceed this")
    p.add_argument("--timeout", type=float, default=300, help="seconds per case")
    p.add_argument("--quick", action="store_true",
                   help="smoke subset: CNN T=20, MLP T=50, one repeat")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.case:
        print(json.dumps(run_case(json.loads(args.case))), flush=True)
        return
    if args.quick:
        args.steps, args.mlp_steps, args.repeats, args.budget = [20], [50], 1, 0.0

    import jax
    chunks = "".join(f", {name} {getattr(args, name)}" for name in
                     ("val_batch_size", "hvp_batch_size") if getattr(args, name))
    print(f"backend: {jax.default_backend()}, batch {args.batch_size}{chunks}, CNN channels "
          f"{','.join(map(str, args.channels))}; "
          "one process per case")
    print(f"{'model':>5} {'T':>6} {'estimator':>10} {'ckpt':>8} {'hvp':>3} {'x64':>3} "
          f"{'seconds':>9} "
          f"{'ratio':>6} {'compile s':>9} {'XLA MiB':>9} {'mem ratio':>9} {'RSS MiB':>8} "
          f"{'rss ratio':>9}", flush=True)
    rows, train, scalar = [], {}, {}
    for case in grid(args):
        r = run_in_subprocess(case, args.timeout)
        group = (case["model"], case["T"], case["conv"], case["x64"])
        if case["estimator"] == "train":
            train[group] = r
        base = train.get(group, {})
        tx, tr = base.get("xla_bytes"), base.get("rss_run_bytes")
        ts = r.get("train_seconds_same_process")  # plain training, timed alongside
        hs = r.get("seconds")
        same = (group, case["estimator"], str(case["checkpoint"]), case["hvp"])
        if case["space"] == "scalar":
            scalar[same] = hs
        vs = scalar.get(same) if case["space"] == "granular" else None
        row = {"estimator": case["estimator"], "checkpoint": case["checkpoint"],
               "hvp": case["hvp"], "val_batch_size": case["val_batch_size"],
               "hvp_batch_size": (case["hvp_batch_size"] or None) if case["hvp"] == "forward"
               else None,
               "space": case["space"],
               "granular_over_scalar": hs / vs if hs and vs else None,
               "model": case["model"], "conv": case["conv"], "T": case["T"],
               "channels": case["channels"] if case["model"] == "cnn" else None,
               "batch_size": case["batch_size"], "x64": case["x64"],
               "window": case["window"] if case["estimator"] == "truncated" else None,
               "train_seconds": ts, "hypergrad_seconds": hs,
               "ratio": hs / ts if hs and ts else None,
               "compile_seconds": r.get("compile_seconds"),
               "peak_memory_ratio": r["xla_bytes"] / tx if r.get("xla_bytes") and tx else None,
               "rss_ratio": (r["rss_run_bytes"] / tr if r.get("rss_run_bytes") is not None
                             and tr else None),
               "backend": jax.default_backend(),
               **{k: v for k, v in r.items() if k not in ("seconds", "compile_seconds")}}
        rows.append(row)

        def f(x, fmt):
            return format(x, fmt) if x is not None else "-".rjust(int(fmt.split(".")[0]))
        mib = r.get("xla_bytes")
        rss = r.get("rss_run_bytes")
        name = case["estimator"] + ("*" if case["space"] == "granular" else "")
        print(f"{case['model']:>5} {case['T']:>6} {name:>10} "
              f"{_label(case['checkpoint']):>8} {(case['hvp'] or '')[:3]:>3} "
              f"{'y' if case['x64'] else '':>3} "
              f"{f(hs, '9.3f')} {f(row['ratio'], '6.2f')} "
              f"{f(row['compile_seconds'], '9.2f')} "
              f"{f(mib / 2**20 if mib else None, '9.2f')} "
              f"{f(row['peak_memory_ratio'], '9.2f')} "
              f"{f(rss / 2**20 if rss is not None else None, '8.1f')} "
              f"{f(row['rss_ratio'], '9.2f')}"
              + (f"  [{r['skipped']}]" if r.get("skipped") else "")
              + (f"  granular/scalar {row['granular_over_scalar']:.2f}"
                 if row["granular_over_scalar"] else ""), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
