"""hg.tune: the one loop. Guards, final and best points, populations of one, History."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import hypergrad as hg
from tests.problems import quadratic_task


def exploding(estimator, above):
    """``estimator`` whose hypergradient is multiplied by 1e104 (finite) where the
    learning rate exceeds ``above``: an unroll that blew up and recovered."""

    def fn(task, phi, key):
        value, grad, aux = estimator(task, phi, key)
        factor = jnp.where(jnp.exp(phi["learning_rate"]) > above, 1e104, 1.0)
        return value, jax.tree.map(lambda g: g * factor, grad), aux

    return hg.estimators.Estimator(fn, "exploding")


def test_regression_mlp_in_a_few_lines():
    # A Flax MLP on y = sin x + noise, its L2 penalty and learning rate tuned by 30 Adam
    # hyper-steps: the tuning code a user writes is the space, the task and one call.
    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 3, (96, 1))
    y = np.sin(x) + 0.1 * rng.normal(size=x.shape)
    (xt, yt), (xv, yv) = (x[:64], y[:64]), (x[64:], y[64:])

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.hidden, self.out = nnx.Linear(1, 32, rngs=rngs), nnx.Linear(32, 1, rngs=rngs)

        def __call__(self, x):
            return self.out(jnp.tanh(self.hidden(x)))

    graph, params0 = nnx.split(MLP(nnx.Rngs(0)))

    def mse(params, batch):
        return jnp.mean((nnx.merge(graph, params)(batch[0]) - batch[1]) ** 2)

    def train_loss(params, hparams, batch):
        l2 = sum(jnp.sum(w**2) for w in jax.tree.leaves(params))
        return mse(params, batch) + hparams["l2"] * l2

    # --- the tuning code ---
    space = hg.HyperSpace({"learning_rate": hg.positive(0.05), "l2": hg.positive(1e-2)})
    task = hg.Task(params=params0, train_loss=train_loss,
                   val_loss=lambda p, hp, b: mse(p, b), train_data=(xt, yt),
                   val_data=(xv, yv), space=space, optimizer=hg.inner.sgd(momentum=0.0),
                   steps=40)
    history = hg.tune(task, hg.estimators.reverse(), optax.adam(0.1), meta_steps=30,
                      key=jax.random.key(0))
    # --- end ---
    assert history.val_loss.shape == (30,) and history.accepted.sum() >= 20
    # The trust region rejected only increases, and the accepted points never rise.
    rejected = [r for r in history.records if "val_loss" not in r]
    assert all(r["reason"] == "increase" for r in rejected)
    kept = history.val_loss[history.point_ok]
    assert np.all(np.diff(kept) <= hg.Guard().tolerance * kept[:-1])
    assert history.final.val_loss < 0.6 * history.val_loss[0]
    assert np.isfinite(history.final.val_loss) and np.isfinite(history.best.val_loss)
    assert history.best.val_loss <= history.final.val_loss
    assert history.hparams["l2"].shape == (30,)
    assert history.final.hparams["l2"] < 1e-2  # less shrinkage fits sin x better


def test_a_last_step_into_divergence_reports_the_last_accepted_point():
    # One meta-step at lr 0.1 (finite), whose huge step lands where training diverges:
    # the point it moved to is evaluated after the loop, fails, and final is the start.
    task = quadratic_task(nan_above=0.3)
    history = hg.tune(task, hg.estimators.reverse(), optax.sgd(50.0), clip=0.0,
                      meta_steps=1, key=jax.random.key(0))
    assert history.accepted.all()  # the step itself was finite
    assert np.exp(history.state.phi["learning_rate"][0]) > 0.3  # ... and went too far
    final = history.final
    assert final.meta_step == 0 and np.isfinite(final.val_loss)
    assert final.val_loss == history.val_loss[0]
    np.testing.assert_allclose(final.hparams["learning_rate"], 0.1)
    assert history.best == final


def test_a_finite_exploding_hypergradient_is_rejected():
    task = quadratic_task()
    est = exploding(hg.estimators.reverse(), above=0.12)
    history = hg.tune(task, est, "gd", meta_steps=4, key=jax.random.key(0))
    lrs = np.asarray([r["hparams"]["learning_rate"] for r in history.records
                      if "hparams" in r])
    # Step 0 moves lr above 0.12; there the hypergradient is ~1e104: rejected, and the
    # run steps again from the last point with half the step (no second evaluation of
    # it), which lands below 0.12: meta-step 2 evaluates that point.
    assert not history.point_ok[1] and "divergent" in history.records[1]["warning"]
    assert history.hypergrad_norm[1] > 1e100
    assert np.all(np.isfinite(history.state.phi["learning_rate"]))
    assert np.all(lrs < 0.12 + 1e-12) and len(lrs) >= 2 and history.point_ok[2]
    assert 0.1 < lrs[1] < 0.12
    assert history.scale[1] == 0.5


def test_an_exploding_start_is_a_tune_error():
    task = quadratic_task()
    with pytest.raises(hg.TuneError, match="starting point"):
        hg.tune(task, exploding(hg.estimators.reverse(), above=0.0), "gd", meta_steps=3,
                key=jax.random.key(0))


def test_a_divergent_validation_loss_is_rejected():
    # Above lr 0.15 the validation loss is 1e6 times larger (finite): rejected.
    task = quadratic_task()
    base = task.val_loss
    task = task.replace(val_loss=lambda w, hp, b: base(w, hp, b) * jnp.where(
        hp["learning_rate"] > 0.15, 1e6, 1.0))
    history = hg.tune(task, hg.estimators.reverse(), optax.sgd(1.5), clip=0.0,
                      meta_steps=3, key=jax.random.key(0))
    assert history.point_ok[0] and not history.point_ok[1]
    assert "divergent validation loss" in history.records[1]["warning"]
    assert history.final.val_loss < 1.0 and history.best.val_loss < 1.0


def test_population_of_one_equals_a_single_run_bitwise():
    task = quadratic_task()
    single = hg.tune(task, hg.estimators.reverse(), optax.adam(0.2), meta_steps=5,
                     key=jax.random.key(3))
    one = hg.tune(task, hg.estimators.reverse(), optax.adam(0.2), meta_steps=5,
                  key=jax.random.key(3), population=1)
    assert one.val_loss.shape == (5, 1) and single.val_loss.shape == (5,)
    for name in ("val_loss", "train_loss", "hypergrad_norm", "accepted", "scale"):
        np.testing.assert_array_equal(getattr(one, name)[:, 0], getattr(single, name))
    np.testing.assert_array_equal(one.hparams["learning_rate"][:, 0],
                                  single.hparams["learning_rate"])
    assert one.final.val_loss == single.final.val_loss and one.final.member == 0
    assert one.best.val_loss == single.best.val_loss


def test_history_saves_loads_and_plots(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    task = quadratic_task(nan_above=0.3)
    history = hg.tune(task, hg.estimators.reverse(), optax.sgd(50.0), clip=0.0,
                      meta_steps=3, key=jax.random.key(0))
    path = history.save(tmp_path / "history.json")
    json.loads(path.read_text())  # strict JSON: no NaN
    loaded = hg.History.load(path)
    assert loaded.records == json.loads(json.dumps(history.to_json()["records"]))
    assert loaded.final.val_loss == history.final.val_loss
    np.testing.assert_array_equal(loaded.val_loss[history.accepted],
                                  history.val_loss[history.accepted])
    np.testing.assert_allclose(loaded.hparams["learning_rate"][history.accepted],
                               history.hparams["learning_rate"][history.accepted], rtol=1e-12)
    np.testing.assert_array_equal(loaded.seconds, history.seconds)
    # Equality is what save writes (the generated one raised on NumPy arrays).
    assert loaded == history and not loaded != history
    shorter = hg.tune(task, hg.estimators.reverse(), optax.sgd(50.0), clip=0.0,
                      meta_steps=2, key=jax.random.key(0))
    assert shorter != history and history != "a history"
    figures = history.plot()
    assert len(figures) == 2
    paths = history.plot(tmp_path)
    assert [p.name for p in paths] == ["val_loss.png", "hparams.png"]


def test_online_tuning_is_one_training_run():
    task = quadratic_task(steps=12)
    seen = []
    history = hg.tune(task, hg.estimators.truncated(3), "gd", online=True,
                      key=jax.random.key(0), callback=lambda r, s: seen.append(r))
    assert [r["inner_step"] for r in seen] == [3, 6, 9, 12]
    assert history.final.meta_step == 4 and np.isfinite(history.final.val_loss)
    with pytest.raises(ValueError, match="truncated"):
        hg.tune(task, hg.estimators.reverse(), "gd", online=True, key=jax.random.key(0))


def test_an_estimator_brings_its_own_online_tuning():
    # The loop knows no estimator by name: an estimator of another name that carries
    # truncated's Online tunes online exactly as truncated does.
    task = quadratic_task(steps=12)
    ref = hg.estimators.truncated(3)
    mine = hg.estimators.Estimator(ref.fn, "my-windows", {}, ref.online)
    runs = [hg.tune(task, est, "gd", online=True, key=jax.random.key(0))
            for est in (ref, mine)]
    np.testing.assert_array_equal(runs[0].val_loss, runs[1].val_loss)
    assert runs[1].final.meta_step == 4


def test_ncg_stops_when_its_line_search_finds_no_step_twice():
    # At the quadratic's optimum in lr nothing lowers the loss measurably.
    task = quadratic_task(steps=2)
    history = hg.tune(task, hg.estimators.reverse(), "ncg", meta_steps=40,
                      key=jax.random.key(0))
    assert history.stopped is not None and "line search found no step" in history.stopped
    searches = history.line_search
    assert len(history) < 40
    assert (searches["failed"][-2:] | (searches["step"][-2:] == 0)).all()


def test_resample_trains_each_meta_step_with_its_own_key():
    from hypergrad.unroll import objective

    rng = np.random.default_rng(0)
    x, w_true = rng.normal(size=(40, 3)), np.asarray([1.0, -2.0, 0.5])
    y = x @ w_true + 0.1 * rng.normal(size=40)

    def loss(w, hparams, batch):
        return jnp.mean((batch[0] @ w - batch[1]) ** 2)

    task = hg.Task(params=jnp.zeros(3), train_loss=loss, val_loss=loss, train_data=(x, y),
                   val_data=(x, y), space=hg.HyperSpace({"learning_rate": hg.positive(0.02)}),
                   optimizer=hg.inner.sgd(momentum=0.0), steps=6, batch_size=5)
    key = jax.random.key(0)
    history = hg.tune(task, hg.estimators.reverse(), "gd", meta_steps=3, key=key,
                      resample=True)
    for t in range(3):
        phi = task.space.unconstrain({"learning_rate": history.hparams["learning_rate"][t]})
        got = objective(task, phi, jax.random.fold_in(key, t))[0]
        np.testing.assert_allclose(history.val_loss[t], got, rtol=1e-12)
    phi = task.space.unconstrain({"learning_rate": history.hparams["learning_rate"][1]})
    assert abs(float(objective(task, phi, key)[0]) - history.val_loss[1]) > 1e-6


def test_es_and_pes_drive_the_loop_and_the_command_line(tmp_path):
    from hypergrad.cli import main

    task = quadratic_task()
    for est in (hg.estimators.es(0.05, 8), hg.estimators.pes(0.05, 8, window=5)):
        history = hg.tune(task, est, "gd", meta_steps=3, key=jax.random.key(0))
        assert history.accepted.all() and history.final.val_loss < history.val_loss[0]
    assert main(["run", "--set", "estimator=pes", "--set", "window=2", "--set", "num_pairs=2",
                 "--set", "steps=4", "--set", "batch_size=20", "--set", "channels=2,2,2",
                 "--set", "meta_steps=1", "--workdir", str(tmp_path / "w"), "--quiet"]) == 0


def _compiled_programs(caplog, run):
    """The jitted programs ``run()`` compiles (JAX's compile log)."""
    caplog.clear()
    # The global flag, not the thread-local context: the default strategy compiles its
    # meta-step in a thread while it explores.
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level("WARNING", logger="jax"):
            run()
    finally:
        jax.config.update("jax_log_compiles", False)
    return [r.getMessage().split(" with ")[0] for r in caplog.records
            if r.getMessage().startswith("Compiling ")]


@pytest.mark.parametrize("explicit", [True, False])
def test_a_second_tune_call_reuses_the_compiled_meta_step(caplog, explicit):
    # The same task, estimator and outer objects (or the defaults, by name) and another
    # key: the meta-step and the final evaluation (jit(one), a single member) are the
    # ones the first call compiled.
    task = quadratic_task(steps=5)
    args = (hg.estimators.reverse(), optax.adam(0.1)) if explicit else ()

    def run(seed):
        return lambda: hg.tune(task, *args, meta_steps=2, key=jax.random.key(seed))

    first = _compiled_programs(caplog, run(0))
    assert first.count("Compiling jit(one)") >= 1  # the log sees them when they compile
    again = _compiled_programs(caplog, run(1))
    assert "Compiling jit(one)" not in again, again
    assert "Compiling jit(build)" not in again, again  # the members' first states
