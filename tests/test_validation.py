"""One validation of tuning arguments (issue 34): hg.tune, the Guard, from_optax and the
command line's config refuse the same things with the same line, naming the argument,
before anything compiles; a state= from another run is refused on entry."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hypergrad as hg
from hypergrad import validation
from hypergrad.config import ConfigError, override
from tests.problems import QuadConfig, quadratic_task, ridge

KEY = jax.random.key(0)
EST = hg.estimators.reverse()


def tune(task=None, outer="adam", **kwargs):
    kwargs.setdefault("meta_steps", 1)
    kwargs.setdefault("key", KEY)
    return hg.tune(quadratic_task(steps=3) if task is None else task, EST, outer, **kwargs)


@pytest.fixture(scope="module")
def single():
    """A single run of one meta-step, keyed by a legacy ``jax.random.PRNGKey``."""
    return tune(key=jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def pair():
    """A population of two, one meta-step."""
    return tune(population=2)


def cli_message(*sets):
    with pytest.raises(ConfigError) as e:
        override(QuadConfig(), list(sets))
    return str(e.value)


# -- finding 1: clip and spread -----------------------------------------------------------


@pytest.mark.parametrize("kwargs, sets, python_name, cli_name", [
    ({"clip": -1.0}, ["clip=-1"], "clip", "clip"),
    ({"clip": math.nan}, ["clip=nan"], "clip", "clip"),
    ({"population": 2, "spread": math.nan}, ["population=2", "population_spread=nan"],
     "spread", "population_spread"),
])
def test_clip_and_spread_are_refused_as_the_command_line_refuses_them(kwargs, sets,
                                                                        python_name, cli_name):
    with pytest.raises(ValueError) as e:
        tune(**kwargs)
    message = str(e.value)
    assert message.startswith(f"{python_name} must be >= 0")
    assert message.replace(python_name, cli_name, 1) == cli_message(*sets)


# -- findings 6, 8 and huge values: every Guard field ------------------------------------


@pytest.mark.parametrize("guard, match", [
    (hg.Guard(value_ratio=math.nan), r"Guard.value_ratio must be >= 0 \(inf turns it off\), "
                                     r"got nan"),
    (hg.Guard(max_rejections=0), "Guard.max_rejections must be at least 1, got 0"),
    (hg.Guard(max_rejections=10**30), "Guard.max_rejections must be at most 2147483647"),
    (hg.Guard(chaos_halvings=2.5), "Guard.chaos_halvings must be an integer, got 2.5"),
    (hg.Guard(grad_ratio=0.0), "Guard.grad_ratio must be > 0"),
    (hg.Guard(max_phi=math.nan), "Guard.max_phi must be > 0"),
    (hg.Guard(tolerance=-1e-3), "Guard.tolerance must be >= 0"),
    (hg.Guard(chaos_ratio="0.5"), "Guard.chaos_ratio must be a number, got '0.5'"),
])
def test_every_guard_field_is_checked(guard, match):
    with pytest.raises((TypeError, ValueError), match=match):
        tune(guard=guard)


def test_a_guard_takes_numpy_integers_and_inf():
    guard = hg.Guard(max_rejections=np.int64(3), value_ratio=math.inf, tolerance=math.inf)
    assert guard.validate() is guard


# -- finding 3 and 9: a state from another run ------------------------------------------


def test_a_population_state_is_refused_by_a_single_run(pair):
    with pytest.raises(ValueError, match="state= belongs to another run: it was made for a "
                                         "population of 2 and this call runs a single run; "
                                         "pass population=2"):
        tune(meta_steps=2, state=pair.state)


def test_a_state_of_another_population_size_is_refused(pair):
    with pytest.raises(ValueError, match="made for a population of 2 and this call runs a "
                                         "population of 3"):
        tune(meta_steps=2, population=3, state=pair.state)


def test_a_state_of_another_outer_optimizer_is_refused(single):
    with pytest.raises(ValueError, match="state= belongs to another run: its outer "
                                         "optimizer's state holds ScaleByAdamState.* makes "
                                         "NonlinearCGState"):
        tune(outer="ncg", meta_steps=2, state=single.state)


def test_a_state_of_other_hyperparameters_is_refused(single):
    task, _, _ = ridge(0.1)
    with pytest.raises(ValueError, match="it tunes learning_rate; this task tunes l2"):
        tune(task, meta_steps=2, state=single.state)


def test_a_state_of_another_granularity_is_refused(single):
    task = quadratic_task(steps=3)
    per_step = task.replace(space=hg.HyperSpace({
        "learning_rate": hg.positive(0.1, schedule="per_step")}))
    with pytest.raises(ValueError, match=r"its learning_rate has shape \(1,\) where "
                                         r"\(1, 3\) is expected"):
        tune(per_step, meta_steps=2, state=single.state)


def test_an_offline_state_is_refused_by_an_online_run(single):
    with pytest.raises(ValueError, match="made for offline tuning"):
        hg.tune(quadratic_task(steps=3), hg.estimators.truncated(1), "adam", key=KEY,
                online=True, state=single.state)


def test_a_state_that_is_not_one_is_refused():
    with pytest.raises(TypeError, match="state must be a TuneState"):
        tune(state=(1, 2))


def test_a_state_of_the_same_run_continues(single, pair):
    # No false refusals: the checks compare with what this call would make.
    assert tune(meta_steps=2, state=single.state).state.meta_step.tolist() == [2]
    assert tune(meta_steps=2, population=2, state=pair.state).val_loss.shape == (1, 2)


# -- finding 10: one rule for populations -----------------------------------------------


@pytest.mark.parametrize("kwargs, sets", [
    ({"outer": "ncg", "population": 2}, ["population=2", "outer=ncg"]),
    ({"outer": hg.outer.nonlinear_cg(1.0), "population": 2}, ["population=2", "outer=ncg"]),
    ({"outer": "ncg", "strategy": hg.ExploreRefine(members=2)},
     ["population=2", "outer=ncg"]),
    ({"population": 2, "online": True}, ["population=2", "online=true", "window=1"]),
])
def test_a_population_is_refused_what_the_command_line_refuses(kwargs, sets):
    outer = kwargs.pop("outer", "adam")
    estimator = hg.estimators.truncated(1) if kwargs.get("online") else EST
    with pytest.raises(ValueError) as e:
        hg.tune(quadratic_task(steps=3), estimator, outer, key=KEY, meta_steps=1, **kwargs)
    assert str(e.value) == cli_message(*sets)


# -- finding 11: from_optax ---------------------------------------------------------------


def test_from_optax_refuses_what_is_not_a_factory():
    with pytest.raises(TypeError, match="from_optax's factory must be a function .* got 3"):
        hg.inner.from_optax(3)
    with pytest.raises(TypeError, match=r"not from_optax\(optax.adam\(0.1\)\)"):
        hg.inner.from_optax(optax.adam(0.1))


def test_from_optax_refuses_a_line_search_when_the_task_is_built():
    task = quadratic_task(steps=3)
    with pytest.raises(TypeError, match=r"from_optax\(lbfgs\): its update needs the "
                                        r"objective .* without a line search"):
        task.replace(optimizer=hg.inner.from_optax(optax.lbfgs, learning_rate=0.1))


@pytest.mark.parametrize("factory, values, name, user", [
    (optax.exponential_decay, {"init_value": 0.1, "transition_steps": 2, "decay_rate": 0.9,
                               "staircase": True}, "decay_rate", "exponential_decay"),
    (optax.cosine_onecycle_schedule, {"transition_steps": 10, "peak_value": 0.1,
                                      "pct_start": 0.3}, "pct_start",
     "cosine_onecycle_schedule"),
])
def test_from_optax_names_a_hyperparameter_optax_uses_in_python_control_flow(
        factory, values, name, user):
    optimizer = hg.inner.from_optax(optax.sgd,
                                    learning_rate=hg.inner.schedule(factory, **values))
    other = "peak_value" if "peak_value" in values else "init_value"  # tunable: not named
    space = hg.HyperSpace({name: hg.unit(values[name]), other: hg.positive(0.1)})
    with pytest.raises(ValueError, match=rf"from_optax\(sgd\): {user} uses {name} in Python "
                                         rf"control flow .* cannot be tuned: remove {name} "):
        quadratic_task(steps=3).replace(optimizer=optimizer, space=space,
                                        val_loss=lambda w, hparams, batch: w @ w)


# -- finding 12: wrong types name the argument ------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    ({"meta_steps": 2.5}, TypeError, "meta_steps must be an integer, got 2.5"),
    ({"meta_steps": "3"}, TypeError, "meta_steps must be an integer, got '3'"),
    ({"meta_steps": 10**30}, ValueError, "meta_steps must be at most 2147483647"),
    ({"population": 2.7}, TypeError, "population must be an integer, got 2.7"),
    ({"explore": 2.5}, TypeError, "explore must be an integer, got 2.5"),
    ({"devices": -1}, ValueError, "devices must be at least 0, got -1"),
    ({"callback": 5}, TypeError, r"callback must be a function \(record, state\) -> None"),
    ({"key": 0}, TypeError, r"key must be a JAX random key \(jax.random.key\(seed\)"),
    ({"phi": {"lr": 0.0}}, ValueError, r"phi must be a dict of the task's hyperparameters "
                                       r"\(learning_rate\) .* got lr"),
    ({"phi": {"learning_rate": jnp.zeros(3)}}, ValueError,
     r"phi\['learning_rate'\] has shape \(3,\) where \(\) is expected"),
    ({"strategy": hg.Local(population=2.5)}, TypeError,
     "Local.population must be an integer, got 2.5"),
])
def test_wrong_arguments_are_refused_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        tune(**kwargs)


def test_a_legacy_prng_key_is_one_key(single):
    assert single.val_loss.shape == (1,)  # the fixture ran with jax.random.PRNGKey(0)
    wrapped = validation.random_key("key", jax.random.PRNGKey(0))
    np.testing.assert_array_equal(jax.random.key_data(wrapped),
                                  jax.random.key_data(jax.random.key(0)))
    stacked = validation.random_key("key", jax.random.split(jax.random.PRNGKey(0), 3))
    assert stacked.shape == (3,)


# -- huge and tiny starts: where the guard accepts no step -------------------------------


def test_a_start_beyond_the_guards_range_is_refused():
    with pytest.raises(ValueError, match=r"learning_rate starts at 1e-30 \(phi -69.0776\), "
                                         r"outside the range the guard accepts"):
        tune(phi={"learning_rate": jnp.log(jnp.asarray(1e-30))})


@pytest.mark.parametrize("sets, match", [
    (["learning_rate=1e-300"], "learning_rate starts at 1e-300, outside the range the guard "
                               "accepts"),
    (["learning_rate=1e300"], "learning_rate starts at 1e\\+300"),
])
def test_the_command_line_refuses_a_start_the_guard_cannot_move_from(sets, match):
    assert match.replace("\\", "") in cli_message(*sets)
