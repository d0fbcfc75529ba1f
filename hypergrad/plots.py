"""Figures drawn from a run's ``metrics.jsonl``; never called inside training code.

``hypergrad plot WORKDIR`` redraws one run's figures (:func:`plot_run`); with several
workdirs it overlays them (:func:`plot_compare`).
"""

from __future__ import annotations

import contextlib
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hypergrad.messages import clip, show


class PlotError(ValueError):
    """A workdir cannot be plotted; the message says which and why."""


def _records(workdir: Path) -> list[dict[str, Any]]:
    """The accepted meta-steps of ``workdir``'s ``metrics.jsonl`` (lines with a
    ``val_loss``), each checked to hold what the figures read.

    Raises:
      PlotError: a line is not UTF-8, not JSON, or lacks what the figures read; the
        message names the file and the line.
    """
    path = workdir / "metrics.jsonl"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PlotError(f"cannot read {path}: {e.strerror or e}") from None
    records, first = [], None
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            problem = _problem(record)
        except UnicodeDecodeError:
            problem = "is not UTF-8 text"
        except ValueError:
            problem = "is not JSON"
        if problem is None and "val_loss" in record:
            first = first or (n, record)
            if _names(record) != _names(first[1]):
                problem = f"names other hyperparameters (or groups) than line {first[0]}"
            records.append(record)
        if problem is not None:
            raise PlotError(f"{path} line {n} {problem}; restore the file or delete the line "
                            "to plot the rest")
    return records


def _number(v: Any) -> bool:
    """A number as ``metrics.jsonl`` writes it: ``null`` stands for a non-finite one."""
    return v is None or (isinstance(v, int | float) and not isinstance(v, bool))


def _hparam(v: Any) -> bool:
    """A hyperparameter's summary: a number, or a dict with a ``mean`` (and ``groups``)."""
    if not isinstance(v, dict):
        return _number(v)
    groups = v.get("groups", {})
    return ("mean" in v and _number(v["mean"]) and isinstance(groups, dict)
            and all(_hparam(g) for g in groups.values()))


def _problem(record: Any) -> str | None:
    """What an accepted meta-step's record lacks for the figures, or ``None``."""
    if not isinstance(record, dict):
        return "is not a JSON object"
    if "val_loss" not in record:
        return None  # a rejected meta-step: not drawn
    if not isinstance(record.get("meta_step"), int) or isinstance(record["meta_step"], bool):
        return "has no integer meta_step"
    if not _number(record["val_loss"]):
        return f"has a val_loss that is not a number ({show(record['val_loss'])})"
    hparams = record.get("hparams")
    if not isinstance(hparams, dict) or not all(_hparam(v) for v in hparams.values()):
        return "has no hparams (an object of numbers, or of summaries with a mean)"
    members = record.get("members", [])
    if not isinstance(members, list) or not all(
            isinstance(e, dict) and isinstance(e.get("member"), int)
            and ("val_loss" not in e or _number(e["val_loss"])
                 and isinstance(e.get("hparams"), dict)
                 and _names(e) == _names(record)
                 and all(_hparam(v) for v in e["hparams"].values()))
            for e in members):
        return "has members without a member number, val_loss or hparams"
    return None


def _names(record: dict[str, Any]) -> dict[str, Any]:
    """Each hyperparameter's name and its groups' names (``None`` if it has none)."""
    return {k: sorted(v["groups"]) if isinstance(v, dict) and "groups" in v else None
            for k, v in record["hparams"].items()}


