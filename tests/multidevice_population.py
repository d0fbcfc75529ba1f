"""Population tests on four forced CPU devices; run by tests/test_population.py in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (the flag must be
set before JAX starts, so these cannot share a process with the other tests)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import hypergrad as hg
from hypergrad import population as pop
from hypergrad.config import override
from hypergrad.experiment import build, estimator_for, get_experiment, outer_for
from hypergrad.run import run
from tests.problems import QUAD, QuadConfig

# One convolution (channels=4): the same paths as three, and a quicker compile.
TINY = ["steps=4", "batch_size=20", "channels=4", "dtype=float64", "outer=adam"]
P = 4


def test_four_devices_are_visible():
    assert len(jax.devices()) == 4, jax.devices()


def test_device_count_divides_the_population():
    assert pop.device_count(8) == 4
    assert pop.device_count(6) == 3  # the largest divisor that fits
    assert pop.device_count(3, devices=3) == 3
    with pytest.raises(pop.DeviceError, match="not divisible by devices=4"):
        pop.device_count(6, devices=4)
    with pytest.raises(pop.DeviceError, match="devices=5 but JAX sees 4"):
        pop.device_count(10, devices=5)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _counting(task):
    traces, base = [], task.train_loss

    def loss(p, hparams, batch):
        traces.append(1)
        return base(p, hparams, batch)

    return task.replace(train_loss=loss), traces


def test_population_equals_separate_runs_sharded_or_not_and_compiles_once():
    experiment = get_experiment("seed-cnn")
    config = override(experiment.config, TINY)
    task, traces = _counting(build(experiment, config).task)
    est, opt = estimator_for(config), outer_for(config)
    phi0 = task.space.init(jnp.float64)
    keys = jax.vmap(jax.random.key)(config.seed + jnp.arange(P))
    starts = pop.member_phis(phi0, P, 0.5, jax.random.key(config.seed))

    # Reference: P separate single runs, one member at a time, from the members' starts.
    separate = [hg.tune(task, est, opt, key=keys[m], phi=pop.member(starts, m),
                        meta_steps=2) for m in range(P)]
    for devices in (1, 4):
        counts = []
        history = hg.tune(task, est, opt, key=keys, phi=phi0, population=P, spread=0.5,
                          devices=devices, meta_steps=3,
                          callback=lambda record, state, c=counts: c.append(len(traces)))
        assert counts[0] > 0 and counts[-1] == counts[0], "the population step compiled twice"
        state = history.state
        if devices == 4:
            assert state.phi["learning_rate"].sharding.spec == PartitionSpec(pop.AXIS)
            assert len(state.phi["learning_rate"].sharding.device_set) == 4
        for m, ref in enumerate(separate):
            np.testing.assert_allclose(history.val_loss[:2, m], ref.val_loss, rtol=1e-12)
            per_step = jax.tree.map(lambda x, m=m: x[:2, m], history.hparams)
            for got, want in zip(_leaves(per_step), _leaves(ref.hparams), strict=True):
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
        # The members started apart and stayed apart: the comparison is not trivial.
        assert len({float(v) for v in history.val_loss[-1]}) == P


def records(workdir):
    out = []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        r.pop("seconds")
        out.append(r)
    return out


def test_sharded_run_equals_unsharded_run(tmp_path):
    config = QuadConfig(population=P, population_spread=0.5, outer="gd", outer_lr=0.5,
                        dtype="float64")
    sharded = run(QUAD, config, tmp_path / "sharded", progress=False)
    single = run(QUAD, dataclasses.replace(config, devices=1), tmp_path / "single",
                 progress=False)
    assert sharded["devices"] == 4 and single["devices"] == 1
    a, b = records(tmp_path / "sharded"), records(tmp_path / "single")
    assert len(a) == len(b) == config.meta_steps
    for ra, rb in zip(a, b, strict=True):
        assert ra["best_member"] == rb["best_member"]
        for ma, mb in zip(ra["members"], rb["members"], strict=True):
            np.testing.assert_allclose(ma["val_loss"], mb["val_loss"], rtol=1e-12)
            np.testing.assert_allclose(ma["hparams"]["learning_rate"],
                                       mb["hparams"]["learning_rate"], rtol=1e-12)
    for ma, mb in zip(sharded["members"], single["members"], strict=True):
        np.testing.assert_allclose(ma["final_val_loss"], mb["final_val_loss"], rtol=1e-12)
