"""The ``hypergrad`` command: run, list, check and plot experiments.

Bad input (an unknown experiment or key, a value of the wrong type or out of range)
prints one line naming the problem and exits with status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from hypergrad.config import ConfigError
from hypergrad.messages import LIMIT, clip, cut_line, show

DEFAULT_EXPERIMENT = "seed-cnn"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not a usage dump, nor a 100 KB value in full
        self.exit(2, f"hypergrad: error: {cut_line(message)} (see `hypergrad --help`)\n")


def _experiment_name(text: str) -> str:
    if len(text) > LIMIT:  # no experiment's name is this long; echo it cut
        raise argparse.ArgumentTypeError(f"no experiment is named {show(text)}")
    return text


def _directions(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {show(text)}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {show(text)}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {value:g}")
    return value


def _path(what: str):
    """An argument type for a path the command writes under: refused at once (one line,
    status 2) if the file system cannot hold it, as a name over 255 bytes."""

    def check(text: str) -> str:
        from hypergrad.workdir import WorkdirError, check_path

        try:
            check_path(Path(text), what)
        except WorkdirError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text

    return check


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hypergrad", description="Gradient-based hyperparameter optimization.")
    from hypergrad import __version__

    p.add_argument("--version", action="version", version=f"hypergrad {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(cmd):
        cmd.add_argument("experiment", nargs="?", default=None, type=_experiment_name,
                         help=f"experiment name (default {DEFAULT_EXPERIMENT}; see `list`)")
        cmd.add_argument("--set", dest="sets", action="append", default=[],
                         metavar="KEY=VALUE", help="override a config key (repeatable)")

    r = sub.add_parser("run", help="tune an experiment's hyperparameters")
    common(r)
    r.add_argument("--workdir", type=_path("--workdir"),
                   help="where the run writes (default runs/NAME-TIME)")
    r.add_argument("--resume", action="store_true",
                   help="continue the run in --workdir from its last checkpoint")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (several hosts): its "
                        "arguments come from the cluster (Slurm, Open MPI, TPU) or the "
                        "three options below; run the same command on every host")
    r.add_argument("--coordinator", help="with --distributed: host:port of process 0")
    r.add_argument("--num-processes", type=int, help="with --distributed: process count")
    r.add_argument("--process-id", type=int, help="with --distributed: this process's id")
    c = sub.add_parser("check", help="compare the estimator with finite differences")
    common(c)
    c.add_argument("--directions", type=_directions, default=None,
                   help="random directions to check, at least 1 (default: every "
                        "coordinate, or 16 random directions for more coordinates)")
    c.add_argument("--tol", type=_tolerance, default=1e-6,
                   help="tolerance of the relative error, which is each direction's error "
                        "over the largest directional derivative (default 1e-6)")
    sub.add_parser("list", help="list the experiments")
    pl = sub.add_parser("plot", help="redraw a run's figures, or overlay several runs")
    pl.add_argument("workdirs", nargs="+", metavar="WORKDIR", type=_path("WORKDIR"),
                    help="workdirs of standard runs (with metrics.jsonl)")
    pl.add_argument("--out", type=_path("--out"),
                    help="where to write the figures (default: the workdir for one run, "
                         "the current directory for several)")
    return p


def _resolve(name: str, sets: list[str]):
    from hypergrad import config as config_lib
    from hypergrad.experiment import get_experiment

    experiment = get_experiment(name)
    return experiment, config_lib.override(experiment.config, sets)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hypergrad`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command in ("run", "check"):
        args.experiment_given = args.experiment is not None
        args.experiment = args.experiment or DEFAULT_EXPERIMENT
    from hypergrad.data import DataError
    from hypergrad.plots import PlotError
    from hypergrad.workdir import WorkdirError

    try:
        return _COMMANDS[args.command](args)
    except (ConfigError, DataError, PlotError, WorkdirError) as e:
        print(f"hypergrad: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the run loop took over the signals
        print("hypergrad: interrupted", file=sys.stderr)
        return 130


def _list(args) -> int:
    from hypergrad.experiment import experiments

    for name, exp in experiments().items():
        print(f"{name:20s} {exp.description}")
    return 0


def _run(args) -> int:
    from hypergrad.run import Interrupted, resume_config, run
    from hypergrad.tune import TuneError

    if args.distributed:
        _initialize_distributed(args)
    elif args.coordinator or args.num_processes is not None or args.process_id is not None:
        raise ConfigError("--coordinator, --num-processes and --process-id need --distributed")
    if args.resume:
        if not args.workdir:
            raise ConfigError("--resume needs the --workdir of the run to continue")
        named = args.experiment if args.experiment_given else None
        experiment, config = resume_config(args.workdir, args.sets, named)
        workdir = Path(args.workdir)
    else:
        experiment, config = _resolve(args.experiment, args.sets)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        workdir = Path(args.workdir or f"runs/{experiment.name}-{stamp}")
    try:
        run(experiment, config, workdir, progress=not args.quiet, resume=args.resume)
    except TuneError as e:
        print(f"hypergrad: error: {e} (nothing to report; the log is in {workdir})",
              file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"hypergrad: {e}", file=sys.stderr)
        return 128 + e.signum
    except MemoryError:
        print(f"hypergrad: error: out of host memory; lower steps, batch_size or "
              f"population, or set checkpoint=nested (the log so far is in {workdir})",
              file=sys.stderr)
        return 1
    except RuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        print(f"hypergrad: error: out of device memory compiling or running the meta-step; "
              f"lower steps, batch_size, val_batch_size or population, or set "
              f"checkpoint=nested or hvp=forward (the log so far is in {workdir})",
              file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a file system gone read-only: the last checkpoint stays
        where = f" ({e.filename})" if e.filename else ""
        print(f"hypergrad: error: cannot write the run's files{where}: {e.strerror or e}; "
              f"free space or fix permissions, then --resume --workdir {workdir}",
              file=sys.stderr)
        return 1
    print(f"wrote {workdir}")
    return 0


def _initialize_distributed(args) -> None:
    """``jax.distributed.initialize`` with the command line's arguments, once a process."""
    import jax

    if jax.distributed.is_initialized():
        return
    try:
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes,
                                   process_id=args.process_id)
    except (ValueError, TypeError) as e:  # missing or inconsistent arguments
        raise ConfigError(f"--distributed: {e}") from None


