"""Smoke tests of the built-in experiments on tiny configs, through the real command."""

import json

import pytest

import hypergrad as hg
from hypergrad.cli import main


def test_list_names_every_experiment(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("seed-cnn", "grazzi-hierarchy", "hoag", "baydin-hd", "seed-recurrence",
                 "maclaurin-schedules", "hyper-cleaning", "augment", "chaos"):
        assert name in out


def test_grazzi_hierarchy_tiny(tmp_path, capsys):
    workdir = tmp_path / "g"
    assert main(["run", "grazzi-hierarchy", "--set", "steps=300", "--set", "iterations=1,8",
                 "--set", "repeats=1", "--workdir", str(workdir), "--quiet"]) == 0
    results = json.loads((workdir / "results.json").read_text())
    assert set(results) == {"reverse", "cg", "fixed_point", "neumann"}
    for r in results.values():
        assert r["t"] == [1, 8] and len(r["rel_error"]) == 2
    # Conjugate gradient is the most accurate at equal iterations; K Neumann terms equal
    # K fixed-point iterations from zero.
    assert results["cg"]["rel_error"][1] < results["fixed_point"]["rel_error"][1]
    assert results["cg"]["rel_error"][1] < results["reverse"]["rel_error"][1]
    assert abs(results["neumann"]["rel_error"][1] - results["fixed_point"]["rel_error"][1]) < 1e-9
    assert (workdir / "hierarchy.png").stat().st_size > 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["t_max"] == 8
    # `hypergrad plot` redraws the figure from results.json alone.
    out = tmp_path / "redrawn"
    assert main(["plot", str(workdir), "--out", str(out)]) == 0
    assert (out / "hierarchy.png").stat().st_size > 0


def test_every_self_contained_experiment_can_redraw_its_figures():
    from hypergrad.experiment import experiments

    for name, exp in experiments().items():
        assert (exp.main is None) == (exp.plot is None), name


def test_grazzi_hierarchy_cannot_resume(tmp_path, capsys):
    assert main(["run", "grazzi-hierarchy", "--resume", "--workdir", str(tmp_path)]) == 2
    assert "no run to resume" in capsys.readouterr().err


def test_hoag_tiny(tmp_path, capsys):
    workdir = tmp_path / "h"
    assert main(["run", "hoag", "--set", "meta_steps=12", "--set", "data.train_size=300",
                 "--set", "data.val_size=200", "--workdir", str(workdir), "--quiet"]) == 0
    results = json.loads((workdir / "results.json").read_text())
    for name in ("hoag", "grid", "random"):
        r = results[name]
        assert len(r["seconds"]) == 12 and r["seconds"] == sorted(r["seconds"])
        # Every incumbent scores no better than the reference optimum.
        assert min(r["incumbent_val_loss"]) >= results["reference"]["val_loss"] - 1e-12
    hoag = results["hoag"]
    assert hoag["tol"][0] > hoag["tol"][-1]  # the tolerance decreases
    summary = json.loads((workdir / "summary.json").read_text())
    # HOAG moves from its start (log l2 = log 0.02 = -3.9) to within 0.5 of the optimum;
    # this grid's spacing (16 / 11) is too coarse to compare with its best point here.
    assert abs(summary["hoag_log_l2"] - summary["optimal_log_l2"]) < 0.5
    assert abs(summary["hoag_log_l2"] - results["hoag"]["log_l2"][0]) > 4
    assert summary["suboptimality"]["hoag"] < results["hoag"]["incumbent_val_loss"][0] - \
        results["reference"]["val_loss"]
    assert (workdir / "suboptimality.png").stat().st_size > 0


def test_hoag_hypergradient_matches_central_differences():
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from hypergrad_experiments import hoag

    config = hoag.HoagConfig(data_train_size=200, data_val_size=100).validate()
    task = hoag.build(config).task
    solve = jax.jit(lambda phi: hoag.inner_solve(task, phi, task.params, 1e-11, 5000)[0])
    phi = {"l2": jnp.asarray(-5.0)}
    w = solve(phi)
    q0 = jnp.zeros_like(ravel_pytree(w)[0])
    _, grad, _, _, residual = hoag.implicit_hypergrad(task, phi, w, q0, 1e-11, 2000)
    assert residual <= 1e-11

    def val(x):
        p = {"l2": jnp.asarray(x)}
        return task.val_loss(solve(p), task.space.constrain(p), task.val_data)

    eps = 1e-4
    numeric = (val(-5.0 + eps) - val(-5.0 - eps)) / (2 * eps)
    assert abs(float(grad["l2"]) - float(numeric)) <= 1e-6 * abs(float(numeric))


def test_hoag_bad_values_are_config_errors(tmp_path, capsys):
    assert main(["run", "hoag", "--set", "tol_decay=1.5", "--workdir", str(tmp_path)]) == 2
    assert "tol_decay" in capsys.readouterr().err
    assert main(["run", "hoag", "--set", "l2=10", "--workdir", str(tmp_path)]) == 2
    assert "log_l2_high" in capsys.readouterr().err


def test_baydin_hd_tiny(tmp_path, capsys):
    workdir = tmp_path / "b"
    assert main(["run", "baydin-hd", "--set", "steps=100", "--set", "alphas=1e-1,1e-3",
                 "--set", "betas=1e-3,1e-1", "--set", "models=logreg",
                 "--set", "target_logreg=1.0", "--set", "dtype=float64",
                 "--workdir", str(workdir), "--quiet"]) == 0
    results = json.loads((workdir / "results.json").read_text())
    assert set(results["runs"]) == {"logreg/sgd", "logreg/sgdn", "logreg/adam"}
    sgd = results["runs"]["logreg/sgd"]
    assert len(sgd["iterations_hd"]) == 2 and len(sgd["iterations_hd"][0]) == 2
    # At alpha_0 = 1e-3 plain SGD does not reach the loss in 100 steps; with beta = 0.1
    # hypergradient descent raises the learning rate until it does.
    assert sgd["iterations_plain"][1] is None
    assert sgd["iterations_hd"][1][1] is not None
    assert sgd["final_lr_hd"][1][1] > 1e-2
    assert (workdir / "iterations.png").stat().st_size > 0


def test_baydin_hd_beta_zero_is_the_plain_optimizer():
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from hypergrad_experiments import baydin_hd

    config = baydin_hd.BaydinConfig(steps=20, eval_every=5, data_train_size=200,
                                     dtype="float64").validate()
    task = baydin_hd.build(config, "logreg").task
    run = baydin_hd.make_grid_run(task, "sgd", 20, 5, 0.9)
    key = jax.random.key(0)
    losses, lrs = run(jnp.asarray([0.1]), jnp.asarray([0.0]), key)
    # The same 20 minibatches by plain optax SGD.
    idx = baydin_hd.batch_indices(key, task.num_examples, task.batch_size, 20)
    params, opt = task.params, optax.sgd(0.1)
    state = opt.init(params)
    for i in idx:
        batch = jax.tree.map(lambda a, i=i: a[i], task.train_data)
        updates, state = opt.update(jax.grad(task.train_loss)(params, {}, batch), state)
        params = optax.apply_updates(params, updates)
    expected = task.train_loss(params, {}, task.train_data)
    np.testing.assert_allclose(losses[0, -1], expected, rtol=1e-10)
    np.testing.assert_allclose(lrs[0], 0.1)


def test_iterations_to_marks_divergence_and_misses_as_not_reached():
    import numpy as np

    from hypergrad_experiments.baydin_hd import iterations_to

    losses = np.array([[2.0, 0.9, 0.4], [2.0, np.nan, 0.1], [2.0, 1.5, 1.2]])
    assert iterations_to(losses, 0.5, 10) == [20, 20, None]
    losses = np.array([[2.0, np.inf, np.nan]])
    assert iterations_to(losses, 0.5, 10) == [None]


SEED_TINY = ["--set", "steps=3", "--set", "meta_steps=4", "--set", "batch_size=20",
             "--set", "channels=4,4,4", "--set", "data.train_size=200",
             "--set", "data.val_size=100", "--set", "dtype=float64", "--quiet"]


def test_seed_recurrence_tiny_follows_the_formula(tmp_path, capsys):
    import math

    workdir = tmp_path / "r"
    assert main(["run", "seed-recurrence", *SEED_TINY, "--workdir", str(workdir)]) == 0
    results = json.loads((workdir / "results.json").read_text())
    rec, gd = results["recurrence"], results["gd"]
    assert rec["stopped"] is None and len(rec["slope"]) == 5
    # a_t = a_{t-1} + a_{t-2} (exp(b_t) - b_{t-1}) with a_{-1} = b_{-1} = 0, where b_t is
    # the hypergradient recorded at meta-step t (taken at a_t, applied to reach a_{t+1}).
    a, b = [0.0, *rec["slope"]], [0.0, *rec["hypergrad"]]
    for t in range(1, len(a) - 1):
        assert math.isclose(a[t + 1], a[t] + a[t - 1] * (math.exp(b[t]) - b[t - 1]),
                            rel_tol=1e-12)
    # Gradient descent: a_{t+1} = a_t - outer_lr * b_t with outer_lr = 1.
    for t in range(len(gd["slope"]) - 1):
        assert math.isclose(gd["slope"][t + 1], gd["slope"][t] - gd["hypergrad"][t],
                            rel_tol=1e-12)
    assert (workdir / "trajectories.png").stat().st_size > 0


def test_seed_recurrence_stops_before_a_bad_slope_reaches_the_run():
    import jax

    import hypergrad as hg
    from hypergrad_experiments import seed_recurrence as sr

    tiny = dict(steps=3, meta_steps=4, batch_size=20, channels="4,4,4", data_train_size=200,
                data_val_size=100, dtype="float64")
    opt, key = hg.outer.fibonacci_recurrence(), jax.random.key(0)
    config = sr.SeedRecurrenceConfig(**tiny, max_slope=0.015).validate()
    out = sr.trajectory(sr.build(config).task, opt, config, key)
    assert "beyond max_slope" in out["stopped"]
    assert out["slope"] == [0.01, 0.01]  # a_2 = 0.02 was refused
    config = sr.SeedRecurrenceConfig(**tiny, learning_rate=1e9).validate()
    out = sr.trajectory(sr.build(config).task, opt, config, key)
    assert "non-finite" in out["stopped"]
    assert out["slope"] == [0.01] and out["val_loss"] == [None]  # never updated


def test_maclaurin_schedules_tiny(tmp_path, capsys):
    workdir = tmp_path / "m"
    assert main(["run", "maclaurin-schedules", "--set", "steps=10", "--set", "meta_steps=3",
                 "--set", "grid_points=4", "--set", "batch_size=50",
                 "--set", "data.train_size=200", "--set", "data.val_size=100",
                 "--workdir", str(workdir), "--quiet"]) == 0
    results = json.loads((workdir / "results.json").read_text())
    # One learning rate and one momentum per layer (3) and per step (10).
    for name in ("learning_rate", "momentum"):
        assert len(results["schedules"][name]) == 10
        assert all(len(row) == 3 for row in results["schedules"][name])
    assert results["groups"] == ["layers/0", "layers/1", "layers/2"]
    assert len(results["tuned"]["val_loss"]) == 3 and len(results["grid"]["val_loss"]) == 4
    # The schedules moved from their start (log lr -1, momentum 0.5 everywhere).
    assert results["final_schedules"] != results["initial_schedules"]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["best_val_loss"] <= summary["initial_val_loss"]
    assert (workdir / "schedules.png").stat().st_size > 0
    assert sorted(p.name for p in (workdir / "hparams").iterdir()) == [
        "meta_step_00000.npz", "meta_step_00003.npz"]


def test_maclaurin_schedules_reversible_matches_reverse():
    # The experiment named after reversible learning runs it: per-layer, per-step learning
    # rates and momenta, exact to the fixed point's resolution (float64, radix 2**-40).
    import jax
    import numpy as np

    from hypergrad.experiment import estimator_for
    from hypergrad_experiments import maclaurin_schedules as ms

    config = ms.MaclaurinConfig(steps=10, batch_size=50, data_train_size=200,
                                data_val_size=100, dtype="float64",
                                estimator="reversible").validate()
    task = ms.build(config).task
    phi, key = task.space.init(np.float64), jax.random.key(0)
    value, grad, _ = jax.jit(estimator_for(config))(task, phi, key)
    ref_value, ref, _ = jax.jit(hg.estimators.reverse())(task, phi, key)
    np.testing.assert_allclose(value, ref_value, rtol=1e-9)
    for name in ("learning_rate", "momentum"):
        for a, b in zip(jax.tree.leaves(grad[name]), jax.tree.leaves(ref[name]), strict=True):
            assert a.shape == (10, 3)  # one value per step and layer
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9 * np.abs(b).max())


