"""Hypergradients against black-box search: best validation loss against wall time.

Run:  python scripts/bench_hpo.py [--budget 60] [--json bench_hpo.json] [--figure FILE]
      python scripts/bench_hpo.py --quick            (a smoke run: tiny problems, 2 s each)
      python scripts/bench_hpo.py --data idx:../shared/data/mnist-10k --problems b,d

Four problems, all float32 on digits (1000 train / 400 validation / 397 test), one key
per problem shared by every method (same initial weights, same minibatch order).
``--data SOURCE`` runs the seed-CNN problems (a, b, d) on that dataset instead, at
``seed-mnist``'s sizes (:data:`MNIST_SIZES`):

- ``a``: the seed CNN's four scalar hyperparameters (learning rate, momentum, weight
  decay, leaky slope), as ``hypergrad run seed-cnn`` (T = 100, batch 100);
- ``b``: the seed CNN with one learning rate and one weight decay per layer (three
  convolutions and the head; a layer's kernel and bias share them) plus the shared
  momentum and leaky slope: 10 hyperparameters;
- ``c``: logistic regression with one L2 penalty per input feature (64 hyperparameters),
  ``sum_f l2_f |W[f, :]|^2``, trained by full-batch gradient descent (step 0.1, T = 1000
  steps, cross-entropy), as ``hypergrad run grazzi-hierarchy`` builds it;
- ``d``: the seed CNN with a learning rate per layer and per inner step (4 x 100) and a
  weight decay per parameter (13 818), plus momentum and slope: 14 220 hyperparameters.
  The hypergradient methods tune all of them. TPE, random and grid search cannot search
  14 220 dimensions; they search the best reduction they can handle, ``b``'s 10 (a
  constant learning rate and one weight decay per layer, which is the subspace of ``d``
  where every step's learning rate and every weight decay of a layer are equal). Both
  spaces start at the same values and score a configuration with the same training run.
  When ``b`` runs in the same invocation, ``d``'s black-box results are ``b``'s runs
  (the same space, key and budget), reported again rather than run twice.

Methods, each under the same wall-clock budget (``--budget`` seconds per method and
problem): hypergradient meta-steps (reverse-mode hypergradient through the whole unroll,
:func:`hypergrad.tune`) with gradient-descent, nonlinear-CG and Adam
hyper-updates (:func:`hg.tune` with ``hypergrad run``'s norm clip 0.5 for gd and adam):
``hypergrad-adam`` is Adam with step 0.05 in log / logit units (the default until these
runs chose 0.2) and ``hypergrad-adam-0.2`` Adam with step 0.2 (the default now), all
starting from the initial values; random search; Optuna TPE
(sequential); and, on ``a`` only, a coarse grid (3 values per hyperparameter, 81
configurations). Random and grid search score ``--batch`` configurations per ``vmap``-ed
call; the default is 1 because on the 2-core CPU a batch of 8 took longer per
configuration than one at a time (0.66 s against 0.41 s for the CNN, 0.061 s against
0.042 s for logistic regression, measured once while the machine was shared). Random
search, TPE and the grid search the default box of :mod:`hypergrad.search` around the
initial values (positive: /100 to x100; unit and bounded: logit +-4); the hypergradient
runs start from its centre.

Wall time counts everything from the method's start, compilation included. A method's
choice is its best evaluated configuration (lowest validation loss); its test loss is
reported. The table gives each method's time to reach the best validation loss TPE
reached with its whole budget; ``time_fraction`` in the JSON is the best hypergradient
method's such time divided by TPE's whole time (``null`` if none reaches it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import hypergrad as hg
from hypergrad import search
from hypergrad.config import Config, ConfigError
from hypergrad.data import DataError
from hypergrad.experiment import Problem, outer_for
from hypergrad.plots import save_figure
from hypergrad.unroll import objective

HYPERGRAD = ("hypergrad-gd", "hypergrad-ncg", "hypergrad-adam", "hypergrad-adam-0.2",
             "hypergrad-explore")
#: ``hypergrad-adam``: Adam with step ``SHORT_LR``, the default before these runs;
#: ``hypergrad-adam-0.2``: Adam with step ``LONG_LR``, the default since.
SHORT_LR, LONG_LR = 0.05, 0.2
#: ``hypergrad-explore``: ``explore=EXPLORE`` random configurations pick the start, then
#: Adam with step ``EXPLORE_LR`` (in log / logit units) refines it; chosen by measurement
#: on (a) and (b) (README, "Hypergradients against black-box search").
EXPLORE, EXPLORE_LR = 20, 0.2


# --------------------------------------------------------------------------------------
# Problems


#: ``--data SOURCE`` (for example ``idx:../shared/data/mnist-10k``) runs the seed-CNN
#: problems on 28 x 28 digits at ``seed-mnist``'s sizes: 5000 training, 1000 validation
#: and 2000 test images, weights checkpointed every 10 steps, scored 500 at a time.
MNIST_SIZES = dict(data_train_size=5000, data_val_size=1000, data_test_size=2000,
                   checkpoint="10", val_batch_size=500)
QUICK_MNIST_SIZES = dict(data_train_size=200, data_val_size=100, data_test_size=100)


def _seed_cnn(quick: bool, data: str | None, options=()) -> Problem:
    from experiments.seed_cnn import SeedCnnConfig, build

    tiny = dict(steps=10, channels="4,4,4") if quick else {}
    sizes = {} if data is None else dict(data=data, **(QUICK_MNIST_SIZES if quick
                                                       else MNIST_SIZES))
    return build(SeedCnnConfig(hparam_options=tuple(options), **tiny, **sizes))


def problem_a(quick: bool, data: str | None = None) -> Problem:
    return _seed_cnn(quick, data)


def problem_b(quick: bool, data: str | None = None) -> Problem:
    # One learning rate and one weight decay per layer (convs/0..2 and head), declared in
    # the space: `--set hparams.learning_rate.per=layer` on the command line.
    return _seed_cnn(quick, data, (("learning_rate", "per", "layer"),
                                   ("weight_decay", "per", "layer")))


def problem_c(quick: bool, data: str | None = None) -> Problem:
    from experiments.grazzi_hierarchy import GrazziConfig, build

    assert data is None, "problem c runs on the embedded digits only"
    return build(GrazziConfig(steps=100 if quick else 1000, dtype="float32"))


def problem_d(quick: bool, data: str | None = None) -> Problem:
    # `--set hparams.learning_rate.per=layer --set hparams.learning_rate.schedule=per_step
    #  --set hparams.weight_decay.per=parameter` on the command line.
    return _seed_cnn(quick, data, (("learning_rate", "per", "layer"),
                                   ("learning_rate", "schedule", "per_step"),
                                   ("weight_decay", "per", "parameter")))


PROBLEMS = {
    "a": ("seed CNN, 4 scalar hyperparameters", problem_a),
    "b": ("seed CNN, per-layer lr and wd + momentum, slope (10)", problem_b),
    "c": ("logistic regression, 64 per-feature L2 penalties", problem_c),
    "d": ("seed CNN, per-layer x per-step lr, per-parameter wd (14 220)", problem_d),
}
#: The space the black-box methods search instead, where a problem has too many
#: hyperparameters for them (a subspace of the problem's, with the same start).
REDUCTION = {"d": problem_b}


# --------------------------------------------------------------------------------------
# Methods


class _Spent(Exception):
    """The time budget of a hypergradient run is spent."""


def hypergradient(problem: Problem, outer: str, key: jax.Array, budget: float, *,
                  explore: int = 0, outer_lr: float | None = None, label: str | None = None
                  ) -> search.SearchResult:
    """:func:`hg.tune` with the command line's defaults from the initial values, stopped
    once ``budget`` seconds have passed (or when it stops itself: nonlinear CG after two
    failed line searches in a row).

    Each meta-step's validation loss is that of the ``phi`` it evaluated (``inf`` for a
    point the guard rejected). With ``explore``, :func:`hg.tune`'s random phase picks the
    start; its evaluations come first in the trace, at the times they finished.
    """
    phis, losses, seconds = [], [], []
    began = time.perf_counter()

    def callback(record, state):
        accepted = "val_loss" in record
        phis.append(jax.tree.map(lambda x: np.asarray(x)[0], jax.device_get(state.last_phi)))
        losses.append(record["val_loss"] if accepted else np.inf)
        seconds.append(time.perf_counter() - began)
        if seconds[-1] >= budget:
            raise _Spent

    task = problem.task
    phi = task.space.init(jnp.float32)
    if explore:  # as hg.tune(explore=...) does, with its evaluations kept for the trace
        phi, found = search.explore(task, key, explore, phi=phi)
        phis.extend(jax.tree.map(lambda a, i=i: a[i], found.phi) for i in range(explore))
        losses.extend(found.val_loss.tolist())
        offset = time.perf_counter() - began - float(found.seconds[-1])
        seconds.extend((found.seconds + offset).tolist())
    try:
        hg.tune(task, hg.estimators.reverse(), outer_for(Config(outer=outer, outer_lr=outer_lr)),
                key=key, phi=phi, meta_steps=1_000_000, callback=callback)
    except (_Spent, hg.TuneError):
        pass
    stacked = jax.tree.map(lambda *a: np.stack(a), *phis)
    return search.SearchResult(label or f"hypergrad-{outer}", stacked, np.array(losses),
                               np.array(seconds))


def run_methods(name: str, problem: Problem, budget: float, seed: int, quick: bool,
                batch: int, log, only: list[str] | None = None,
                reduced: Problem | None = None,
                reuse: dict[str, search.SearchResult] | None = None
                ) -> dict[str, search.SearchResult]:
    """Every method on ``problem``; the black-box ones on ``reduced`` where given, and
    taken from ``reuse`` where it holds them (runs in the same space, same key)."""
    key = jax.random.key(seed)
    task = (reduced or problem).task
    methods = {
        "hypergrad-gd": lambda: hypergradient(problem, "gd", key, budget),
        "hypergrad-ncg": lambda: hypergradient(problem, "ncg", key, budget),
        "hypergrad-adam": lambda: hypergradient(problem, "adam", key, budget,
                                                outer_lr=SHORT_LR, label="hypergrad-adam"),
        "hypergrad-adam-0.2": lambda: hypergradient(problem, "adam", key, budget,
                                                    outer_lr=LONG_LR,
                                                    label="hypergrad-adam-0.2"),
        "hypergrad-explore": lambda: hypergradient(
            problem, "adam", key, budget, explore=2 if quick else EXPLORE,
            outer_lr=EXPLORE_LR, label="hypergrad-explore"),
        "random": lambda: search.random_search(task, key, seed=seed, batch_size=batch,
                                               budget=budget, dtype=jnp.float32),
        "tpe": lambda: search.tpe_search(task, key, seed=seed, budget=budget,
                                         dtype=jnp.float32),
    }
    if name == "a":
        methods["grid"] = lambda: search.grid_search(task, key, points=2 if quick else 3,
                                                     batch_size=batch, budget=budget,
                                                     dtype=jnp.float32)
    if only:
        methods = {m: fn for m, fn in methods.items() if m in only or m == "tpe"}
    results = {}
    for method, fn in methods.items():
        reused = method in (reuse or {})
        results[method] = r = reuse[method] if reuse and reused else fn()
        log(f"  {name} {method:15s} {len(r.val_loss):5d} evaluations in {r.seconds[-1]:6.1f} s,"
            f" best val loss {r.best_val_loss:.4f}{' (the same run as above)' if reused else ''}")
    return results


def time_to_reach(result: search.SearchResult, target: float) -> float | None:
    """Seconds until ``result`` first evaluated a loss <= ``target``; None if never."""
    hit = np.nonzero(result.val_loss <= target)[0]
    return float(result.seconds[hit[0]]) if hit.size else None


def summarize(problem: Problem, results: dict[str, search.SearchResult], seed: int,
              reduced: Problem | None = None) -> dict[str, Any]:
    """Per method: trace, best, test loss of the choice, time to reach TPE's best. A
    black-box method's choice is scored in ``reduced``'s space where given."""
    @jax.jit
    def evaluate(task, phi, key):
        _, aux = objective(task, phi, key)
        hparams = task.space.at_step(task.space.constrain(phi), task.steps - 1)
        return problem.evaluate(aux["params"], hparams)

    key = jax.random.key(seed)
    tpe = results["tpe"]
    target, tpe_time = tpe.best_val_loss, float(tpe.seconds[-1])
    out: dict[str, Any] = {"methods": {}, "tpe_best_val_loss": target, "tpe_seconds": tpe_time}
    for method, r in results.items():
        task = (problem if method in HYPERGRAD or reduced is None else reduced).task
        scores = jax.device_get(evaluate(task, r.best_phi, key))
        reach = time_to_reach(r, target)
        out["methods"][method] = {
            "seconds": r.seconds.tolist(),
            "val_loss": [v if np.isfinite(v) else None for v in r.val_loss.tolist()],
            "best_so_far": [v if np.isfinite(v) else None for v in r.best_so_far().tolist()],
            "evaluations": len(r.val_loss),
            "best_val_loss": r.best_val_loss,
            "test_loss": float(scores["test_loss"]),
            "test_accuracy": float(scores["test_accuracy"]),
            "time_to_tpe_best": reach,
            "fraction_of_tpe_time": None if reach is None else reach / tpe_time,
            "best_hparams": hg.hparams.summarize(task.space.constrain(r.best_phi)),
        }
    reaches = [out["methods"][m]["time_to_tpe_best"] for m in HYPERGRAD if m in out["methods"]]
    reaches = [t for t in reaches if t is not None]
    out["time_fraction"] = min(reaches) / tpe_time if reaches else None
    return out


# --------------------------------------------------------------------------------------
# Output


def table(report: dict[str, Any]) -> str:
    """A Markdown table: per problem and method, best val/test loss, time to TPE's best."""
    lines = ["| problem | method | evaluations | best val loss | test loss of choice | "
             "time to TPE's best (s) | / TPE's time |",
             "|---|---|---|---|---|---|---|"]
    for name in PROBLEMS:
        if name not in report:
            continue
        p = report[name]
        for method, m in p["methods"].items():
            t = m["time_to_tpe_best"]
            reach = "never" if t is None else f"{t:.1f}"
            frac = "" if t is None else f"{m['fraction_of_tpe_time']:.2f}"
            lines.append(f"| {name} | {method} | {m['evaluations']} | {m['best_val_loss']:.4f} | "
                         f"{m['test_loss']:.4f} | {reach} | {frac} |")
    return "\n".join(lines)


