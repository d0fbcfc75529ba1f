"""``hypergrad run``: an experiment's config tuned by :func:`hypergrad.tune` in a workdir.

The run writes ``config.json`` before any work, one ``metrics.jsonl`` line per meta-step as
it finishes (tune's callback), a checkpoint every ``save_every`` meta-steps (and on SIGINT or
SIGTERM), then ``summary.json`` and figures (see :mod:`hypergrad.workdir`). ``--resume``
continues from the checkpoint bitwise as if never interrupted.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from hypergrad import population as population_lib
from hypergrad import search
from hypergrad import workdir as files
from hypergrad.config import Config, ConfigError, from_dict, override
from hypergrad.experiment import (
    Experiment,
    Problem,
    build,
    estimator_for,
    get_experiment,
    keys_for,
    outer_for,
    strategy_for,
    tune_options,
)
from hypergrad.tune import (
    Guard,
    TuneState,
    TuneWarning,
    initial_state,
    json_safe,
    online_weights,
    states,
    tune,
    with_key,
)
from hypergrad.tune.saving import Interrupted, RunFiles, summary_of
from hypergrad.unroll import objective

RESUMABLE_KEYS = ("meta_steps", "budget")  # the only keys a resumed run may change


def use_dtype(config: Config) -> None:
    """Switch JAX to 64-bit floats when the config asks for ``dtype=float64`` (the one
    place that honours the key; it must happen before any array is made)."""
    if config.dtype == "float64" and not jax.config.read("jax_enable_x64"):
        jax.config.update("jax_enable_x64", True)


DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def use_determinism(config: Config) -> None:
    """With ``deterministic=true``, add XLA's deterministic-ops flag to ``XLA_FLAGS``; it
    only takes effect before JAX starts its devices (a notebook sets the environment
    variable before its first JAX computation)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if not config.deterministic or DETERMINISTIC_FLAG in flags.split():
        return
    from jax._src import xla_bridge  # no public way to ask whether devices are up

    started = getattr(xla_bridge, "backends_are_initialized", lambda: True)()
    if started:
        raise ConfigError(f"deterministic=true must be set before JAX starts: set "
                          f"XLA_FLAGS={DETERMINISTIC_FLAG} in the environment instead")
    os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_FLAG}".strip()


def _scorer(problem: Problem, estimator: Any, online: bool, mesh, size: int):
    """Vmapped ``(task, phi, [carry,] keys) -> metrics``: the validation loss and the
    problem's test scores of training with ``phi`` (online: of the weights ``carry``)."""

    def scores(task, params, hparams, model_state):
        last = task.space.at_step(hparams, task.steps - 1)
        return {"val_loss": task.validation_loss(params, hparams, model_state),
                **problem.evaluate(params, last)}

    def trained(task, phi, key):
        value, aux = objective(task, phi, key)
        hparams = task.space.constrain(phi)
        if task.tasks is not None:  # the meta-loss over drawn tasks; weights per task
            return {"val_loss": value, **problem.evaluate(
                aux["params"], task.space.at_step(hparams, task.steps - 1))}
        return scores(task, aux["params"], hparams, aux.get("model_state"))

    def weights(task, phi, carry, key):
        # Online PES trains 2N particles: their scores' mean (one run for truncated).
        del key
        hparams = task.space.constrain(phi)
        each = jax.vmap(lambda w: scores(task, w.params, hparams, w.model_state))(
            online_weights(estimator, carry))
        return jax.tree.map(lambda a: jnp.mean(a, axis=0), each)

    return population_lib.vmapped(with_key(weights if online else trained), mesh, size)


def _rows(metrics: dict[str, np.ndarray], size: int) -> list[dict[str, float]]:
    return [{k: float(v[m]) for k, v in metrics.items()} for m in range(size)]


