"""scripts/bench_hpo.py: its problems, and smoke runs of problems c and d."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hypergrad.unroll import objective
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist-10k"


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_hpo")


def test_problem_b_has_one_learning_rate_and_weight_decay_per_layer(bench):
    task = bench.problem_b(quick=True).task
    for name in ("learning_rate", "weight_decay"):
        layout = task.space.constraints[name].layout
        assert layout.groups == ("convs/0", "convs/1", "convs/2", "head")
    assert task.space.init()["learning_rate"].shape == (4,)


def test_quick_run_of_problem_c(bench, tmp_path):
    out, fig = tmp_path / "bench.json", tmp_path / "bench.png"
    report = bench.main(["--quick", "--problems", "c", "--budget", "1", "--json", str(out),
                         "--figure", str(fig)])
    saved = json.loads(out.read_text())
    assert set(saved) == {"settings", "c"} and fig.stat().st_size > 0
    c = saved["c"]
    assert c["num_hparams"] == 64
    assert set(c["methods"]) == {*bench.HYPERGRAD, "random", "tpe"}
    # The explore strategy's trace starts with its random draws (2 in a quick run).
    assert c["methods"]["hypergrad-explore"]["evaluations"] >= 2
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


def test_problem_d_lifts_b_and_black_box_methods_search_the_reduction(bench, tmp_path):
    d, b = bench.problem_d(quick=True), bench.problem_b(quick=True)
    space_d, space_b = d.task.space, b.task.space
    assert space_d.constraints["learning_rate"].schedule.kind == "per_step"
    assert space_d.constraints["weight_decay"].per == "parameter"
    # b is d's subspace: a constant per-layer learning rate, one weight decay per layer,
    # from the same start.
    lr_d = space_d.constrain(space_d.init())["learning_rate"]
    lr_b = space_b.constrain(space_b.init())["learning_rate"]
    np.testing.assert_array_equal(np.unique(np.asarray(lr_d)), np.unique(np.asarray(lr_b)))

    out = tmp_path / "bench.json"
    report = bench.main(["--quick", "--problems", "d", "--budget", "1", "--methods",
                         "hypergrad-adam-0.2,random", "--json", str(out)])
    saved = json.loads(out.read_text())["d"]
    assert saved["num_hparams"] == bench._size(d) > saved["black_box_num_hparams"] == 10
    assert set(saved["methods"]) == {"hypergrad-adam-0.2", "random", "tpe"}
    # Black-box choices are scored in b's space, the hypergradient's in d's (a phi of one
    # space does not fit the other's task: scoring in the wrong one fails on shapes).
    for m in saved["methods"].values():
        assert np.isfinite(m["best_val_loss"]) and np.isfinite(m["test_loss"])
    assert report["d"]["tpe_best_val_loss"] == saved["methods"]["tpe"]["best_val_loss"]


def test_a_b_configuration_lifted_into_d_trains_the_same(bench):
    """d's space holds b's: a per-layer learning rate repeated at every step and each
    layer's weight decay on every one of its parameters give the same training run and
    validation loss as the (b) configuration itself."""
    d, b = bench.problem_d(quick=True), bench.problem_b(quick=True)
    space_b, space_d = b.task.space, d.task.space
    key = jax.random.key(0)
    # A (b) point away from the start: every hyperparameter moved by its own amount.
    phi_b = space_b.init(jnp.float32)
    phi_b = {n: v + 0.3 * jax.random.normal(jax.random.fold_in(key, i), jnp.shape(v))
             for i, (n, v) in enumerate(sorted(phi_b.items()))}
    hp_b = space_b.constrain(phi_b)
    expanded = space_b.expand(hp_b)  # weight decay as a tree shaped like the weights
    lr_d = space_d.constrain(space_d.init(jnp.float32))["learning_rate"]
    assert lr_d.shape == (b.task.steps, 4)
    hp_d = dict(hp_b, learning_rate=jnp.broadcast_to(hp_b["learning_rate"], lr_d.shape),
                weight_decay=jax.tree.map(
                    lambda v, shape: jnp.broadcast_to(v, shape), expanded["weight_decay"],
                    jax.tree.map(jnp.shape, space_d.init(jnp.float32)["weight_decay"])))
    phi_d = space_d.unconstrain(hp_d)
    loss_b, aux_b = jax.jit(objective)(b.task, phi_b, key)
    loss_d, aux_d = jax.jit(objective)(d.task, phi_d, key)
    assert np.isfinite(loss_b)
    np.testing.assert_allclose(float(loss_d), float(loss_b), rtol=1e-6)
    np.testing.assert_allclose(aux_d["train_losses"], aux_b["train_losses"], rtol=1e-5)


def test_d_takes_b_black_box_runs_when_b_ran(bench, tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--problems", "b,d", "--budget", "1", "--methods",
                "hypergrad-adam-0.2,random", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert "black_box_runs_of" not in saved["b"] and saved["d"]["black_box_runs_of"] == "b"
    for method in ("random", "tpe"):
        assert saved["d"]["methods"][method] == saved["b"]["methods"][method]
    assert saved["d"]["methods"]["hypergrad-adam-0.2"] != saved["b"]["methods"][
        "hypergrad-adam-0.2"]


def test_data_runs_the_cnn_problems_on_mnist_files(bench, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", "--problems", "b,c", "--data", "idx:nowhere"])
    assert exit_info.value.code == 2
    assert "problem c runs on the embedded digits only" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", "--problems", "b", "--data", f"idx:{tmp_path / 'none'}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("bench_hpo.py: error: ") and "Traceback" not in err
    if not MNIST_DIR.is_dir():
        pytest.skip(f"real MNIST is not at {MNIST_DIR}")
    task = bench.problem_b(quick=True, data=f"idx:{MNIST_DIR}").task
    assert jax.tree.leaves(task.val_data)[0].shape[0] == 100  # QUICK_MNIST_SIZES
    assert 28 * 28 in {int(np.prod(x.shape[1:])) for x in jax.tree.leaves(task.val_data)}
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--problems", "b", "--budget", "1", "--methods", "random",
                "--data", f"idx:{MNIST_DIR}", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["settings"]["data"] == f"idx:{MNIST_DIR}"
    assert saved["b"]["num_hparams"] == 10
    for m in saved["b"]["methods"].values():
        assert np.isfinite(m["best_val_loss"]) and np.isfinite(m["test_loss"])


def test_unknown_method_is_a_usage_error(bench, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", "--methods", "hypergrad-sgd"])
    assert exit_info.value.code == 2
    assert "got hypergrad-sgd" in capsys.readouterr().err
