"""scripts/bench_hpo.py: the per-layer optimizer wrapper, and a smoke run of problem c."""

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
    assert set(c["methods"]) == {"hypergrad-gd", "hypergrad-ncg", "hypergrad-adam",
                                 "hypergrad-explore", "random", "tpe"}
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
