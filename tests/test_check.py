"""check_hypergrad itself: it passes the exact estimator and catches a wrong one."""

import jax
import pytest

import hypergrad as hg
from hypergrad.estimators import Estimator
from tests.problems import logreg_task


def test_random_directions_pass_for_the_exact_estimator():
    task = logreg_task()
    records = hg.directional_errors(hg.estimators.reverse(), task, task.space.init(),
                                    jax.random.key(0), directions=3, seed=1)
    assert [r["name"] for r in records] == ["random[0]", "random[1]", "random[2]"]
    assert max(r["rel_error"] for r in records) <= 1e-6


def test_a_wrong_hypergradient_is_caught():
    exact = hg.estimators.reverse()

    def off_by_one_percent(task, phi, key):
        value, grad, aux = exact(task, phi, key)
        return value, jax.tree.map(lambda g: 1.01 * g, grad), aux

    task = logreg_task()
    err = hg.check_hypergrad(Estimator(off_by_one_percent, "wrong"), task, task.space.init(),
                             jax.random.key(0))
    assert 5e-3 < err < 2e-2


def perturbed(name, change):
    """The exact estimator with ``change(g)`` applied to hyperparameter ``name``'s
    gradient."""
    exact = hg.estimators.reverse()

    def est(task, phi, key):
        value, grad, aux = exact(task, phi, key)
        return value, {**grad, name: change(grad[name])}, aux

    return Estimator(est, f"perturbed {name}")


def test_errors_are_relative_to_the_largest_directional_derivative():
    # weight_decay's derivative is 1/9 of learning_rate's. An error of 3e-8 in it, like
    # rounding noise every direction shares, is 5e-6 of its own derivative but 6e-7 of
    # the hypergradient's size: the check must pass (issue 21's false FAILED).
    task, key = logreg_task(), jax.random.key(0)
    records = hg.directional_errors(perturbed("weight_decay", lambda g: g + 3e-8), task,
                                    task.space.init(), key)
    by_name = {r["name"]: r for r in records}
    wd, lr = by_name["weight_decay"], by_name["learning_rate"]
    assert abs(wd["analytic"]) < abs(lr["analytic"]) / 5
    own = abs(wd["analytic"] - wd["numeric"]) / abs(wd["numeric"])
    assert own > 2e-6  # the old rule, relative to its own derivative, failed it
    scale = max(max(abs(r["analytic"]), abs(r["numeric"])) for r in records)
    assert all(r["scale"] == scale for r in records)
    assert wd["rel_error"] == abs(wd["analytic"] - wd["numeric"]) / scale
    assert 2e-7 < wd["rel_error"] < 1e-6
    # A gradient wrong in that small direction alone (by 10%) still fails clearly.
    err = hg.check_hypergrad(perturbed("weight_decay", lambda g: 1.1 * g), task,
                             task.space.init(), key)
    assert 5e-3 < err < 2e-2


def test_refuses_without_64_bit_mode_and_bad_arguments():
    task = logreg_task()
    phi, key, exact = task.space.init(), jax.random.key(0), hg.estimators.reverse()
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.raises(ValueError, match="checking a hypergradient needs float64: call "
                                             r"jax.config.update\('jax_enable_x64', True\)"):
            hg.check_hypergrad(exact, task, phi, key)
    finally:
        jax.config.update("jax_enable_x64", True)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="directions must be a positive integer"):
            hg.directional_errors(exact, task, phi, key, directions=bad)
    for bad in (0.0, -1e-4, float("nan"), ()):
        with pytest.raises(ValueError, match="eps must be positive finite"):
            hg.directional_errors(exact, task, phi, key, eps=bad)