def test_maclaurin_schedules_bad_values_are_config_errors(tmp_path, capsys):
    assert main(["run", "maclaurin-schedules", "--set", "grid_low=2",
                 "--workdir", str(tmp_path)]) == 2
    assert "grid_low" in capsys.readouterr().err
    assert main(["run", "maclaurin-schedules", "--set", "estimator=implicit",
                 "--workdir", str(tmp_path)]) == 2
    assert "estimator" in capsys.readouterr().err


def test_hyper_cleaning_tiny(tmp_path, capsys):
    workdir = tmp_path / "c"
    assert main(["run", "hyper-cleaning", "--set", "steps=30", "--set", "meta_steps=3",
                 "--set", "data.train_size=100", "--set", "data.val_size=60",
                 "--set", "methods=reverse,truncated:1,truncated:30,implicit",
                 "--workdir", str(workdir), "--quiet"]) == 0
    results = json.loads((workdir / "results.json").read_text())
    assert sum(results["corrupted"]) == 50
    methods = results["methods"]
    assert set(methods) == {"reverse", "truncated:1", "truncated:30", "implicit"}
    # A window as long as the run is the full reverse hypergradient.
    assert methods["truncated:30"]["weights"] == pytest.approx(methods["reverse"]["weights"],
                                                              abs=1e-9)
    for m in methods.values():
        assert 0 <= m["f1"] <= 1 and m["peak_bytes"] > 0 and len(m["weights"]) == 100
    # Backpropagating through 30 steps holds more memory than through one.
    assert methods["reverse"]["peak_bytes"] > methods["truncated:1"]["peak_bytes"]
    base = results["baselines"]
    assert base["oracle"]["test_accuracy"] > base["uniform"]["test_accuracy"]
    for name in ("weights.png", "methods.png"):
        assert (workdir / name).stat().st_size > 0


