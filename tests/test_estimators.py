"""forward, truncated and implicit against closed forms, reverse mode and each other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hypergrad as hg
from hypergrad.estimators import NotConvergedWarning
from tests.problems import logreg_task, ridge, tiny_cnn_task


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


LAMS = [0.1, np.array([0.05, 0.1, 0.2, 0.4])]


@pytest.mark.parametrize("lam", LAMS, ids=["scalar", "per-feature"])
def test_implicit_cg_against_central_differences(lam):
    # Trained long enough that the objective is the bilevel one, the implicit hypergradient
    # must match central differences of that objective (float64).
    task, exact, _ = ridge(lam, steps=300)
    est = hg.estimators.implicit("cg", tol=1e-12)
    assert hg.check_hypergrad(est, task, task.space.init(), jax.random.key(0)) <= 1e-6


@pytest.mark.parametrize("lam", LAMS, ids=["scalar", "per-feature"])
def test_implicit_cg_matches_ridge_closed_form(lam):
    task, exact, _ = ridge(lam)
    _, grad, aux = hg.estimators.implicit("cg", tol=1e-12)(task, task.space.init(),
                                                           jax.random.key(0))
    assert grad["l2"].shape == np.shape(lam)
    assert bool(aux["converged"]) and aux["residual"] <= 1e-12
    assert rel(grad["l2"], exact) <= 1e-8


@pytest.mark.parametrize("solver", ["neumann", "fixed_point"])
@pytest.mark.parametrize("lam", LAMS, ids=["scalar", "per-feature"])
def test_neumann_and_fixed_point_converge_with_iterations(solver, lam):
    task, exact, hessian = ridge(lam)
    alpha = 1 / np.linalg.eigvalsh(hessian).max()
    errors = []
    for maxiter in (5, 20, 100):
        est = hg.estimators.implicit(solver, maxiter=maxiter, tol=1e-11, alpha=alpha)
        if maxiter < 100:
            with pytest.warns(NotConvergedWarning, match="did not converge"):
                _, grad, aux = est(task, task.space.init(), jax.random.key(0))
            assert not aux["converged"] and aux["iterations"] == maxiter
        else:
            _, grad, aux = est(task, task.space.init(), jax.random.key(0))
            assert aux["converged"] and aux["iterations"] < maxiter
        errors.append(rel(grad["l2"], exact))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] <= 1e-9, errors


def test_truncation_equals_neumann_terms_on_a_quadratic():
    # g(w) = w'Aw/2 - w'(B lam + c), trained by gradient descent from w* (where it stays):
    # d w_T / d lam over the last K steps is [I - (I - eta A)^K] A^-1 B (Shaban et al. 2019),
    # which is also K Neumann terms with alpha = eta (Lorraine et al. 2020).
    rng = np.random.default_rng(1)
    d, m, eta, steps = 5, 3, 0.3, 12
    q = rng.standard_normal((d, d))
    a = q @ q.T / d + 0.5 * np.eye(d)
    a /= np.linalg.eigvalsh(a).max()
    b, c = rng.standard_normal((d, m)), rng.standard_normal(d)
    lam0, target = rng.standard_normal(m), rng.standard_normal(d)
    w_star = np.linalg.solve(a, b @ lam0 + c)

    def train(w, hparams, batch):
        return 0.5 * w @ (jnp.asarray(a) @ w) - w @ (jnp.asarray(b) @ hparams["lam"] + c)

    def val(w, hparams, batch):
        return 0.5 * jnp.sum((w - target) ** 2)

    task = hg.Task(params=jnp.asarray(w_star), train_loss=train, val_loss=val,
                   train_data=jnp.zeros(1), val_data=jnp.zeros(1),
                   space=hg.HyperSpace({"lam": hg.real(lam0)}),
                   optimizer=hg.inner.sgd(learning_rate=eta), steps=steps)
    phi, key = task.space.init(), jax.random.key(0)
    g_val = w_star - target
    for k in (1, 4, steps):
        closed = b.T @ (np.eye(d) - np.linalg.matrix_power(np.eye(d) - eta * a, k)) @ \
            np.linalg.solve(a, g_val)
        _, trunc, _ = hg.estimators.truncated(window=k)(task, phi, key)
        with pytest.warns(NotConvergedWarning):
            _, neumann, aux = hg.estimators.implicit("neumann", maxiter=k, tol=0.0,
                                                     alpha=eta)(task, phi, key)
        assert aux["iterations"] == k
        assert rel(trunc["lam"], closed) <= 1e-10
        assert rel(neumann["lam"], closed) <= 1e-10
    _, rev, _ = hg.estimators.reverse()(task, phi, key)
    assert rel(rev["lam"], trunc["lam"]) <= 1e-10


def test_forward_and_full_truncation_equal_reverse_on_a_tiny_cnn():
    task = tiny_cnn_task()
    phi, key = task.space.init(), jax.random.key(0)
    v0, g0, _ = hg.estimators.reverse()(task, phi, key)
    v1, g1, _ = jax.jit(hg.estimators.forward())(task, phi, key)
    v2, g2, _ = hg.estimators.truncated(window=task.steps)(task, phi, key)
    v3, g3, _ = hg.estimators.truncated(window=3)(task, phi, key)
    np.testing.assert_allclose(v1, v0, rtol=1e-12)
    np.testing.assert_allclose(v3, v0, rtol=1e-12)  # the value is never truncated
    for name in phi:
        assert rel(g1[name], g0[name]) <= 1e-10, name
        assert rel(g2[name], g0[name]) <= 1e-12, name
    # K < T is biased: at least one hyperparameter's hypergradient is visibly off.
    assert max(rel(g3[name], g0[name]) for name in phi) > 1e-2


@pytest.mark.parametrize("est", [hg.estimators.forward(), hg.estimators.truncated(window=12)],
                         ids=["forward", "truncated"])
def test_exact_estimators_pass_check_hypergrad(est):
    task = logreg_task(steps=12, batch_size=20)
    assert hg.check_hypergrad(est, task, task.space.init(), jax.random.key(1)) <= 1e-6


def test_pieces_of_an_unroll_train_like_the_whole():
    task = logreg_task(steps=12, batch_size=20)
    hparams, key = task.space.constrain(task.space.init()), jax.random.key(2)
    whole, losses = hg.unroll.unroll(task, hparams, key)
    state, data_key = hg.unroll.start(task, hparams, key)
    state, head = hg.unroll.resume(task, hparams, state, data_key, 0, 5)
    state, tail = hg.unroll.resume(task, hparams, state, data_key, 5, checkpoint=3)
    cut, cut_losses = hg.unroll.truncated_unroll(task, hparams, key, 4)
    for p in (state.params, cut):
        for name in whole:
            np.testing.assert_allclose(p[name], whole[name], rtol=1e-13)
    np.testing.assert_allclose(jnp.concatenate([head, tail]), losses, rtol=1e-13)
    np.testing.assert_allclose(cut_losses, losses, rtol=1e-13)


@pytest.mark.parametrize("jit", [False, True])
def test_unconverged_implicit_warns_and_falls_back_to_truncation(jit):
    task, _, _ = ridge(0.1, steps=30, batch_size=10, at_optimum=False)
    phi, key = task.space.init(), jax.random.key(0)
    wrap = jax.jit if jit else (lambda f: f)
    plain = wrap(hg.estimators.implicit("cg", maxiter=2, tol=1e-12))
    backup = wrap(hg.estimators.implicit("cg", maxiter=2, tol=1e-12, fallback="truncated",
                                         window=3))
    with pytest.warns(NotConvergedWarning, match="inexact"):
        _, grad, aux = jax.block_until_ready(plain(task, phi, key))
    assert not aux["converged"] and aux["iterations"] == 2 and aux["residual"] > 1e-3
    with pytest.warns(NotConvergedWarning, match="3-step truncated"):
        value, grad_fb, aux = jax.block_until_ready(backup(task, phi, key))
    assert aux["fallback_used"] and not aux["converged"]
    v_t, grad_t, _ = hg.estimators.truncated(window=3)(task, phi, key)
    np.testing.assert_allclose(value, v_t, rtol=1e-12)
    assert rel(grad_fb["l2"], grad_t["l2"]) <= 1e-12
    assert abs(grad_fb["l2"]) > 1e-6 and rel(grad["l2"], grad_t["l2"]) > 1e-3


def test_converged_implicit_does_not_fall_back():
    task, exact, _ = ridge(0.1)
    est = hg.estimators.implicit("cg", tol=1e-10, fallback="truncated", window=2)
    _, grad, aux = est(task, task.space.init(), jax.random.key(0))
    assert aux["converged"] and not aux["fallback_used"]
    assert rel(grad["l2"], exact) <= 1e-8


def test_implicit_refuses_optimizer_hyperparameters():
    task = logreg_task()
    with pytest.raises(ValueError, match="implicit cannot differentiate learning_rate") as e:
        hg.estimators.implicit()(task, task.space.init(), jax.random.key(0))
    assert "\n" not in str(e.value) and "reverse()" in str(e.value)


def test_bad_options():
    with pytest.raises(ValueError, match="window must be a positive integer"):
        hg.estimators.truncated(window=0)
    with pytest.raises(ValueError, match="needs a step alpha"):
        hg.estimators.implicit("neumann")
    with pytest.raises(ValueError, match="solver must be one of"):
        hg.estimators.implicit("lu")
    with pytest.raises(ValueError, match="fallback must be"):
        hg.estimators.implicit(fallback="reverse")


@pytest.mark.parametrize("make", [
    hg.estimators.forward,
    lambda: hg.estimators.truncated(window=2),
    lambda: hg.estimators.implicit("cg"),
    lambda: hg.estimators.implicit("fixed_point", maxiter=500, tol=1e-8, alpha=0.2,
                                   fallback="truncated"),
], ids=["forward", "truncated", "implicit-cg", "implicit-fixed-point"])
def test_one_configuration_compiles_once(make):
    task, _, _ = ridge(np.full(4, 0.1))
    traces, base = [], task.train_loss

    def loss(w, hparams, batch):
        traces.append(1)
        return base(w, hparams, batch)

    task = task.replace(train_loss=loss)
    zeroed = task.replace(params=jnp.zeros(4))
    est = jax.jit(make())
    phi = task.space.init()
    _, _, aux = est(task, phi, jax.random.key(0))
    n = len(traces)
    shifted = jax.tree.map(lambda p: p + 0.1, phi)
    est(task, shifted, jax.random.key(1))
    est(zeroed, shifted, jax.random.key(2))
    assert n > 0 and len(traces) == n
    if "converged" in aux:
        assert aux["converged"]
