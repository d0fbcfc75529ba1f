"""The chaos experiment on a tiny config, through the real command."""

import json
import math

import pytest

from hypergrad.cli import main

# The slice's learning rates are 0.05, 1.58 and 50; ten steps diverge at the last two.
TINY = ["steps=10", "window=3", "points=3", "num_pairs=2", "meta_steps=2",
        "data.train_size=60", "data.val_size=40", "data.test_size=40", "channels=2,2,2",
        "slice_low=0.05", "slice_high=50"]


@pytest.mark.slow
def test_chaos_tiny(tmp_path, capsys):
    workdir = tmp_path / "c"
    args = ["run", "chaos", "--workdir", str(workdir), "--quiet"]
    for s in TINY:
        args += ["--set", s]
    assert main(args) == 0
    results = json.loads((workdir / "results.json").read_text())
    assert set(results) >= {"slice", "tune", "start"}
    sliced = results["slice"]
    assert len(sliced["learning_rate"]) == 3
    assert math.isclose(sliced["learning_rate"][0], 0.05)
    assert math.isclose(sliced["learning_rate"][-1], 50)
    for name in ("val_loss", "reverse", "truncated", "es", "es_stderr", "es_capped", "pes",
                 "pes_stderr", "pes_capped"):
        assert len(sliced[name]) == 3
    # At 0.05 ten steps of a tiny CNN train stably: every value and derivative is finite.
    for name in ("val_loss", "reverse", "truncated", "es", "es_stderr", "pes", "pes_stderr"):
        assert sliced[name][0] is not None and math.isfinite(sliced[name][0]), name
    assert sliced["es_stderr"][0] > 0 and sliced["es_capped"][0] == 0
    assert sliced["pes_stderr"][0] > 0 and sliced["pes_capped"][0] == 0
    # At 50 training diverges: the run and both backpropagated derivatives are NaN (null in
    # JSON), while es and pes count every perturbed run as the cap and say 0, finite.
    assert sliced["val_loss"][-1] is None
    assert sliced["reverse"][-1] is None and sliced["truncated"][-1] is None
    assert sliced["es"][-1] == 0.0 and sliced["es_capped"][-1] == 4
    assert sliced["pes"][-1] == 0.0 and sliced["pes_capped"][-1] == 4
    start = results["start"]
    assert math.isfinite(start["val_loss"]) and 0 <= start["test_accuracy"] <= 1
    for name in ("reverse", "truncated", "es", "pes"):
        r = results["tune"][name]
        # pes tunes one run online, a meta-step per window of 3 of the 10 steps.
        steps = 3 if name == "pes" else 2
        assert len(r["val_loss"]) == steps and len(r["accepted"]) == steps
        assert r["online"] == (name == "pes")
        # Meta-step 0 evaluates the shared start (pes: a full run at its hyperparameters).
        assert math.isclose(r["val_loss"][0], start["val_loss"], rel_tol=1e-5)
        for key in ("final_val_loss", "best_val_loss", "final_test_loss", "best_test_loss"):
            assert math.isfinite(r[key]), (name, key)
        assert r["best_val_loss"] <= r["val_loss"][0] + 1e-6
        assert 0 <= r["best_test_accuracy"] <= 1 and 0 <= r["final_test_accuracy"] <= 1
    assert (workdir / "chaos.png").stat().st_size > 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["experiment"] == "chaos"
    assert summary["reverse_slice_nan"] == summary["truncated_slice_nan"] == 2
    assert summary["es_slice_nan"] == summary["pes_slice_nan"] == 0
    pes = results["tune"]["pes"]
    assert len(pes["window_val_loss"]) == 3 and pes["window_val_loss"] != pes["val_loss"]
    # `hypergrad plot` redraws the figure from results.json alone.
    out = tmp_path / "redrawn"
    assert main(["plot", str(workdir), "--out", str(out)]) == 0
    assert (out / "chaos.png").stat().st_size > 0


def test_chaos_rejects_a_bad_slice(tmp_path, capsys):
    assert main(["run", "chaos", "--set", "slice_low=0.2", "--set", "slice_high=0.1",
                 "--workdir", str(tmp_path / "c")]) == 2
    assert "slice_low" in capsys.readouterr().err
