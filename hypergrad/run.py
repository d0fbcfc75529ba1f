"""The outer loop: meta-steps, metrics as they happen, guards, summary and figures.

A run's workdir holds ``config.json`` (written before any work), ``metrics.jsonl`` (one
line per meta-step, flushed as it is written), ``summary.json`` and PNG figures.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import jax
import jax.numpy as jnp
import optax

from hypergrad import estimators
from hypergrad import outer as outer_lib
from hypergrad.config import Config, ConfigError
from hypergrad.estimators import Estimator
from hypergrad.task import Task
from hypergrad.unroll import objective, segment, start

PyTree = Any
ENTRY_POINTS = "hypergrad.experiments"


class Problem(NamedTuple):
    """What an experiment builds from its config: the task, and how to score a test set.

    ``evaluate(params, hparams) -> {"test_loss": ..., "test_accuracy": ...}`` is jittable.
    """

    task: Task
    evaluate: Callable[[PyTree, Any], dict[str, jax.Array]]


class Experiment(NamedTuple):
    """A named, runnable experiment: its default config and how to build the problem.

    Most experiments tune hyperparameters with the standard loop of :func:`run`. One that
    measures something else (a comparison of estimators, say) gives ``main(config,
    workdir, progress) -> summary``, which :func:`run` calls instead of the loop, after
    writing ``config.json``; such a run cannot be resumed. Its ``plot(workdir, out) ->
    paths`` redraws its figures from what ``main`` wrote (``hypergrad plot WORKDIR``).
    """

    name: str
    config: Config
    build: Callable[[Config], Problem]
    description: str
    main: Callable[[Config, Path, bool], dict[str, Any]] | None = None
    plot: Callable[[Path, Path], list[Path]] | None = None


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
    checkpoint = config.checkpoint_policy()
    if config.estimator == "truncated":
        return estimators.truncated(config.window, checkpoint=checkpoint, hvp=config.hvp)
    if config.estimator == "forward":
        return estimators.forward()
    if config.estimator == "reversible":
        return estimators.reversible()
    if config.estimator == "implicit":
        return estimators.implicit(config.solver, maxiter=config.maxiter, tol=config.tol,
                                   alpha=config.solver_step)
    return estimators.reverse(checkpoint=checkpoint, hvp=config.hvp)


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


def build(experiment: Experiment, config: Config) -> Problem:
    """Build the experiment's problem; a value the data or model rejects (a batch larger
    than the training set, say) becomes a :class:`ConfigError`."""
    try:
        problem = experiment.build(config)
    except ValueError as e:  # DataError included
        raise ConfigError(str(e)) from None
    # Every experiment's losses are means over examples (plus, for training, penalties
    # that do not depend on the batch), which chunking them needs.
    chunks = {name: getattr(config, name) for name in ("val_batch_size", "hvp_batch_size")
              if getattr(config, name)}
    if chunks:
        problem = problem._replace(task=problem.task.replace(**chunks))
    reads = problem.task.optimizer.reads
    tuned = [n for n in problem.task.space.names if n in reads]
    if config.estimator == "implicit" and not config.online and tuned:
        raise ConfigError(
            f"the implicit estimator cannot differentiate {', '.join(tuned)}: optimizer "
            "hyperparameters do not appear in the stationarity condition; use --set "
            "estimator=reverse, forward or truncated")
    return problem


def _guarded_update(opt, task, phi, opt_state, value, grad, value_fn, scale, extra_ok=True):
    """Apply ``opt`` (its update times ``scale``) only where everything is finite.

    Returns ``(phi, opt_state, metrics)``; on rejection ``phi`` and the state are the old
    ones, so a non-finite number never reaches ``phi``.
    """
    updates, new_state = opt.update(grad, opt_state, phi, value=value, grad=grad,
                                    value_fn=value_fn)
    new_phi = optax.apply_updates(phi, jax.tree.map(lambda u: scale * u, updates))
    finite = jnp.isfinite(value) & _all_finite(grad) & extra_ok
    ok = finite & _all_finite(new_phi)
    phi_out = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_phi, phi)
    state_out = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_state, opt_state)
    metrics = {
        **_line_search(new_state),
        "val_loss": value,
        "hypergrad_norm": optax.tree.norm(grad),
        "hparams": task.space.constrain(phi),
        "finite": finite,
        "accepted": ok,
    }
    return phi_out, state_out, metrics


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

        phi, opt_state, metrics = _guarded_update(opt, task, phi, opt_state, value, grad,
                                                  value_fn, scale)
        return phi, opt_state, {**metrics, "train_loss": aux["train_loss"]}

    return jax.jit(meta_step)


def make_online_step(opt: optax.GradientTransformationExtraArgs, window: int,
                     hvp: str = "reverse"):
    """One segment of online tuning as one jitted function (truncated, Shaban et al. 2019).

    Returns ``step(task, phi, opt_state, inner, key, scale, begin) -> (phi, opt_state,
    inner, metrics)``: from the current weights ``inner`` (an
    :class:`hypergrad.inner.InnerState` at inner step ``begin``, a traced integer, so one
    compile serves every segment) it trains ``window`` steps, takes the hypergradient of
    the validation loss through those steps, and updates ``phi``; the trained state is
    the next segment's start. A rejected segment leaves the weights where they were.
    ``hvp`` is how the segment's steps are backpropagated (see
    :func:`hypergrad.estimators.reverse`).
    """

    def step(task, phi, opt_state, inner, key, scale, begin):
        _, data_key = jax.random.split(key)

        def f(p):
            hparams = task.space.constrain(p)
            state, losses = segment(task, hparams, inner, data_key, begin, window, hvp=hvp)
            return task.validation_loss(state.params, hparams), (state, losses)

        (value, (new_inner, losses)), grad = jax.value_and_grad(f, has_aux=True)(phi)
        phi, opt_state, metrics = _guarded_update(
            opt, task, phi, opt_state, value, grad, lambda p: f(p)[0], scale,
            extra_ok=_all_finite(new_inner))
        inner = jax.tree.map(lambda a, b: jnp.where(metrics["accepted"], a, b),
                             new_inner, inner)
        return phi, opt_state, inner, {**metrics, "train_loss": losses[-1]}

    return jax.jit(step)


def _line_search(state: PyTree) -> dict[str, Any]:
    """The nonlinear-CG line search's outcome, if the hyper-update has one."""
    is_ncg = lambda x: isinstance(x, outer_lib.NonlinearCGState)  # noqa: E731
    for s in jax.tree.leaves(state, is_leaf=is_ncg):
        if is_ncg(s):
            return {"line_search": {"step": s.step_size, "evals": s.num_evals,
                                    "failed": s.failed}}
    return {}


