"""Figures drawn from a run's ``metrics.jsonl``; never called inside training code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _records(workdir: Path) -> list[dict[str, Any]]:
    with open(workdir / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return [r for r in lines if "val_loss" in r]


def _scalar(v: Any) -> float:
    return v if isinstance(v, float) else v["mean"]


def _members(workdir: Path, records: list[dict[str, Any]]):
    """A population run's members as ``{member: (meta_steps, val_losses, hparams)}`` over
    their accepted meta-steps, and the best member (``summary.json``'s, else the lowest
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
    summary = workdir / "summary.json"
    best = json.loads(summary.read_text()).get("best_member") if summary.exists() else None
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


def plot_run(workdir: str | Path) -> list[Path]:
    """Write ``val_loss.png`` and ``hparams.png`` into ``workdir``; return their paths.

    ``val_loss.png``: validation loss per meta-step. ``hparams.png``: one panel per
    hyperparameter with its trajectory (the mean, for array-valued ones), on a log axis
    where the values are positive and span more than a factor of 3. For a population
    every member is drawn faintly and the best member boldly.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = Path(workdir)
    records = _records(workdir)
    steps = [r["meta_step"] for r in records]
    series, best = _members(workdir, records)
    paths = []

    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=100)
    _draw(ax, steps, [r["val_loss"] for r in records], series, best, lambda v, h: v,
          legend=True)
    ax.set_xlabel("meta-step")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    paths.append(_save(plt, fig, workdir / "val_loss.png"))

    names = list(records[0]["hparams"]) if records else []
    if names:
        fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names), 2.8), dpi=100,
                                 squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            values = _draw(ax, steps, [_scalar(r["hparams"][name]) for r in records],
                           series, best, lambda v, h, n=name: _scalar(h[n]))
            if min(values) > 0 and max(values) > 3 * min(values):
                ax.set_yscale("log")
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("meta-step")
            ax.grid(alpha=0.3)
        paths.append(_save(plt, fig, workdir / "hparams.png"))
    schedules = plot_schedules(workdir)
    return paths + ([schedules] if schedules else [])


def plot_schedules(workdir: str | Path) -> Path | None:
    """Write ``schedules.png``: each scheduled hyperparameter over the inner steps, one
    line per group (layer), as tuned at the last saved meta-step (solid) and at the start
    (dashed); as Maclaurin et al. (2015), Fig. 2. ``None`` if the run has no schedule."""
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
    return _save(plt, fig, Path(workdir) / "schedules.png")


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
