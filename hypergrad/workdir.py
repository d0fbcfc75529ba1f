"""A run's files: config, metrics log, checkpoints, hyperparameter arrays, signals, summary.

A workdir holds ``config.json`` (written before any work), ``metrics.jsonl`` (one line per
meta-step, flushed as it is written), ``checkpoint.npz`` (the loop's state, atomically
replaced), ``hparams/meta_step_NNNNN.npz`` (array-valued hyperparameters in full),
``summary.json`` and PNG figures. Every JSON file is valid JSON: a non-finite number is
written as ``null``.

Checkpoints are pytrees of arrays plus JSON metadata in one ``.npz`` that cannot execute
code when loaded (no pickle): arrays are numbered entries restored into the structure of a
template. A file is written to a temporary name, synced, and renamed over the old one, so a
kill at any moment leaves the old or the new file, never half of one.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from hypergrad.tune import json_safe

PyTree = Any
CHECKPOINT = "checkpoint.npz"
METRICS = "metrics.jsonl"
HPARAMS_DIR = "hparams"


class WorkdirError(ValueError):
    """A workdir cannot be used as asked; the message names the file and the way on."""


def check_new(workdir: Path) -> None:
    """Refuse a ``workdir`` that is not a directory, already holds files, or cannot be
    created or written; write nothing. Called before any data is loaded, so a wrong
    ``--workdir`` costs nothing."""
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"workdir {workdir} is not a directory; choose another --workdir")
    if workdir.exists() and any(workdir.iterdir()):
        raise WorkdirError(
            f"workdir {workdir} already holds files; pass --resume to continue that run, "
            "or choose another --workdir")
    if workdir.exists():
        probe = workdir / ".write-test"
        try:
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise WorkdirError(f"cannot write in workdir {workdir}: {e.strerror}; choose "
                               "another --workdir") from None
        return
    parent = next(p for p in workdir.absolute().parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise WorkdirError(f"cannot create workdir {workdir}: {parent} is not a writable "
                           "directory; choose another --workdir")


def create(workdir: Path) -> None:
    """Create ``workdir`` (checked by :func:`check_new`)."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"cannot create workdir {workdir}: {e.strerror}; choose another "
                           "--workdir") from None


LOCK = "lock"


class Lock:
    """One process per workdir: ``lock`` holds the running process's PID (and host).

    Taking it where a live process holds it is a :class:`WorkdirError`; a lock left by a
    process that no longer runs (killed) is stale and taken over.
    """

    def __init__(self, workdir: Path):
        self.path = workdir / LOCK
        self.mine = f"{os.getpid()} {socket.gethostname()}\n"

    def __enter__(self) -> Lock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if holder is not None:
                    raise WorkdirError(
                        f"workdir {self.path.parent} is in use by process {holder} (see "
                        f"{self.path}); wait for it to finish or stop it, then --resume"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self.mine)
            return self
        raise WorkdirError(f"cannot take the lock {self.path}; remove it if no run uses "
                           "this workdir")

    def _holder(self) -> int | None:
        """The PID holding the lock if that process still runs on this host, else None."""
        try:
            pid_text, _, host = self.path.read_text().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            return None
        if host.strip() and host.strip() != socket.gethostname():
            return pid  # another host's process: cannot tell, so assume it runs
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    def __exit__(self, *exc) -> None:
        try:
            if self.path.read_text() == self.mine:
                self.path.unlink()
        except OSError:
            pass


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file renamed over it)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON (non-finite numbers as ``null``), atomically."""
    write_text(path, json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n")


def write_config(workdir: Path, experiment: str, config: dict[str, Any]) -> None:
    """``config.json``: the experiment's name and the resolved config."""
    write_json(workdir / "config.json", {"experiment": experiment, **config})


