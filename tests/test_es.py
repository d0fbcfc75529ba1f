"""es against the closed-form gradient of a Gaussian-smoothed meta-objective."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hypergrad as hg
from hypergrad.estimators.es import NOISE_STREAM
from tests.problems import (
    CLIFF,
    OMEGA,
    XBAR,
    C,
    logreg_task,
    phi0,
    shift_task,
    smoothed_grad,
    weights,
)


def test_es_matches_the_smoothed_closed_form():
    # With one perturbation held over the whole run, w_T spreads by sigma * a.
    task = shift_task()
    sigma, pairs = 0.4, 4000
    value, grad, aux = jax.jit(hg.estimators.es(sigma, pairs))(task, phi0(task),
                                                               jax.random.key(0))
    s = np.asarray(phi0(task)["shift"])
    a = weights().sum()
    exact = smoothed_grad(s, sigma, a)
    se = np.asarray(aux["stderr"]["shift"])
    assert np.all(np.abs(np.asarray(grad["shift"]) - exact) < 4.5 * se), (grad, exact, se)
    # The closed form is right at sigma = 0, and the test can tell the smoothed
    # gradient from the plain one.
    plain = jax.grad(lambda p: hg.unroll.objective(task, p, jax.random.key(0))[0])(phi0(task))
    np.testing.assert_allclose(plain["shift"], smoothed_grad(s, 0.0, a), rtol=1e-10)
    assert np.max(np.abs(np.asarray(plain["shift"]) - exact) / se) > 10
    # value is the unperturbed run's; smoothed_value estimates E f(phi + sigma z).
    assert np.isclose(value, hg.unroll.objective(task, phi0(task), jax.random.key(0))[0])
    mu = a * (s + XBAR)
    f_sigma = np.sum(-np.cos(OMEGA * (mu - C))) * np.exp(-0.5 * (OMEGA * sigma * a) ** 2)
    assert abs(float(aux["smoothed_value"]) - f_sigma) < 0.05
    assert set(aux) >= {"train_loss", "train_losses", "params", "smoothed_value", "stderr",
                        "pair_std"}


def test_es_on_a_quadratic_is_exact_up_to_the_sample_covariance():
    # Antithetic differences of a quadratic are exactly linear in z:
    # (f(phi + sigma z) - f(phi - sigma z)) / (2 sigma) = z . grad f, so the estimate is
    # mean_i z_i z_i' grad f for es's own draws z (recomputed here from the same key).
    task = shift_task("quadratic")
    key = jax.random.key(3)
    _, grad, _ = hg.estimators.es(0.7, 50)(task, phi0(task), key)
    noise = jax.random.fold_in(jax.random.fold_in(key, NOISE_STREAM), 0)
    z = np.asarray(jax.random.normal(noise, (50, 2), jnp.float64))
    exact = smoothed_grad(np.asarray(phi0(task)["shift"]), 0.7, 0, "quadratic")
    np.testing.assert_allclose(grad["shift"], z.T @ z / 50 @ exact, rtol=1e-10)


def test_es_cap_past_a_cliff():
    # Past the cliff every run diverges. Capped at c, the value is w_0 - c_0 below the
    # cliff and c above, and with w_0 - c_0 ~ N(mu, s^2), s = sigma a, the smoothed
    # gradient in s_0 is a (Phi(beta) + (c - CLIFF) phi(beta) / s), beta = (CLIFF - mu) / s.
    task = shift_task("cliff")
    phi, key = phi0(task), jax.random.key(0)
    sigma, pairs, cap = 0.4, 4000, 1.0
    assert np.isnan(hg.estimators.es(sigma, 50)(task, phi, key)[1]["shift"][0])
    _, grad, aux = jax.jit(hg.estimators.es(sigma, pairs, cap=cap))(task, phi, key)
    a = weights().sum()
    mu = a * (float(phi["shift"][0]) + XBAR[0]) - C[0]
    s = sigma * a
    beta = (CLIFF - mu) / s
    cdf = 0.5 * (1 + math.erf(beta / math.sqrt(2)))
    pdf = math.exp(-0.5 * beta**2) / math.sqrt(2 * math.pi)
    exact = np.array([a * (cdf + (cap - CLIFF) * pdf / s), 0.0])
    se = np.asarray(aux["stderr"]["shift"])
    assert np.all(np.abs(np.asarray(grad["shift"]) - exact) < 4.5 * se), (grad, exact, se)
    assert abs(exact[0] - a) > 5 * se[0]  # not the gradient without the cliff
    assert 0 < int(aux["capped"]) < 2 * pairs


@pytest.mark.parametrize("make", [lambda: hg.estimators.es(0.1, 2),
                                  lambda: hg.estimators.pes(0.1, 2, 4),
                                  lambda: hg.estimators.forward(),
                                  lambda: hg.estimators.reverse()],
                         ids=["es", "pes", "forward", "reverse"])
def test_gradients_come_in_phi_dtype_when_the_loss_is_float64(make):
    # A float64 task (weights, data, loss) tuned in float32 phi: the gradient must be float32
    # like phi, or Adam's moments turn float64 after one step and a checkpoint written
    # then no longer matches the state a resumed run starts from (issue 23's default).
    # es and forward returned float64 before Estimator cast it; pes's online steps
    # (pes_steps, no Estimator) cast on their own and are checked by test_resume.
    task = logreg_task(steps=8)
    phi = task.space.init(jnp.float32)
    value, grad, _ = make()(task, phi, jax.random.key(0))
    assert jax.tree.map(lambda g: g.dtype, grad) == jax.tree.map(lambda p: p.dtype, phi)
    assert all(bool(jnp.all(jnp.isfinite(g))) and bool(jnp.any(g != 0)) for g in grad.values())


def test_es_chunked_equals_vmapped():
    task = shift_task()
    key = jax.random.key(1)
    a = hg.estimators.es(0.3, 6)(task, phi0(task), key)[1]
    b = hg.estimators.es(0.3, 6, chunk=4)(task, phi0(task), key)[1]
    np.testing.assert_allclose(a["shift"], b["shift"], rtol=1e-12)


@pytest.mark.parametrize("bad", [dict(sigma=0.0, num_pairs=2), dict(sigma=0.1, num_pairs=0),
                                 dict(sigma=0.1, num_pairs=2, chunk=0),
                                 dict(sigma=0.1, num_pairs=2, cap=float("nan"))])
def test_es_rejects_bad_options(bad):
    with pytest.raises(ValueError):
        hg.estimators.es(**bad)


def test_es_with_small_sigma_follows_reverse_on_minibatch_sgd():
    # A smooth objective (logistic regression, minibatches, tuned lr, momentum and weight
    # decay): smoothing at sigma = 1e-3 moves the gradient by O(sigma^2), far below the
    # Monte-Carlo error, so the estimate must sit within a few standard errors of reverse.
    task = logreg_task(steps=6)
    phi, key = task.space.init(), jax.random.key(0)
    _, exact, _ = jax.jit(hg.estimators.reverse())(task, phi, key)
    _, grad, aux = jax.jit(hg.estimators.es(1e-3, 100))(task, phi, key)
    for name in phi:
        assert abs(grad[name] - exact[name]) < 4.5 * aux["stderr"][name], name
