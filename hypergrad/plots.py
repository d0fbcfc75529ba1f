"""Figures drawn from a run's ``metrics.jsonl``; never called inside training code.

``hypergrad plot WORKDIR`` redraws one run's figures (:func:`plot_run`); with several
workdirs it overlays them (:func:`plot_compare`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class PlotError(ValueError):
    """A workdir cannot be plotted; the message says which and why."""


def _records(workdir: Path) -> list[dict[str, Any]]:
    with open(workdir / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return [r for r in lines if "val_loss" in r]


def read_run(workdir: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A standard run's accepted meta-steps (from ``metrics.jsonl``) and its config.

    Raises :class:`PlotError` for a missing workdir, one without ``metrics.jsonl`` (an
    experiment with its own ``main`` draws its figures itself), an unreadable file, or a
    run with no accepted meta-step. The config is ``{}`` when ``config.json`` is absent.
    """
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise PlotError(f"no workdir {workdir}")
    if not (workdir / "metrics.jsonl").is_file():
        raise PlotError(f"{workdir} holds no metrics.jsonl; only standard runs can be "
                        "plotted (other experiments write their figures themselves)")
    try:
        records = _records(workdir)
    except (OSError, ValueError) as e:
        raise PlotError(f"{workdir / 'metrics.jsonl'} is unreadable: {e}") from None
    if not records:
        raise PlotError(f"{workdir / 'metrics.jsonl'} holds no accepted meta-step")
    try:
        config = json.loads((workdir / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    return records, config if isinstance(config, dict) else {}


def _scalar(v: Any) -> float:
    return v if isinstance(v, float) else v["mean"]


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
                vals.append(e["val_loss"])
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
    summary = workdir / "summary.json"
    try:
        best = json.loads(summary.read_text()).get("best_member") if summary.exists() else None
    except ValueError:
        best = None
    paths = plot_records(_records(workdir), out, best_member=best)
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
    _draw(ax, steps, [r["val_loss"] for r in records], series, best, lambda v, h: v,
          legend=True)
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
    with np.load(files[0]) as first, np.load(files[-1]) as last:
        names = [k[: -len("@steps")] for k in last.files if k.endswith("@steps")]
        if not names:
            return None
        start = {n: first[f"{n}@steps"] for n in names if f"{n}@steps" in first.files}
        end = {n: last[f"{n}@steps"] for n in names}
        groups = {n: list(last[f"{n}@groups"]) if f"{n}@groups" in last.files else None
                  for n in names}
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
        v = [r["val_loss"] for r in records]
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

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.tight_layout()
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return path
