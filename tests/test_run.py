"""The outer loop: files, metrics, guards against non-finite values, compiling once."""

import dataclasses
import json

import jax
import numpy as np
import pytest

import hypergrad as hg
from hypergrad.run import run
from hypergrad.tune import TuneError
from hypergrad.workdir import WorkdirError
from tests.problems import QUAD, QuadConfig, quad_build


def records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_config_metrics_summary_and_figures(tmp_path, capsys):
    config = QuadConfig(outer="gd", outer_lr=0.5)
    summary = run(QUAD, config, tmp_path, progress=False)
    for name in ("config.json", "metrics.jsonl", "summary.json", "val_loss.png", "hparams.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    lines = records(tmp_path)
    assert [r["meta_step"] for r in lines] == [0, 1, 2, 3]
    for r in lines:
        # rho: the achieved over the predicted change since the last accepted point
        assert set(r) - {"rho"} == {"meta_step", "val_loss", "train_loss", "hparams",
                                    "hypergrad_norm", "seconds"}
    assert json.loads((tmp_path / "config.json").read_text())["outer_lr"] == 0.5
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["initial_val_loss"] == pytest.approx(lines[0]["val_loss"])
    assert summary["final_val_loss"] < summary["initial_val_loss"]  # a larger lr helps
    assert summary["final_hparams"]["learning_rate"] > 0.1
    out = capsys.readouterr().out
    assert "learning_rate" in out and "val_loss" in out and "test_accuracy" in out


def test_refuses_a_workdir_that_holds_a_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("keep me\n")
    with pytest.raises(WorkdirError, match="already holds files"):
        run(QUAD, QuadConfig(), tmp_path, progress=False)
    assert (tmp_path / "metrics.jsonl").read_text() == "keep me\n"


def test_non_finite_values_never_reach_phi(tmp_path):
    # Plain GD with a huge step jumps into the NaN region; the run must step back, shrink
    # the step and go on, and every logged hyperparameter must be finite.
    config = QuadConfig(outer="gd", outer_lr=50.0, clip=0.0, meta_steps=8, nan_above=0.3)
    summary = run(QUAD, config, tmp_path, progress=False)
    lines = records(tmp_path)
    warnings = [r for r in lines if "warning" in r]
    assert warnings and "rejected" in warnings[0]["warning"]
    assert len(lines) == 8
    for r in lines:
        if "hparams" in r:
            assert np.isfinite(r["val_loss"]) and r["hparams"]["learning_rate"] <= 0.3
    assert np.isfinite(summary["final_val_loss"])
    assert summary["rejected_meta_steps"] == len(warnings)


def test_a_start_that_diverges_stops_at_once_and_keeps_the_log(tmp_path):
    # Re-evaluating the same point gives the same NaN: a local run says so after the first.
    config = QuadConfig(learning_rate=0.5, nan_above=0.3, meta_steps=10)
    with pytest.raises(TuneError, match="starting point"):
        run(QUAD, config, tmp_path, progress=False, max_rejections=3)
    lines = records(tmp_path)
    assert len(lines) == 1 and "starting point itself" in lines[0]["warning"]


def test_the_default_strategy_restarts_a_start_that_diverges_from_the_search(tmp_path):
    config = QuadConfig(learning_rate=0.5, nan_above=0.3, meta_steps=4, strategy="default")
    summary = run(QUAD, config, tmp_path, progress=False, max_rejections=3)
    lines = records(tmp_path)
    assert "starting point itself" in lines[0]["warning"]
    assert len(lines) == 4  # restarted from the search's best point, and refined
    assert np.isfinite(summary["best_val_loss"])
    assert summary["best_hparams"]["learning_rate"] <= 0.3


def test_too_many_rejections_in_a_row_stop_the_run_with_a_summary(tmp_path):
    # Unclipped GD with a huge step throws log lr far beyond the guard's max_phi; the step
    # is refused, the halved retry from the same point is refused too, and the run gives
    # up with a summary of the points it did evaluate (the start, twice).
    config = QuadConfig(outer="gd", outer_lr=1e6, clip=0.0, meta_steps=10, nan_above=0.3)
    summary = run(QUAD, config, tmp_path, progress=False, max_rejections=2)
    lines = records(tmp_path)
    assert len(lines) == 2 and all("out-of-range" in r["warning"] for r in lines)
    assert "retired after 2 rejections" in lines[-1]["warning"]
    assert "rejected 2 times in a row" in summary["stopped_early"]
    assert summary["final_meta_step"] == 1 and summary["final_hparams"]["learning_rate"] == \
        pytest.approx(0.1)
    assert np.isfinite(summary["final_val_loss"]) and summary["rejected_meta_steps"] == 2


@pytest.mark.parametrize("outer", ["gd", "adam", "ncg"])
def test_meta_step_compiles_once(outer):
    traces = []
    problem = quad_build(QuadConfig())
    base = problem.task.train_loss

    def loss(w, hparams, batch):
        traces.append(1)
        return base(w, hparams, batch)

    task = problem.task.replace(train_loss=loss)
    counts = []
    history = hg.tune(task, hg.estimators.reverse(), outer, key=jax.random.key(0),
                      meta_steps=4, callback=lambda record, state: counts.append(len(traces)))
    assert counts[0] > 0 and counts[-1] == counts[0]
    assert history.accepted.all()


def test_the_explore_refine_strategy_and_a_budget_from_the_config(tmp_path):
    # --set strategy=explore-refine --set explore=6 --set budget=...: the run explores,
    # checkpoints the refinement's start, and resumes like any run.
    config = QuadConfig(strategy="explore-refine", explore=6, meta_steps=3, budget=600.0)
    summary = run(QUAD, config, tmp_path, progress=False)
    assert summary["explored"]["evaluations"] == 7  # the start, then six draws
    # The refinement starts at the configured values; the best point is the better of
    # what it reached and the search's best.
    assert summary["best_val_loss"] <= summary["explored"]["best_val_loss"]
    assert summary["final_val_loss"] <= summary["initial_val_loss"]
    resumed = run(QUAD, dataclasses.replace(config, meta_steps=5), tmp_path, progress=False,
                  resume=True)
    assert resumed["meta_steps_run"] == 5
    assert resumed["final_val_loss"] <= summary["final_val_loss"] * (1 + hg.Guard().tolerance)
    assert resumed["best_val_loss"] <= summary["initial_val_loss"]
