"""scripts/bench_hpo.py and scripts/bench_problems.py: the problems, the methods, and smoke
runs of every problem but a and b."""

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


@pytest.fixture(scope="module")
def problems():
    return load_script("bench_problems")


def test_problem_b_has_one_learning_rate_and_weight_decay_per_layer(problems):
    task = problems.problem_b(quick=True).task
    for name in ("learning_rate", "weight_decay"):
        layout = task.space.constraints[name].layout
        assert layout.groups == ("convs/0", "convs/1", "convs/2", "head")
    assert task.space.init()["learning_rate"].shape == (4,)


def test_every_method_runs_by_default(bench):
    methods = bench.methods_for("c")
    assert {*bench.HYPERGRAD, *bench.LR_FREE, "random", "tpe", "optuna-hyperband"} - set(
        methods) == ({"hypergrad-default"} if not bench.default_tuner_ready() else set())
    assert "grid" not in methods and "grid" in bench.methods_for("a")


def test_quick_run_of_problem_c(bench, tmp_path):
    # The hypergradient methods and random search (the learning-rate-free optimizers and
    # Hyperband run in the tests of e to h, which are cheaper).
    out, fig = tmp_path / "bench.json", tmp_path / "bench.png"
    methods = [m for m in bench.methods_for("c") if m.startswith("hypergrad") or m == "random"]
    report = bench.main(["--quick", "--problems", "c", "--budget", "1", "--methods",
                         ",".join(methods), "--json", str(out), "--figure", str(fig)])
    saved = json.loads(out.read_text())
    assert set(saved) == {"settings", "c"} and fig.stat().st_size > 0
    c = saved["c"]
    assert c["num_hparams"] == 64
    assert set(c["methods"]) == {*methods, "tpe"}
    # The explore strategy's trace starts with its random draws (2 in a quick run).
    assert c["methods"]["hypergrad-explore"]["evaluations"] >= 2
    for m in c["methods"].values():
        assert len(m["seconds"]) == len(m["val_loss"]) == m["evaluations"] >= 1
        if "error" in m:  # a method that reported no point (the default tuner's TuneError)
            assert m["best_val_loss"] is None and m["test_loss"] is None
            continue
        finite = [v for v in m["val_loss"] if v is not None]
        assert m["best_val_loss"] == min(finite) and np.isfinite(m["test_loss"])
    tpe = c["methods"]["tpe"]
    assert c["tpe_best_val_loss"] == tpe["best_val_loss"]
    assert tpe["fraction_of_tpe_time"] <= 1.0  # TPE reaches its own best within its time
    # time_fraction is the best hypergradient method's time to TPE's best over TPE's time.
    reach = [c["methods"][m]["time_to_tpe_best"] for m in methods if m in bench.HYPERGRAD]
    reach = [t for t in reach if t is not None]
    expected = min(reach) / c["tpe_seconds"] if reach else None
    assert c["time_fraction"] == expected
    assert report["c"]["time_fraction"] == expected


def test_problem_d_lifts_b_and_black_box_methods_search_the_reduction(bench, problems,
                                                                       tmp_path):
    d, b = problems.problem_d(quick=True), problems.problem_b(quick=True)
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
    assert saved["num_hparams"] == problems.size(d) > saved["black_box_num_hparams"] == 10
    assert set(saved["methods"]) == {"hypergrad-adam-0.2", "random", "tpe"}
    # Black-box choices are scored in b's space, the hypergradient's in d's (a phi of one
    # space does not fit the other's task: scoring in the wrong one fails on shapes).
    for m in saved["methods"].values():
        assert np.isfinite(m["best_val_loss"]) and np.isfinite(m["test_loss"])
    assert report["d"]["tpe_best_val_loss"] == saved["methods"]["tpe"]["best_val_loss"]


def test_a_b_configuration_lifted_into_d_trains_the_same(problems):
    """d's space holds b's: a per-layer learning rate repeated at every step and each
    layer's weight decay on every one of its parameters give the same training run and
    validation loss as the (b) configuration itself."""
    d, b = problems.problem_d(quick=True), problems.problem_b(quick=True)
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


