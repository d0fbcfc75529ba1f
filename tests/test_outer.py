"""Tests for hypergrad.outer: the hyper-updates that move ``phi`` along a hypergradient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from hypergrad import outer

VARIANTS = ["polak_ribiere", "fletcher_reeves", "hestenes_stiefel"]


def _quadratic(n, seed=0, cond=100.0):
    """``f(x) = 1/2 (x - x*)^T A (x - x*)``: random SPD ``A`` with condition number ``cond``.

    This is ``1/2 x^T A x - b^T x`` (``b = A x*``) plus a constant chosen so that ``f* = 0``:
    the line search compares objective values, so with ``f* != 0`` roundoff in ``f`` alone
    would cap the reachable gradient norm near ``sqrt(eps |f*| cond)``, not the method.
    """
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = jnp.asarray(q @ np.diag(np.logspace(0.0, np.log10(cond), n)) @ q.T)
    x_star = jnp.asarray(rng.normal(size=n))

    def f(x):
        r = x - x_star
        return 0.5 * r @ (a @ r)

    return f, a, x_star


def _run(opt, f, phi, steps, trace=lambda state: None):
    """``steps`` meta-steps of ``opt`` on ``f`` in one jitted ``lax.scan``.

    Returns the final ``phi`` and optimizer state, and per step the gradient norm and value at
    the step's start and ``trace(state)`` after it.
    """
    value_and_grad = jax.value_and_grad(f)

    def meta_step(carry, _):
        phi, state = carry
        value, grad = value_and_grad(phi)
        updates, state = opt.update(grad, state, phi, value=value, grad=grad, value_fn=f)
        outputs = (optax.tree.norm(grad), value, trace(state))
        return (optax.apply_updates(phi, updates), state), outputs

    @jax.jit
    def loop(phi):
        (phi, state), outputs = jax.lax.scan(meta_step, (phi, opt.init(phi)), length=steps)
        return phi, state, *outputs

    return loop(phi)


@pytest.mark.parametrize("variant", VARIANTS)
def test_nonlinear_cg_minimizes_quadratic_in_about_n_steps(variant):
    n = 10
    f, a, x_star = _quadratic(n)
    opt = outer.nonlinear_cg(variant=variant)
    x, _, grad_norms, _, _ = _run(opt, f, jnp.zeros(n), n + 2)
    final = jnp.linalg.norm(a @ (x - x_star))
    # Measured (all variants): the relative gradient norm first drops below 1e-8 after
    # n + 1 = 11 updates and is about 1e-12 after n + 2, with 2-4 objective evaluations per
    # update (28 in all); exact-arithmetic CG needs n.
    assert final <= 1e-8 * grad_norms[0]
    assert jnp.all(jnp.isfinite(x))


def test_nonlinear_cg_on_a_dict_of_differently_shaped_arrays():
    f_flat, a, x_star = _quadratic(10, seed=1)
    phi = {"bias": jnp.zeros(4), "weights": jnp.zeros((2, 3))}
    _, unravel = ravel_pytree(phi)

    def f(phi):
        return f_flat(ravel_pytree(phi)[0])

    opt = outer.nonlinear_cg()
    phi_final, state, grad_norms, _, _ = _run(opt, f, phi, 12)
    assert jax.tree.map(jnp.shape, phi_final) == {"bias": (4,), "weights": (2, 3)}
    assert jax.tree.map(jnp.shape, state.prev_direction) == {"bias": (4,), "weights": (2, 3)}
    expected = unravel(x_star)
    for key in phi:
        np.testing.assert_allclose(phi_final[key], expected[key], rtol=0, atol=1e-8)
    x = ravel_pytree(phi_final)[0]
    assert jnp.linalg.norm(a @ (x - x_star)) <= 1e-8 * grad_norms[0]


def _rosenbrock(phi):
    x, y = phi["x"], phi["y"]
    return (1.0 - x) ** 2 + 100.0 * (y - x**2) ** 2


def test_nonlinear_cg_minimizes_rosenbrock():
    opt = outer.nonlinear_cg()
    phi = {"x": jnp.asarray(-1.2), "y": jnp.asarray(1.0)}
    # Measured: the default (PR+, learning_rate=1) is within 1e-4 of (1, 1) after 25 updates
    # and 141 objective evaluations; the variants and learning rates 1e-3..30 take 25-40
    # (Fletcher-Reeves, without restarts, 80-180).
    phi, state, _, values, _ = _run(opt, _rosenbrock, phi, 40)
    assert abs(phi["x"] - 1.0) <= 1e-4
    assert abs(phi["y"] - 1.0) <= 1e-4
    assert jnp.all(jnp.diff(values) <= 0)  # every accepted step decreased the objective
    assert state.count == 40


@pytest.mark.parametrize("restart_every", [None, 1, 3])
def test_nonlinear_cg_restarts(restart_every):
    f, _, _ = _quadratic(6, seed=2)
    opt = outer.nonlinear_cg(restart_every=restart_every)
    restarted = _run(opt, f, jnp.zeros(6), 4, trace=lambda s: s.restarted)[-1]
    if restart_every == 1:
        assert restarted.tolist() == [True] * 4
    elif restart_every == 3:
        assert restarted[0] and restarted[3]
    else:
        assert restarted[0] and not jnp.any(restarted[1:])  # conjugate steps on a quadratic


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_gradient_descent_decreases_quadratic(momentum):
    f, _, _ = _quadratic(5, seed=3)
    x0 = jnp.zeros(5)
    x, _, _, values, _ = _run(outer.gradient_descent(0.01, momentum=momentum), f, x0, 50)
    assert f(x) < 0.5 * f(x0)
    if momentum == 0.0:
        assert jnp.all(jnp.diff(values) <= 0)  # lr < 2 / L: monotone


def test_adam_decreases_quadratic():
    f, _, _ = _quadratic(5, seed=4)
    x0 = {"a": jnp.zeros(2), "b": jnp.zeros(3)}

    def g(phi):
        return f(jnp.concatenate([phi["a"], phi["b"]]))

    x, *_ = _run(outer.adam(0.05), g, x0, 50)
    assert g(x) < 0.5 * g(x0)


def _one_update(opt, f, phi, grad=None):
    """The first update of ``opt`` from ``phi``, jitted; ``grad`` overrides the true gradient."""

    @jax.jit
    def update(phi, grad):
        value, true_grad = jax.value_and_grad(f)(phi)
        grad = true_grad if grad is None else grad
        return opt.update(grad, opt.init(phi), phi, value=value, grad=grad, value_fn=f)

    return update(phi, grad)


def test_linesearch_backtracks_out_of_a_nan_region():
    # f = (x - 3)^2 from x = 0: the first trial, x = 6, and the exact minimizer x = 3 are
    # beyond x = 1, where the objective is NaN (a training run that diverged).
    def f(phi):
        x = phi["x"]
        return jnp.where(x > 1.0, jnp.nan, (x - 3.0) ** 2)

    phi = {"x": jnp.asarray(0.0)}
    updates, state = _one_update(outer.nonlinear_cg(), f, phi)
    new = optax.apply_updates(phi, updates)
    assert jnp.isfinite(new["x"]) and 0.0 < new["x"] <= 1.0
    assert f(new) < f(phi)
    assert not state.failed and state.step_size > 0
    assert state.value == f(new)


def test_linesearch_fails_to_a_zero_update_when_every_step_is_nan():
    phi0 = {"x": jnp.asarray(0.5), "y": jnp.ones(3)}

    def f(phi):
        at_start = (phi["x"] == phi0["x"]) & jnp.all(phi["y"] == phi0["y"])
        return jnp.where(at_start, 1.0 + phi["x"] ** 2 + jnp.sum(phi["y"] ** 2), jnp.nan)

    opt = outer.nonlinear_cg(max_linesearch_steps=7)

    @jax.jit
    def step(phi, state):
        value, grad = jax.value_and_grad(f)(phi)
        return opt.update(grad, state, phi, value=value, grad=grad, value_fn=f)

    state = opt.init(phi0)
    for _ in range(2):  # and again from the failed state: still no NaN reaches phi
        updates, state = step(phi0, state)
        for leaf in jax.tree.leaves(updates):
            np.testing.assert_array_equal(leaf, jnp.zeros_like(leaf))
        assert state.failed and state.step_size == 0 and state.num_evals == 7
        assert state.restarted
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))


def test_nonlinear_cg_zero_gradient_is_a_zero_update_without_evaluations():
    f, _, x_star = _quadratic(3, seed=5)
    updates, state = _one_update(outer.nonlinear_cg(), f, x_star)
    np.testing.assert_array_equal(updates, jnp.zeros(3))
    assert not state.failed and state.num_evals == 0


def test_nonlinear_cg_nan_gradient_is_a_zero_update():
    def f(x):
        return jnp.sum(x**2)

    grad = jnp.array([jnp.nan, 1.0])
    updates, state = _one_update(outer.nonlinear_cg(), f, jnp.ones(2), grad)
    np.testing.assert_array_equal(updates, jnp.zeros(2))
    assert state.failed and state.num_evals == 0


@pytest.mark.parametrize("name", ["gd", "ncg", "adam"])
def test_float32_keeps_dtypes(name):
    f, _, _ = _quadratic(4, seed=6)

    def f32(phi):
        return f(jnp.concatenate([phi["a"], phi["b"]]).astype(jnp.float64)).astype(jnp.float32)

    phi = {"a": jnp.zeros(2, jnp.float32), "b": jnp.zeros(2, jnp.float32)}
    # lax.scan rejects a carry whose dtypes change, so this also checks the state.
    x, state, _, values, _ = _run(outer.by_name(name, 0.01), f32, phi, 5)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(x))
    assert values[-1] < values[0]
    if name == "ncg":
        assert state.step_size.dtype == jnp.float32


@pytest.mark.parametrize("name", ["gd", "ncg", "adam"])
@pytest.mark.parametrize("learning_rate", [0.1, None])
def test_by_name(name, learning_rate):
    opt = outer.by_name(name, learning_rate)
    assert isinstance(opt, optax.GradientTransformationExtraArgs)


def test_by_name_rejects_unknown_names():
    with pytest.raises(ValueError, match="'sgd'.*'gd', 'ncg', 'adam'"):
        outer.by_name("sgd", 0.1)


def test_nonlinear_cg_rejects_unknown_variant():
    with pytest.raises(ValueError, match="polak_ribiere"):
        outer.nonlinear_cg(variant="dai_yuan")


def test_jitted_step_does_not_retrace():
    f, _, _ = _quadratic(3, seed=7)
    opt = outer.nonlinear_cg()
    traces = 0

    @jax.jit
    def step(phi, state):
        nonlocal traces
        traces += 1
        value, grad = jax.value_and_grad(f)(phi)
        updates, state = opt.update(grad, state, phi, value=value, grad=grad, value_fn=f)
        return optax.apply_updates(phi, updates), state

    phi = jnp.zeros(3)
    state = opt.init(phi)
    phi, state = step(phi, state)
    phi, state = step(phi, state)
    assert traces == 1


def test_fibonacci_recurrence_grows_like_fibonacci_with_zero_hypergradients():
    opt = outer.fibonacci_recurrence()
    phi = {"a": jnp.asarray(0.01)}
    state = opt.init(phi)
    values = []
    step = jax.jit(opt.update)
    for _ in range(10):
        updates, state = step({"a": jnp.asarray(0.0)}, state, phi)
        phi = optax.apply_updates(phi, updates)
        values.append(float(phi["a"]))
    fib = [1, 2, 3, 5, 8, 13, 21, 34, 55, 89]  # F_{t+1} for t = 1 ... 10, after a_0 = F_1
    np.testing.assert_allclose(values, [0.01 * f for f in fib], rtol=1e-12)


def test_fibonacci_recurrence_follows_the_formula():
    opt = outer.fibonacci_recurrence()
    a0, betas = 0.3, [0.2, -0.5, 1.1]
    phi = jnp.asarray(a0)
    state = opt.init(phi)
    history = [0.0, a0]  # a_{-1}, a_0
    prev_beta = 0.0
    for beta in betas:
        updates, state = opt.update(jnp.asarray(beta), state, phi, value=1.0, grad=beta,
                                    value_fn=None)
        phi = optax.apply_updates(phi, updates)
        history.append(history[-1] + history[-2] * (np.exp(beta) - prev_beta))
        prev_beta = beta
        np.testing.assert_allclose(float(phi), history[-1], rtol=1e-12)