def _all_finite(tree: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def score(problem: Problem):
    """``(task, params, hparams) -> {"val_loss", "test_loss", "test_accuracy"}``; the
    experiment's ``evaluate`` reads ``hparams`` as they are at the last inner step."""

    def scores(task, params, hparams):
        last = task.space.at_step(hparams, task.steps - 1)
        return {"val_loss": task.validation_loss(params, hparams),
                **problem.evaluate(params, last)}

    return scores


def make_evaluate(problem: Problem):
    """A jitted ``(task, phi, key) -> metrics``: train with ``phi`` from the start, score."""

    def evaluate(task, phi, key):
        _, aux = objective(task, phi, key)
        return score(problem)(task, aux["params"], task.space.constrain(phi))

    return jax.jit(evaluate)


HPARAMS_DIR = "hparams"


def save_hparams(workdir: Path, task: Task, phi: PyTree, meta_step: int) -> Path | None:
    """Write every hyperparameter in full to ``hparams/meta_step_NNNNN.npz`` (atomically)
    when any of them is more than a scalar; ``metrics.jsonl`` holds only summaries."""
    import numpy as np

    values = task.space.arrays(task.space.constrain(phi))
    if all(np.size(v) == 1 for v in values.values()):
        return None
    folder = workdir / HPARAMS_DIR
    folder.mkdir(exist_ok=True)
    path = folder / f"meta_step_{meta_step:05d}.npz"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **values)  # type: ignore[arg-type]
    os.replace(tmp, path)
    return path


def _floats(tree: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in tree.items()}


def _fmt(hparams: dict[str, Any]) -> str:
    parts = []
    for name, v in hparams.items():
        parts.append(f"{name}={v:.4g}" if isinstance(v, float) else f"{name}~{v['mean']:.4g}")
    return " ".join(parts)


