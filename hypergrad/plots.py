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


def plot_run(workdir: str | Path) -> list[Path]:
    """Write ``val_loss.png`` and ``hparams.png`` into ``workdir``; return their paths.

    ``val_loss.png``: validation loss per meta-step. ``hparams.png``: one panel per
    hyperparameter with its trajectory (the mean, for array-valued ones), on a log axis
    where the values are positive and span more than a factor of 3.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = Path(workdir)
    records = _records(workdir)
    steps = [r["meta_step"] for r in records]
    paths = []

    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=100)
    ax.plot(steps, [r["val_loss"] for r in records], marker=".")
    ax.set_xlabel("meta-step")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    paths.append(_save(plt, fig, workdir / "val_loss.png"))

    names = list(records[0]["hparams"]) if records else []
    if names:
        fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names), 2.8), dpi=100,
                                 squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            values = [_scalar(r["hparams"][name]) for r in records]
            ax.plot(steps, values, marker=".")
            if min(values) > 0 and max(values) > 3 * min(values):
                ax.set_yscale("log")
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("meta-step")
            ax.grid(alpha=0.3)
        paths.append(_save(plt, fig, workdir / "hparams.png"))
    return paths


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
