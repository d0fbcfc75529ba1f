"""Populations: member starts, per-member guards, metrics and summary, resume, and (in
subprocesses, with four forced CPU devices) sharding and jax.distributed."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hypergrad import population as pop
from hypergrad.config import ConfigError, override
from hypergrad.experiment import get_experiment
from hypergrad.run import run
from hypergrad.tune import TuneError
from tests.problems import QUAD, QuadConfig

ROOT = Path(__file__).resolve().parent.parent
FOUR_DEVICES = {**os.environ, "XLA_FLAGS": " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=4"]).strip()}


def records(workdir):
    out = []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        r.pop("seconds")
        out.append(r)
    return out


def summary(workdir):
    out = json.loads((workdir / "summary.json").read_text())
    out.pop("seconds")
    return out


def test_member_starts_follow_the_documented_rule():
    phi = {"learning_rate": jnp.log(jnp.asarray(0.01)), "momentum": jnp.zeros((3,))}
    members = pop.member_phis(phi, 5, 0.5, jax.random.key(7))
    assert members["momentum"].shape == (5, 3)
    for name in phi:  # member 0 is the configured start
        np.testing.assert_array_equal(members[name][0], phi[name])
    for m in range(1, 5):  # member m: phi + spread * N(0, 1) from fold_in(key(seed), m)
        k_lr, k_mom = jax.random.split(jax.random.fold_in(jax.random.key(7), m), 2)
        np.testing.assert_allclose(
            members["learning_rate"][m],
            phi["learning_rate"] + 0.5 * jax.random.normal(k_lr, (), jnp.float64), rtol=1e-15)
        np.testing.assert_allclose(
            members["momentum"][m],
            phi["momentum"] + 0.5 * jax.random.normal(k_mom, (3,), jnp.float64), rtol=1e-15)
    # A member's start does not depend on P.
    fewer = pop.member_phis(phi, 3, 0.5, jax.random.key(7))
    np.testing.assert_array_equal(fewer["momentum"], members["momentum"][:3])
    assert len({float(v) for v in members["learning_rate"]}) == 5
    same = pop.member_phis(phi, 4, 0.0, jax.random.key(7))
    np.testing.assert_array_equal(same["momentum"], np.broadcast_to(phi["momentum"], (4, 3)))


def test_member_keys():
    from hypergrad.run import keys_for

    data = lambda s: np.asarray(jax.random.key_data(jax.random.key(s)))  # noqa: E731
    shared = pop.member_keys(keys_for(QuadConfig(seed=3, population=4)), 4)
    own = pop.member_keys(keys_for(QuadConfig(seed=3, population=4,
                                                 population_seeds=True)), 4)
    for m in range(4):
        np.testing.assert_array_equal(shared[m], data(3))
        np.testing.assert_array_equal(own[m], data(3 + m))
    with pytest.raises(ValueError, match="one key or 4 keys"):
        pop.member_keys(jax.random.split(jax.random.key(0), 3), 4)


@pytest.mark.parametrize("sets, match", [
    (["population=0"], "population must be at least 1"),
    (["population_spread=-1"], "population_spread must be >= 0"),
    (["population=4", "outer=ncg"], "supports outer=gd or adam, not ncg"),
    (["population=4", "online=true", "window=5"], "does not support online"),
    (["devices=-1"], "devices must be at least 0"),
])
def test_bad_population_configs_are_config_errors(sets, match):
    with pytest.raises(ConfigError, match=match):
        override(get_experiment("seed-cnn").config, sets)


def test_more_devices_than_there_are_is_a_config_error(tmp_path):
    n = len(jax.devices())
    with pytest.raises(ConfigError, match=f"devices={n + 1} but JAX sees {n}"):
        run(QUAD, QuadConfig(population=2 * (n + 1), devices=n + 1), tmp_path, progress=False)


def test_an_experiment_with_its_own_main_refuses_a_population(tmp_path):
    experiment = get_experiment("grazzi-hierarchy")
    config = dataclasses.replace(experiment.config, population=2)
    with pytest.raises(ConfigError, match="cannot run a population"):
        run(experiment, config, tmp_path, progress=False)


def test_population_run_equals_separate_runs_and_a_nan_touches_one_member(tmp_path):
    # Three members on the quadratic; the validation loss is NaN above a learning rate
    # between the largest member's and the others', so that member's start is rejected and
    # it retires at once (re-evaluating it would give the same NaN), while the others must
    # equal their own single runs.
    size, spread = 3, 1.0
    lrs = np.exp(np.asarray(pop.member_phis(
        QuadConfig().space().init(), size, spread, jax.random.key(0))["learning_rate"]))
    worst = int(np.argmax(lrs))
    others = sorted(set(range(size)) - {worst})
    nan_above = float((lrs[worst] + max(lrs[others])) / 2)
    config = QuadConfig(population=size, population_spread=spread, nan_above=nan_above,
                        outer="gd", outer_lr=0.1, meta_steps=4, dtype="float64")
    result = run(QUAD, config, tmp_path / "pop", progress=False, max_rejections=3)
    lines = records(tmp_path / "pop")
    assert len(lines) == 4
    for i, r in enumerate(lines):
        assert [e["member"] for e in r["members"]] == list(range(size))
        entry = r["members"][worst]
        assert ("retired" in entry) if i else ("starting point itself" in entry["warning"])
        accepted = {e["member"]: e["val_loss"] for e in r["members"] if "val_loss" in e}
        assert set(accepted) == set(others)
        assert r["best_member"] == min(accepted, key=accepted.get)
        assert r["val_loss"] == accepted[r["best_member"]]
        assert r["hparams"] == r["members"][r["best_member"]]["hparams"]
    row = result["members"][worst]
    assert row["retired"] and row["rejected_meta_steps"] == 1
    assert row["final_hparams"] is None and row["final_val_loss"] is None  # no point

    for m in others:
        single = run(QUAD, dataclasses.replace(config, population=1,
                                               learning_rate=float(lrs[m])),
                     tmp_path / f"single{m}", progress=False)
        want = records(tmp_path / f"single{m}")
        got = [r["members"][m] for r in lines]
        np.testing.assert_allclose([g["val_loss"] for g in got],
                                   [w["val_loss"] for w in want], rtol=1e-12)
        np.testing.assert_allclose([g["hparams"]["learning_rate"] for g in got],
                                   [w["hparams"]["learning_rate"] for w in want], rtol=1e-12)
        np.testing.assert_allclose(result["members"][m]["final_val_loss"],
                                   single["final_val_loss"], rtol=1e-12)

    finals = [row["final_val_loss"] for row in result["members"]]
    b = result["best_member"]
    assert b in others and result["final_val_loss"] == min(finals[m] for m in others)
    assert result["final_val_loss_spread"]["min"] == result["final_val_loss"]
    assert result["final_val_loss_spread"]["max"] == max(finals[m] for m in others)
    assert result["population"] == size and result["devices"] == len(jax.devices())
    assert result["final_hparams"] == result["members"][b]["final_hparams"]
    assert result["rejected_meta_steps"] == 1
    for name in ("val_loss.png", "hparams.png", "summary.json", "checkpoint.npz"):
        assert (tmp_path / "pop" / name).stat().st_size > 0


def test_every_member_retired_stops_the_run(tmp_path):
    config = QuadConfig(population=2, population_spread=0.0, learning_rate=0.5,
                        nan_above=0.3, meta_steps=6)
    with pytest.raises(TuneError, match="starting point"):
        run(QUAD, config, tmp_path, progress=False, max_rejections=2)
    lines = records(tmp_path)
    assert len(lines) == 1 and "stopped" in lines[-1]


def test_resume_a_population_equals_an_uninterrupted_run(tmp_path):
    config = QuadConfig(population=3, population_seeds=True, outer="adam", outer_lr=0.2,
                        meta_steps=5, save_every=2, dtype="float64")
    run(QUAD, config, tmp_path / "ref", progress=False)
    short = dataclasses.replace(config, meta_steps=3)
    run(QUAD, short, tmp_path / "cut", progress=False)
    # As if killed after writing one more metrics line than the checkpoint holds.
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"meta_step": 3, "val_loss": -1.0}) + "\n")
    run(QUAD, config, tmp_path / "cut", progress=False, resume=True)
    assert records(tmp_path / "cut") == records(tmp_path / "ref")
    assert summary(tmp_path / "cut") == summary(tmp_path / "ref")


def _python(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_sharded_across_four_devices():
    """tests/multidevice_population.py: population == separate runs, sharded ==
    unsharded, one compile per configuration, on four forced CPU devices."""
    # -n 0: one process (the addopts' -n auto would start pytest-xdist workers, each
    # importing JAX and compiling on its own, inside a test that already has a worker).
    proc = _python("-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
                   "tests/multidevice_population.py", env=FOUR_DEVICES)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "4 passed" in proc.stdout


@pytest.mark.slow
def test_distributed_smoke_script(tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    proc = _python("scripts/distributed_smoke.py", "--port", str(port), "--workdir",
                   str(tmp_path), env=FOUR_DEVICES)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] and result["devices"] == 4 and result["process_count"] == 1
