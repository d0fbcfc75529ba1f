"""Hypergradient descent (Baydin et al. 2018) as optax transformations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hypergrad as hg


def quadratic(d=6, seed=0):
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    a = jnp.asarray(q @ np.diag(np.linspace(0.1, 1.0, d)) @ q.T)  # eigenvalues 0.1 ... 1
    return (lambda t: 0.5 * t @ (a @ t)), jnp.asarray(rng.standard_normal(d))


def run(opt, f, theta, steps=100):
    """``steps`` updates under jit; each step's loss and the learning rate it used."""

    def step(carry, _):
        p, s = carry
        u, s = opt.update(jax.grad(f)(p), s, p)
        p = optax.apply_updates(p, u)
        hd = [x for x in jax.tree.leaves(s, is_leaf=_has_lr) if _has_lr(x)]
        return (p, s), (f(p), hd[0].learning_rate if hd else jnp.nan)

    return jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), length=steps)[1])(theta)


def _has_lr(x):
    return hasattr(x, "learning_rate")


def test_one_step_identity_and_the_sgd_hd_update():
    # d f(theta_t) / d alpha = -grad f(theta_t) . grad f(theta_{t-1}) for one SGD step.
    def f(t):
        return jnp.sum(jnp.log(jnp.cosh(t))) + 0.1 * jnp.sum(t**3)

    theta0, alpha, beta = jnp.array([0.3, -1.2, 0.7]), 0.05, 0.02
    g0 = jax.grad(f)(theta0)
    dalpha = jax.grad(lambda a: f(theta0 - a * g0))(alpha)
    theta1 = theta0 - alpha * g0
    g1 = jax.grad(f)(theta1)
    np.testing.assert_allclose(dalpha, -g1 @ g0, rtol=1e-12)
    eps = 1e-6  # and against central differences, not only jax.grad
    numeric = (f(theta0 - (alpha + eps) * g0) - f(theta0 - (alpha - eps) * g0)) / (2 * eps)
    np.testing.assert_allclose(numeric, -g1 @ g0, rtol=1e-7)

    opt = hg.online.sgd_hd(alpha, beta)
    state = opt.init(theta0)
    u0, state = opt.update(g0, state)
    np.testing.assert_allclose(state.learning_rate, alpha, rtol=1e-15)  # nothing to adapt yet
    np.testing.assert_allclose(theta0 + u0, theta1, rtol=1e-15)
    u1, state = opt.update(g1, state)
    np.testing.assert_allclose(state.learning_rate, alpha - beta * dalpha, rtol=1e-12)
    np.testing.assert_allclose(u1, -state.learning_rate * g1, rtol=1e-15)


def test_sgd_hd_raises_a_small_learning_rate_and_beats_sgd():
    f, theta = quadratic()
    plain, _ = run(optax.sgd(0.01), f, theta)
    loss, lr = run(hg.online.sgd_hd(0.01, 0.01), f, theta)
    assert np.all(np.diff(np.asarray(lr)) >= 0) and lr[-1] > 10 * lr[0]
    assert loss[-1] < 1e-2 * plain[-1]


def test_sgd_hd_lowers_a_learning_rate_that_overshoots():
    f, theta = quadratic()
    _, lr = run(hg.online.sgd_hd(1.9, 0.01), f, theta)  # 1.9 * lambda_max: oscillates
    assert lr[-1] < lr[0]


@pytest.mark.parametrize("opt, plain", [
    (hg.online.sgdn_hd(0.01, 0.01, momentum=0.9), optax.sgd(0.01, momentum=0.9, nesterov=True)),
    (hg.online.adam_hd(1e-3, 1e-3), optax.adam(1e-3)),
], ids=["sgdn_hd", "adam_hd"])
def test_momentum_and_adam_variants_adapt_under_jit(opt, plain):
    f, theta = quadratic()
    loss, lr = run(opt, f, theta)
    plain_loss, _ = run(plain, f, theta)
    assert lr[-1] > 10 * lr[0]  # a too-small learning rate goes up
    assert loss[-1] < 1e-2 * plain_loss[-1]


def test_hd_with_zero_beta_is_the_plain_optimizer():
    f, theta = quadratic()
    for hd, plain in [(hg.online.sgd_hd(0.05, 0.0), optax.sgd(0.05)),
                      (hg.online.sgdn_hd(0.05, 0.0, 0.9), optax.sgd(0.05, 0.9, nesterov=True)),
                      (hg.online.adam_hd(0.05, 0.0), optax.adam(0.05))]:
        np.testing.assert_allclose(run(hd, f, theta, 20)[0], run(plain, f, theta, 20)[0],
                                   rtol=1e-10)


def test_chains_with_gradient_clipping_on_a_pytree():
    params = {"w": jnp.full((3,), 10.0, jnp.float32), "b": jnp.asarray(-5.0, jnp.float64)}

    def f(p):
        return jnp.sum(p["w"] ** 2) + p["b"] ** 2

    opt = optax.chain(optax.clip_by_global_norm(1.0), hg.online.sgd_hd(0.1, 0.5))
    state = opt.init(params)
    update = jax.jit(opt.update)
    clipped = []
    for _ in range(2):
        grads = jax.grad(f)(params)
        clipped.append(optax.clip_by_global_norm(1.0).update(grads, None)[0])
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert params["w"].dtype == jnp.float32 and state[1].learning_rate.dtype == jnp.float64
    # the learning rate adapts along the clipped gradients the chain passes on
    dot = sum(jnp.vdot(a, b) for a, b in zip(*map(jax.tree.leaves, clipped), strict=True))
    np.testing.assert_allclose(state[1].learning_rate, 0.1 + 0.5 * dot, rtol=1e-6)
    assert float(optax.tree.norm(updates)) <= state[1].learning_rate * (1 + 1e-6)
