"""hg.tune's default strategy (explore, then refine), its trust region, chaos, budget,
re-scoring of a stochastic task and the online check."""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hypergrad as hg
from hypergrad.population import member_keys
from hypergrad.tune import RESCORE_KEYS, states
from hypergrad.tune.strategies import space_filling
from hypergrad.unroll import objective


def basins_task(x0=0.8, ripple=0.0):
    """The validation loss is f(x) = (x^2 - 1)^2 + 0.3 x (+ a ripple): two basins, the
    one at x = -1 (f = -0.3) better than the one at x = +1 (f = +0.3)."""

    def f(x):
        return (x**2 - 1.0) ** 2 + 0.3 * x + ripple * jnp.sin(400.0 * x)

    def train_loss(w, hparams, batch):
        return 0.5 * jnp.sum(w**2)

    def val_loss(w, hparams, batch):
        return f(hparams["x"]) + 0.0 * jnp.sum(w)

    return hg.Task(params=jnp.ones(2), train_loss=train_loss, val_loss=val_loss,
                   train_data=jnp.zeros(1), val_data=jnp.zeros(1),
                   space=hg.HyperSpace({"x": hg.real(x0)}),
                   optimizer=hg.inner.sgd(learning_rate=0.1, momentum=0.0), steps=2)


BOX = {"x": (-2.0, 2.0)}


def test_the_default_finds_the_better_basin_a_local_run_does_not():
    task, key = basins_task(), jax.random.key(0)
    local = hg.tune(task, hg.estimators.reverse(), "adam", meta_steps=30, key=key)
    assert local.strategy == "local" and local.best.hparams["x"] > 0.5
    default = hg.tune(task, key=key, meta_steps=30,
                      strategy=hg.ExploreRefine(explore=16, bounds=BOX))
    # 16 draws after the start, then more between meta-steps (the search shares the time).
    assert default.strategy == "explore-refine" and len(default.explored.val_loss) >= 17
    np.testing.assert_allclose(default.best.hparams["x"], -1.0366, atol=2e-3)
    assert default.best.val_loss < -0.29 < 0.29 < local.best.val_loss
    # The start is scored first, and neither point is worse than it.
    assert default.start.val_loss == default.explored.val_loss[0]
    assert default.final.val_loss <= default.start.val_loss
    trace = default.trace()
    assert len(trace.val_loss) == len(default.explored.val_loss) + len(default)
    assert np.all(np.diff(trace.seconds) >= 0)
    assert trace.best_val_loss == pytest.approx(default.best.val_loss)


def test_late_in_a_run_a_refinement_stuck_in_a_worse_basin_moves_to_the_search_best():
    # 8 meta-steps: the refinement descends into the basin at +1 without stopping; in the
    # last quarter it goes on from the search's point in the better basin, so the final
    # point is the best one, and the diagnosis says why.
    task = basins_task()
    history = hg.tune(task, key=jax.random.key(0), meta_steps=8,
                      strategy=hg.ExploreRefine(explore=8, bounds=BOX))
    stuck = [d for d in history.diagnosis if "stuck in a basin" in d]
    assert len(stuck) == 1 and stuck[0].startswith("meta-step 5:")
    assert history.val_loss[:6].min() > 0.29  # the refinement alone stayed at +1
    assert history.final.hparams["x"] < -0.9
    assert history.final.val_loss == history.best.val_loss < -0.29


def test_the_call_with_no_estimator_or_outer_is_the_default_strategy():
    task = basins_task()
    history = hg.tune(task, key=jax.random.key(1), meta_steps=3)
    assert history.strategy == "explore-refine" and history.explored is not None
    assert history.stop_reason == "meta_steps" and len(history) == 3