def test_data_runs_the_cnn_problems_on_mnist_files(bench, problems, tmp_path, capsys):
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
    task = problems.problem_b(quick=True, data=f"idx:{MNIST_DIR}").task
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


# --------------------------------------------------------------------------------------
# The problems e to h and the methods added with them


def finite(x):
    return x is not None and np.isfinite(x)


def test_quick_run_of_problem_e_regression_has_no_accuracy(bench, tmp_path):
    out = tmp_path / "bench.json"
    lr_free = ["optax-dadapt-adamw", "optax-dog", "optax-dowg", "optax-schedule-free-adamw"]
    report = bench.main(["--quick", "--problems", "e", "--budget", "1", "--methods",
                         ",".join(["hypergrad-adam-0.2", *lr_free]), "--json", str(out)])
    saved = json.loads(out.read_text())  # strict JSON (written with allow_nan=False)
    e = saved["e"]
    assert e["num_hparams"] == 3 and "black_box_num_hparams" not in e
    assert list(e["methods"]) == ["hypergrad-adam-0.2", "tpe", *lr_free]
    for m in e["methods"].values():
        assert "test_accuracy" not in m
        assert finite(m["best_val_loss"]) and finite(m["test_loss"])
        assert finite(m["choice_val_loss"])
    # A learning-rate-free optimizer is one untuned training run: one evaluation, whose
    # validation loss its choice reproduces (the same key, the same program).
    for method in lr_free:
        m = e["methods"][method]
        assert m["evaluations"] == len(m["seconds"]) == 1 and m["best_hparams"] == {}
        np.testing.assert_allclose(m["choice_val_loss"], m["best_val_loss"], rtol=1e-6)
    assert finite(e["start"]["val_loss"]) and "rescored" not in e["start"]
    assert e["targets"] is None and report["e"]["targets"] is None


def test_quick_run_of_problem_f_rescores_every_choice_on_four_fresh_keys(bench, tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--problems", "f", "--budget", "1", "--methods", "optax-dowg",
                "--json", str(out)])
    f = json.loads(out.read_text())["f"]
    assert f["num_hparams"] == 3 and set(f["methods"]) == {"tpe", "optax-dowg"}
    for entry in (f["start"], *f["methods"].values()):
        s = entry["rescored"]
        assert s["keys"] == 4
        for name in ("val_loss", "test_loss", "test_accuracy"):
            assert finite(s[f"{name}_mean"]) and finite(s[f"{name}_stderr"])
        # Fresh keys draw other noise and minibatches than the search's key: the losses
        # vary over them, and their mean is not the search key's value.
        assert s["val_loss_stderr"] > 0 and s["val_loss_mean"] != entry.get(
            "choice_val_loss", entry.get("val_loss"))
    assert "| f | tpe | 4 |" in bench.table({"f": f})


def test_fresh_keys_are_none_of_the_keys_a_search_uses(problems):
    data = jax.random.key_data
    used = [jax.random.key(0), *(jax.random.fold_in(jax.random.key(0), t) for t in range(50))]
    fresh = problems.fresh_keys(0, 4)
    assert fresh.shape == (4,)
    for k in fresh:
        assert not any(np.array_equal(data(k), data(u)) for u in used)


def test_warmup_cosine_is_optax_schedule_and_differentiable_in_the_fraction(problems):
    import optax

    ours = problems.warmup_cosine(0.1, 0.2, 20)  # a warm-up of 4 steps
    theirs = optax.warmup_cosine_decay_schedule(0.0, 0.1, 4, 20)
    for t in range(21):
        np.testing.assert_allclose(float(ours(t)), float(theirs(t)), rtol=1e-6, atol=1e-12)
    d_fraction = jax.grad(lambda f: sum(problems.warmup_cosine(0.1, f, 20)(t)
                                        for t in range(20)))
    assert abs(float(d_fraction(0.2))) > 1e-3


