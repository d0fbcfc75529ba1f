"""Time one MAML meta-gradient on the sinusoid task against plain training, in one process.

Run:  python scripts/bench_maml.py [--steps 1 5] [--repeats 50]
      python scripts/bench_maml.py --torch [--torch-site DIR]   # also PyTorch + higher

The problem is maml-sinusoid's (Finn et al. 2017): the 1-40-40-1 ReLU network, a
meta-batch of 25 tasks, 10 support and 10 query points each, ``steps`` adaptation steps of
SGD with step 0.01, float32. For each number of steps it compiles once and times, as the
median of ``--repeats`` calls after a warm-up (each call a fresh key: fresh tasks):

- ``maml``: ``jax.jit(hg.estimators.reverse())`` on ``hg.meta.maml``: the meta-loss and
  its gradient with respect to the initial weights (second order);
- ``fomaml``: the same with ``hg.estimators.first_order()``;
- ``forward``: ``hg.unroll.objective``: the same 25 adaptations and query losses, no
  gradient;
- ``train1``: plain training of one task for the same steps (``hg.unroll.train``).

and prints the times in milliseconds with the ratios ``maml / forward`` (what the
meta-gradient costs over evaluating the meta-loss) and ``maml / train1``.

``--torch`` times the same MAML meta-gradient in PyTorch with ``higher`` (the usual
``innerloop_ctx`` loop over the 25 tasks, ``copy_initial_weights=False``,
``track_higher_grads=True``, ``loss.backward()``) on the same data, and with
``torch.func`` (``functional_call`` + ``grad`` inside ``vmap`` over the tasks, then
``torch.autograd.grad``): the vectorized form closest to ours. Both on the CPU, float32,
torch's default threads. Torch is not a dependency of hypergrad: install it (and
``higher``) in a separate environment and point ``--torch-site`` at its site-packages
(appended to ``sys.path``, after this environment's), or skip it; without torch the
``--torch`` rows print a message instead. Numbers measured on this project's machine are in
docs/benchmarks/speed.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import numpy as np

import hypergrad as hg
from hypergrad.unroll import objective, train
from hypergrad_experiments.maml_sinusoid import init_mlp, mse, sampler

SHOTS, META_BATCH, HIDDEN, INNER_LR = 10, 25, (40, 40), 0.01


# The experiment's own problem, so the benchmark times what `hypergrad run maml-sinusoid`
# trains: its task sampler, the authors' initialization and the network's loss.
sample = sampler(SHOTS, SHOTS)


def init(key):
    """The 1-40-40-1 network as the experiment (and the authors' code) starts it."""
    return init_mlp(key, HIDDEN)


def median_ms(fn, keys) -> float:
    """Median milliseconds of ``fn(key)`` over ``keys`` (after one warm-up call)."""
    jax.block_until_ready(fn(keys[0]))
    times = []
    for key in keys:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(key))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench_jax(steps: int, repeats: int) -> dict[str, float]:
    params = init(jax.random.key(0))
    task = hg.meta.maml(params, mse, hg.tasks.Tasks(sample, META_BATCH), steps=steps,
                        inner_lr=INNER_LR)
    phi = task.space.init()
    one = task.one(*sample(jax.random.key(1)))
    hparams = one.space.constrain(phi)
    fns = {
        "maml": jax.jit(lambda k: hg.estimators.reverse()(task, phi, k)[:2]),
        "fomaml": jax.jit(lambda k: hg.estimators.first_order()(task, phi, k)[:2]),
        "forward": jax.jit(lambda k: objective(task, phi, k)[0]),
        "train1": jax.jit(lambda k: train(one, hparams, k)[0].params),
    }
    keys = [jax.random.key(100 + i) for i in range(repeats)]
    return {name: median_ms(fn, keys) for name, fn in fns.items()}


def torch_data(seed: int):
    """25 tasks' support and query sets as numpy arrays (the same for every framework)."""
    rng = np.random.default_rng(seed)
    amplitude = rng.uniform(0.1, 5.0, (META_BATCH, 1, 1))
    phase = rng.uniform(0.0, np.pi, (META_BATCH, 1, 1))
    x = rng.uniform(-5.0, 5.0, (META_BATCH, 2 * SHOTS, 1))
    y = amplitude * np.sin(x + phase)
    return [a.astype(np.float32) for a in (x[:, :SHOTS], y[:, :SHOTS], x[:, SHOTS:],
                                           y[:, SHOTS:])]


