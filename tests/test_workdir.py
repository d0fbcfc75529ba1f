"""A run's files: one process per workdir, config fingerprints, valid JSON, full disks."""

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hypergrad import workdir as files
from hypergrad.cli import main
from hypergrad.run import run
from hypergrad.workdir import WorkdirError
from tests.problems import QUAD, QuadConfig, template


def strict_json(path):
    def refuse(name):
        raise ValueError(f"{path} holds {name}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_second_process_on_a_workdir_is_refused_and_a_stale_lock_taken_over(tmp_path):
    config = QuadConfig(meta_steps=2)
    run(QUAD, config, tmp_path, progress=False)
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        try:
            (tmp_path / files.LOCK).write_text(f"{other.pid} {os.uname().nodename}\n")
            with pytest.raises(WorkdirError, match=f"in use by process {other.pid}"):
                run(QUAD, QuadConfig(meta_steps=3), tmp_path, progress=False, resume=True)
            assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
        finally:
            other.kill()
    # The holder is gone (killed): its lock is stale and the run takes it over.
    summary = run(QUAD, QuadConfig(meta_steps=3), tmp_path, progress=False, resume=True)
    assert summary["meta_steps_run"] == 3 and not (tmp_path / files.LOCK).exists()


def test_resume_refuses_a_hand_edited_config_and_records_a_new_meta_steps(tmp_path):
    run(QUAD, QuadConfig(meta_steps=2), tmp_path, progress=False)
    from hypergrad.config import from_dict

    edited = from_dict(QuadConfig(), {"steps": 5, "meta_steps": 2})
    with pytest.raises(WorkdirError, match="steps 10 -> 5"):
        run(QUAD, edited, tmp_path, progress=False, resume=True)
    run(QUAD, QuadConfig(meta_steps=4), tmp_path, progress=False, resume=True)
    assert strict_json(tmp_path / "config.json")["meta_steps"] == 4


def test_a_corrupt_metrics_line_stops_resume_and_is_kept(tmp_path):
    run(QUAD, QuadConfig(meta_steps=2), tmp_path, progress=False)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    damaged = "\n".join([lines[0], "{oops", *lines[2:]]) + "\n"
    (tmp_path / "metrics.jsonl").write_text(damaged)
    with pytest.raises(WorkdirError, match="line 2 is not JSON"):
        run(QUAD, QuadConfig(meta_steps=4), tmp_path, progress=False, resume=True)
    assert (tmp_path / "metrics.jsonl").read_text() == damaged


def test_every_json_file_is_valid_json_with_a_member_that_never_had_a_point(tmp_path):
    # One member starts above the NaN threshold: its final and best points do not exist.
    import jax

    from hypergrad.population import member_phis

    lrs = np.exp(np.asarray(member_phis(QuadConfig().space().init(), 3, 1.0,
                                        jax.random.key(0))["learning_rate"]))
    top = np.sort(lrs)
    config = QuadConfig(population=3, population_spread=1.0, meta_steps=2, dtype="float64",
                        nan_above=float((top[-1] + top[-2]) / 2))
    summary = run(QUAD, config, tmp_path, progress=False)
    for name in ("summary.json", "config.json"):
        strict_json(tmp_path / name)
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
    assert any(m["final_val_loss"] is None for m in summary["members"])


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    work = tmp_path / "w"
    real = np.savez
    calls = []

    def full(*args, **kwargs):
        calls.append(1)
        if len(calls) >= 2:  # the first checkpoint fits, the next one does not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(files.np, "savez", full)
    argv = ["run", "--set", "steps=2", "--set", "batch_size=20", "--set", "channels=2,2,2",
            "--set", "meta_steps=3", "--set", "save_every=1", "--workdir", str(work),
            "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "--resume" in err[0]
    assert not list(work.glob("*.tmp"))
    files.load_checkpoint(work / files.CHECKPOINT, template(work))  # still readable
    monkeypatch.setattr(files.np, "savez", real)
    assert main([argv[0], "--resume", "--workdir", str(work), "--quiet"]) == 0


def test_dtype_float64_is_honoured(tmp_path):
    # In a fresh process (the tests themselves run with x64 on).
    work = tmp_path / "w"
    proc = subprocess.run(
        [sys.executable, "-m", "hypergrad.cli", "run", "--set", "steps=2", "--set",
         "batch_size=20", "--set", "channels=2,2,2", "--set", "meta_steps=1", "--set",
         "dtype=float64", "--workdir", str(work), "--quiet"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "UserWarning" not in proc.stderr
    with np.load(work / files.CHECKPOINT) as data:
        floats = [data[k].dtype for k in data.files if data[k].dtype.kind == "f"]
    assert floats and all(d == np.float64 for d in floats)


def test_out_of_device_memory_is_one_line(tmp_path, monkeypatch, capsys):
    import hypergrad.run

    def exhausted(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.1 TiB")

    monkeypatch.setattr(hypergrad.run, "tune", exhausted)
    argv = ["run", "--set", "steps=2", "--set", "batch_size=20", "--set", "channels=2,2,2",
            "--set", "meta_steps=1", "--workdir", str(tmp_path / "w"), "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of device memory" in err[0] and "lower steps" in err[0]
    assert (tmp_path / "w" / "config.json").exists()  # what was written stays


def test_ctrl_c_while_the_first_evaluation_compiles_exits_cleanly(tmp_path):
    import signal
    import time

    work = tmp_path / "w"
    argv = [sys.executable, "-m", "hypergrad.cli", "run", "--set", "steps=3", "--set",
            "batch_size=20", "--set", "channels=2,2,2", "--set", "meta_steps=50",
            "--workdir", str(work), "--quiet"]
    with subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          text=True) as proc:
        deadline = time.monotonic() + 120
        while not (work / "config.json").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        status = proc.wait(timeout=300)
        err = proc.stderr.read()
    assert status == 128 + signal.SIGINT, err
    assert "checkpoint saved, continue with --resume" in err
    assert "Traceback" not in err and "Fatal" not in err
    assert (work / files.CHECKPOINT).exists()


def test_an_empty_workdir_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, capsys):
    # A read-only mount or `chattr +i` (root ignores mode bits, so the write is made to
    # fail): refused before any data is loaded, nothing left behind.
    from pathlib import Path

    work = tmp_path / "w"
    work.mkdir()
    real = Path.write_text

    def refuse(self, *args, **kwargs):
        if self.parent == work:
            raise PermissionError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", refuse)
    assert main(["run", "--set", "steps=2", "--workdir", str(work), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write in workdir" in err[0]
    assert not any(work.iterdir())
