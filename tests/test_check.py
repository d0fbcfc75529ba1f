"""check_hypergrad itself: it passes the exact estimator and catches a wrong one."""

import jax

import hypergrad as hg
from hypergrad.estimators import Estimator
from tests.test_reverse import logreg_task


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
