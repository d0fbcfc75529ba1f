"""scripts/bench_hpo.py: its problems, and smoke runs of problems c and d."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_hpo.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_hpo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_unknown_method_is_a_usage_error(bench, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", "--methods", "hypergrad-sgd"])
    assert exit_info.value.code == 2
    assert "got hypergrad-sgd" in capsys.readouterr().err