CHECKPOINT = "checkpoint.npz"
RESUMABLE_KEYS = ("meta_steps",)  # the only keys a resumed run may change


def prepare_workdir(workdir: Path) -> None:
    """Create ``workdir``; refuse one that already holds files (nothing is overwritten)."""
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"workdir {workdir} is not a directory; choose another --workdir")
    if workdir.exists() and any(workdir.iterdir()):
        raise ConfigError(
            f"workdir {workdir} already holds files; pass --resume to continue that run, "
            "or choose another --workdir"
        )
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create workdir {workdir}: {e.strerror}") from None


def resume_config(workdir: str | Path, assignments: list[str],
                  name: str | None = None) -> tuple[Experiment, Config]:
    """The experiment and config of the run in ``workdir``, with ``assignments`` applied.

    Only :data:`RESUMABLE_KEYS` may change; ``name``, if given, must match the run's.
    """
    from hypergrad.config import from_dict, override

    workdir = Path(workdir)
    path = workdir / "config.json"
    if not path.is_file():
        raise ConfigError(f"no run to resume in {workdir} (no config.json); "
                          "start it without --resume")
    try:
        saved = json.loads(path.read_text())
        saved_name = saved.pop("experiment")
    except (OSError, ValueError, KeyError, AttributeError):
        raise ConfigError(f"{path} is unreadable; the run cannot be resumed") from None
    if name is not None and name != saved_name:
        raise ConfigError(f"{workdir} holds a run of {saved_name!r}, not {name!r}")
    experiment = get_experiment(saved_name)
    old = from_dict(experiment.config, saved, source=str(path))
    new = override(old, assignments)
    changed = [k for k, v in new.to_dict().items()
               if v != old.to_dict()[k] and k not in RESUMABLE_KEYS]
    if changed:
        what = ", ".join(f"{k} {old.to_dict()[k]!r} -> {new.to_dict()[k]!r}" for k in changed)
        raise ConfigError(f"cannot resume with a changed config ({what}); only "
                          f"{', '.join(RESUMABLE_KEYS)} may change")
    return experiment, new


class _Signals:
    """Turns SIGINT/SIGTERM into a flag the loop checks between meta-steps."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        import signal

        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        return False


class Interrupted(RuntimeError):
    """The run stopped on SIGINT/SIGTERM after saving a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def _truncate_lines(path: Path, keep: int) -> None:
    """Keep the first ``keep`` lines of ``path`` (atomically); drop the rest."""
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    if len(lines) < keep:
        raise ConfigError(f"{path} has {len(lines)} lines but its checkpoint expects "
                          f"{keep}; the run cannot be resumed")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines[:keep]))
    os.replace(tmp, path)


