"""Grid, random and TPE search on a tiny ridge problem, in float64."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hypergrad as hg
from hypergrad import search
from hypergrad.unroll import objective


def tiny_task(steps=6):
    """Ridge regression by 6 full-batch SGD steps; learning rate and per-feature L2 tuned."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.3 * rng.normal(size=30)
    xv = rng.normal(size=(20, 3))
    yv = xv @ np.array([1.0, -2.0, 0.5]) + 0.3 * rng.normal(size=20)

    def data_loss(w, hparams, batch):
        xb, yb = batch
        return jnp.mean((xb @ w - yb) ** 2)

    def train_loss(w, hparams, batch):
        return data_loss(w, hparams, batch) + jnp.sum(hparams["l2"] * w**2)

    space = hg.HyperSpace({"learning_rate": hg.positive(0.1),
                           "l2": hg.positive(np.full(3, 0.1))})
    return hg.Task(params=jnp.zeros(3), train_loss=train_loss, val_loss=data_loss,
                   train_data=(x, y), val_data=(xv, yv), space=space,
                   optimizer=hg.inner.sgd(), steps=steps)


KEY = jax.random.key(0)


def one_at_a_time(task, phis):
    f = jax.jit(lambda p: objective(task, p, KEY)[0])
    n = len(jax.tree.leaves(phis)[0])
    return np.array([float(f(jax.tree.map(lambda a, i=i: a[i], phis))) for i in range(n)])


def test_vmapped_evaluation_equals_one_at_a_time():
    task = tiny_task()
    rng = np.random.default_rng(1)
    phis = {"learning_rate": np.log(rng.uniform(0.01, 0.3, size=5)),
            "l2": np.log(rng.uniform(1e-3, 1.0, size=(5, 3)))}
    batched = search.make_evaluate(task, KEY)(phis)
    assert batched.dtype == np.float64 and batched.shape == (5,)
    np.testing.assert_allclose(batched, one_at_a_time(task, phis), rtol=1e-13, atol=0)
    assert len(set(batched.tolist())) == 5  # the configurations really differ


def test_non_finite_losses_come_back_as_inf():
    task = tiny_task(steps=40)
    phis = {"learning_rate": np.log(np.array([0.1, 1e6])), "l2": np.zeros((2, 3))}
    losses = search.make_evaluate(task, KEY)(phis)
    assert np.isfinite(losses[0]) and losses[1] == np.inf


def check_result(result, task, n):
    assert len(result.val_loss) == len(result.seconds) == n
    assert all(leaf.shape[0] == n for leaf in jax.tree.leaves(result.phi))
    assert np.all(np.diff(result.seconds) >= 0) and result.seconds[0] > 0
    # The best configuration is the best one evaluated, and re-training with it gives
    # the recorded loss.
    assert result.best_val_loss == result.val_loss.min()
    np.testing.assert_allclose(result.best_so_far()[-1], result.val_loss.min())
    assert np.all(np.diff(result.best_so_far()) <= 0)
    again = float(objective(task, result.best_phi, KEY)[0])
    np.testing.assert_allclose(again, result.best_val_loss, rtol=1e-12)
    # The recorded losses are the objective's at the recorded configurations.
    np.testing.assert_allclose(result.val_loss, one_at_a_time(task, result.phi), rtol=1e-12)


def test_grid_search_scores_the_product_in_order():
    task = tiny_task()
    lrs, l2s = [0.03, 0.1, 0.2], [1e-3, 0.1]
    result = search.grid_search(task, KEY, {"learning_rate": lrs, "l2": l2s}, batch_size=4)
    check_result(result, task, 6)
    assert result.method == "grid"
    hparams = task.space.constrain(result.phi)
    np.testing.assert_allclose(hparams["learning_rate"], np.repeat(lrs, 2), rtol=1e-14)
    np.testing.assert_allclose(hparams["l2"], np.tile(l2s, 3)[:, None] * np.ones(3),
                               rtol=1e-14)


def test_grid_search_default_grid_is_centred_on_the_initial_values():
    task = tiny_task()
    result = search.grid_search(task, KEY, points=3)
    check_result(result, task, 9)
    lr = np.exp(np.unique(result.phi["learning_rate"]))
    np.testing.assert_allclose(lr, 0.1 * 100.0 ** np.array([-2 / 3, 0, 2 / 3]), rtol=1e-12)


def test_random_search_is_reproducible_by_seed_and_stays_in_the_box():
    task = tiny_task()
    bounds = {"learning_rate": (0.01, 0.3), "l2": (1e-4, 1.0)}
    a = search.random_search(task, KEY, 11, seed=3, bounds=bounds, batch_size=4)
    b = search.random_search(task, KEY, 11, seed=3, bounds=bounds, batch_size=4)
    c = search.random_search(task, KEY, 11, seed=4, bounds=bounds, batch_size=4)
    check_result(a, task, 11)
    for name in a.phi:
        np.testing.assert_array_equal(a.phi[name], b.phi[name])
        assert not np.array_equal(a.phi[name], c.phi[name])
    np.testing.assert_array_equal(a.val_loss, b.val_loss)
    hparams = task.space.constrain(a.phi)
    for name, (lo, hi) in bounds.items():
        assert np.all(hparams[name] >= lo) and np.all(hparams[name] <= hi)
    # Log-uniform: the draws of log(l2) spread over the whole box, not just its top decade.
    assert np.mean(hparams["l2"] < 1e-2) > 0.25


