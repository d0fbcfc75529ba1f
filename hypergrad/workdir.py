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

import contextlib
import fcntl
import io
import json
import math
import os
import signal
import socket
import stat
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from hypergrad.messages import clip, show
from hypergrad.tune import json_safe

PyTree = Any
CHECKPOINT = "checkpoint.npz"
METRICS = "metrics.jsonl"
HPARAMS_DIR = "hparams"


class WorkdirError(ValueError):
    """A workdir cannot be used as asked; the message names the file and the way on."""


RESERVED = 64
"""Bytes a path keeps free for the run's files beneath it (``hparams/meta_step_00000.npz.tmp``
is 31)."""


def check_path(path: Path, what: str = "--workdir") -> None:
    """Refuse a ``path`` that the file system cannot hold or look up: a name longer than it
    allows (255 bytes on most), a path too long for the run's files beneath it, or one a
    lookup fails on (a parent that cannot be searched); touch nothing. The message names the
    path and says to choose another ``what``; a path that does not exist yet is fine.

    Raises:
      WorkdirError: the path cannot be used.
    """
    base = next((p for p in path.absolute().parents if os.path.isdir(p)), Path("/"))
    name_max, path_max = _limit(base, "PC_NAME_MAX", 255), _limit(base, "PC_PATH_MAX", 4096)
    longest = max((len(os.fsencode(part)) for part in path.parts), default=0)
    if longest > name_max:
        raise WorkdirError(f"{clip(str(path))}: a name of {longest} bytes is longer than the "
                           f"{name_max} this file system allows; choose a shorter {what}")
    if len(os.fsencode(str(path))) + RESERVED > path_max:
        raise WorkdirError(f"{clip(str(path))}: the path is too long for this file system "
                           f"(the run's files need it under {path_max - RESERVED} bytes); "
                           f"choose a shorter {what}")
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        pass  # not there yet (or beneath a file): the caller says what that means
    except OSError as e:
        raise WorkdirError(f"cannot use {clip(str(path))}: {e.strerror or e}; choose another "
                           f"{what}") from None


