"""The Python side a researcher porting a problem meets (issue 33): per-step starting
values, ``space.init()`` on any space, the trained weights behind a tuning result and
their score on other data, and wrong keyword arguments named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hypergrad as hg

A, C, B, W0 = 0.8, 1.0, 0.3, 2.0  # train 0.5 a (w - c)^2 from w0; validate 0.5 (w - b)^2


def scalar_gd(space, steps):
    """HIPS's ``test_sgd`` in its smallest form: plain gradient descent on a 1-D
    quadratic, with a learning rate per step given as its starting values."""
    return hg.Task(params=jnp.asarray(W0),
                   train_loss=lambda w, hp, batch: 0.5 * A * (w - C) ** 2,
                   val_loss=lambda w, hp, batch: 0.5 * (w - B) ** 2,
                   train_data=jnp.zeros(1), val_data=jnp.zeros(1), space=space,
                   optimizer=hg.inner.sgd(), steps=steps)


def test_a_per_step_schedule_starts_from_given_per_step_values():
    """T values under ``schedule="per_step"`` are the T steps' starts (not a vector copied
    to every step), and the hypergradient at them is the closed form's:
    ``w_T = c + prod_t (1 - lr_t a) (w0 - c)``."""
    lrs = np.array([0.1, 0.5, 0.9, 1.3, 0.2])
    task = scalar_gd(hg.HyperSpace({"learning_rate": hg.positive(lrs, schedule="per_step")}),
                     len(lrs))
    phi = task.space.init()
    np.testing.assert_allclose(task.space.constrain(phi)["learning_rate"], lrs, rtol=1e-15)
    value, grad, _ = hg.estimators.reverse()(task, phi, jax.random.key(0))
    factors = 1 - lrs * A
    w_t = C + np.prod(factors) * (W0 - C)
    d_lr = (w_t - B) * (W0 - C) * np.prod(factors) / factors * (-A)
    np.testing.assert_allclose(value, 0.5 * (w_t - B) ** 2, rtol=1e-14)
    np.testing.assert_allclose(grad["learning_rate"], d_lr * lrs, rtol=1e-12)  # d/d log lr


def test_windows_and_per_layer_schedules_take_one_start_per_slot():
    params = {"a": {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}, "c": {"w": jnp.ones(2)}}
    steps = jnp.array([0.1, 0.2, 0.3, 0.4, 0.5])
    space = hg.HyperSpace({
        "lr": hg.positive(steps, per="layer", schedule="per_step"),
        "m": hg.unit(np.array([0.5, 0.6]), schedule="windows:3"),
        "v": hg.positive(np.full((1, 3), 0.2), schedule="per_step"),  # a vector, every step
    }).resolve(params, 5)
    start = space.constrain(space.init())
    np.testing.assert_allclose(start["lr"], np.repeat(steps[:, None], 2, axis=1), rtol=1e-15)
    np.testing.assert_allclose(start["m"], [0.5, 0.6], rtol=1e-15)
    np.testing.assert_allclose(start["v"], np.full((5, 3), 0.2), rtol=1e-15)
    with pytest.raises(ValueError, match=r"per_step schedule over 7 steps takes one value, "
                                         r"7 values \(one per step\)"):
        hg.HyperSpace({"lr": hg.positive(steps, schedule="per_step")}).resolve(params, 7)


def test_space_init_works_on_a_space_not_yet_laid_out():
    """Unresolved, it gives the declared values; the task's space lays them out."""
    space = hg.HyperSpace({"learning_rate": hg.positive(0.5, schedule="per_step"),
                           "wd": hg.positive(1e-3, per="layer")})
    phi = space.init()
    np.testing.assert_allclose(phi["learning_rate"], np.log(0.5), rtol=1e-15)
    np.testing.assert_allclose(phi["wd"], np.log(1e-3), rtol=1e-15)
    task = scalar_gd(hg.HyperSpace({"learning_rate": space.constraints["learning_rate"]}), 4)
    np.testing.assert_allclose(task.space.init()["learning_rate"], np.full(4, np.log(0.5)),
                               rtol=1e-15)


def test_the_trained_weights_of_the_best_point_give_its_validation_loss_and_score_data():
    task = scalar_gd(hg.HyperSpace({"learning_rate": hg.positive(0.05)}), 6)
    key = jax.random.key(0)
    history = hg.tune(task, hg.estimators.reverse(), "adam", meta_steps=4, key=key)
    fitted = hg.fit(task, history.best, key)
    assert float(fitted.val_loss) == pytest.approx(history.best.val_loss, rel=1e-12)
    lr = float(history.best.hparams["learning_rate"])
    w_t = C + (1 - lr * A) ** 6 * (W0 - C)
    np.testing.assert_allclose(fitted.params, w_t, rtol=1e-12)
    np.testing.assert_allclose(fitted.train_losses[0], 0.5 * A * (W0 - C) ** 2, rtol=1e-15)
    # Any data and any metric (a mean over the examples): |w - x| on a "test set" x.
    test = jnp.array([0.0, 1.0, 3.0])
    got = hg.score(task, fitted, test, metric=lambda w, hp, x: jnp.mean(jnp.abs(w - x)))
    np.testing.assert_allclose(got, np.mean(np.abs(w_t - np.array([0.0, 1.0, 3.0]))),
                               rtol=1e-12)
    # In chunks: the same mean.
    chunked = hg.score(task, fitted, test, batch_size=2,
                       metric=lambda w, hp, x: jnp.mean(jnp.abs(w - x)))
    np.testing.assert_allclose(chunked, got, rtol=1e-14)
    # A phi works as well as a point.
    again = hg.fit(task, history.best.phi, key)
    np.testing.assert_allclose(again.params, fitted.params, rtol=0)


