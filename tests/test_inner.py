"""hg.inner.from_optax: any optax optimizer and schedule, differentiable in its hyperparameters."""

import jax
import jax.numpy as jnp
import optax
import pytest

import hypergrad as hg
from tests.problems import logreg

KEY = jax.random.key(0)


def assert_every_coordinate_checks(task, tol=1e-6):
    records = hg.directional_errors(hg.estimators.reverse(), task, task.space.init(), KEY)
    assert sorted(r["name"] for r in records) == sorted(task.space.names)
    for r in records:
        assert abs(r["analytic"]) > 1e-8, r  # a zero gradient would pass vacuously
        assert r["rel_error"] <= tol, r


def test_adamw_against_central_differences():
    space = hg.HyperSpace({"learning_rate": hg.positive(0.05), "b1": hg.unit(0.8),
                           "b2": hg.unit(0.95), "weight_decay": hg.positive(0.1)})
    opt = hg.inner.from_optax(optax.adamw, learning_rate=0.05, weight_decay=1e-2)
    assert {"learning_rate", "b1", "b2", "eps", "weight_decay"} <= set(opt.reads)
    assert_every_coordinate_checks(logreg(space, opt))


def test_lion_against_central_differences():
    # Lion's update is sign(...), so only the step size and the decay move the weights
    # smoothly; both are checked.
    space = hg.HyperSpace({"learning_rate": hg.positive(0.01),
                           "weight_decay": hg.positive(0.5)})
    task = logreg(space, hg.inner.from_optax(optax.lion, learning_rate=0.01))
    assert_every_coordinate_checks(task)


def test_sgd_with_warmup_cosine_schedule_tuning_its_peak():
    sched = hg.inner.schedule(optax.warmup_cosine_decay_schedule, init_value=0.01,
                              peak_value=0.5, warmup_steps=3, decay_steps=10)
    opt = hg.inner.from_optax(optax.sgd, learning_rate=sched, momentum=0.5)
    space = hg.HyperSpace({"peak_value": hg.positive(0.5), "init_value": hg.positive(0.01),
                           "momentum": hg.unit(0.5)})
    task = logreg(space, opt)
    assert_every_coordinate_checks(task)
    # The schedule really is applied: a run at peak 0.5 differs from one at the warm-up
    # value held constant.
    flat = logreg(hg.HyperSpace({"momentum": hg.unit(0.5)}),
                  hg.inner.from_optax(optax.sgd, learning_rate=0.01, momentum=0.5))
    a = hg.unroll.unroll(task, task.space.constrain(task.space.init()), KEY)[0]
    b = hg.unroll.unroll(flat, flat.space.constrain(flat.space.init()), KEY)[0]
    assert float(jnp.max(jnp.abs(a["w"] - b["w"]))) > 1e-3


def test_adamw_matches_builtin_adam():
    space = hg.HyperSpace({"learning_rate": hg.positive(0.05), "b1": hg.unit(0.8),
                           "weight_decay": hg.positive(0.1)})
    ours = logreg(space, hg.inner.adam())
    theirs = logreg(space, hg.inner.from_optax(optax.adamw, learning_rate=0.05))
    phi = space.init()
    v0, g0, _ = hg.estimators.reverse()(ours, phi, KEY)
    v1, g1, _ = hg.estimators.reverse()(theirs, phi, KEY)
    assert abs(float(v0 - v1)) <= 1e-12
    for name in space.names:
        assert abs(float(g0[name] - g1[name])) <= 1e-10 * abs(float(g0[name])), name


def test_untuned_values_are_fixed_and_per_step_schedules_work():
    # A per-step learning rate from the space (T values) drives optax.sgd step by step;
    # momentum stays at the value given.
    space = hg.HyperSpace({"learning_rate": hg.positive(0.3, schedule="per_step")})
    task = logreg(space, hg.inner.from_optax(optax.sgd, learning_rate=0.3, momentum=0.9),
                  steps=4)
    records = hg.directional_errors(hg.estimators.reverse(), task, task.space.init(), KEY)
    assert len(records) == 4 and max(r["rel_error"] for r in records) <= 1e-6


def test_float32_weights_keep_their_dtype_under_float64_hyperparameters():
    space = hg.HyperSpace({"learning_rate": hg.positive(0.05)})
    task = logreg(space, hg.inner.from_optax(optax.adamw, learning_rate=0.05),
                  dtype=jnp.float32)
    params, _ = hg.unroll.unroll(task, space.constrain(space.init()), KEY)
    assert params["w"].dtype == jnp.float32


def test_plain_optax_transformation_is_refused_with_the_fix():
    space = hg.HyperSpace({"learning_rate": hg.positive(0.05)})
    with pytest.raises(TypeError, match=r"from_optax\(optax.adamw"):
        logreg(space, optax.adamw(1e-2))


def test_a_required_value_neither_given_nor_tuned_is_named():
    space = hg.HyperSpace({"momentum": hg.unit(0.5)})
    with pytest.raises(ValueError, match="needs learning_rate"):
        logreg(space, hg.inner.from_optax(optax.sgd, momentum=0.5))


def test_per_layer_values_are_refused():
    space = hg.HyperSpace({"learning_rate": hg.positive(0.05, per="tensor")})
    with pytest.raises(ValueError, match="one number"):
        logreg(space, hg.inner.from_optax(optax.adam))


def test_traceable_warmup_cosine_matches_optax():
    ours = hg.inner.warmup_cosine_decay(0.01, 0.5, 3, 10, end_value=0.02)
    theirs = optax.warmup_cosine_decay_schedule(0.01, 0.5, 3, 10, end_value=0.02)
    for t in range(14):
        assert float(ours(t)) == pytest.approx(float(theirs(t)), rel=1e-14, abs=1e-15), t


def test_reading_an_undeclared_hyperparameter_names_it_and_the_closest():
    from hypergrad.task import UndeclaredHyperparameter

    space = hg.HyperSpace({"learning_rate": hg.positive(0.05), "temperature": hg.positive(1.0)})
    base = logreg(hg.HyperSpace({"learning_rate": hg.positive(0.05)}), hg.inner.sgd())

    def loss(p, hparams, batch):
        return base.train_loss(p, hparams, batch) / hparams["temprature"]

    with pytest.raises(UndeclaredHyperparameter) as info:
        base.replace(train_loss=loss, space=space)
    message = str(info.value)
    assert "\n" not in message and "'temprature'" in message
    assert "did you mean 'temperature'" in message