def test_without_a_budget_the_run_is_counted_in_trainings_and_resumes_exactly():
    # The search's share is counted in trainings (STEP_TRAININGS a meta-step), so two
    # runs agree evaluation for evaluation; a run stopped after its third meta-step (as
    # `hypergrad run` checkpoints in its callback) and resumed from the plan's snapshot
    # ends where one run ends.
    task, key = basins_task(), jax.random.key(2)
    strategy = hg.ExploreRefine(explore=8, bounds=BOX)
    runs = [hg.tune(task, key=key, meta_steps=6, strategy=strategy) for _ in range(2)]
    np.testing.assert_array_equal(runs[0].trace().val_loss, runs[1].trace().val_loss)

    est, outer = hg.estimators.reverse(), hg.outer.by_name("adam")
    phi, began = task.space.init(), time.perf_counter()
    plan = strategy.plan(task, key, phi, budget=None, began=began, keys=1)
    saved = []

    class Killed(Exception):
        pass

    def checkpoint(record, state):
        saved.append((record.get("val_loss", record.get("rejected_val_loss")), state,
                      plan.snapshot()))
        if len(saved) == 3:
            raise Killed

    with pytest.raises(Killed):
        hg.tune(task, est, outer, key=key, meta_steps=6, strategy=strategy,
                state=states(task, est, outer, plan.phis, member_keys(key, 1)), plan=plan,
                callback=checkpoint)
    _, state, memory = saved[-1]
    assert memory["evaluations"] > memory["explored"] == 9  # the start and 8 draws
    again = strategy.resume(task, key, phi, memory, began=began, keys=1)
    assert again.searcher.losses == plan.searcher.losses
    rest = hg.tune(task, est, outer, key=key, meta_steps=6, strategy=strategy,
                   state=state, plan=again)
    np.testing.assert_array_equal([v for v, _, _ in saved] + list(rest.val_loss),
                                  runs[0].val_loss)
    assert rest.diagnosis == runs[0].diagnosis


def test_the_trust_region_never_accepts_an_increase():
    # Plain gradient descent with a step far too long for the curvature: every other
    # step overshoots. Accepted points never rise; the rejected ones are increases.
    task = basins_task(x0=0.3)
    history = hg.tune(task, hg.estimators.reverse(), optax.sgd(3.0), clip=0.0,
                      meta_steps=25, key=jax.random.key(0))
    kept = history.val_loss[history.point_ok]
    assert np.all(np.diff(kept) <= hg.Guard().tolerance * np.abs(kept[:-1]))
    assert (~history.point_ok).any()
    assert {r["reason"] for r in history.records if "val_loss" not in r} <= {"increase"}
    assert history.final.val_loss <= history.start.val_loss
    assert history.best.val_loss <= history.final.val_loss


def test_without_the_trust_region_the_same_run_accepts_increases():
    task = basins_task(x0=0.3)
    guard = hg.Guard(tolerance=math.inf)
    history = hg.tune(task, hg.estimators.reverse(), optax.sgd(3.0), clip=0.0,
                      meta_steps=25, key=jax.random.key(0), guard=guard)
    assert np.any(np.diff(history.val_loss[history.point_ok]) > 0.1)


def test_chaos_is_detected_and_smoothed():
    # A ripple of amplitude 0.02 and period 0.016 under the smooth loss: the exact
    # hypergradient is that of the ripple (amplitude 8) and predicts nothing at the step.
    task = basins_task(x0=0.6, ripple=0.02)
    with pytest.warns(hg.TuneWarning, match="chaotic"):
        local = hg.tune(task, hg.estimators.reverse(), "adam", meta_steps=40,
                        key=jax.random.key(0))
    assert local.stopped is not None and "chaotic" in local.stopped
    history = hg.tune(task, key=jax.random.key(0), meta_steps=60,
                      strategy=hg.ExploreRefine(explore=4, bounds={"x": (0.2, 1.5)}))
    said = " ".join(history.diagnosis)
    assert "chaotic" in said and "smoothed" in said
    assert history.best.val_loss <= history.start.val_loss