def run(experiment: Experiment, config: Config, workdir: str | Path, *, progress: bool = True,
        out: TextIO | None = None, max_rejections: int = 5,
        resume: bool = False) -> dict[str, Any]:
    """Tune the experiment's hyperparameters in ``workdir``; return the summary.

    Raises:
      tune.TuneError: no meta-step was accepted (the start is not finite or diverges).
      Interrupted: SIGINT or SIGTERM arrived; a checkpoint was saved first.
    """
    config = config.validate()
    workdir = Path(workdir)
    began = time.perf_counter()
    use_determinism(config)
    use_dtype(config)
    if experiment.main is not None:
        if config.population > 1:
            raise ConfigError(f"{experiment.name} runs its own main, not the tuning loop; "
                              "it cannot run a population (set population=1)")
        return _run_main(experiment, config, workdir, progress, resume, out, began)
    if not resume:
        files.check_new(workdir)
    else:
        files.check_path(workdir)
    if resume and not (workdir / "config.json").is_file():
        raise ConfigError(f"no run to resume in {workdir} (no config.json); start it "
                          "without --resume")
    problem = build(experiment, config)
    if not resume:
        files.create(workdir)
    # From here on Ctrl-C (and SIGTERM) only sets a flag, checked once the computation in
    # flight is done: interrupting XLA mid-run can crash the interpreter on its way out.
    with files.Lock(workdir), files.Signals() as signals:
        if not resume:
            files.write_config(workdir, experiment.name, config.to_dict())
        return _tune_in(experiment, config, problem, workdir, signals, progress=progress,
                        out=out, max_rejections=max_rejections, resume=resume, began=began)


def _fingerprint(config: Config) -> dict[str, Any]:
    """What a checkpoint must be resumed under: every key but :data:`RESUMABLE_KEYS`."""
    return {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_KEYS}