def _limit(path: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(path, name)
    except (OSError, ValueError):
        return default


def check_new(workdir: Path, what: str = "--workdir", hint: str | None = None) -> None:
    """Refuse a ``workdir`` that is not a directory, already holds files, or cannot be
    created or written (:func:`check_path` included); write nothing. Called before any data
    is loaded, so a wrong ``--workdir`` costs nothing. ``what`` names the argument in the
    messages, ``hint`` says what to do with a workdir that holds files."""
    check_path(workdir, what)
    if hint is None:
        hint = f"pass --resume to continue that run, or choose another {what}"
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"workdir {workdir} is not a directory; choose another {what}")
    if workdir.exists() and any(workdir.iterdir()):
        raise WorkdirError(f"workdir {workdir} already holds files; {hint}")
    if workdir.exists():
        probe = workdir / ".write-test"
        try:
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise WorkdirError(f"cannot write in workdir {workdir}: {e.strerror}; choose "
                               f"another {what}") from None
        return
    parent = next(p for p in workdir.absolute().parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise WorkdirError(f"cannot create workdir {workdir}: {parent} is not a writable "
                           f"directory; choose another {what}")


def create(workdir: Path) -> None:
    """Create ``workdir`` (checked by :func:`check_new`)."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"cannot create workdir {workdir}: {e.strerror}; choose another "
                           "--workdir") from None


LOCK = "lock"
LOCK_GRACE = 5.0
"""Seconds an empty lock file counts as held: its process may be between creating the file
and writing its PID into it."""


class Lock:
    """One process per workdir: an OS lock (``flock``) on the file ``lock``, which holds the
    PID and host of the process that took it.

    The kernel releases a ``flock`` when its process ends, however it ends, and grants it to
    one open file at a time; so taking over a stale lock (its process killed) unlinks
    nothing: the taker holds the OS lock first, then overwrites the file in place, and two
    processes that read the same stale PID cannot both hold the workdir. The holder unlinks
    the file on exit while it still holds the OS lock; a process that opened the file
    before that and gets the OS lock after finds another file (or none) at the path and
    tries again, so no one holds a lock on a file that is gone.

    The file's contents are checked too, for a holder that takes no OS lock (an older
    hypergrad) or one on another host (``flock`` may be local to a host on a network file
    system): a live process's PID on this host, a PID on another host, and an empty file
    younger than :data:`LOCK_GRACE` seconds (a process between creating the file and
    writing it) count as held. Anything else there (not a PID and a host, a directory) is a
    :class:`WorkdirError`, never guessed to be stale.
    """

    def __init__(self, workdir: Path):
        self.path = workdir / LOCK
        self.mine = f"{os.getpid()} {socket.gethostname()}\n"
        self._fd: int | None = None

    def __enter__(self) -> Lock:
        for _ in range(3):  # another run unlinked the file as we opened it: try again
            opened = self._open()
            if opened is None:
                continue
            fd, created = opened
            try:
                if not self._flock(fd):
                    raise WorkdirError(f"workdir {self.path.parent} is in use by "
                                       f"{self._who(fd)} (see {self.path}); wait for it to "
                                       "finish or stop it, then --resume")
                if not self._same_file(fd):
                    os.close(fd)
                    continue
                if not created:
                    self._check_stale(fd)
                os.ftruncate(fd, 0)
                os.pwrite(fd, self.mine.encode(), 0)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            self._fd = fd
            return self
        raise WorkdirError(f"cannot take the lock {self.path}: other runs keep replacing it; "
                           "remove it if no run uses this workdir")

    def _open(self) -> tuple[int, bool] | None:
        """``(fd, created)`` of the lock file, created if absent; ``None`` if it vanished."""
        fix = "make the workdir writable, or remove it if no run uses this workdir"
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            pass
        except OSError as e:
            raise WorkdirError(f"cannot create the lock {self.path}: {e.strerror or e}; "
                               f"{fix}") from None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as e:  # IsADirectoryError for a directory named lock
            raise WorkdirError(f"cannot open the lock {self.path}: {e.strerror or e}; "
                               f"{fix}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise WorkdirError(f"{self.path} is not a lock file (not a regular file); "
                               "remove it if no run uses this workdir")
        return fd, False

    def _flock(self, fd: int) -> bool:
        """Take the OS lock on ``fd`` without waiting; ``False`` if another file holds it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as e:  # ENOLCK, EOPNOTSUPP: a file system without file locks
            raise WorkdirError(f"cannot lock {self.path}: {e.strerror or e}; choose a "
                               "--workdir on a file system with file locks") from None
        return True

    def _same_file(self, fd: int) -> bool:
        """Whether the path still names the file open as ``fd``."""
        try:
            now = os.stat(self.path)
        except OSError:
            return False
        then = os.fstat(fd)
        return (now.st_dev, now.st_ino) == (then.st_dev, then.st_ino)

    def _holder(self, fd: int) -> tuple[int, str] | None:
        """The ``(pid, host)`` the file holds; ``None`` when empty. Contents that are not
        one positive PID and a host name are a :class:`WorkdirError`."""
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        if not text.strip():
            return None
        pid_text, *rest = text.split()
        pid = int(pid_text) if pid_text.isdigit() and pid_text.isascii() else 0
        if not 0 < pid < 2**31 or len(rest) > 1:
            raise WorkdirError(f"{self.path} holds {show(text)}, not a run's process id and "
                               "host; remove it if no run uses this workdir")
        return pid, rest[0] if rest else ""

    def _who(self, fd: int) -> str:
        try:
            holder = self._holder(fd)
        except WorkdirError:
            holder = None
        return "another process" if holder is None else f"process {holder[0]}"

    def _check_stale(self, fd: int) -> None:
        """With the OS lock held on a file another process made: raise a
        :class:`WorkdirError` unless that process is gone (the lock is stale)."""
        holder = self._holder(fd)
        if holder is None:
            age = time.time() - os.fstat(fd).st_mtime
            if age < LOCK_GRACE:
                raise WorkdirError(f"workdir {self.path.parent} is being taken by another "
                                   f"process ({self.path} was created {max(age, 0):.1f} s "
                                   "ago and is still empty); wait for it, or remove it if "
                                   "no run uses this workdir")
            return  # its process died before writing it
        pid, host = holder
        here = socket.gethostname()
        if host and host != here:  # another host's process: cannot tell, so assume it runs
            raise WorkdirError(f"workdir {self.path.parent} is in use by process {pid} on "
                               f"{clip(host)} (see {self.path}); wait for it to finish, or "
                               "remove the lock if that run has ended")
        if pid == os.getpid():
            return  # we hold the OS lock: an earlier lock of this process, left behind
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            pass  # it runs, as another user
        raise WorkdirError(f"workdir {self.path.parent} is in use by process {pid} (see "
                           f"{self.path}); wait for it to finish or stop it, then --resume")

    def __exit__(self, *exc) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._same_file(fd):
                self.path.unlink()  # while holding the OS lock (see the class docstring)
        except OSError:
            pass
        finally:
            os.close(fd)


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Name ``path`` in an :class:`OSError` raised while writing it: ``write`` and ``fsync``
    on a full disk raise one that names no file, and an error on a temporary file should
    name the file it stands for; the command line's error line prints the name."""
    try:
        yield
    except OSError as e:
        e.filename = str(path)
        raise


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file renamed over it)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with writing(path), open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
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
        """Keep the first ``lines`` lines (a checkpoint's meta-steps) and drop the rest.

        Raises:
          WorkdirError: fewer lines, or one of them not a JSON object (not UTF-8 included);
            the file is left as it was.
        """
        try:
            kept = io.BytesIO(self.path.read_bytes()).readlines()
        except FileNotFoundError:
            kept = []
        except OSError as e:
            raise WorkdirError(f"cannot read {self.path}: {e.strerror or e}; the run cannot "
                               "be resumed") from None
        if len(kept) < lines:
            raise WorkdirError(f"{self.path} has {len(kept)} lines but its checkpoint expects "
                               f"{lines}; the run cannot be resumed")
        text = []
        for n, line in enumerate(kept[:lines]):
            try:
                text.append(line.decode("utf-8"))
                record = json.loads(text[-1])
            except ValueError:  # UnicodeDecodeError included
                record = None
            if not isinstance(record, dict):
                raise WorkdirError(f"{self.path} line {n + 1} is not JSON; the run cannot be "
                                   "resumed (restore the file or start again)")
        write_text(self.path, "".join(text))

    def __enter__(self) -> MetricsLog:
        self._file: TextIO = open(self.path, "a")
        return self

    def write(self, record: dict[str, Any]) -> None:
        """Append one meta-step's record as a JSON line and flush it."""
        with writing(self.path):
            self._file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
            self._file.flush()

    def __exit__(self, *exc) -> None:
        self._file.close()


def save_checkpoint(path: Path, tree: PyTree, meta: dict[str, Any]) -> None:
    """Write the leaves of ``tree`` and the JSON-ready ``meta`` to ``path`` atomically."""
    tmp = path.with_name(path.name + ".tmp")
    arrays = {f"leaf_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}
    try:
        with writing(path), open(tmp, "wb") as f:
            arrays["__meta__"] = np.asarray(json.dumps(json_safe(meta)))
            np.savez(f, **arrays)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    with writing(path):
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
    path = folder / f"meta_step_{meta_step:05d}.npz"
    tmp = path.with_name(path.name + ".tmp")
    with writing(path):
        folder.mkdir(exist_ok=True)
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
