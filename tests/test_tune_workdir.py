"""``hg.tune(..., workdir=PATH)``: the command line's run files written from Python, a run
resumed from them (killed, or continued to more meta-steps) equal to an uninterrupted one,
and a directory of another call refused before anything is written."""

import json
import os
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hypergrad as hg
from hypergrad import workdir as files
from hypergrad.tune import saving
from tests.problems import logreg_task, main

KEY = jax.random.key(0)


class Killed(Exception):
    """What a test callback raises to stop a run after a meta-step, as a kill would."""


def kill_after(step):
    def callback(record, state):
        if record["meta_step"] == step:
            raise Killed(step)
    return callback


def no_seconds(data):
    """A History's JSON, or a run's records, without the wall times (the only numbers two
    runs of one call do not share)."""
    data = json.loads(json.dumps(data))
    records = data["records"] if isinstance(data, dict) else data
    for r in records:
        r.pop("seconds")
    return data


def lines(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def summary(path):
    out = json.loads((path / "summary.json").read_text())
    out.pop("seconds")
    out.get("explored", {}).pop("seconds", None)  # the search's wall time
    return out


def local(task, **kw):
    """One local run: Adam on phi, 5 meta-steps."""
    return hg.tune(task, hg.estimators.reverse(), "adam", key=KEY, **{"meta_steps": 5, **kw})


def test_a_run_with_a_workdir_writes_the_command_lines_files(tmp_path):
    task = logreg_task(steps=6)
    run = tmp_path / "run"
    history = local(task, workdir=run)
    assert {p.name for p in run.iterdir()} == {
        "config.json", "metrics.jsonl", "checkpoint.npz", "history.json", "summary.json",
        "val_loss.png", "hparams.png"}  # the lock is gone
    assert lines(run) == history.records  # the records the callback saw, one per line
    assert [r["meta_step"] for r in history.records] == list(range(5))
    # the same History as without a workdir
    assert no_seconds(history.to_json()) == no_seconds(local(task).to_json())
    assert hg.History.load(run / "history.json") == history
    config = json.loads((run / "config.json").read_text())
    assert config["call"] == "hypergrad.tune"
    assert config["estimator"]["name"] == "reverse"
    assert config["meta_steps"] == 5 and config["budget"] is None
    assert config["strategy"]["type"] == "Local" and config["strategy"]["name"] == "local"
    assert config["key"] == np.asarray(jax.random.key_data(KEY)).tolist()
    assert set(config["phi"]) == {"['learning_rate']", "['momentum']", "['weight_decay']"}
    done = summary(run)
    assert done["meta_steps_run"] == 5 and done["stop_reason"] == "meta_steps"
    assert done["final_val_loss"] == history.final.val_loss
    assert done["best_val_loss"] == history.best.val_loss
    assert done["best_meta_step"] == history.best.meta_step
    assert done["initial_val_loss"] == history.records[0]["val_loss"]
    assert done["initial_hparams"]["learning_rate"] == pytest.approx(0.5, rel=1e-12)
    assert done["final_hparams"]["learning_rate"] == pytest.approx(
        float(history.final.hparams["learning_rate"]), rel=1e-12)
    state, meta = files.load_checkpoint(run / files.CHECKPOINT, history.state)
    assert meta["meta_step"] == 5 and len(meta["clock"]) == 5
    np.testing.assert_array_equal(state.phi["learning_rate"],
                                  history.state.phi["learning_rate"])
    # hypergrad plot redraws it from the files
    (run / "val_loss.png").unlink()
    assert main(["plot", str(run)]) == 0
    assert (run / "val_loss.png").is_file()


@pytest.mark.parametrize("save_every", [1, 2])
def test_a_killed_run_resumes_equal_to_an_uninterrupted_one(tmp_path, save_every):
    task = logreg_task(steps=6)
    whole = local(task, workdir=tmp_path / "whole", save_every=save_every)
    run = tmp_path / "run"
    with pytest.raises(Killed):
        local(task, workdir=run, save_every=save_every, callback=kill_after(2))
    assert len(lines(run)) == 3  # meta-steps 0, 1, 2 were logged
    _, meta = files.load_checkpoint(run / files.CHECKPOINT, whole.state)
    assert meta["meta_step"] == (3 if save_every == 1 else 2)
    assert not (run / "history.json").exists() and not (run / "lock").exists()
    seen = []
    resumed = local(task, workdir=run, save_every=save_every,
                    callback=lambda r, s: seen.append(r["meta_step"]))
    assert seen == list(range(meta["meta_step"], 5))  # only the steps after the checkpoint
    assert len(resumed) == 5
    assert no_seconds(resumed.to_json()) == no_seconds(whole.to_json())
    np.testing.assert_array_equal(resumed.val_loss, whole.val_loss)
    np.testing.assert_array_equal(resumed.accepted, whole.accepted)
    for name in ("learning_rate", "momentum", "weight_decay"):
        np.testing.assert_array_equal(resumed.hparams[name], whole.hparams[name])
    # the start, rebuilt from the checkpoint (the resumed loop never saw meta-step 0)
    assert (resumed.start.meta_step, resumed.start.val_loss, resumed.start.member) == (
        0, whole.start.val_loss, None)
    np.testing.assert_array_equal(resumed.start.phi["momentum"], whole.start.phi["momentum"])
    assert resumed.final.val_loss == whole.final.val_loss
    assert np.all(np.diff(resumed.clock) >= 0) and len(resumed.clock) == 5
    # not kept in the files: NaN before the resume, as evaluated after it
    assert np.isnan(resumed.hypergrad["learning_rate"][0])
    np.testing.assert_array_equal(resumed.hypergrad["learning_rate"][-1],
                                  whole.hypergrad["learning_rate"][-1])
    # and the files are the uninterrupted run's
    assert no_seconds(lines(run)) == no_seconds(lines(tmp_path / "whole"))
    assert summary(run) == summary(tmp_path / "whole")
    assert hg.History.load(run / "history.json") == resumed


def test_a_finished_run_goes_on_to_more_meta_steps_and_is_returned_as_saved(tmp_path):
    task = logreg_task(steps=6)
    whole = local(task)
    run = tmp_path / "run"
    first = local(task, workdir=run, meta_steps=3)
    assert len(first) == 3
    later = local(task, workdir=run, meta_steps=5)  # meta_steps may change on a resume
    assert no_seconds(later.to_json()) == no_seconds(whole.to_json())
    assert json.loads((run / "config.json").read_text())["meta_steps"] == 5
    text = (run / "metrics.jsonl").read_text()
    again = local(task, workdir=run, meta_steps=5,
                  callback=lambda r, s: pytest.fail("a finished run trained again"))
    assert again == later  # read back from history.json
    assert (run / "metrics.jsonl").read_text() == text
    np.testing.assert_array_equal(again.state.phi["momentum"], later.state.phi["momentum"])


def test_a_population_resumes_exactly(tmp_path):
    task = logreg_task(steps=6)
    whole = local(task, population=2, meta_steps=4, workdir=tmp_path / "whole")
    run = tmp_path / "run"
    with pytest.raises(Killed):
        local(task, population=2, meta_steps=4, workdir=run, callback=kill_after(1))
    resumed = local(task, population=2, meta_steps=4, workdir=run)
    assert resumed.population == 2 and resumed.val_loss.shape == (4, 2)
    assert no_seconds(resumed.to_json()) == no_seconds(whole.to_json())
    np.testing.assert_array_equal(resumed.val_loss, whole.val_loss)
    assert summary(run) == summary(tmp_path / "whole")
    assert summary(run)["population"] == 2


def test_the_default_strategy_resumes_exactly(tmp_path):
    """ExploreRefine: the search scored again to its size at the checkpoint, the loop's
    memory restored; with meta_steps and no budget the run does not depend on the clock."""
    task = logreg_task(steps=6)
    whole = hg.tune(task, key=KEY, meta_steps=4, workdir=tmp_path / "whole")
    assert whole.strategy == "explore-refine"
    run = tmp_path / "run"
    with pytest.raises(Killed):
        hg.tune(task, key=KEY, meta_steps=4, workdir=run, callback=kill_after(1))
    _, meta = files.load_checkpoint(run / files.CHECKPOINT, whole.state)
    assert meta["strategy"]["evaluations"] > meta["strategy"]["explored"]  # searched on
    resumed = hg.tune(task, key=KEY, meta_steps=4, workdir=run)
    assert no_seconds(resumed.to_json()) == no_seconds(whole.to_json())
    assert resumed.start.meta_step == -1  # the plan's scored start
    assert len(resumed.explored.val_loss) == len(whole.explored.val_loss)
    assert no_seconds(lines(run)) == no_seconds(lines(tmp_path / "whole"))
    assert summary(run) == summary(tmp_path / "whole")


def snapshot(path):
    return {p.relative_to(path): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("change, named", [
    ({"outer": optax.adam(0.05)}, "outer"),
    ({"estimator": hg.estimators.truncated(3)}, "estimator"),
    ({"task": logreg_task(steps=5)}, "task"),
    ({"key": jax.random.key(1)}, "key"),
])
def test_a_workdir_of_another_call_is_refused_and_left_as_it_was(tmp_path, change, named):
    task = logreg_task(steps=6)
    run = tmp_path / "run"
    with pytest.raises(Killed):
        local(task, workdir=run, callback=kill_after(1))
    before = snapshot(run)
    args = {"task": task, "estimator": hg.estimators.reverse(), "outer": "adam", "key": KEY,
            **change}
    with pytest.raises(files.WorkdirError) as e:
        hg.tune(args.pop("task"), args.pop("estimator"), args.pop("outer"), meta_steps=5,
                workdir=run, **args)
    message = str(e.value)
    assert "\n" not in message and f"holds a run of another call ({named} " in message
    assert "choose another workdir" in message
    assert snapshot(run) == before  # nothing written, nothing lost
    resumed = local(task, workdir=run)  # the right call still resumes it
    assert len(resumed) == 5


def test_a_workdir_that_is_no_tune_run_is_refused(tmp_path):
    task = logreg_task(steps=6)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(files.WorkdirError, match="holds no hg.tune run"):
        local(task, workdir=tmp_path)
    (tmp_path / "notes.txt").unlink()
    files.write_json(tmp_path / "config.json", {"experiment": "seed-cnn", "steps": 100})
    with pytest.raises(files.WorkdirError, match="`hypergrad run` of 'seed-cnn'"):
        local(task, workdir=tmp_path)
    with pytest.raises(ValueError, match="without state= and plan="):
        local(task, workdir=tmp_path / "new", state=local(task, meta_steps=1).state)
    with pytest.raises(ValueError, match="save_every must be at least 1"):
        local(task, workdir=tmp_path / "new", save_every=0)
    assert not (tmp_path / "new").exists()


def test_config_json_describes_the_outer_optimizer_by_its_values():
    task = logreg_task(steps=6)
    describe = lambda outer: saving.describe(  # noqa: E731
        task, hg.estimators.reverse(), outer, hg.Local(), KEY, None, devices=0, online=False,
        resample=False, clip=0.5, guard=hg.Guard(), meta_steps=1, budget=None, save_every=1)
    assert describe(optax.adam(0.05)) == describe(optax.adam(0.05))
    assert describe(optax.adam(0.05))["outer"] != describe(optax.adam(0.1))["outer"]
    assert "0.05" in json.dumps(describe(optax.adam(0.05))["outer"])


def per_layer_task():
    """A two-layer linear regression with one learning rate per layer (an array-valued
    hyperparameter: its values go to ``hparams/`` and its records hold each group's)."""
    rng = np.random.default_rng(0)
    x, xv = rng.standard_normal((16, 3)), rng.standard_normal((8, 3))
    params = {"hidden": {"w": rng.standard_normal((3, 2)) * 0.5},
              "out": {"w": rng.standard_normal(2) * 0.5}}

    def mse(p, hparams, batch):
        xb, yb = batch
        return jnp.mean((xb @ p["hidden"]["w"] @ p["out"]["w"] - yb) ** 2)

    space = hg.HyperSpace({"learning_rate": hg.positive(0.05, per="layer")})
    return hg.Task(params=params, train_loss=mse, val_loss=mse,
                   train_data=(x, x @ np.ones(3)), val_data=(xv, xv @ np.ones(3)),
                   space=space, optimizer=hg.inner.sgd(), steps=4)


def test_sigint_checkpoints_and_raises_then_the_run_resumes_exactly(tmp_path):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are installed from the main thread only")
    task = per_layer_task()
    whole = local(task, meta_steps=4, workdir=tmp_path / "whole")
    run = tmp_path / "run"

    def interrupt(record, state):
        if record["meta_step"] == 1:  # as Ctrl-C while meta-step 2 computes
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(saving.Interrupted, match="after meta-step 2; checkpoint saved"):
        local(task, meta_steps=4, workdir=run, callback=interrupt)
    _, meta = files.load_checkpoint(run / files.CHECKPOINT, whole.state)
    assert meta["meta_step"] == 3
    assert sorted(p.name for p in (run / "hparams").iterdir()) == [
        f"meta_step_0000{i}.npz" for i in range(4)]
    resumed = local(task, meta_steps=4, workdir=run)
    assert no_seconds(resumed.to_json()) == no_seconds(whole.to_json())
    # per-layer values before the resume come back from the records' groups
    np.testing.assert_array_equal(resumed.hparams["learning_rate"],
                                  whole.hparams["learning_rate"])
    assert sorted(p.name for p in (run / "hparams").iterdir()) == [
        f"meta_step_0000{i}.npz" for i in range(5)]
    with np.load(run / "hparams" / "meta_step_00004.npz") as a, \
            np.load(tmp_path / "whole" / "hparams" / "meta_step_00004.npz") as b:
        np.testing.assert_array_equal(a["learning_rate"], b["learning_rate"])