def run(
    experiment: Experiment, config: Config, workdir: str | Path, *, progress: bool = True,
    out: TextIO | None = None, max_rejections: int = 5, resume: bool = False,
) -> dict[str, Any]:
    """Tune the experiment's hyperparameters for ``config.meta_steps`` meta-steps.

    Writes ``config.json`` first, then one ``metrics.jsonl`` line per meta-step as it
    finishes, a checkpoint of the whole run state every ``config.save_every`` meta-steps
    (and on SIGINT/SIGTERM, and before stopping on an error), then ``summary.json`` and
    figures. With ``resume=True`` it continues the run in ``workdir`` from its checkpoint:
    metrics lines past the checkpoint are dropped and recomputed, so the result equals an
    uninterrupted run's. A meta-step whose value or hypergradient is not finite is
    rejected: ``phi`` goes back to the last point that evaluated finitely, the step scale
    halves, a ``warning`` line is logged, and after ``max_rejections`` in a row the run
    stops with :class:`RunError`.

    Returns:
      the summary dict written to ``summary.json``.
    """
    from hypergrad import checkpoint

    config = config.validate()
    workdir = Path(workdir)
    began = time.perf_counter()
    if experiment.main is not None:
        if config.population > 1:
            raise ConfigError(f"{experiment.name} runs its own main, not the tuning loop; "
                              "it cannot run a population (set population=1)")
        return _run_main(experiment, config, workdir, progress, resume, out, began)
    if config.population > 1:  # P members as one vmapped meta-step: hypergrad.population
        from hypergrad import population

        return population.run(experiment, config, workdir, progress=progress, out=out,
                              max_rejections=max_rejections, resume=resume, began=began)
    problem = build(experiment, config)
    if not resume:
        prepare_workdir(workdir)
        (workdir / "config.json").write_text(
            json.dumps({"experiment": experiment.name, **config.to_dict()}, indent=2) + "\n"
        )
    task = problem.task
    dtype = jnp.dtype(config.dtype)
    phi = task.space.init(dtype)
    opt = outer_for(config)
    opt_state = opt.init(phi)
    key = jax.random.key(config.seed)
    evaluate = make_evaluate(problem)
    if config.online:  # one training run, a hyper-update every `window` inner steps
        online_step = make_online_step(opt, config.window, config.hvp)
        total = config.steps // config.window
    else:
        meta_step = make_meta_step(estimator_for(config), opt)
        total = config.meta_steps
    ckpt_path = workdir / CHECKPOINT
    metrics_path = workdir / "metrics.jsonl"

    # Everything the loop carries: arrays in `arrays`, the rest in `meta` (JSON).
    arrays = {"phi": phi, "opt_state": opt_state, "good_phi": phi, "good_state": opt_state,
              "best_phi": phi}
    if config.online:
        arrays["inner"] = jax.jit(lambda t, p, k: start(t, t.space.constrain(p), k)[0])(
            task, phi, key)
    if resume and ckpt_path.exists():
        arrays, meta = checkpoint.load(ckpt_path, arrays)
        _truncate_lines(metrics_path, meta["meta_step"])  # one line per meta-step
    else:
        initial = _floats(evaluate(task, phi, key))
        meta = {"meta_step": 0, "scale": 1.0, "rejected": 0,
                "rejected_in_row": 0, "search_failures": 0, "stopped": None,
                "elapsed": 0.0, "initial": initial,
                "initial_hparams": task.space.summarize(task.space.constrain(phi)),
                "best": {"val_loss": None, "meta_step": None}, "inner_step": 0}
        metrics_path.write_text("")
        checkpoint.save(ckpt_path, arrays, meta)
        save_hparams(workdir, task, arrays["phi"], 0)
    elapsed_before = meta["elapsed"]

    def save():
        meta["elapsed"] = elapsed_before + time.perf_counter() - began
        save_hparams(workdir, task, arrays["phi"], meta["meta_step"])
        checkpoint.save(ckpt_path, arrays, meta)

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=meta["meta_step"], desc="meta-step",
               unit="step", disable=not progress, dynamic_ncols=True)
    with bar, _Signals() as signals, open(metrics_path, "a") as log:
        while meta["meta_step"] < total and not meta["stopped"]:
            i = meta["meta_step"]
            t0 = time.perf_counter()
            scale = jnp.asarray(meta["scale"], dtype)
            if config.online:
                new_phi, new_state, new_inner, m = online_step(
                    task, arrays["phi"], arrays["opt_state"], arrays["inner"], key, scale,
                    jnp.asarray(meta["inner_step"]))
            else:
                new_phi, new_state, m = meta_step(task, arrays["phi"], arrays["opt_state"],
                                                  key, scale)
            m = jax.device_get(m)
            record: dict[str, Any] = {"meta_step": i}
            if m["accepted"] and config.online:
                arrays["inner"] = new_inner
                meta["inner_step"] += config.window
                record["inner_step"] = meta["inner_step"]
            if m["accepted"]:
                val = float(m["val_loss"])
                if meta["best"]["val_loss"] is None or val < meta["best"]["val_loss"]:
                    meta["best"] = {"val_loss": val, "meta_step": i}
                    arrays["best_phi"] = arrays["phi"]
                arrays["good_phi"], arrays["good_state"] = arrays["phi"], arrays["opt_state"]
                arrays["phi"], arrays["opt_state"] = new_phi, new_state
                meta["rejected_in_row"] = 0
                record |= {"val_loss": val, "train_loss": float(m["train_loss"]),
                           "hparams": task.space.summarize(m["hparams"]),
                           "hypergrad_norm": float(m["hypergrad_norm"])}
                if "line_search" in m:
                    ls = m["line_search"]
                    record["line_search"] = {"step": float(ls["step"]),
                                             "evals": int(ls["evals"]),
                                             "failed": bool(ls["failed"])}
                    meta["search_failures"] = (meta["search_failures"] + 1
                                               if ls["failed"] else 0)
                bar.set_postfix_str(f"val={val:.4f} {_fmt(record['hparams'])}")
            else:
                if m["finite"]:  # phi itself was fine; only the step overshot
                    arrays["good_phi"], arrays["good_state"] = arrays["phi"], arrays["opt_state"]
                arrays["phi"], arrays["opt_state"] = arrays["good_phi"], arrays["good_state"]
                meta["scale"] *= 0.5
                meta["rejected"] += 1
                meta["rejected_in_row"] += 1
                what = "new hyperparameters" if m["finite"] else "validation loss or hypergradient"
                record["warning"] = (f"non-finite {what}; step rejected, outer step scale "
                                     f"now {meta['scale']:g}")
            if meta["search_failures"] >= 2:
                # phi has not moved and the objective is deterministic: every further
                # meta-step would repeat the same failed search, so the run ends here.
                meta["stopped"] = record["stopped"] = (
                    f"stopped after meta-step {i}: the line search failed twice in a row; "
                    "no step along the hypergradient lowers the validation loss measurably")
            record["seconds"] = time.perf_counter() - t0
            log.write(json.dumps(record) + "\n")
            log.flush()
            meta["meta_step"] = i + 1
            bar.update(1)
            if meta["rejected_in_row"] >= max_rejections:
                save()
                raise RunError(
                    f"{meta['rejected_in_row']} meta-steps in a row were rejected as "
                    "non-finite; lower outer_lr or start from other hyperparameters"
                )
            if signals.received is not None:
                save()
                raise Interrupted(f"stopped by signal {signals.received} after meta-step {i}; "
                                  f"checkpoint saved, continue with --resume --workdir "
                                  f"{workdir}", signals.received)
            if meta["meta_step"] % config.save_every == 0:
                save()
    save()

    phi = arrays["phi"]
    initial = meta["initial"]
    if config.online:  # the weights this run trained, with the hyperparameters it ended on
        final = _floats(jax.jit(score(problem))(task, arrays["inner"].params,
                                                 task.space.constrain(phi)))
    else:
        final = _floats(evaluate(task, phi, key))
    best = meta["best"]
    summary = {
        "experiment": experiment.name,
        "initial_val_loss": initial["val_loss"],
        "final_val_loss": final["val_loss"],
        "initial_hparams": meta["initial_hparams"],
        "final_hparams": task.space.summarize(task.space.constrain(phi)),
        "best_val_loss": best["val_loss"],
        "best_meta_step": best["meta_step"],
        "best_hparams": task.space.summarize(task.space.constrain(arrays["best_phi"])),
        "initial_test_loss": initial["test_loss"],
        "initial_test_accuracy": initial["test_accuracy"],
        "test_loss": final["test_loss"],
        "test_accuracy": final["test_accuracy"],
        "rejected_meta_steps": meta["rejected"],
        "meta_steps_run": meta["meta_step"],
        "stopped_early": meta["stopped"],
        "seconds": elapsed_before + time.perf_counter() - began,
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    from hypergrad import plots  # matplotlib only once there is something to draw

    plots.plot_run(workdir)
    print_summary(summary, out)
    return summary


def _run_main(experiment, config, workdir, progress, resume, out, began) -> dict[str, Any]:
    """Run an experiment's own ``main`` in a fresh workdir; write its summary."""
    if resume:
        raise ConfigError(f"{experiment.name} cannot be resumed; run it again in a new workdir")
    prepare_workdir(workdir)
    (workdir / "config.json").write_text(
        json.dumps({"experiment": experiment.name, **config.to_dict()}, indent=2) + "\n")
    summary = {"experiment": experiment.name, **experiment.main(config, workdir, progress),
               "seconds": time.perf_counter() - began}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2), file=out or sys.stdout)
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

    if not jax.config.read("jax_enable_x64"):
        raise ConfigError("check needs float64: call jax.config.update('jax_enable_x64', True)")
    problem = build(experiment, config)
    task = problem.task
    phi = task.space.init(jnp.float64)
    return directional_errors(estimator_for(config), task, phi, jax.random.key(config.seed),
                              directions=directions)