def stochastic_task():
    """A noisy linear regression: the training loss adds noise from its key."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=64)

    def train_loss(w, hparams, batch, key):
        xb, yb = batch
        noisy = xb + hparams["noise"] * jax.random.normal(key, xb.shape)
        return jnp.mean((noisy @ w - yb) ** 2)

    def val_loss(w, hparams, batch):
        xb, yb = batch
        return jnp.mean((xb @ w - yb) ** 2)

    return hg.Task(params=jnp.zeros(3), train_loss=train_loss, val_loss=val_loss,
                   train_data=(x[:48], y[:48]), val_data=(x[48:], y[48:]),
                   space=hg.HyperSpace({"learning_rate": hg.positive(0.05),
                                        "noise": hg.positive(0.3)}),
                   optimizer=hg.inner.sgd(momentum=0.0), steps=20, batch_size=16)


def test_a_stochastic_task_is_rescored_on_fresh_keys():
    task, key = stochastic_task(), jax.random.key(0)
    assert task.stochastic
    history = hg.tune(task, key=key, meta_steps=4, strategy=hg.ExploreRefine(explore=3))
    best = history.best
    assert best.stderr is not None and best.stderr >= 0
    # The mean over RESCORE_KEYS fresh keys, none of them a key the run trained with.
    from hypergrad.tune.result import RESCORE_STREAM

    stream = jax.random.fold_in(key, RESCORE_STREAM)
    values = [float(objective(task, jax.tree.map(jnp.asarray, best.phi),
                              jax.random.fold_in(stream, r))[0]) for r in range(RESCORE_KEYS)]
    assert best.val_loss == pytest.approx(np.mean(values), rel=1e-5)
    assert history.final.stderr is not None
    assert history.final.val_loss <= history.start.val_loss + 1e-12


def test_the_budget_is_kept_to_within_one_meta_step():
    task = basins_task()
    began = time.perf_counter()
    history = hg.tune(task, key=jax.random.key(0), budget=4.0)
    elapsed = time.perf_counter() - began
    assert history.stop_reason == "budget" and "budget spent" in history.diagnosis[-1]
    step = max(history.seconds.max(initial=0.0), 0.5)
    assert history.clock[-1] <= 4.0 + step and elapsed <= 4.0 + 3 * step


def test_an_online_run_worse_than_its_start_returns_the_start():
    # Gradient ascent on the hyperparameters (a negative outer step): the online run
    # ends worse than the start trained without updates, says so and returns the start.
    a = jnp.diag(jnp.linspace(0.1, 1.0, 4))
    task = hg.Task(params=jnp.ones(4), train_loss=lambda w, hp, b: 0.5 * w @ (a @ w),
                   val_loss=lambda w, hp, b: 0.5 * w @ (a @ w), train_data=jnp.zeros(1),
                   val_data=jnp.zeros(1),
                   space=hg.HyperSpace({"learning_rate": hg.positive(0.5)}),
                   optimizer=hg.inner.sgd(momentum=0.0), steps=20)
    with pytest.warns(hg.TuneWarning, match="worse than the start"):
        history = hg.tune(task, hg.estimators.truncated(2), optax.sgd(-2.0), online=True,
                          key=jax.random.key(0))
    start = float(objective(task, task.space.init(), jax.random.key(0))[0])
    assert history.final.val_loss == pytest.approx(start)
    assert history.best == history.final
    assert any("worse than the start" in d for d in history.diagnosis)


def test_guard_fields_are_validated():
    with pytest.raises(ValueError, match="max_rejections"):
        hg.tune(basins_task(), hg.estimators.reverse(), "gd", meta_steps=1,
                key=jax.random.key(0), guard=hg.Guard(max_rejections=0))
    with pytest.raises(ValueError, match="value_ratio"):
        hg.Guard(value_ratio=math.nan).validate()


def test_space_filling_is_a_latin_hypercube():
    low, high = {"a": jnp.zeros(2), "b": jnp.asarray(-1.0)}, {"a": jnp.ones(2),
                                                               "b": jnp.asarray(1.0)}
    pts = space_filling(low, high, 10, jax.random.key(0))
    assert pts["a"].shape == (10, 2) and pts["b"].shape == (10,)
    for column in (pts["a"][:, 0], pts["a"][:, 1], (pts["b"] + 1) / 2):
        assert sorted(np.floor(np.asarray(column) * 10).astype(int).tolist()) == list(range(10))
    tied = space_filling(low, high, 5, jax.random.key(0), tied=True)
    assert np.all(tied["a"][:, 0] == tied["a"][:, 1])