def test_quick_run_of_problem_g_with_hyperband(bench, tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--problems", "g", "--budget", "1.5", "--methods",
                "optuna-hyperband,optax-prodigy", "--json", str(out)])
    g = json.loads(out.read_text())["g"]
    assert g["num_hparams"] == 3
    assert set(g["start"]) == {"val_loss", "test_loss"}
    assert set(g["methods"]["tpe"]["best_hparams"]) == {
        "peak_learning_rate", "weight_decay", "warmup_fraction"}
    band = g["methods"]["optuna-hyperband"]
    assert band["evaluations"] >= 1 and band["seconds"] == sorted(band["seconds"])
    done = [v for v in band["val_loss"] if v is not None]
    assert done and band["best_val_loss"] == min(done)
    assert g["methods"]["optax-prodigy"]["evaluations"] == 1


def test_hyperband_prunes_and_records_pruned_trials_as_inf(bench, problems):
    task = problems.problem_e(quick=True).task
    r = bench.optuna_hyperband(task, jax.random.key(0), seed=0, num_trials=24)
    assert r.method == "optuna-hyperband" and r.val_loss.shape == r.seconds.shape == (24,)
    assert jax.tree.leaves(r.phi)[0].shape[0] == 24
    pruned = np.isinf(r.val_loss)
    assert pruned.any() and not pruned.all() and np.isfinite(r.best_val_loss)
    # The best completed trial is a full training run of its configuration.
    from hypergrad.unroll import objective

    whole = float(objective(task, jax.tree.map(jnp.asarray, r.best_phi), jax.random.key(0))[0])
    np.testing.assert_allclose(r.best_val_loss, whole, rtol=1e-5)


def test_hyperband_chunks_train_the_same_run_as_one_unroll(bench, problems):
    from hypergrad.unroll import objective

    task = problems.problem_e(quick=True).task  # T = 20: four chunks of 5 steps
    phi = jax.tree.map(lambda p: p + 0.3, task.space.init(jnp.float32))
    key = jax.random.key(0)
    state, data_key = bench._begin(task, phi, key)
    losses = []
    for begin in range(0, task.steps, 5):
        state, value = bench._chunk(task, phi, state, data_key, begin, 5)
        losses.append(float(value))
    whole = float(objective(task, phi, key)[0])
    np.testing.assert_allclose(losses[-1], whole, rtol=1e-5)
    assert losses[0] != losses[-1]


def test_quick_run_of_problem_h_black_box_search_one_shared_weight(bench, problems,
                                                                  tmp_path):
    h, shared = problems.problem_h(quick=True), problems.problem_h_shared(quick=True)
    assert problems.size(h) == 1000 and problems.size(shared) == 1
    # The shared weight is h's subspace: the same value for every example trains alike.
    key = jax.random.key(0)
    from hypergrad.unroll import objective

    one = {"example_weight": jnp.asarray(0.7, jnp.float32)}
    every = {"example_weight": jnp.full((1000,), 0.7, jnp.float32)}
    np.testing.assert_allclose(float(objective(shared.task, one, key)[0]),
                               float(objective(h.task, every, key)[0]), rtol=1e-6)

    out = tmp_path / "bench.json"
    bench.main(["--quick", "--problems", "h", "--budget", "1", "--methods",
                "hypergrad-adam-0.2,optax-cocob", "--json", str(out)])
    saved = json.loads(out.read_text())["h"]
    assert saved["num_hparams"] == 1000 and saved["black_box_num_hparams"] == 1
    methods = saved["methods"]
    # Summaries of 1000 weights for the hypergradient, one number for the black box.
    assert set(methods["hypergrad-adam-0.2"]["best_hparams"]["example_weight"]) >= {
        "mean", "min", "max"}
    assert isinstance(methods["tpe"]["best_hparams"]["example_weight"], float)
    assert methods["optax-cocob"]["evaluations"] == 1
    for m in methods.values():
        assert finite(m["best_val_loss"]) and finite(m["test_loss"])
        assert 0 <= m["test_accuracy"] <= 1


