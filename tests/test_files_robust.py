"""A run's files when they are odd: raced or strange lock files, damaged metrics and
configs, names the file system cannot hold, full disks and read-only folders (issue 34).

Bad input is one line naming the problem and the fix (command line: exit status 2, no
traceback), and nothing already written is lost.
"""

import errno
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from hypergrad import workdir as files
from hypergrad.cli import main
from hypergrad.run import run
from hypergrad.workdir import Lock, WorkdirError
from tests.problems import QUAD, QuadConfig

HOST = os.uname().nodename


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def dead_pid() -> int:
    """The PID of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished two-meta-step run of the quadratic (checkpointed at its end)."""
    work = tmp_path_factory.mktemp("base") / "w"
    run(QUAD, QuadConfig(meta_steps=2), work, progress=False)
    return work


@pytest.fixture
def work(base, tmp_path):
    """A copy of :func:`base` to damage."""
    return shutil.copytree(base, tmp_path / "w")


# Finding 2: the lock.


def test_two_takers_of_one_stale_lock_cannot_both_hold_it(tmp_path, monkeypatch):
    # Both read the same dead PID; the second goes on 0.3 s after the first, when the
    # first already holds the workdir: unlinking and recreating the file let both in.
    (tmp_path / files.LOCK).write_text(f"{dead_pid()} {HOST}\n")
    real_kill = os.kill
    barrier = threading.Barrier(2)
    order = iter([0.0, 0.3])

    def slow_kill(pid, sig):
        try:
            barrier.wait(timeout=1.0)  # both have read the stale PID (if both get here)
        except threading.BrokenBarrierError:
            pass
        time.sleep(next(order, 0.3))
        return real_kill(pid, sig)

    monkeypatch.setattr(os, "kill", slow_kill)
    held, refused, release = [], [], threading.Event()

    def take():
        try:
            with Lock(tmp_path):
                held.append(1)
                release.wait(5)
        except WorkdirError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=take) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while len(held) + len(refused) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for t in threads:
        t.join()
    assert len(held) == 1 and len(refused) == 1, (held, refused)
    assert "in use by" in refused[0]
    assert not (tmp_path / files.LOCK).exists()


def test_a_held_lock_is_refused_and_free_once_released(tmp_path):
    with Lock(tmp_path):
        assert (tmp_path / files.LOCK).read_text() == f"{os.getpid()} {HOST}\n"
        with pytest.raises(WorkdirError, match=f"in use by process {os.getpid()}"):
            Lock(tmp_path).__enter__()
    assert not (tmp_path / files.LOCK).exists()
    with Lock(tmp_path):
        pass


def test_an_empty_lock_file_is_held_for_a_grace_period_then_stale(tmp_path):
    lock = tmp_path / files.LOCK
    lock.write_text("")  # a process between creating the file and writing its PID
    with pytest.raises(WorkdirError, match="being taken by another process"):
        Lock(tmp_path).__enter__()
    assert lock.read_text() == ""
    old = time.time() - files.LOCK_GRACE - 1
    os.utime(lock, (old, old))  # its process died before writing: stale
    with Lock(tmp_path):
        assert lock.read_text().startswith(f"{os.getpid()} ")


@pytest.mark.parametrize("contents", [b"garbage\n", b"-1 host\n", b"0\n", b"-5\n",
                                      b"99999999999999999999 h\n", b"12 a b\n",
                                      b"\xff\xfe\x00 \n"],
                         ids=["garbage", "minus-one", "zero", "negative", "huge",
                              "three-words", "not-utf8"])
def test_a_lock_file_with_odd_contents_is_one_line_and_kept(tmp_path, contents):
    lock = tmp_path / files.LOCK
    lock.write_bytes(contents)
    with pytest.raises(WorkdirError, match="not a run's process id and host; remove it") as e:
        Lock(tmp_path).__enter__()
    assert "\n" not in str(e.value)
    assert lock.read_bytes() == contents


def test_a_directory_named_lock_is_one_line(tmp_path):
    (tmp_path / files.LOCK).mkdir()
    (tmp_path / files.LOCK / "x").write_text("keep")
    with pytest.raises(WorkdirError, match="lock.*remove it if no run uses this workdir"):
        Lock(tmp_path).__enter__()
    assert (tmp_path / files.LOCK / "x").read_text() == "keep"