def bench_torch(steps: int, repeats: int) -> dict[str, float] | str:
    """The MAML meta-gradient in PyTorch (higher, torch.func); a message if unavailable."""
    try:
        import torch
        from torch import nn
    except ImportError:
        return "torch is not installed here (see --torch-site); the torch rows are skipped"
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, HIDDEN[0]), nn.ReLU(), nn.Linear(*HIDDEN), nn.ReLU(),
                        nn.Linear(HIDDEN[1], 1))
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.01, a=-0.02, b=0.02)
                layer.bias.zero_()
    batches = [[torch.from_numpy(np.ascontiguousarray(a)) for a in torch_data(s)]
               for s in range(repeats + 1)]
    loss_fn = nn.functional.mse_loss
    out: dict[str, float] = {}

    try:
        import higher
    except ImportError:
        higher = None

    def with_higher(batch):
        xs, ys, xq, yq = batch
        inner = torch.optim.SGD(net.parameters(), lr=INNER_LR)
        net.zero_grad()
        total = 0.0
        for i in range(META_BATCH):
            with higher.innerloop_ctx(net, inner, copy_initial_weights=False,
                                      track_higher_grads=True) as (fnet, diffopt):
                for _ in range(steps):
                    diffopt.step(loss_fn(fnet(xs[i]), ys[i]))
                query = loss_fn(fnet(xq[i]), yq[i]) / META_BATCH
                query.backward()
                total += query.item()
        return total

    from torch.func import functional_call, grad, vmap

    names = [n for n, _ in net.named_parameters()]

    def adapted_query_loss(params, xs, ys, xq, yq):
        def support_loss(p):
            return loss_fn(functional_call(net, dict(zip(names, p, strict=True)), (xs,)), ys)

        p = params
        for _ in range(steps):
            g = grad(support_loss)(p)
            p = tuple(w - INNER_LR * gw for w, gw in zip(p, g, strict=True))
        return loss_fn(functional_call(net, dict(zip(names, p, strict=True)), (xq,)), yq)

    def with_func(batch):
        params = tuple(net.parameters())
        losses = vmap(adapted_query_loss, in_dims=(None, 0, 0, 0, 0))(params, *batch)
        meta = losses.mean()
        grads = torch.autograd.grad(meta, params)
        return float(meta), grads

    def timed(fn):
        fn(batches[0])  # warm-up
        times = []
        for batch in batches[1:]:
            t0 = time.perf_counter()
            fn(batch)
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    if higher is not None:
        out["torch_higher"] = timed(with_higher)
    out["torch_func"] = timed(with_func)
    out["torch_threads"] = torch.get_num_threads()
    out["torch_version"] = torch.__version__
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--torch", action="store_true", help="also time PyTorch (+ higher)")
    parser.add_argument("--torch-site", default=None,
                        help="a site-packages directory holding torch (and higher)")
    args = parser.parse_args(argv)
    if args.torch_site:
        sys.path.append(args.torch_site)
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, float32, MAML on sinusoids: "
          f"{META_BATCH} tasks x {SHOTS} shots, 1-40-40-1 ReLU, inner SGD {INNER_LR}; "
          f"median of {args.repeats} calls, ms")
    head = f"{'steps':>5} {'maml':>9} {'fomaml':>9} {'forward':>9} {'train1':>9} " \
           f"{'maml/fwd':>9} {'fo/fwd':>9} {'maml/train1':>12}"
    if args.torch:
        head += f" {'higher':>9} {'torch.func':>11} {'higher/maml':>12} {'func/maml':>10}"
    print(head)
    note = None
    for steps in args.steps:
        t = bench_jax(steps, args.repeats)
        row = (f"{steps:>5} {t['maml']:>9.3f} {t['fomaml']:>9.3f} {t['forward']:>9.3f} "
               f"{t['train1']:>9.3f} {t['maml'] / t['forward']:>9.2f} "
               f"{t['fomaml'] / t['forward']:>9.2f} {t['maml'] / t['train1']:>12.1f}")
        if args.torch:
            tt = bench_torch(steps, args.repeats)
            if isinstance(tt, str):
                note = tt
            else:
                higher_ms = tt.get("torch_higher", float("nan"))
                row += (f" {higher_ms:>9.3f} {tt['torch_func']:>11.3f} "
                        f"{higher_ms / t['maml']:>12.1f} {tt['torch_func'] / t['maml']:>10.1f}")
                note = f"torch {tt['torch_version']}, {tt['torch_threads']} threads" + \
                    ("" if "torch_higher" in tt else "; higher is not installed")
        print(row, flush=True)
    if note:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
