"""hg.implicit.root: any solver's output differentiated through its optimality condition."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hypergrad as hg
from tests.problems import ridge

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


@pytest.mark.parametrize("solve", ["fixed_point", "gmres"])
def test_fixed_point_of_a_non_symmetric_map(solve):
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

    solution = hg.implicit.root(iterate, opt, solve=solve, alpha=1.0, tol=1e-12,
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
    solve = hg.implicit.linear_solver(solve, 500, 1e-12, 1.0)
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


@pytest.mark.parametrize("bad", [dict(solve="lu"), dict(solve="neumann"),
                                 dict(solve="fixed_point", alpha=0.0), dict(maxiter=-1),
                                 dict(tol=-1.0)])
def test_root_rejects_bad_options(bad):
    with pytest.raises(ValueError):
        hg.implicit.root(lbfgs, optimality, **bad)


# --------------------------------------------------------------------------------------
# jaxopt's ridge example (examples/implicit_diff/ridge_reg_implicit_diff.py), smallest form:
# a closed-form inner solve, optimality = the gradient of the ridge objective, l2 = exp(theta).


def ridge_objective(w, l2reg, data):
    x, y = data
    return 0.5 * jnp.mean((x @ w - y) ** 2) + 0.5 * l2reg * jnp.sum(w**2)


def ridge_solver(init, l2reg, data):
    x, y = data
    return jnp.linalg.solve(x.T @ x + len(y) * l2reg * jnp.eye(x.shape[1]), x.T @ y)


def ridge_hypergradient(theta, x, y, xv, yv):
    """``d mean (xv w* - yv)^2 / d theta`` with ``w* = (x'x + n e^theta I)^-1 x'y``."""
    n, d = x.shape
    l2reg = np.exp(theta)
    m = x.T @ x + n * l2reg * np.eye(d)
    w = np.linalg.solve(m, x.T @ y)
    g = 2 / len(yv) * xv.T @ (xv @ w - yv)
    return l2reg * g @ np.linalg.solve(m, -n * w)


def ridge_outer(solution, x, y, xv, yv):
    def outer(theta):
        w = solution(jnp.zeros(x.shape[1]), jnp.exp(theta), (x, y))
        return jnp.mean((xv @ w - yv) ** 2)

    return outer


@pytest.mark.parametrize("check", [True, False], ids=["check", "nocheck"])
@pytest.mark.parametrize("solve", ["cg", "gmres"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_jaxopt_ridge_example_against_closed_form(solve, check, jit):
    solution = hg.implicit.root(ridge_solver, jax.grad(ridge_objective), solve=solve,
                                tol=1e-12, check=check)
    grad = jax.grad(ridge_outer(solution, X, Y, XV, YV))
    grad = jax.jit(grad) if jit else grad
    for theta in (-3.0, 0.0):
        np.testing.assert_allclose(grad(jnp.asarray(theta)),
                                   ridge_hypergradient(theta, X, Y, XV, YV), rtol=1e-10)


def test_the_check_leaves_no_side_effect_in_the_program():
    # A jax.debug.callback anywhere (even in a cond branch never taken) gives the program
    # an effect, and JAX then dispatches it by the Python path (~0.1 ms a call on a CPU,
    # scripts/bench_root.py); the default check must not, and check=False has no callback.
    for check in (True, False):
        solution = hg.implicit.root(ridge_solver, jax.grad(ridge_objective), check=check)
        grad = jax.grad(ridge_outer(solution, X, Y, XV, YV))
        jaxpr = jax.make_jaxpr(grad)(jnp.asarray(0.0))
        assert not jaxpr.effects
        assert ("pure_callback" in str(jaxpr)) == check
        assert "debug_callback" not in str(jaxpr)


def test_check_false_does_not_warn():
    # filterwarnings = error: an unconverged solve would raise if check=False still warned.
    solution = hg.implicit.root(lbfgs, optimality, maxiter=1, tol=1e-12, has_aux=True,
                                check=False)
    grad = jax.jit(jax.grad(lambda phi: val_loss(solution(jnp.zeros(D), jnp.exp(phi))[0])))
    assert np.all(np.isfinite(grad(jnp.log(jnp.full(D, 0.1)))))


def test_warns_under_vmap():
    solution = hg.implicit.root(ridge_solver, jax.grad(ridge_objective), maxiter=1,
                                tol=1e-12)
    grad = jax.jit(jax.vmap(jax.grad(ridge_outer(solution, X, Y, XV, YV))))
    with pytest.warns(hg.implicit.NotConvergedWarning, match="did not converge"):
        jax.block_until_ready(grad(jnp.asarray([-1.0, 0.0])))


# The map a user porting from jaxopt's custom_fixed_point writes: a gradient step of size 1,
# T(w) = w - grad f(w), on a ridge problem whose Hessian has eigenvalues above 2 (so T is
# not even a contraction). Its optimality T(w) - w = -grad f(w) has J = -H, negative
# definite: the Richardson iteration v <- v + alpha (g - J'v) diverges for every alpha.
XS, YS = 2 * X, 2 * Y


def gradient_step(w, l2reg, data):
    return w - jax.grad(ridge_objective)(w, l2reg, data)


def test_gradient_step_map_has_hessian_eigenvalues_above_2():
    hessian = XS.T @ XS / N + np.exp(-1.0) * np.eye(D)
    assert np.linalg.eigvalsh(hessian).max() > 2


@pytest.mark.parametrize("how", ["fixed_point", "root"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_gradient_step_fixed_point_by_gmres_against_closed_form(how, jit):
    if how == "fixed_point":
        solution = hg.implicit.fixed_point(ridge_solver, gradient_step, tol=1e-12)
    else:
        solution = hg.implicit.root(
            ridge_solver, lambda w, *a: gradient_step(w, *a) - w, solve="gmres", tol=1e-12)
    grad = jax.grad(ridge_outer(solution, XS, YS, XV, YV))
    grad = jax.jit(grad) if jit else grad
    for theta in (-1.0, 0.5):
        np.testing.assert_allclose(grad(jnp.asarray(theta)),
                                   ridge_hypergradient(theta, XS, YS, XV, YV), rtol=1e-8)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_gradient_step_fixed_point_by_richardson_warns_and_names_gmres(jit):
    solution = hg.implicit.fixed_point(ridge_solver, gradient_step, solve="fixed_point",
                                       alpha=1.0, maxiter=1000)
    grad = jax.grad(ridge_outer(solution, XS, YS, XV, YV))
    grad = jax.jit(grad) if jit else grad
    with pytest.warns(hg.implicit.NotConvergedWarning, match="diverged.*solve='gmres'"):
        out = jax.block_until_ready(grad(jnp.asarray(-1.0)))
    # NaN, as the message says, not an overflowing number that looks like a gradient.
    assert np.isnan(out)
    # It stopped once the residual passed 1e4 |g|, long before maxiter or overflow.
    w = ridge_solver(None, np.exp(-1.0), (XS, YS))
    solve = hg.implicit.linear_solver("fixed_point", 1000, 1e-6, 1.0)
    _, info = hg.implicit.root_vjp(lambda w, *a: gradient_step(w, *a) - w, w,
                                   (jnp.exp(-1.0), (XS, YS)), jnp.ones(D), solve)
    assert 0 < int(info["iterations"]) < 50 and np.isnan(info["residual"])


def test_gmres_solves_a_non_symmetric_system_with_restarts():
    rng = np.random.default_rng(2)
    n = 30
    a = jnp.asarray(rng.standard_normal((n, n)) / np.sqrt(n) + 1.5 * np.eye(n))
    b = jnp.asarray(rng.standard_normal(n))
    exact = np.linalg.solve(a, b)
    for restart in (5, 30):
        x, iterations, rnorm = jax.jit(lambda b, r=restart: hg.implicit.gmres(
            lambda v: a @ v, b, restart=r, maxiter=1000, atol=1e-12))(b)
        np.testing.assert_allclose(x, exact, rtol=1e-10, atol=1e-12)
        assert rnorm <= 1e-12 and int(iterations) % restart == 0
        assert 0 < int(iterations) <= (30 if restart == 30 else 1000)


@pytest.mark.parametrize("lam", [0.1, np.array([0.05, 0.1, 0.2, 0.4])],
                         ids=["scalar", "per-feature"])
def test_estimator_with_gmres_matches_ridge_closed_form(lam):
    task, exact, _ = ridge(lam)
    _, grad, aux = hg.estimators.implicit("gmres", tol=1e-12)(task, task.space.init(),
                                                              jax.random.key(0))
    assert bool(aux["converged"]) and aux["residual"] <= 1e-12
    np.testing.assert_allclose(grad["l2"], exact, rtol=1e-10)
