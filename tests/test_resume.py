"""Runs you can trust: kill and resume, atomic checkpoints, divergence, determinism."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from hypergrad import workdir as files
from hypergrad.cli import main
from hypergrad.run import run
from hypergrad.workdir import WorkdirError
from tests.problems import QUAD, QuadConfig, template

TINY = ["--set", "steps=4", "--set", "batch_size=20", "--set", "channels=4,4,4",
        "--set", "meta_steps=6", "--set", "save_every=2"]


def metrics(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def summary(workdir):
    out = json.loads((workdir / "summary.json").read_text())
    out.pop("seconds")
    if "explored" in out:  # the default strategy's search: its seconds are the clock's
        out["explored"].pop("seconds")
    return out


def cli(*args, cwd):
    """Start the `hypergrad` command in a fresh process (float32, as a user runs it).

    The runs one test starts share a JAX compilation cache in its ``cwd``: a run compiles
    what the one before it compiled only if that one was killed before writing it (an
    entry cut short by the kill is read as a miss, with a warning, and compiled again)."""
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cwd / "jax-cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    return subprocess.Popen([sys.executable, "-m", "hypergrad.cli", *args],
                            cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)


def cli_status(*args, cwd):
    """Run the `hypergrad` command to its end; its exit status and standard error."""
    with cli(*args, cwd=cwd) as p:
        err = p.stderr.read()
        return p.wait(timeout=300), err


def wait_for_lines(path, n, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError("run too slow")


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    ref = tmp_path / "ref"
    status, err = cli_status("run", *TINY, "--workdir", str(ref), "--quiet", cwd=tmp_path)
    assert status == 0, err

    # One run killed twice, resumed after each kill: first before the first periodic
    # save, then (in the resumed run) after one; the last resume runs to the end.
    work = tmp_path / "killed"
    done = []
    for args in (("run", *TINY), ("run", "--resume")):
        # The second kill: past meta-step 2's save, and past what the first run wrote.
        kill_after = 1 if not done else max(3, len(done) + 1)
        with cli(*args, "--workdir", str(work), "--quiet", cwd=tmp_path) as p:
            wait_for_lines(work / "metrics.jsonl", kill_after, p)
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=60)
        assert not (work / "summary.json").exists()
        # What the killed run wrote is what the uninterrupted run wrote (bitwise).
        done = metrics(work)
        assert len(done) >= kill_after and done == metrics(ref)[:len(done)]
    status, err = cli_status("run", "--resume", "--workdir", str(work), "--quiet",
                             cwd=tmp_path)
    assert status == 0, err
    assert metrics(work) == metrics(ref)  # bitwise: floats compare exactly
    assert summary(work) == summary(ref)
    assert not (work / "checkpoint.npz.tmp").exists()


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path):
    work = tmp_path / "w"
    args = [*TINY[:-4], "--set", "meta_steps=40", "--set", "save_every=1000"]
    with cli("run", *args, "--workdir", str(work), "--quiet", cwd=tmp_path) as p:
        wait_for_lines(work / "metrics.jsonl", 2, p)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=120) == 128 + signal.SIGTERM
        err = p.stderr.read()
    assert "checkpoint saved, continue with --resume" in err and "Traceback" not in err
    _, meta = files.load_checkpoint(work / "checkpoint.npz", template(work))
    done = meta["meta_step"]
    assert 2 <= done < 40 and len(metrics(work)) == done
    # The run may be resumed with a different number of meta-steps (and nothing else).
    status, err = cli_status("run", "--resume", "--workdir", str(work), "--quiet",
                             "--set", f"meta_steps={done + 1}", cwd=tmp_path)
    assert status == 0, err
    assert len(metrics(work)) == done + 1 and summary(work)["meta_steps_run"] == done + 1


def test_a_kill_during_a_checkpoint_write_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    config = QuadConfig(meta_steps=6, save_every=2, outer_lr=0.5)
    run(QUAD, config, tmp_path / "ref", progress=False)

    calls = []
    real_replace = os.replace

    def dying_replace(src, dst):
        calls.extend([dst] if str(dst).endswith("checkpoint.npz") else [])
        if str(dst).endswith("checkpoint.npz") and len(calls) == 3:
            with open(src, "r+b") as f:  # the process dies with half a file written
                f.truncate(100)
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    work = tmp_path / "w"
    monkeypatch.setattr(files.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        run(QUAD, config, work, progress=False)
    monkeypatch.setattr(files.os, "replace", real_replace)
    assert (work / "checkpoint.npz.tmp").stat().st_size == 100
    run(QUAD, config, work, progress=False, resume=True)
    assert metrics(work) == metrics(tmp_path / "ref")
    assert summary(work) == summary(tmp_path / "ref")


@pytest.mark.parametrize("estimator", ["truncated", "pes"])
def test_online_run_resumes_after_a_kill_like_an_uninterrupted_one(tmp_path, monkeypatch,
                                                                   estimator):
    # pes: the checkpoint holds the particles, their accumulated perturbations and key.
    config = QuadConfig(online=True, steps=12, window=2, save_every=2, outer_lr=0.5,
                        estimator=estimator, num_pairs=2, sigma=0.1)
    run(QUAD, config, tmp_path / "ref", progress=False)
    real_replace = os.replace
    calls = []

    def dying_replace(src, dst):
        calls.extend([dst] if str(dst).endswith("checkpoint.npz") else [])
        if len(calls) == 4:
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        run(QUAD, config, tmp_path / "w", progress=False)
    monkeypatch.setattr(files.os, "replace", real_replace)
    run(QUAD, config, tmp_path / "w", progress=False, resume=True)
    assert [r["inner_step"] for r in metrics(tmp_path / "ref")] == [2, 4, 6, 8, 10, 12]
    assert metrics(tmp_path / "w") == metrics(tmp_path / "ref")
    assert summary(tmp_path / "w") == summary(tmp_path / "ref")


def test_corrupt_checkpoint_is_a_clear_error_and_is_kept(tmp_path):
    config = QuadConfig(meta_steps=2)
    run(QUAD, config, tmp_path, progress=False)
    (tmp_path / "checkpoint.npz").write_bytes(b"not a zip file")
    with pytest.raises(WorkdirError, match="checkpoint .* is unreadable"):
        run(QUAD, config, tmp_path, progress=False, resume=True)
    assert (tmp_path / "checkpoint.npz").read_bytes() == b"not a zip file"


def test_diverging_inner_training_finishes_with_warnings_and_finite_phi(tmp_path):
    # Large, unclipped hyper-steps throw the learning rate into divergence; the run must
    # reject those steps, go on, and finish.
    workdir = tmp_path / "w"
    status = main(["run", "--set", "steps=10", "--set", "batch_size=20",
                   "--set", "channels=4,4,4", "--set", "meta_steps=6", "--set", "clip=0",
                   "--set", "outer_lr=300", "--set", "dtype=float64",
                   "--workdir", str(workdir), "--quiet"])
    assert status == 0
    lines = metrics(workdir)
    assert any("warning" in r for r in lines)
    for r in lines:
        if "hparams" in r:
            assert all(np.isfinite(v) for v in r["hparams"].values())
    assert np.isfinite(summary(workdir)["final_val_loss"])


def test_same_config_and_seed_give_identical_metrics(tmp_path):
    args = ["run", *TINY, "--set", "meta_steps=3", "--quiet"]
    assert main([*args, "--workdir", str(tmp_path / "a")]) == 0
    assert main([*args, "--workdir", str(tmp_path / "b")]) == 0
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    assert summary(tmp_path / "a") == summary(tmp_path / "b")