def _check(args) -> int:
    import jax
    import numpy as np

    jax.config.update("jax_enable_x64", True)  # finite differences need float64
    from hypergrad.run import check

    for given in args.sets:
        key, _, value = given.partition("=")
        if key.strip() == "dtype" and value.strip() != "float64":
            raise ConfigError(f"hypergrad check runs in float64 (central differences need "
                              f"it), so --set {given.strip()} would be ignored; drop it")
    experiment, config = _resolve(args.experiment, [*args.sets, "dtype=float64"])
    records = check(experiment, config, directions=args.directions)
    width = max(len(r["name"]) for r in records)
    print(f"{'direction':{width}}  {'estimator':>14}  {'central diff':>14}  {'rel error':>9}")
    for r in records:
        print(f"{r['name']:{width}}  {r['analytic']:14.7e}  {r['numeric']:14.7e}  "
              f"{r['rel_error']:9.2e}")
    worst = float(np.max([r["rel_error"] for r in records]))  # NaN stays NaN: FAILED
    print(f"rel error = |estimator - central diff| / the largest |derivative| among the "
          f"directions ({records[0]['scale']:.3e})")
    verdict = "ok" if worst <= args.tol else "FAILED"
    print(f"max relative error {worst:.2e} (tolerance {args.tol:g}): {verdict}")
    return 0 if worst <= args.tol else 1


def _own_plot(workdir: Path):
    """``out -> paths``, the ``plot`` of the experiment that wrote ``workdir``, if it has
    its own ``main`` and left a ``results.json`` (and no ``metrics.jsonl``); else ``None``.

    A ``results.json`` that is not JSON, or lacks what the plot reads, is a
    :class:`hypergrad.plots.PlotError`, as a standard run's damaged metrics are."""
    import json

    from hypergrad.plots import PlotError

    results = workdir / "results.json"
    if (workdir / "metrics.jsonl").exists() or not results.is_file():
        return None
    try:
        name = json.loads((workdir / "config.json").read_text())["experiment"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    from hypergrad.experiment import get_experiment

    plot = get_experiment(name).plot
    if plot is None:
        return None
    try:
        json.loads(results.read_text())
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError included
        raise PlotError(f"{results} is unreadable ({type(e).__name__}: {show(str(e))}); "
                        f"run {name} again to rewrite it") from None

    def draw(out: Path) -> list[Path]:
        try:
            return plot(workdir, out)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise PlotError(f"{results} lacks what {name}'s figures need "
                            f"({type(e).__name__}: {show(str(e))}); run {name} again to "
                            "rewrite it") from None

    return draw


def _out_dir(path: Path) -> Path:
    """``path``, created if need be; a :class:`hypergrad.plots.PlotError` if it cannot be."""
    from hypergrad.plots import PlotError

    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # FileExistsError for a file, NotADirectoryError beneath one
        raise PlotError(f"cannot create the folder {clip(str(path))} for the figures "
                        f"({e.strerror or e}); name a folder for --out") from None
    return path


def _plot(args) -> int:
    from hypergrad import plots

    workdirs = [Path(w) for w in args.workdirs]
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise plots.PlotError(f"--out {clip(args.out)} is a file, not a folder; name a "
                              "folder for the figures")
    own = _own_plot(workdirs[0]) if len(workdirs) == 1 else None
    try:
        if own is not None:  # an experiment with its own main redraws from its results.json
            paths = own(_out_dir(out or workdirs[0]))
        elif len(workdirs) == 1:
            plots.read_run(workdirs[0])  # a one-line error before any figure is drawn
            paths = plots.plot_run(workdirs[0], out and _out_dir(out))
        else:
            paths = plots.plot_compare(workdirs, _out_dir(out or Path(".")))
    except OSError as e:  # a read-only workdir, a full disk: the figure is named
        raise plots.PlotError(f"cannot write {clip(str(e.filename or 'the figures'))}: "
                              f"{e.strerror or e}; make its folder writable or name another "
                              "with --out") from None
    for path in paths:
        print(f"wrote {path}")
    return 0


_COMMANDS = {"run": _run, "list": _list, "check": _check, "plot": _plot}


if __name__ == "__main__":
    sys.exit(main())