def test_hyper_cleaning_corruption_and_f1():
    import numpy as np

    from hypergrad_experiments.hyper_cleaning import corrupt_labels, f1_corrupted

    y = np.arange(200) % 10
    noisy, corrupted = corrupt_labels(y, 0.5, 10, seed=3)
    assert corrupted.sum() == 100
    assert np.all(noisy[corrupted] != y[corrupted]) and np.all(noisy[~corrupted] == y[~corrupted])
    assert np.array_equal(corrupt_labels(y, 0.5, 10, seed=3)[0], noisy)  # seeded
    scores = f1_corrupted(np.where(corrupted, -1.0, 1.0), corrupted)
    assert scores == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert f1_corrupted(np.zeros(200), corrupted)["f1"] == 0.0  # w = 0 flags nothing


def test_hyper_cleaning_bad_values_are_config_errors(tmp_path, capsys):
    assert main(["run", "hyper-cleaning", "--set", "methods=truncated:0",
                 "--workdir", str(tmp_path)]) == 2
    assert "methods" in capsys.readouterr().err
    assert main(["run", "hyper-cleaning", "--set", "batch_size=10",
                 "--workdir", str(tmp_path)]) == 2
    assert "batch_size" in capsys.readouterr().err


def test_seed_cnn_scores_the_test_split_in_the_validation_chunks():
    import dataclasses

    import jax
    import numpy as np

    from hypergrad_experiments import seed_cnn

    config = seed_cnn.SeedCnnConfig(steps=3, data_train_size=100, data_val_size=30,
                                    data_test_size=53, channels="2,2,2",
                                    dtype="float64").validate()
    problem = seed_cnn.build(config)
    hparams = problem.task.space.constrain(problem.task.space.init())
    params = problem.task.init_params(jax.random.key(0), hparams)
    whole = problem.evaluate(params, hparams)
    for size in (7, 10):  # 53 test images: a remainder either way
        chunked = seed_cnn.build(dataclasses.replace(config, val_batch_size=size)).evaluate(
            params, hparams)
        for name in ("test_loss", "test_accuracy"):
            np.testing.assert_allclose(chunked[name], whole[name], rtol=1e-13, err_msg=name)
    assert 0 < float(whole["test_accuracy"]) < 1