def test_lr_free_task_keeps_the_hyperparameters_the_model_reads(bench, problems):
    import optax

    f = problems.problem_f(quick=True).task
    task = bench.lr_free_task(f, optax.contrib.prodigy)
    assert task.space.names == ("dropout", "augment_noise")
    assert task.optimizer.name == "optax.prodigy"
    e = problems.problem_e(quick=True).task
    assert bench.lr_free_task(e, optax.contrib.dog).space.names == ()


def test_targets_compare_the_default_tuner_with_tpe_lr_free_and_start(bench):
    def entry(val, test):
        return {"choice_val_loss": val, "test_loss": test}

    p = {"start": {"val_loss": 1.0, "test_loss": 1.1},
         "methods": {"hypergrad-default": entry(0.505, 0.60), "tpe": entry(0.50, 0.61),
                     "optax-dog": entry(0.7, 0.7), "optax-prodigy": entry(None, None)}}
    t = bench.targets(p)
    assert t["within_2pct_of_tpe"] and t["test_no_worse_than_tpe"]
    assert t["below_every_lr_free"] and t["not_worse_than_start"]  # a diverged one is beaten
    p["methods"]["hypergrad-default"] = entry(0.52, 0.62)
    p["methods"]["optax-dog"] = entry(0.51, 0.5)
    t = bench.targets(p)
    assert not t["within_2pct_of_tpe"] and not t["test_no_worse_than_tpe"]
    assert not t["below_every_lr_free"] and t["not_worse_than_start"]
    # Rescored problems compare the means over fresh keys.
    p["methods"]["hypergrad-default"]["rescored"] = {"val_loss_mean": 0.49,
                                                     "test_loss_mean": 0.6}
    p["methods"]["tpe"]["rescored"] = {"val_loss_mean": 0.5, "test_loss_mean": 0.6}
    p["start"]["rescored"] = {"val_loss_mean": 0.45, "test_loss_mean": 0.5}
    t = bench.targets(p)
    assert t["within_2pct_of_tpe"] and not t["not_worse_than_start"]
    assert "NO" in bench.targets_text({"e": {**p, "targets": t}})
    del p["methods"]["hypergrad-default"]
    assert bench.targets(p) is None


def test_hypergrad_default_runs_the_default_tuner(bench, monkeypatch):
    import hypergrad as hg
    from hypergrad.search import SearchResult

    problem = load_script("bench_problems").problem_e(quick=True)
    phi = problem.task.space.init(jnp.float32)
    seen = {}

    class History:
        best = type("Point", (), {"phi": phi})()

        def trace(self):
            stacked = jax.tree.map(lambda a: np.stack([a, a + 1]), phi)
            return SearchResult("explore", stacked, np.array([0.5, 0.4]), np.array([1.0, 2.0]))

    def tune(task, **kw):
        seen.update(kw)
        return History()

    monkeypatch.setattr(hg, "tune", tune)
    run = bench.hypergrad_default(problem, jax.random.key(0), 3.0)
    assert set(seen) == {"key", "budget"} and seen["budget"] == 3.0
    assert run.trace.method == "hypergrad-default" and run.task is problem.task
    assert run.phi is phi and run.error is None  # the History's best, not the trace's

    def fails(task, **kw):
        raise hg.TuneError("no meta-step was accepted")

    monkeypatch.setattr(hg, "tune", fails)
    run = bench.hypergrad_default(problem, jax.random.key(0), 3.0)
    assert run.error == "TuneError: no meta-step was accepted"
    assert run.trace.val_loss.tolist() == [np.inf]
    monkeypatch.undo()
    if not bench.default_tuner_ready():
        pytest.skip("hg.tune(task, key=, budget=) with History.trace() is not written yet")
    # 10 s: with 1-2 s (less than its compilation) hg.tune spends the budget before its
    # first meta-step and raises TuneError (the error path above).
    real = bench.hypergrad_default(problem, jax.random.key(0), 10.0)
    assert real.error is None and real.trace.method == "hypergrad-default"
    assert np.isfinite(real.trace.best_val_loss) and np.all(np.diff(real.trace.seconds) >= 0)
    assert jax.tree.structure(real.phi) == jax.tree.structure(phi)