def test_random_search_stops_at_the_budget():
    result = search.random_search(tiny_task(), KEY, seed=0, batch_size=2, budget=1e-9)
    assert len(result.val_loss) == 2  # one batch: the budget is checked after each


def test_tpe_search_returns_its_best_and_is_reproducible():
    pytest.importorskip("optuna")
    task = tiny_task()
    a = search.tpe_search(task, KEY, 14, seed=0, n_startup_trials=5)
    b = search.tpe_search(task, KEY, 14, seed=0, n_startup_trials=5)
    check_result(a, task, 14)
    assert a.method == "tpe"
    np.testing.assert_array_equal(a.val_loss, b.val_loss)
    low, high = search.box(task.space)
    for name in a.phi:
        assert np.all(a.phi[name] >= np.asarray(low[name]))
        assert np.all(a.phi[name] <= np.asarray(high[name]))


def test_tpe_search_in_batches():
    pytest.importorskip("optuna")
    task = tiny_task()
    result = search.tpe_search(task, KEY, 7, seed=0, batch_size=3, n_startup_trials=3)
    check_result(result, task, 7)


def test_tpe_without_optuna_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    with pytest.raises(ImportError, match=r'pip install -e "\.\[bench\]"'):
        search.tpe_search(tiny_task(), KEY, 3)


def test_box_defaults_and_bounds():
    task = tiny_task()
    low, high = search.box(task.space)
    np.testing.assert_allclose(np.exp(low["learning_rate"]), 1e-3, rtol=1e-12)
    np.testing.assert_allclose(np.exp(high["l2"]), np.full(3, 10.0), rtol=1e-12)
    low, high = search.box(task.space, {"l2": (np.array([1e-3, 1e-2, 1e-1]), 1.0)})
    np.testing.assert_allclose(np.exp(low["l2"]), [1e-3, 1e-2, 1e-1], rtol=1e-12)


@pytest.mark.parametrize("call, match", [
    (lambda t: search.grid_search(t, KEY, {"learning_rate": []}), "grid of learning_rate is empty"),
    (lambda t: search.grid_search(t, KEY, {}), "the grid is empty"),
    (lambda t: search.grid_search(t, KEY, {"momentum": [0.5]}), "unknown hyperparameter"),
    (lambda t: search.grid_search(t, KEY, {"learning_rate": [-1.0]}), "must be > 0"),
    (lambda t: search.grid_search(t, KEY, points=0), "points must be a positive integer"),
    (lambda t: search.grid_search(t, KEY, budget=0), "budget must be a positive"),
    (lambda t: search.random_search(t, KEY, 0), "num_samples must be a positive integer"),
    (lambda t: search.random_search(t, KEY, budget=-1.0), "budget must be a positive"),
    (lambda t: search.random_search(t, KEY), "give num_samples or budget"),
    (lambda t: search.random_search(t, KEY, 4, batch_size=0), "batch_size must be"),
    (lambda t: search.random_search(t, KEY, 4, bounds={"learning_rate": (0.5, 0.1)}),
     "need low < high"),
    (lambda t: search.random_search(t, KEY, 4, bounds={"lr": (0.1, 0.5)}), "unknown"),
    (lambda t: search.tpe_search(t, KEY, budget=0.0), "budget must be a positive"),
])
def test_bad_input_is_a_clear_error(call, match):
    if "tpe" in repr(call.__code__.co_names):
        pytest.importorskip("optuna")
    with pytest.raises((ValueError, KeyError), match=match):
        call(tiny_task())


def test_explore_starts_from_the_best_of_the_start_and_the_draws():
    task = tiny_task()
    phi0 = task.space.init(np.float64)
    start = float(objective(task, phi0, KEY)[0])
    phi, found = search.explore(task, KEY, 12, phi=phi0, seed=3)
    assert len(found.val_loss) == 12
    np.testing.assert_array_equal(found.val_loss, search.random_search(
        task, KEY, 12, seed=3, batch_size=1, dtype=np.float64).val_loss)
    chosen = float(objective(task, phi, KEY)[0])
    assert chosen == pytest.approx(min(start, found.best_val_loss), rel=1e-12)
    # A start no draw beats is kept as it is.
    best = jax.tree.map(jnp.asarray, found.best_phi)
    kept, _ = search.explore(task, KEY, 3, phi=best, seed=4)
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(best), strict=True):
        np.testing.assert_array_equal(a, b)


def test_tune_explores_before_its_first_meta_step():
    task = tiny_task()
    history = hg.tune(task, hg.estimators.reverse(), "gd", key=KEY, meta_steps=2, explore=8)
    assert len(history.explored.val_loss) == 8
    # One key, one set of draws: hg.tune and hypergrad run both let explore seed from it.
    np.testing.assert_array_equal(history.explored.val_loss,
                                  search.explore(task, KEY, 8)[1].val_loss)
    # Meta-step 0 evaluates the explored start: no worse than the best draw.
    assert history.val_loss[0] <= history.explored.best_val_loss * (1 + 1e-12)
    with pytest.raises(ValueError, match="single run"):
        hg.tune(task, hg.estimators.reverse(), "gd", key=KEY, meta_steps=1, explore=4,
                population=2)