@pytest.mark.parametrize("call, message", [
    (lambda: hg.tune(None, rng=jax.random.key(0)), "'rng'; did you mean key=?"),
    (lambda: hg.tune(None, time_budget=3), "did you mean budget=?"),
    (lambda: hg.tune(None, meta_step=3), "did you mean meta_steps=?"),
    (lambda: hg.Task(params=1, train_los=1), r"Task\(\) .* did you mean train_loss=?"),
    (lambda: hg.positive(0.1, per_layer=True), "did you mean per=?"),
    (lambda: hg.estimators.truncated(windw=3), "did you mean window=?"),
    (lambda: hg.inner.sgd(lr=0.1), "did you mean learning_rate=?"),
    (lambda: hg.ExploreRefine(zzz=1), "it takes explore, members"),
])
def test_a_wrong_keyword_argument_is_answered_with_the_right_one(call, message):
    with pytest.raises(TypeError, match=message):
        call()


def two_layer_task(steps=4):
    """A two-layer linear regression whose learning rate is one value per layer."""
    rng = np.random.default_rng(0)
    x, xv = rng.standard_normal((16, 3)), rng.standard_normal((8, 3))
    y, yv = x @ np.ones(3), xv @ np.ones(3)
    params = {"hidden": {"w": jnp.asarray(rng.standard_normal((3, 2)) * 0.5)},
              "out": {"w": jnp.asarray(rng.standard_normal(2) * 0.5)}}

    def mse(p, batch):
        xb, yb = batch
        return jnp.mean((xb @ p["hidden"]["w"] @ p["out"]["w"] - yb) ** 2)

    space = hg.HyperSpace({"learning_rate": hg.positive(0.05, per="layer")})
    return hg.Task(params=params, train_loss=lambda p, hp, b: mse(p, b),
                   val_loss=lambda p, hp, b: mse(p, b), train_data=(x, y), val_data=(xv, yv),
                   space=space, optimizer=hg.inner.sgd(), steps=steps)


def test_per_layer_values_come_back_labelled_by_layer(tmp_path):
    task = two_layer_task()
    history = hg.tune(task, hg.estimators.reverse(), "adam", meta_steps=3,
                      key=jax.random.key(0))
    assert history.groups == {"learning_rate": ["hidden", "out"]}
    series = history.by_group("learning_rate")
    assert set(series) == {"hidden", "out"}
    np.testing.assert_array_equal(series["out"], history.hparams["learning_rate"][:, 1])
    best = history.by_group("learning_rate", history.best.hparams["learning_rate"])
    assert best["hidden"].shape == ()
    assert best["hidden"] != best["out"]  # the two layers moved apart
    loaded = hg.History.load(history.save(tmp_path / "history.json"))
    assert loaded == history
    for g in ("hidden", "out"):  # the records keep each group's value per meta-step
        np.testing.assert_allclose(loaded.by_group("learning_rate")[g], series[g],
                                   rtol=1e-15)
    with pytest.raises(KeyError, match="'momentum' has no groups"):
        history.by_group("momentum")


def test_per_layer_groups_a_flax_nnx_state_by_layer():
    """``nnx.split``'s leaves end in ``.value``: a layer is still the module, not the
    tensor."""
    from flax import nnx

    class Two(nnx.Module):
        def __init__(self, rngs):
            self.hidden, self.out = nnx.Linear(3, 2, rngs=rngs), nnx.Linear(2, 1, rngs=rngs)

    _, state = nnx.split(Two(nnx.Rngs(0)))
    space = hg.HyperSpace({"lr": hg.positive(0.1, per="layer"),
                           "wd": hg.positive(0.1, per="tensor")}).resolve(state, 3)
    assert space.constraints["lr"].layout.groups == ("hidden", "out")
    assert space.constraints["wd"].layout.groups == ("hidden/bias", "hidden/kernel",
                                                     "out/bias", "out/kernel")


def test_a_run_resumed_from_its_state_joins_into_one_history_over_the_whole_run(tmp_path):
    task, key = two_layer_task(), jax.random.key(0)
    est, tune = hg.estimators.reverse(), hg.tune
    whole = tune(task, est, "adam", meta_steps=5, key=key)
    first = tune(task, est, "adam", meta_steps=3, key=key)
    later = tune(task, est, "adam", meta_steps=5, key=key, state=first.state)
    assert len(later) == 2  # alone, the resumed run covers its own meta-steps only
    joined = first.then(later)
    assert len(joined) == len(whole) == 5
    assert [r["meta_step"] for r in joined.records] == list(range(5))
    strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
                             for r in records]
    assert strip(joined.records) == strip(whole.records)
    np.testing.assert_array_equal(joined.val_loss, whole.val_loss)
    np.testing.assert_array_equal(joined.hparams["learning_rate"],
                                  whole.hparams["learning_rate"])
    assert joined.best.val_loss == whole.best.val_loss
    assert joined.final.val_loss == whole.final.val_loss
    assert joined.start.val_loss == whole.start.val_loss
    assert np.all(np.diff(joined.clock) >= 0)
    assert hg.History.load(joined.save(tmp_path / "h.json")) == joined