class MetricsLog:
    """``metrics.jsonl``: one JSON line per meta-step, flushed as it is written."""

    def __init__(self, workdir: Path):
        self.path = workdir / METRICS

    def start(self) -> None:
        """Begin an empty log (a new run)."""
        write_text(self.path, "")

    def keep(self, lines: int) -> None:
        """Keep the first ``lines`` lines (a checkpoint's meta-steps) and drop the rest."""
        try:
            kept = self.path.read_text().splitlines(keepends=True)
        except OSError:
            kept = []
        if len(kept) < lines:
            raise WorkdirError(f"{self.path} has {len(kept)} lines but its checkpoint expects "
                               f"{lines}; the run cannot be resumed")
        for n, line in enumerate(kept[:lines]):
            try:
                json.loads(line)
            except ValueError:
                raise WorkdirError(f"{self.path} line {n + 1} is not JSON; the run cannot be "
                                   "resumed (restore the file or start again)") from None
        write_text(self.path, "".join(kept[:lines]))

    def __enter__(self) -> MetricsLog:
        self._file: TextIO = open(self.path, "a")
        return self

    def write(self, record: dict[str, Any]) -> None:
        """Append one meta-step's record as a JSON line and flush it."""
        self._file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self._file.flush()

    def __exit__(self, *exc) -> None:
        self._file.close()


def save_checkpoint(path: Path, tree: PyTree, meta: dict[str, Any]) -> None:
    """Write the leaves of ``tree`` and the JSON-ready ``meta`` to ``path`` atomically."""
    tmp = path.with_name(path.name + ".tmp")
    arrays = {f"leaf_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}
    try:
        with open(tmp, "wb") as f:
            arrays["__meta__"] = np.asarray(json.dumps(json_safe(meta)))
            np.savez(f, **arrays)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def load_checkpoint(path: Path, template: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Read a checkpoint into the structure, shapes and dtypes of ``template``.

    Raises:
      WorkdirError: the file is unreadable, truncated, or does not match ``template``;
        the message names the file and says how to go on.
    """
    leaves, treedef = jax.tree.flatten(template)
    fix = f"remove it (and {path.name}.tmp, if any) to restart the run from its start"
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["__meta__"]))
            stored = [data[f"leaf_{i}"] for i in range(len(leaves))]
            extra = len(data.files) - 1 - len(leaves)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise WorkdirError(f"checkpoint {path} is unreadable ({type(e).__name__}); {fix}") \
            from None
    if extra:
        raise WorkdirError(f"checkpoint {path} does not match this run's state; {fix}")
    for got, want in zip(stored, leaves, strict=True):
        if got.shape != np.shape(want) or got.dtype != jnp.asarray(want).dtype:
            raise WorkdirError(f"checkpoint {path} does not match this run's state; {fix}")
    return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in stored]), meta


def save_hparams(workdir: Path, space, phi: PyTree, meta_step: int) -> Path | None:
    """Write every hyperparameter in full to ``hparams/meta_step_NNNNN.npz`` (atomically)
    when any of them is more than a scalar; ``metrics.jsonl`` holds only summaries."""
    values = space.arrays(space.constrain(phi))
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


class Signals:
    """Turns SIGINT/SIGTERM into a flag the loop checks between meta-steps."""

    def __init__(self):
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def print_summary(summary: dict[str, Any], out: TextIO | None = None) -> None:
    """Print the initial and final hyperparameters and losses as a table."""
    out = out or sys.stdout
    rows = []
    for name, v0 in summary["initial_hparams"].items():
        rows.append((name, _cell(v0), _cell(summary["final_hparams"][name])))
    rows += [("val_loss", _cell(summary["initial_val_loss"]), _cell(summary["final_val_loss"]))]
    for key in ("test_loss", "test_accuracy"):
        if key in summary:
            rows.append((key, _cell(summary[f"initial_{key}"]), _cell(summary[key])))
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'initial':>12}  {'final':>12}", file=out)
    for name, a, b in rows:
        print(f"{name:{width}}  {a:>12}  {b:>12}", file=out)
    print(f"final: meta-step {summary['final_meta_step']}; best: meta-step "
          f"{summary['best_meta_step']} (val_loss {_cell(summary['best_val_loss'])}); "
          f"{summary['seconds']:.1f} s", file=out)


def _cell(v: Any) -> str:
    if isinstance(v, dict):
        return f"~{v['mean']:.4g}"
    if v is None or not math.isfinite(v):
        return str(v)
    return f"{v:.4g}"
