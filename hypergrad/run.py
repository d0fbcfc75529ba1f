"""The outer loop: meta-steps, metrics as they happen, guards, summary and figures.

A run's workdir holds ``config.json`` (written before any work), ``metrics.jsonl`` (one
line per meta-step, flushed as it is written), ``summary.json`` and PNG figures.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import jax
import jax.numpy as jnp
import optax

from hypergrad import outer as outer_lib
from hypergrad.config import Config, ConfigError
from hypergrad.estimators import Estimator, reverse
from hypergrad.hparams import summarize
from hypergrad.task import Task
from hypergrad.unroll import objective

PyTree = Any
ENTRY_POINTS = "hypergrad.experiments"


class Problem(NamedTuple):
    """What an experiment builds from its config: the task, and how to score a test set.

    ``evaluate(params, hparams) -> {"test_loss": ..., "test_accuracy": ...}`` is jittable.
    """

    task: Task
    evaluate: Callable[[PyTree, Any], dict[str, jax.Array]]


class Experiment(NamedTuple):
    """A named, runnable experiment: its default config and how to build the problem."""

    name: str
    config: Config
    build: Callable[[Config], Problem]
    description: str


class RunError(RuntimeError):
    """A run cannot go on (for example, too many rejected meta-steps)."""


def experiments() -> dict[str, Experiment]:
    """Every experiment registered under the ``hypergrad.experiments`` entry points."""
    found = {}
    for ep in metadata.entry_points(group=ENTRY_POINTS):
        found[ep.name] = ep.load()
    return dict(sorted(found.items()))


def get_experiment(name: str) -> Experiment:
    """The experiment called ``name``; a :class:`ConfigError` names the valid ones."""
    available = experiments()
    if name not in available:
        import difflib

        close = difflib.get_close_matches(name, list(available), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(
            f"unknown experiment {name!r}{hint} (available: {', '.join(available)}; "
            "see `hypergrad list`)"
        )
    return available[name]


def estimator_for(config: Config) -> Estimator:
    """The hypergradient estimator a config asks for."""
    return reverse(checkpoint=config.checkpoint or None)


def outer_for(config: Config) -> optax.GradientTransformationExtraArgs:
    """The hyper-update a config asks for, with hypergradient clipping for gd and adam.

    Nonlinear CG is not clipped: its line search already bounds the step, and it needs
    the true gradient for the Armijo condition.
    """
    opt = outer_lib.by_name(config.outer, config.outer_lr)
    if config.clip and config.outer != "ncg":
        clip = optax.with_extra_args_support(optax.clip_by_global_norm(config.clip))
        opt = optax.chain(clip, opt)
    return opt


def make_meta_step(est: Estimator, opt: optax.GradientTransformationExtraArgs):
    """One meta-step as one jitted function: hypergradient, hyper-update, guard.

    Returns ``meta_step(task, phi, opt_state, key, scale) -> (phi, opt_state, metrics)``.
    ``scale`` multiplies the update (the run shrinks it after a rejected step); the
    update is taken only where the value, the hypergradient and the new ``phi`` are all
    finite, so a non-finite number never reaches ``phi``.
    """

    def meta_step(task, phi, opt_state, key, scale):
        value, grad, aux = est(task, phi, key)

        def value_fn(p):
            return objective(task, p, key)[0]

        updates, new_state = opt.update(
            grad, opt_state, phi, value=value, grad=grad, value_fn=value_fn
        )
        new_phi = optax.apply_updates(phi, jax.tree.map(lambda u: scale * u, updates))
        finite = jnp.isfinite(value) & _all_finite(grad)
        ok = finite & _all_finite(new_phi)
        phi_out = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_phi, phi)
        state_out = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_state, opt_state)
        metrics = {
            "val_loss": value,
            "train_loss": aux["train_loss"],
            "hypergrad_norm": optax.tree.norm(grad),
            "hparams": task.space.constrain(phi),
            "finite": finite,
            "accepted": ok,
        }
        return phi_out, state_out, metrics

    return jax.jit(meta_step)


def _all_finite(tree: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_evaluate(problem: Problem):
    """A jitted ``(task, phi, key) -> metrics`` for the start and the end of a run."""

    def evaluate(task, phi, key):
        value, aux = objective(task, phi, key)
        hparams = task.space.constrain(phi)
        return {"val_loss": value, "train_loss": aux["train_loss"],
                **problem.evaluate(aux["params"], hparams)}

    return jax.jit(evaluate)


def _floats(tree: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in tree.items()}


def _fmt(hparams: dict[str, Any]) -> str:
    parts = []
    for name, v in hparams.items():
        parts.append(f"{name}={v:.4g}" if isinstance(v, float) else f"{name}~{v['mean']:.4g}")
    return " ".join(parts)


def prepare_workdir(workdir: Path) -> None:
    """Create ``workdir``; refuse one that already holds a run (nothing is overwritten)."""
    if workdir.exists() and any(workdir.iterdir()):
        raise ConfigError(
            f"workdir {workdir} already holds files; choose another --workdir or remove it"
        )
    workdir.mkdir(parents=True, exist_ok=True)


def run(
    experiment: Experiment, config: Config, workdir: str | Path, *, progress: bool = True,
    out: TextIO | None = None, max_rejections: int = 5,
) -> dict[str, Any]:
    """Tune the experiment's hyperparameters for ``config.meta_steps`` meta-steps.

    Writes ``config.json`` first, then one ``metrics.jsonl`` line per meta-step as it
    finishes, then ``summary.json`` and figures. A meta-step whose value or hypergradient
    is not finite is rejected: ``phi`` goes back to the last point that evaluated
    finitely, the step scale halves, a ``warning`` line is logged, and after
    ``max_rejections`` in a row the run stops with :class:`RunError`.

    Returns:
      the summary dict written to ``summary.json``.
    """
    config = config.validate()
    workdir = Path(workdir)
    prepare_workdir(workdir)
    (workdir / "config.json").write_text(
        json.dumps({"experiment": experiment.name, **config.to_dict()}, indent=2) + "\n"
    )
    start = time.perf_counter()
    problem = experiment.build(config)
    task = problem.task
    dtype = jnp.dtype(config.dtype)
    phi = task.space.init(dtype)
    opt = outer_for(config)
    opt_state = opt.init(phi)
    key = jax.random.key(config.seed)
    meta_step = make_meta_step(estimator_for(config), opt)
    evaluate = make_evaluate(problem)

    initial = _floats(evaluate(task, phi, key))
    initial_hparams = summarize(task.space.constrain(phi))
    good = (phi, opt_state)  # the last phi whose value and hypergradient were finite
    scale, rejected_in_row, rejected = 1.0, 0, 0

    from tqdm.auto import tqdm

    bar = tqdm(total=config.meta_steps, desc="meta-step", unit="step", disable=not progress,
               dynamic_ncols=True)
    with bar, open(workdir / "metrics.jsonl", "w") as log:
        for i in range(config.meta_steps):
            t0 = time.perf_counter()
            new_phi, new_state, m = meta_step(task, phi, opt_state, key, jnp.asarray(scale, dtype))
            m = jax.device_get(m)
            record = {"meta_step": i}
            if m["accepted"]:
                good = (phi, opt_state)
                phi, opt_state, rejected_in_row = new_phi, new_state, 0
                record |= {"val_loss": float(m["val_loss"]),
                           "train_loss": float(m["train_loss"]),
                           "hparams": summarize(m["hparams"]),
                           "hypergrad_norm": float(m["hypergrad_norm"])}
                bar.set_postfix_str(f"val={record['val_loss']:.4f} {_fmt(record['hparams'])}")
            else:
                if m["finite"]:
                    good = (phi, opt_state)  # phi itself was fine; only the step overshot
                phi, opt_state = good
                scale, rejected, rejected_in_row = 0.5 * scale, rejected + 1, rejected_in_row + 1
                what = "new hyperparameters" if m["finite"] else "validation loss or hypergradient"
                record["warning"] = (f"non-finite {what}; step rejected, outer step scale "
                                     f"now {scale:g}")
            record["seconds"] = time.perf_counter() - t0
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.update(1)
            if rejected_in_row >= max_rejections:
                raise RunError(
                    f"{rejected_in_row} meta-steps in a row were rejected as non-finite; "
                    "lower outer_lr or start from other hyperparameters"
                )

    final = _floats(evaluate(task, phi, key))
    summary = {
        "experiment": experiment.name,
        "initial_val_loss": initial["val_loss"],
        "final_val_loss": final["val_loss"],
        "initial_hparams": initial_hparams,
        "final_hparams": summarize(task.space.constrain(phi)),
        "initial_test_loss": initial["test_loss"],
        "initial_test_accuracy": initial["test_accuracy"],
        "test_loss": final["test_loss"],
        "test_accuracy": final["test_accuracy"],
        "rejected_meta_steps": rejected,
        "seconds": time.perf_counter() - start,
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    from hypergrad import plots  # matplotlib only once there is something to draw

    plots.plot_run(workdir)
    print_summary(summary, out)
    return summary


def print_summary(summary: dict[str, Any], out: TextIO | None = None) -> None:
    """Print the initial and final hyperparameters and losses as a table."""
    out = out or sys.stdout
    rows = []
    for name, v0 in summary["initial_hparams"].items():
        v1 = summary["final_hparams"][name]
        rows.append((name, _cell(v0), _cell(v1)))
    rows += [
        ("val_loss", _cell(summary["initial_val_loss"]), _cell(summary["final_val_loss"])),
        ("test_loss", _cell(summary["initial_test_loss"]), _cell(summary["test_loss"])),
        ("test_accuracy", _cell(summary["initial_test_accuracy"]),
         _cell(summary["test_accuracy"])),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'initial':>12}  {'final':>12}", file=out)
    for name, a, b in rows:
        print(f"{name:{width}}  {a:>12}  {b:>12}", file=out)
    print(f"{summary['seconds']:.1f} s", file=out)


def _cell(v: Any) -> str:
    if isinstance(v, dict):
        return f"~{v['mean']:.4g}"
    if not math.isfinite(v):
        return str(v)
    return f"{v:.4g}"


def check(experiment: Experiment, config: Config, *, directions: int | None = None) -> list:
    """Compare the configured estimator with central differences; float64 is required."""
    from hypergrad.check import directional_errors

    if not jax.config.jax_enable_x64:
        raise ConfigError("check needs float64: call jax.config.update('jax_enable_x64', True)")
    problem = experiment.build(config)
    task = problem.task
    phi = task.space.init(jnp.float64)
    return directional_errors(estimator_for(config), task, phi, jax.random.key(config.seed),
                              directions=directions)


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``, in order."""
    with open(Path(workdir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]

