"""hg.implicit.root: any solver's output differentiated through its optimality condition."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hypergrad as hg

N, D = 40, 4
_rng = np.random.default_rng(0)
X = _rng.standard_normal((N, D))
Y = X @ _rng.standard_normal(D) + 0.5 * _rng.standard_normal(N)
XV = _rng.standard_normal((20, D))
YV = XV @ _rng.standard_normal(D)


def train_loss(w, lam):
    return jnp.mean((X @ w - Y) ** 2) + jnp.sum(lam * w**2)


def val_loss(w):
    return jnp.mean((XV @ w - YV) ** 2)


def lbfgs(w0, lam, tol=1e-12, maxiter=200):
    """optax's L-BFGS with its zoom line search, to a gradient norm of ``tol``."""
    opt = optax.lbfgs()
    f = lambda w: train_loss(w, lam)  # noqa: E731
    value_and_grad = optax.value_and_grad_from_state(f)

    def step(carry):
        w, state = carry
        value, grad = value_and_grad(w, state=state)
        updates, state = opt.update(grad, state, w, value=value, grad=grad, value_fn=f)
        return optax.apply_updates(w, updates), state

    def cond(carry):
        _, state = carry
        count = optax.tree.get(state, "count")
        grad = optax.tree.get(state, "grad")
        return (count == 0) | ((count < maxiter) & (optax.tree.norm(grad) >= tol))

    w, state = jax.lax.while_loop(cond, step, (w0, opt.init(w0)))
    return w, optax.tree.get(state, "count")


def optimality(w, lam):
    return jax.grad(train_loss)(w, lam)


def ridge_exact(lam):
    """``d val_loss(w*(lam)) / d log lam`` from ``w* = (X'X + N diag(lam))^-1 X'y``."""
    lam = np.broadcast_to(lam, (D,))
    m = X.T @ X + N * np.diag(lam)
    w = np.linalg.solve(m, X.T @ Y)
    g = 2 / len(YV) * XV.T @ (XV @ w - YV)
    return lam * (-N * w * np.linalg.solve(m, g)), w


SOLUTION = hg.implicit.root(lbfgs, optimality, tol=1e-12, has_aux=True)


@jax.jit
def outer(phi):
    w, _ = SOLUTION(jnp.zeros(D), jnp.exp(phi))
    return val_loss(w)


GRAD = jax.jit(jax.grad(outer))
SOLVE = jax.jit(SOLUTION)


@pytest.mark.parametrize("lam", [np.full(D, 0.1), np.array([0.05, 0.1, 0.2, 0.4])],
                         ids=["equal", "per-feature"])
def test_lbfgs_solution_against_ridge_closed_form_and_central_differences(lam):
    phi = jnp.log(jnp.asarray(lam))
    # Reverse mode could not differentiate L-BFGS's while_loop at all without root.
    grad = GRAD(phi)
    exact, w_star = ridge_exact(lam)
    w, iterations = SOLVE(jnp.zeros(D), jnp.exp(phi))
    np.testing.assert_allclose(w, w_star, rtol=1e-10)
    assert 0 < int(iterations) < 200
    np.testing.assert_allclose(grad, exact, rtol=1e-6)
    eps = 1e-5
    fd = [(outer(phi.at[i].add(eps)) - outer(phi.at[i].add(-eps))) / (2 * eps)
          for i in range(D)]
    np.testing.assert_allclose(grad, fd, rtol=1e-6)


def test_fixed_point_of_a_non_symmetric_map():
    # x = tanh(A x + B theta) with a non-symmetric A: J = I - diag(1 - x^2) A is not
    # symmetric, so the backward pass uses the fixed-point solve, checked against central
    # differences of the forward iteration run to convergence.
    rng = np.random.default_rng(1)
    a = 0.3 * rng.standard_normal((5, 5))
    b = rng.standard_normal((5, 3))

    def iterate(x0, theta):
        def body(_, x):
            return jnp.tanh(a @ x + b @ theta)

        return jax.lax.fori_loop(0, 200, body, x0)

    def opt(x, theta):
        return x - jnp.tanh(a @ x + b @ theta)

    solution = hg.implicit.root(iterate, opt, solve="fixed_point", alpha=1.0, tol=1e-12,
                                maxiter=500)

    @jax.jit
    def outer(theta):
        return jnp.sum(jnp.sin(solution(jnp.zeros(5), theta)))

    theta = jnp.asarray([0.2, -0.1, 0.4])
    grad = jax.grad(outer)(theta)
    eps = 1e-5
    fd = [(outer(theta.at[i].add(eps)) - outer(theta.at[i].add(-eps))) / (2 * eps)
          for i in range(3)]
    np.testing.assert_allclose(grad, fd, rtol=1e-6)
    # The same cotangents, with diagnostics, from root_vjp.
    x = iterate(jnp.zeros(5), theta)
    solve = hg.implicit.linear_solver("fixed_point", 500, 1e-12, 1.0)
    (ct,), info = hg.implicit.root_vjp(opt, x, (theta,), jnp.cos(x), solve)
    np.testing.assert_allclose(ct, grad, rtol=1e-10)
    assert info["residual"] <= 1e-12 and float(info["optimality"]) < 1e-12
    assert 0 < int(info["iterations"]) < 500


def test_warns_when_the_backward_solve_does_not_converge():
    solution = hg.implicit.root(lbfgs, optimality, maxiter=1, tol=1e-12, has_aux=True)

    def outer(phi):
        return val_loss(solution(jnp.zeros(D), jnp.exp(phi))[0])

    phi = jnp.log(jnp.full(D, 0.1))
    grad = jax.jit(jax.grad(outer))
    for _ in range(2):  # under jit, each time the compiled function runs
        with pytest.warns(hg.implicit.NotConvergedWarning, match="did not converge"):
            jax.block_until_ready(grad(phi))


@pytest.mark.parametrize("bad", [dict(solve="gmres"), dict(solve="neumann"),
                                 dict(maxiter=-1), dict(tol=-1.0)])
def test_root_rejects_bad_options(bad):
    with pytest.raises(ValueError):
        hg.implicit.root(lbfgs, optimality, **bad)
