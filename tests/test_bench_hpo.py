"""scripts/bench_hpo.py: the per-layer optimizer wrapper, and a smoke run of problem c."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hypergrad as hg

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_hpo.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_hpo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_per_layer_reads_one_value_per_layer(bench):
    params = {"a": {"bias": jnp.ones(2), "kernel": jnp.ones((3, 2))},
              "b": {"bias": jnp.ones(4), "kernel": jnp.ones((2, 4))}}
    grads = jax.tree.map(lambda w: 0.5 * w, params)
    opt, layers = bench.per_layer(hg.inner.sgd(momentum=0.0), params)
    assert layers == ["['a']", "['b']"]
    hparams = {"learning_rate": jnp.array([0.1, 0.2]), "weight_decay": jnp.array([0.0, 1.0])}
    updates, _ = opt.update(grads, opt.init(params), params, hparams)
    # -lr * (g + wd * w) with g = 0.5 w = 0.5: layer a -0.1 * 0.5, layer b -0.2 * 1.5.
    for leaf in jax.tree.leaves(updates["a"]):
        np.testing.assert_allclose(leaf, -0.05, rtol=1e-15)
    for leaf in jax.tree.leaves(updates["b"]):
        np.testing.assert_allclose(leaf, -0.3, rtol=1e-15)


def test_quick_run_of_problem_c(bench, tmp_path):
    out, fig = tmp_path / "bench.json", tmp_path / "bench.png"
    report = bench.main(["--quick", "--problems", "c", "--budget", "1", "--json", str(out),
                         "--figure", str(fig)])
    saved = json.loads(out.read_text())
    assert set(saved) == {"settings", "c"} and fig.stat().st_size > 0
    c = saved["c"]
    assert c["num_hparams"] == 64
    assert set(c["methods"]) == {"hypergrad-gd", "hypergrad-ncg", "hypergrad-adam", "random",
                                 "tpe"}
    for m in c["methods"].values():
        assert len(m["seconds"]) == len(m["val_loss"]) == m["evaluations"] >= 1
        finite = [v for v in m["val_loss"] if v is not None]
        assert m["best_val_loss"] == min(finite) and np.isfinite(m["test_loss"])
    tpe = c["methods"]["tpe"]
    assert c["tpe_best_val_loss"] == tpe["best_val_loss"]
    assert tpe["fraction_of_tpe_time"] <= 1.0  # TPE reaches its own best within its time
    # time_fraction is the best hypergradient method's time to TPE's best over TPE's time.
    reach = [c["methods"][m]["time_to_tpe_best"] for m in bench.HYPERGRAD]
    reach = [t for t in reach if t is not None]
    expected = min(reach) / c["tpe_seconds"] if reach else None
    assert c["time_fraction"] == expected
    assert report["c"]["time_fraction"] == expected