def read_run(workdir: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A standard run's accepted meta-steps (from ``metrics.jsonl``) and its config.

    Raises :class:`PlotError` for a missing workdir, one without ``metrics.jsonl`` (an
    experiment with its own ``main`` draws its figures itself), an unreadable file, or a
    run with no accepted meta-step. The config is ``{}`` when ``config.json`` is absent.
    """
    workdir = Path(workdir)
    try:
        found = workdir.is_dir(), (workdir / "metrics.jsonl").is_file()
    except OSError as e:  # a name too long, a folder that cannot be searched
        raise PlotError(f"cannot read {clip(str(workdir))}: {e.strerror or e}") from None
    if not found[0]:
        raise PlotError(f"no workdir {workdir}")
    if not found[1]:
        raise PlotError(f"{workdir} holds no metrics.jsonl; only standard runs can be "
                        "plotted (other experiments write their figures themselves)")
    records = _records(workdir)
    if not records:
        raise PlotError(f"{workdir / 'metrics.jsonl'} holds no accepted meta-step")
    try:
        config = json.loads((workdir / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    return records, config if isinstance(config, dict) else {}


def _scalar(v: Any) -> float:
    """A number, or a summary's mean; ``null`` (a non-finite number) as NaN."""
    v = v["mean"] if isinstance(v, dict) else v
    return float("nan") if v is None else v


MAX_GROUP_LINES = 8


def _groups(records: list[dict[str, Any]], name: str) -> dict[str, list[float]] | None:
    """Each group's value (its mean, for a schedule) per meta-step, when ``name`` is
    grouped into at most :data:`MAX_GROUP_LINES` groups; else ``None``."""
    first = records[0]["hparams"][name]
    if not isinstance(first, dict) or not 1 < len(first.get("groups", {})) <= MAX_GROUP_LINES:
        return None
    return {g: [_scalar(r["hparams"][name]["groups"][g]) for r in records]
            for g in first["groups"]}


def _members(records: list[dict[str, Any]], best: int | None):
    """A population run's members as ``{member: (meta_steps, val_losses, hparams)}`` over
    their accepted meta-steps, and the best member (``best`` if given, else the lowest
    last validation loss); ``({}, None)`` for a single run."""
    series: dict[int, tuple[list, list, list]] = {}
    for r in records:
        for e in r.get("members", []):
            if "val_loss" in e:
                steps, vals, hps = series.setdefault(e["member"], ([], [], []))
                steps.append(r["meta_step"])
                vals.append(_scalar(e["val_loss"]))
                hps.append(e["hparams"])
    if not series:
        return {}, None
    if best not in series:
        best = min(series, key=lambda m: series[m][1][-1])
    return series, best


def _draw(ax, steps, values, series, best, pick, legend=False) -> list[float]:
    """One line (a single run), or every member faintly and the best member boldly;
    returns every value drawn."""
    if not series:
        ax.plot(steps, values, marker=".")
        return values
    drawn = []
    for m, (s, vals, hps) in series.items():
        ys = [pick(v, h) for v, h in zip(vals, hps, strict=True)]
        drawn += ys
        if m == best:
            ax.plot(s, ys, color="C0", lw=2.0, marker=".", zorder=3, label=f"best (member {m})")
        else:
            ax.plot(s, ys, color="C0", lw=0.8, alpha=0.3)
    if legend:
        ax.legend(fontsize=7)
    return drawn


def plot_run(workdir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write a run's figures (:func:`plot_records`, and ``schedules.png`` for scheduled
    hyperparameters) into ``out`` (default ``workdir``); return their paths."""
    workdir = Path(workdir)
    out = workdir if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        summary = json.loads((workdir / "summary.json").read_text())
    except (OSError, ValueError):  # absent, or damaged: the best member is then guessed
        summary = None
    best = summary.get("best_member") if isinstance(summary, dict) else None
    paths = plot_records(_records(workdir), out,
                         best_member=best if isinstance(best, int) else None)
    schedules = plot_schedules(workdir, out)
    return paths + ([schedules] if schedules else [])


def plot_records(records: list[dict[str, Any]], out: str | Path | None = None,
                 best_member: int | None = None) -> list[Any]:
    """``val_loss.png`` and ``hparams.png`` from a run's records (``metrics.jsonl``'s
    lines, or ``History.records``): written into ``out`` (paths returned), or, without
    ``out``, the matplotlib figures themselves.

    ``val_loss``: validation loss per meta-step. ``hparams``: one panel per hyperparameter
    with its trajectory (one line per group for a per-layer one with at most
    :data:`MAX_GROUP_LINES` groups, else the mean), on a log axis where the values are
    positive and span more than a factor of 3. For a population every member is drawn
    faintly and the best member boldly.
    """
    import matplotlib

    if out is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in records if "val_loss" in r]
    steps = [r["meta_step"] for r in records]
    series, best = _members(records, best_member)
    figures = []

    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=100)
    _draw(ax, steps, [_scalar(r["val_loss"]) for r in records], series, best,
          lambda v, h: _scalar(v), legend=True)
    ax.set_xlabel("meta-step")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    figures.append(("val_loss.png", fig))

    names = list(records[0]["hparams"]) if records else []
    if names:
        fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names), 2.8), dpi=100,
                                 squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            groups = _groups(records, name) if not series else None
            if groups:  # one line per layer (or group), as for a per-layer slope
                values = []
                for group, ys in groups.items():
                    ax.plot(steps, ys, marker=".", ms=3, label=group)
                    values += ys
                ax.legend(fontsize=6)
            else:
                values = _draw(ax, steps, [_scalar(r["hparams"][name]) for r in records],
                               series, best, lambda v, h, n=name: _scalar(h[n]))
            if min(values) > 0 and max(values) > 3 * min(values):
                ax.set_yscale("log")
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("meta-step")
            ax.grid(alpha=0.3)
        figures.append(("hparams.png", fig))
    if out is None:
        for _, fig in figures:
            fig.tight_layout()
        return [fig for _, fig in figures]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [save_figure(fig, out / name) for name, fig in figures]


def plot_schedules(workdir: str | Path, out: str | Path | None = None) -> Path | None:
    """Write ``schedules.png`` into ``out`` (default ``workdir``): each scheduled
    hyperparameter over the inner steps, one line per group (layer), as tuned at the last
    saved meta-step (solid) and at the start (dashed); as Maclaurin et al. (2015), Fig. 2.
    ``None`` if the run has no schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    files = sorted((Path(workdir) / "hparams").glob("meta_step_*.npz"))
    if not files:
        return None
    first, last = _arrays(files[0]), _arrays(files[-1])
    names = [k[: -len("@steps")] for k in last if k.endswith("@steps")]
    if not names:
        return None
    start = {n: first[f"{n}@steps"] for n in names if f"{n}@steps" in first}
    end = {n: last[f"{n}@steps"] for n in names}
    groups = {n: list(last[f"{n}@groups"]) if f"{n}@groups" in last else None for n in names}
    meta_step = int(files[-1].stem.rsplit("_", 1)[1])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), dpi=100,
                             squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        values = end[name].reshape(len(end[name]), -1)
        labels = groups[name] or ([name] if values.shape[1] == 1 else
                                  [f"{name}[{i}]" for i in range(values.shape[1])])
        steps = np.arange(len(values))
        for i, label in enumerate(labels):
            line, = ax.plot(steps, values[:, i], label=label)
            if name in start:
                ax.plot(steps, start[name].reshape(len(values), -1)[:, i], ls="--", lw=0.8,
                        color=line.get_color(), alpha=0.6)
        if values.min() > 0 and values.max() > 3 * values.min():
            ax.set_yscale("log")
        ax.set_title(f"{name} (meta-step {meta_step}; dashed: start)", fontsize=9)
        ax.set_xlabel("inner step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, Path(workdir if out is None else out) / "schedules.png")


def _arrays(path: Path) -> dict[str, Any]:
    """The arrays of a ``.npz`` file; a :class:`PlotError` naming it if it is damaged."""
    import numpy as np

    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise PlotError(f"{path} is unreadable ({type(e).__name__}); remove it to plot the "
                        "rest") from None


def _labels(workdirs: list[Path], configs: list[dict[str, Any]]) -> list[str]:
    """Each run's ``outer``; the directory name where that is missing or not unique."""
    outers = [c.get("outer") for c in configs]
    labels = []
    for w, outer in zip(workdirs, outers, strict=True):
        if outer is None:
            labels.append(w.name)
        elif outers.count(outer) > 1:
            labels.append(f"{outer} ({w.name})")
        else:
            labels.append(str(outer))
    return labels


def plot_compare(workdirs: Sequence[str | Path], out: str | Path) -> list[Path]:
    """Overlay several runs: ``compare_val_loss.png`` and ``compare_hparams.png`` in ``out``.

    One line per run, labelled by its ``outer`` from ``config.json``: the validation loss
    per meta-step (log axis when it spans more than a factor of 3), and one panel per
    hyperparameter (those of the first run; the mean for array-valued ones).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dirs = [Path(w) for w in workdirs]
    runs = [read_run(w) for w in dirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = _labels(dirs, [config for _, config in runs])
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4), dpi=90)
    values = []
    for (records, _), label in zip(runs, labels, strict=True):
        v = [_scalar(r["val_loss"]) for r in records]
        values += v
        ax.plot([r["meta_step"] for r in records], v, marker=".", label=label)
    if min(values) > 0 and max(values) > 3 * min(values):
        ax.set_yscale("log")
    ax.set_xlabel("meta-step")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, title="hyper-update", title_fontsize=8)
    paths.append(save_figure(fig, out / "compare_val_loss.png"))

    names = list(runs[0][0][0]["hparams"])
    if names:
        cols = min(len(names), 4)
        rows = -(-len(names) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.4 * rows), dpi=90,
                                 squeeze=False)
        for ax, name in zip(axes.flat, names, strict=False):
            values = []
            for (records, _), label in zip(runs, labels, strict=True):
                steps = [r["meta_step"] for r in records if name in r["hparams"]]
                v = [_scalar(r["hparams"][name]) for r in records if name in r["hparams"]]
                values += v
                ax.plot(steps, v, marker=".", markersize=3, label=label)
            if values and min(values) > 0 and max(values) > 3 * min(values):
                ax.set_yscale("log")
                ax.tick_params(which="minor", labelsize=6)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("meta-step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3, which="both")
        for ax in list(axes.flat)[len(names):]:
            ax.set_visible(False)
        axes[0][0].legend(fontsize=7)
        paths.append(save_figure(fig, out / "compare_hparams.png"))
    return paths


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay out, write and close a matplotlib figure; every figure of the project is saved
    here, atomically (a temporary file renamed over ``path``). Returns ``path``."""
    import os

    import matplotlib.pyplot as plt

    from hypergrad.workdir import writing

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.tight_layout()
        with writing(path):  # a full disk's error names the figure
            fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        plt.close(fig)
    return path