def _tune_in(experiment: Experiment, config: Config, problem: Problem, workdir: Path,
             signals: files.Signals, *,
             progress: bool, out: TextIO | None, max_rejections: int, resume: bool,
             began: float) -> dict[str, Any]:
    """:func:`run`'s work, in a checked, locked workdir."""
    task = problem.task
    size = config.population
    population = None if size == 1 else size
    try:
        mesh = population_lib.make_mesh(population_lib.device_count(size, config.devices))
    except population_lib.DeviceError as e:
        raise ConfigError(str(e)) from None
    est, opt = estimator_for(config), outer_for(config)
    key = keys_for(config)
    keys = population_lib.put(population_lib.member_keys(key, size), mesh)
    ckpt = workdir / files.CHECKPOINT
    phi = task.space.init(jnp.dtype(config.dtype))
    explored = None
    strategy = strategy_for(config)
    plan = None
    first = jax.random.wrap_key_data(population_lib.member_keys(key, size)[0])
    if strategy is not None and not (resume and ckpt.exists()):
        plan = strategy.plan(task, first, phi, budget=config.budget, began=began,
                             keys=strategy.keys)
        explored = plan.explored
        template = states(task, est, opt, plan.phis,
                                   population_lib.member_keys(key, size), config.online)
    else:
        if config.explore and strategy is None and not (resume and ckpt.exists()):
            phi, explored = search.explore(task, key, config.explore, phi=phi)
        template = initial_state(
            task, est, opt, key=key, phi=phi, population=size,
            spread=config.population_spread, online=config.online)
    scorer = _scorer(problem, est, config.online, mesh, size)
    placed = population_lib.put(task, mesh, replicate=True)

    def score(state: TuneState, phi) -> list[dict[str, float]]:
        phi = population_lib.put(population_lib.host(phi), mesh)
        args = (phi, population_lib.put(population_lib.host(state.carry), mesh)) \
            if config.online else (phi,)
        return _rows(population_lib.host(scorer(placed, *args, keys)), size)

    # The checkpoint, metrics.jsonl and hparams/ files: shared with hg.tune(workdir=).
    keeper = RunFiles(workdir, task.space, population, save_every=config.save_every,
                      began=began, plan=plan)
    if resume and ckpt.exists():
        state, meta = keeper.resume(template)
        made_under = meta.get("config", {})
        changed = [f"{k} {v!r} -> {_fingerprint(config).get(k)!r}"
                   for k, v in made_under.items() if _fingerprint(config).get(k) != v]
        if changed:
            raise files.WorkdirError(
                f"{workdir / 'config.json'} does not match the config its checkpoint was made "
                f"under ({', '.join(changed)}); restore it, or start a new run")
        if strategy is not None and meta.get("strategy") is not None:
            # The search and what the loop did with it, as they were at the checkpoint.
            plan = keeper.plan = strategy.resume(task, first, phi, meta["strategy"],
                                                 began=began, keys=strategy.keys)
        keeper.keep()
        # config.json says what the run is now (a resumed run may change meta_steps).
        files.write_config(workdir, experiment.name, config.to_dict())
    else:
        state = template
        hp = population_lib.host(task.space.constrain(template.phi))
        meta = {"meta_step": 0, "elapsed": 0.0, "config": _fingerprint(config),
                "initial": score(template, template.phi),
                "initial_hparams": [task.space.summarize(population_lib.member(hp, m))
                                    for m in range(size)]}
        if explored is not None:  # the random phase that chose the start
            meta["explored"] = {"evaluations": len(explored.val_loss),
                                "best_val_loss": explored.best_val_loss,
                                "seconds": float(explored.seconds[-1])}
        keeper.start(state, meta)

    if signals.received is not None:  # during the initial evaluation
        keeper.save(state, meta["meta_step"])
        raise Interrupted(f"stopped by signal {signals.received} before the first meta-step; "
                          f"checkpoint saved, continue with --resume --workdir {workdir}",
                          signals.received)
    with keeper:
        def callback(record, state):
            saved = keeper.write(record, state)  # the line; a checkpoint every save_every
            done = record["meta_step"] + 1
            if signals.received is not None:
                if not saved:
                    keeper.save(state, done)
                raise Interrupted(f"stopped by signal {signals.received} after meta-step "
                                  f"{done - 1}; checkpoint saved, continue with --resume "
                                  f"--workdir {workdir}", signals.received)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TuneWarning)  # summary says it
            options = tune_options(config) | {"estimator": est, "outer": opt, "key": key}
            if strategy is None:
                options["explore"] = 0  # explored above
            history = tune(task, **options, guard=Guard(max_rejections=max_rejections),
                           callback=callback, progress=progress, state=state, plan=plan)
    state = history.state
    assert state is not None
    done = int(population_lib.host(state.meta_step)[0])
    keeper.save(state, done)

    def stacked(points):
        members = [p if p is not None else history.final for p in points]
        return jax.tree.map(lambda *xs: np.stack(xs), *[p.phi for p in members])

    finals, bests = score(state, stacked(history.finals)), score(state, stacked(history.bests))
    summary = summary_of(history, task.space, meta, state, done=done,
                         seconds=keeper.before + time.perf_counter() - began,
                         head={"experiment": experiment.name}, scores=(finals, bests),
                         online=config.online, devices=1 if mesh is None else mesh.size)
    files.write_json(workdir / "summary.json", summary)

    from hypergrad import plots  # matplotlib only once there is something to draw

    plots.plot_run(workdir)
    files.print_summary(summary, out)
    if history.stopped:
        print(history.stopped, file=out or sys.stdout)
    for line in history.diagnosis:
        print(line, file=out or sys.stdout)
    return json.loads(json.dumps(json_safe(summary)))


def _run_main(experiment, config, workdir, progress, resume, out, began) -> dict[str, Any]:
    """Run an experiment's own ``main`` in a fresh workdir; write its summary."""
    if resume:
        raise ConfigError(f"{experiment.name} cannot be resumed; run it again in a new workdir")
    files.check_new(workdir)
    files.create(workdir)
    with files.Lock(workdir):
        files.write_config(workdir, experiment.name, config.to_dict())
        summary = {"experiment": experiment.name, **experiment.main(config, workdir, progress),
                   "seconds": time.perf_counter() - began}
        files.write_json(workdir / "summary.json", summary)
    print(json.dumps(json_safe(summary), indent=2), file=out or sys.stdout)
    return summary


def resume_config(workdir: str | Path, assignments: list[str],
                  name: str | None = None) -> tuple[Experiment, Config]:
    """The experiment and config of the run in ``workdir``, with ``assignments`` applied.

    Only :data:`RESUMABLE_KEYS` may change; ``name``, if given, must match the run's.
    """
    workdir = Path(workdir)
    path = workdir / "config.json"
    if not path.is_file():
        raise ConfigError(f"no run to resume in {workdir} (no config.json); "
                          "start it without --resume")
    try:
        saved = json.loads(path.read_text())
        saved_name = saved.pop("experiment")
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
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