def test_resume_in_a_read_only_workdir_is_one_line_and_keeps_the_files(work, monkeypatch):
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and str(path).startswith(str(work)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(WorkdirError, match="cannot create the lock .*Read-only file system; "
                                           "make the workdir writable"):
        run(QUAD, QuadConfig(meta_steps=3), work, progress=False, resume=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()} == before


# Finding 4: a byte that is not UTF-8 in a checkpointed line of metrics.jsonl.


def test_a_byte_that_is_not_utf8_in_a_checkpointed_line_stops_resume(work):
    log = work / files.METRICS
    data = log.read_bytes()
    damaged = data.replace(b"val_loss", b"val_\xffloss", 1)
    log.write_bytes(damaged)
    with pytest.raises(WorkdirError, match=f"{log} line 1 is not JSON; the run cannot be "
                                           "resumed"):
        run(QUAD, QuadConfig(meta_steps=3), work, progress=False, resume=True)
    assert log.read_bytes() == damaged


def test_a_line_that_is_json_but_not_an_object_stops_resume(work):
    log = work / files.METRICS
    damaged = b"3\n" + log.read_bytes().split(b"\n", 1)[1]
    log.write_bytes(damaged)
    with pytest.raises(WorkdirError, match="line 1 is not JSON"):
        run(QUAD, QuadConfig(meta_steps=3), work, progress=False, resume=True)
    assert log.read_bytes() == damaged


# Finding 5: a name the file system cannot hold.

LONG = "a" * 300


def test_a_workdir_name_too_long_is_refused_at_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for option, argv in [("--workdir", ["run", "--workdir", LONG, "--set", "steps=2"]),
                         ("--workdir", ["run", "--resume", "--workdir", LONG]),
                         ("WORKDIR", ["plot", LONG]),
                         ("--out", ["plot", str(tmp_path), "--out", f"figs/{LONG}"])]:
        began = time.perf_counter()
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and time.perf_counter() - began < 5
        line = error_line(capsys)
        assert "aaaa… (30" in line and f"choose a shorter {option}" in line, line
    assert not any(tmp_path.iterdir())
    with pytest.raises(WorkdirError, match="300 bytes is longer than"):
        files.check_new(tmp_path / LONG)


def test_a_path_too_long_for_the_runs_files_is_refused(tmp_path):
    deep = tmp_path.joinpath(*["b" * 200] * 21)
    with pytest.raises(WorkdirError, match="the path is too long .* choose a shorter"):
        files.check_new(deep)


# Finding 13: a full disk names the file.


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_names_the_file_it_could_not_write(work, tmp_path, monkeypatch):
    monkeypatch.setattr(files.np, "savez", full_disk)
    ckpt = work / files.CHECKPOINT
    before = ckpt.read_bytes()
    with pytest.raises(OSError, match="No space left") as e:
        files.save_checkpoint(ckpt, {"a": np.zeros(2)}, {})
    assert e.value.filename == str(ckpt) and ckpt.read_bytes() == before
    assert not (work / "checkpoint.npz.tmp").exists()

    class FullFile:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    with files.MetricsLog(work) as log:
        real, log._file = log._file, FullFile()
        with pytest.raises(OSError) as e:
            log.write({"meta_step": 9})
        log._file = real
    assert e.value.filename == str(work / files.METRICS)


def test_a_full_disk_is_one_line_naming_the_file_on_the_command_line(tmp_path, monkeypatch,
                                                                      capsys):
    import hypergrad.run

    def writes_a_checkpoint(experiment, config, workdir, **kwargs):
        workdir.mkdir()
        files.save_checkpoint(workdir / files.CHECKPOINT, {"a": np.zeros(2)}, {})

    monkeypatch.setattr(files.np, "savez", full_disk)
    monkeypatch.setattr(hypergrad.run, "run", writes_a_checkpoint)
    assert main(["run", "--workdir", str(tmp_path / "w"), "--quiet"]) == 1
    line = error_line(capsys)
    assert f"({tmp_path / 'w' / files.CHECKPOINT}): No space left on device" in line, line


# Not reached last round: hypergrad plot on damaged files, a read-only folder.


@pytest.mark.parametrize("line, problem", [
    (b"garbage", "line 2 is not JSON"),
    (b'{"val_loss": 1.0}', "line 2 has no integer meta_step"),
    (b'{"val_loss": 1.0, "meta_step": 5}', "line 2 has no hparams"),
    (b'{"val_loss": "x", "meta_step": 5, "hparams": {}}', "line 2 has a val_loss that"),
    (b'{"val_loss": 1.0, "meta_step": 5, "hparams": {"learning_rate": "x"}}',
     "line 2 has no hparams"),
    (b'{"val_loss": 1.0, "meta_step": 5, "hparams": {"learning_rate": {"min": 1}}}',
     "line 2 has no hparams"),
    (b'{"val_loss": 1.0, "meta_step": 5, "hparams": {"momentum": 0.5}}',
     "line 2 names other hyperparameters (or groups) than line 1"),
    (b'{"val_loss": 1.0, "meta_step": 5, "hparams": {"learning_rate": 1}, "members": [3]}',
     "line 2 has members without"),
    (b"[1, 2]", "line 2 is not a JSON object"),
    (b"7", "line 2 is not a JSON object"),
    (b'{"val_\xffloss": 1.0}', "line 2 is not UTF-8 text"),
], ids=["garbage", "no-meta-step", "no-hparams", "text-loss", "text-hparam", "no-mean",
        "other-names", "bad-members", "list", "number", "not-utf8"])
def test_plot_of_a_damaged_metrics_line_is_one_line(work, tmp_path, capsys, line, problem):
    log = work / files.METRICS
    damaged = log.read_bytes().splitlines(keepends=True)
    damaged[1] = line + b"\n"
    log.write_bytes(b"".join(damaged))
    assert main(["plot", str(work)]) == 2
    assert f"{log} {problem}" in error_line(capsys)
    assert main(["plot", str(work), str(work), "--out", str(tmp_path / "both")]) == 2
    assert problem in error_line(capsys)


def test_plot_of_an_empty_metrics_file_is_one_line(work, capsys):
    (work / files.METRICS).write_bytes(b"")
    assert main(["plot", str(work)]) == 2
    assert "holds no accepted meta-step" in error_line(capsys)


def test_plot_draws_null_losses_and_ignores_a_damaged_summary(work, capsys):
    # null is how a non-finite number is written; summary.json of the wrong shape is
    # only a hint (the best member), so the figures are drawn without it.
    log = work / files.METRICS
    lines = log.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"val_loss": ', b'"val_loss": null, "was": ', 1)
    log.write_bytes(b"".join(lines))
    (work / "summary.json").write_text("[1, 2]")
    (work / "val_loss.png").unlink()
    assert main(["plot", str(work)]) == 0
    assert (work / "val_loss.png").stat().st_size > 0
    assert main(["plot", str(work), str(work), "--out", str(work / "both")]) == 0


def test_plot_of_a_damaged_hyperparameter_file_is_one_line(work, capsys):
    (work / files.HPARAMS_DIR).mkdir()
    (work / files.HPARAMS_DIR / "meta_step_00000.npz").write_bytes(b"PK\x03\x04 broken")
    assert main(["plot", str(work)]) == 2
    assert "meta_step_00000.npz" in error_line(capsys)


def test_plot_into_a_folder_it_cannot_write_is_one_line(work, capsys, monkeypatch):
    # A directory where the figure's temporary file goes: the write fails as in a
    # read-only folder (root writes through read-only modes, so chmod proves nothing).
    # A relative name: a long temporary path, as under pytest-xdist, would be cut.
    (work / "val_loss.png.tmp").mkdir()
    before = (work / "val_loss.png").read_bytes()
    monkeypatch.chdir(work.parent)
    assert main(["plot", work.name]) == 2
    line = error_line(capsys)
    assert f"cannot write {work.name}/val_loss.png" in line and "--out" in line, line
    assert (work / "val_loss.png").read_bytes() == before


# Not reached last round: a malformed config.json on --resume.


@pytest.mark.parametrize("text", [b'{"experiment": 5}', b'{"experiment": ["seed-cnn"]}',
                                  b'{"experiment": "seed-cnn", "steps": 3\xff}', b"",
                                  b'"seed-cnn"'],
                         ids=["number", "list", "not-utf8", "empty", "string"])
def test_resume_with_a_malformed_config_is_one_line(tmp_path, capsys, text):
    (tmp_path / "config.json").write_bytes(text)
    assert main(["run", "--resume", "--workdir", str(tmp_path), "--quiet"]) == 2
    line = error_line(capsys)
    assert "config.json is unreadable" in line or "unknown experiment" in line, line
    assert (tmp_path / "config.json").read_bytes() == text


def test_resume_with_a_config_that_is_a_json_list_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text("[1, 2]")
    assert main(["run", "--resume", "--workdir", str(tmp_path), "--quiet"]) == 2
    assert "config.json is unreadable" in error_line(capsys)
