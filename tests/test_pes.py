"""pes against es and the closed-form gradient of its per-window smoothing."""

import math

import jax
import numpy as np
import optax
import pytest

import hypergrad as hg
from hypergrad.estimators.pes import NOISE_STREAM
from tests.problems import (
    CLIFF,
    STEPS,
    XBAR,
    C,
    logreg_task,
    phi0,
    shift_task,
    smoothed_grad,
    weights,
)


def window_spread(window, steps=STEPS):
    """With an independent perturbation per window, w_T spreads by sigma times this."""
    w = weights(steps)
    a_k = [w[i:i + window].sum() for i in range(0, steps, window)]
    return float(np.sqrt(np.sum(np.square(a_k))))


def test_pes_with_one_window_is_es():
    task = shift_task()
    key = jax.random.key(2)
    v1, g1, aux1 = hg.estimators.pes(0.3, 8, window=STEPS)(task, phi0(task), key)
    v2, g2, aux2 = hg.estimators.es(0.3, 8)(task, phi0(task), key)
    np.testing.assert_allclose(g1["shift"], g2["shift"], rtol=1e-12)
    np.testing.assert_allclose(aux1["smoothed_value"], aux2["smoothed_value"], rtol=1e-12)
    assert v1 == v2


@pytest.mark.parametrize("window", [4, 5])  # three equal windows; 5 + 5 + 2
def test_pes_matches_its_smoothed_closed_form(window):
    # Independent perturbations per window spread w_T by sigma sqrt(sum_k a_k^2) < sigma a,
    # so PES's smoothed gradient is damped less than ES's; the test tells them apart.
    task = shift_task()
    sigma, pairs = 0.4, 4000
    _, grad, aux = jax.jit(hg.estimators.pes(sigma, pairs, window))(task, phi0(task),
                                                                    jax.random.key(0))
    s = np.asarray(phi0(task)["shift"])
    exact = smoothed_grad(s, sigma, window_spread(window))
    se = np.asarray(aux["stderr"]["shift"])
    assert np.all(np.abs(np.asarray(grad["shift"]) - exact) < 4.5 * se), (grad, exact, se)
    es_exact = smoothed_grad(s, sigma, weights().sum())
    assert np.max(np.abs(es_exact - exact) / se) > 5


def test_pes_cap_past_a_cliff():
    # es's cliff (tests/test_es.py) with PES's spread of w_T.
    task = shift_task("cliff")
    phi = phi0(task)
    sigma, pairs, cap = 0.4, 4000, 1.0
    _, grad, aux = jax.jit(hg.estimators.pes(sigma, pairs, 4, cap=cap))(task, phi,
                                                                       jax.random.key(1))
    a, s = weights().sum(), sigma * window_spread(4)
    beta = (CLIFF - (a * (float(phi["shift"][0]) + XBAR[0]) - C[0])) / s
    cdf = 0.5 * (1 + math.erf(beta / math.sqrt(2)))
    pdf = math.exp(-0.5 * beta**2) / math.sqrt(2 * math.pi)
    exact = np.array([a * (cdf + (cap - CLIFF) * pdf / s), 0.0])
    se = np.asarray(aux["stderr"]["shift"])
    assert np.all(np.abs(np.asarray(grad["shift"]) - exact) < 4.5 * se), (grad, exact, se)
    assert 0 < int(aux["capped"]) < 2 * pairs


def test_pes_matches_es_in_expectation_on_a_quadratic():
    # Smoothing does not move the gradient of a quadratic: PES over three windows and ES
    # over the whole run both estimate the plain hypergradient; PES with more variance.
    task = shift_task("quadratic")
    phi, key = phi0(task), jax.random.key(5)
    exact = smoothed_grad(np.asarray(phi["shift"]), 0.0, 0.0, "quadratic")
    results = {}
    for name, est in [("es", hg.estimators.es(0.5, 3000)),
                      ("pes", hg.estimators.pes(0.5, 3000, window=4))]:
        _, grad, aux = jax.jit(est)(task, phi, key)
        se = np.asarray(aux["stderr"]["shift"])
        assert np.all(np.abs(np.asarray(grad["shift"]) - exact) < 4.5 * se), (name, grad, se)
        results[name] = se
    assert np.all(results["pes"] > results["es"])