def figure(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    names = [n for n in PROBLEMS if n in report]
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), dpi=90,
                             squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for method, m in report[name]["methods"].items():
            best = [np.nan if v is None else v for v in m["best_so_far"]]
            ax.step(m["seconds"], best, where="post", label=method,
                    linestyle="-" if method.startswith("hypergrad") else "--")
        ax.axhline(report[name]["tpe_best_val_loss"], color="grey", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"({name}) {report[name]['description']}", fontsize=7)
        ax.set(xlabel="wall time (s), compilation included",
               ylabel="best validation loss so far")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


def _size(problem: Problem) -> int:
    return sum(int(np.size(v)) for v in jax.tree.leaves(problem.task.space.init()))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=60.0,
                    help="wall-clock seconds per method and problem (default 60)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: tiny problems, a 2 s budget unless --budget is given")
    ap.add_argument("--problems", default="a,b,c,d",
                    help="comma-separated subset of a,b,c,d")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=1,
                    help="configurations per vmapped evaluation in random and grid search")
    ap.add_argument("--data", metavar="SOURCE",
                    help="run the seed-CNN problems (a, b, d) on this dataset at MNIST sizes, "
                         "for example idx:../shared/data/mnist-10k (default: embedded digits)")
    ap.add_argument("--methods", default="",
                    help="comma-separated subset of the methods (tpe always runs; default all)")
    ap.add_argument("--json", help="write the traces and summary here")
    ap.add_argument("--figure", help="write the figure (PNG) here")
    ap.add_argument("--from-json", metavar="FILE",
                    help="run nothing: print the table and draw --figure from a saved --json")
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as fh:
            report = json.load(fh)
        print(table(report))
        if args.figure:
            figure(report, args.figure)
        return report
    budget = 2.0 if args.quick and "--budget" not in (argv or sys.argv) else args.budget
    if not budget > 0:
        ap.error(f"--budget must be positive, got {budget:g}")
    chosen = [p for p in args.problems.split(",") if p]
    unknown = sorted(set(chosen) - set(PROBLEMS))
    if unknown or not chosen:
        ap.error(f"--problems takes a comma-separated subset of a,b,c,d, got "
                 f"{args.problems!r}")

    if args.data and "c" in chosen:
        ap.error("problem c runs on the embedded digits only: drop c from --problems "
                 "(for example --problems b,d) or drop --data")

    only = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(only) - set(HYPERGRAD) - {"random", "tpe", "grid"})
    if unknown:
        ap.error(f"--methods takes a comma-separated subset of {', '.join(HYPERGRAD)}, "
                 f"random, tpe, grid; got {', '.join(unknown)}")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    report: dict[str, Any] = {"settings": {
        "budget_seconds": budget, "quick": args.quick, "seed": args.seed, "batch": args.batch,
        "compile_time_included": True, "machine": platform.platform(),
        "data": args.data or "digits",
        "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
        "loadavg_start": list(os.getloadavg())}}
    # Black-box results per searched space. d's reduction is b's space from the same start
    # and key, so where b ran, d's black-box methods are b's runs (the same program and
    # draws), not reruns that differ only by timing noise; the JSON says so.
    done: dict[Any, tuple[str, dict[str, search.SearchResult]]] = {}
    for name in chosen:
        description, build = PROBLEMS[name]
        try:
            problem = build(args.quick, args.data)
            reduced = REDUCTION[name](args.quick, args.data) if name in REDUCTION else None
        except (DataError, ConfigError) as e:
            ap.exit(2, f"bench_hpo.py: error: {e}\n")
        log(f"({name}) {description}: {problem.task.space}")
        space = REDUCTION.get(name, build)
        source, reuse = done.get(space, (name, {}))
        results = run_methods(name, problem, budget, args.seed, args.quick, args.batch, log,
                              only, reduced, reuse)
        done.setdefault(space, (name, {m: r for m, r in results.items() if m not in HYPERGRAD}))
        report[name] = {"description": description, "num_hparams": _size(problem),
                        **summarize(problem, results, args.seed, reduced)}
        if reduced is not None:
            report[name]["black_box_num_hparams"] = _size(reduced)
        if reuse:
            report[name]["black_box_runs_of"] = source
    report["settings"]["loadavg_end"] = list(os.getloadavg())
    print(table(report))
    for name in chosen:
        f = report[name]["time_fraction"]
        print(f"({name}) time_fraction = {'null' if f is None else f'{f:.3f}'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
            fh.write("\n")
    if args.figure:
        figure(report, args.figure)
    return report


if __name__ == "__main__":
    main()