def test_pes_steps_carry_the_particles_across_windows():
    # An online loop calling the jitted step once per window (traced start step, one
    # compile) ends with the plain estimator's gradient.
    task = shift_task()
    phi, key = phi0(task), jax.random.key(4)
    sigma, pairs, window = 0.3, 16, 4
    core = hg.estimators.pes_steps(sigma, pairs, window)
    step = jax.jit(core.step)
    state = core.init(task, phi, key)
    noise = jax.random.fold_in(key, NOISE_STREAM)
    for k in range(STEPS // window):
        state, value, grad, aux = step(state, task, phi, jax.random.fold_in(noise, k))
    assert step._cache_size() == 1
    assert int(state.t) == STEPS
    assert state.xi.shape == (pairs, 2)
    _, expected, _ = hg.estimators.pes(sigma, pairs, window)(task, phi, key)
    np.testing.assert_allclose(grad["shift"], expected["shift"], rtol=1e-12)
    assert np.isfinite(float(value)) and np.isfinite(float(aux["train_loss"]))


@pytest.mark.parametrize("bad", [dict(sigma=-1.0, num_pairs=2, window=3),
                                 dict(sigma=0.1, num_pairs=2, window=0)])
def test_pes_rejects_bad_options(bad):
    with pytest.raises(ValueError):
        hg.estimators.pes(**bad)


def test_pes_with_small_sigma_follows_reverse_on_minibatch_sgd():
    # As for es: on a smooth objective the smoothed gradient is the plain one.
    task = logreg_task(steps=6)
    phi, key = task.space.init(), jax.random.key(0)
    _, exact, _ = jax.jit(hg.estimators.reverse())(task, phi, key)
    _, grad, aux = jax.jit(hg.estimators.pes(1e-3, 100, window=4))(task, phi, key)
    for name in phi:
        assert abs(grad[name] - exact[name]) < 4.5 * aux["stderr"][name], name


def test_tune_online_carries_the_pes_particles():
    # hg.tune(online=True) with pes is the loop of the test above with gradient descent
    # between windows: the same particles, perturbations and updates, to rounding.
    task = shift_task()
    phi, key = phi0(task), jax.random.key(5)
    sigma, pairs, window, lr = 0.3, 8, 4, 0.5
    records, states = [], []
    history = hg.tune(task, hg.estimators.pes(sigma, pairs, window), optax.sgd(lr),
                      online=True, key=key, clip=0.0,
                      callback=lambda r, s: (records.append(r), states.append(s)))
    assert [r["inner_step"] for r in records] == [4, 8, 12]
    assert history.accepted.all()

    core = hg.estimators.pes_steps(sigma, pairs, window)
    state = core.init(task, phi, key)
    noise = jax.random.fold_in(key, NOISE_STREAM)
    for k in range(len(records)):
        state, value, grad, _ = core.step(state, task, phi, jax.random.fold_in(noise, k))
        np.testing.assert_allclose(history.val_loss[k], float(value), rtol=1e-12)
        np.testing.assert_allclose(history.hypergrad["shift"][k], grad["shift"], rtol=1e-12)
        np.testing.assert_allclose(states[k].carry.xi[0], state.xi, rtol=1e-12)
        phi = jax.tree.map(lambda p, g: p - lr * g, phi, grad)
    np.testing.assert_allclose(history.final.hparams["shift"], phi["shift"], rtol=1e-12)
    # The final point: the particles' mean validation loss at the tuned hyperparameters.
    particles = jax.vmap(lambda w: task.validation_loss(w, task.space.constrain(phi)))(
        state.inner.params)
    np.testing.assert_allclose(history.final.val_loss, float(particles.mean()), rtol=1e-12)


def test_tune_online_takes_truncated_or_pes_only():
    task = shift_task()
    with pytest.raises(ValueError, match="truncated.*pes"):
        hg.tune(task, hg.estimators.es(0.3, 2), "gd", online=True, key=jax.random.key(0))
