"""Implicit-function hypergradients at the trained weights (Pedregosa 2016; Lorraine et al.
2020; Grazzi et al. 2020)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from hypergrad.estimators.base import Estimator
from hypergrad.task import Task
from hypergrad.unroll import check_window, truncated_objective, unroll
from hypergrad.validation import keywords

SOLVERS = ("cg", "neumann", "fixed_point", "gmres")
# A Richardson-type solve ("neumann", "fixed_point") whose residual exceeds this multiple of
# |g| has diverged: it stops there and returns NaN rather than an overflowing iterate.
_DIVERGED = 1e4


class NotConvergedWarning(UserWarning):
    """The implicit linear solve stopped before reaching its tolerance."""


@keywords
def implicit(
    solver: str = "cg", maxiter: int = 100, tol: float = 1e-6, alpha: float | None = None,
    fallback: str | None = None, window: int = 10,
) -> Estimator:
    """Differentiate the stationarity condition of training instead of the training run.

    At weights ``w`` with ``grad_w L_train(w, lam) = 0`` on the full training set, the
    implicit function theorem gives (Pedregosa 2016, §2; Lorraine et al. 2020, §3)::

        dL_val/dphi = dL_val/dphi (direct) - (d^2 L_train / dphi dw) v,   H v = grad_w L_val

    with ``H`` the Hessian of the full-batch train loss at the trained weights. ``H`` is
    never formed: the solvers use Hessian-vector products (``jax.jvp`` of ``jax.grad``)
    and the mixed term is one VJP. The training run itself is not differentiated, so
    memory does not grow with the horizon; the answer is exact only to the extent that
    training reached a stationary point. Only hyperparameters that the train loss (or
    the validation loss) reads can be differentiated: those of the inner optimizer
    (learning rate, momentum, ``sgd``'s weight decay) do not appear in the stationarity
    condition, and tuning one raises ``ValueError``. Put an L2 penalty in the train
    loss to tune it here. Initial-weight hyperparameters get no gradient (``w*`` does
    not depend on where training starts).

    Solvers, each stopped at ``maxiter`` iterations or when the relative residual
    ``||H v - g|| / ||g||`` is at most ``tol``:

    - ``"cg"``: conjugate gradients; needs ``H`` symmetric positive definite.
    - ``"neumann"``: the truncated Neumann series ``v = alpha sum_{k<K} (I - alpha H)^k g``
      (Lorraine et al. 2020, Alg. 3), accumulated term by term; K iterations = K terms.
    - ``"fixed_point"``: the fixed-point iteration ``v <- v + alpha (g - H v)`` from
      ``v = 0`` (Grazzi et al. 2020, the FP method with the gradient-descent map).
      In exact arithmetic its K-th iterate equals the K-term Neumann sum; it recomputes
      the residual from ``v`` each step instead of accumulating powers.

    - ``"gmres"``: restarted GMRES (Saad & Schultz 1986, restart 20); needs only ``H``
      non-singular (an indefinite ``H``, at a saddle, too); ``maxiter`` counts its
      Hessian-vector products in whole cycles.

    Neumann and fixed-point need ``0 < alpha < 2 / lambda_max(H)`` to converge (the inner
    learning rate is a natural choice); K Neumann terms with ``alpha`` = the learning rate
    equal the K-step truncated hypergradient when training sits at the minimum of a
    quadratic. When their residual grows past ``1e4 |g|`` they stop and return NaN
    (a residual of NaN, reported as not converged) instead of an overflowing iterate.

    Convergence is reported in ``aux``. When the tolerance is not met the estimator warns
    with :class:`NotConvergedWarning` from a host callback that runs only then (a
    ``jax.pure_callback`` in a ``lax.cond``: a converged call pays nothing, a vmapped one
    one batched call), so the warning is
    issued both eagerly and under ``jax.jit`` (each time the compiled function runs; with
    warnings turned into errors a jitted call raises ``JaxRuntimeError``). Jitted code
    that must not warn can read ``aux["converged"]`` and filter the warning.

    Args:
      solver: ``"cg"``, ``"neumann"``, ``"fixed_point"`` or ``"gmres"``.
      maxiter: the most solver iterations (Hessian-vector products).
      tol: the relative residual at which the solve counts as converged.
      alpha: the step of ``"neumann"`` and ``"fixed_point"`` (required for them).
      fallback: ``None``, or ``"truncated"`` to return the ``window``-step truncated
        hypergradient (Shaban et al. 2019) instead when the solve does not converge.
      window: the truncation window of the fallback.

    Returns:
      an estimator ``(task, phi, key) -> (value, grad, aux)``; ``aux`` holds
      ``train_loss``, ``train_losses``, ``params``, ``iterations``, ``residual`` (final
      relative residual), ``converged`` and, with a fallback, ``fallback_used``.
    """
    solve = linear_solver(solver, maxiter, tol, alpha)
    if fallback not in (None, "truncated"):
        raise ValueError(f"fallback must be None or 'truncated', got {fallback!r}")
    check_window(window)

    def estimate(task: Task, phi: Any, key: jax.Array):
        task.require_final("implicit")
        _refuse_optimizer_hparams(task)
        hp = jax.lax.stop_gradient(task.space.constrain(phi))
        params, losses = unroll(task, hp, key)
        params = jax.lax.stop_gradient(params)
        value, grad, info = stationary_hypergradient(task, phi, params, solve)
        iterations, residual = info["iterations"], info["residual"]
        converged = residual <= tol  # False for a NaN residual
        aux = {"train_loss": losses[-1], "train_losses": losses, "params": params,
               "iterations": iterations, "residual": residual, "converged": converged}
        if fallback == "truncated":
            def truncated_grad():
                return jax.grad(
                    lambda p: truncated_objective(task, p, key, window)[0])(phi)

            grad = jax.lax.cond(converged, lambda: grad, truncated_grad)
            aux["fallback_used"] = ~converged
        # The warning's host call runs only where the solve failed (vmapped: one batched
        # call); a converged call keeps JAX's fast dispatch (see _warn_in_graph).
        grad = _warn_in_graph(_warn_unless_converged(solver, tol, fallback, window),
                              converged, residual, iterations, grad)
        return value, grad, aux

    options = {"solver": solver, "maxiter": maxiter, "tol": tol, "alpha": alpha,
               "fallback": fallback, "window": window}
    return Estimator(estimate, "implicit", options)


def stationary_hypergradient(
    task: Task, phi: Any, params: Any, solve: Callable
) -> tuple[jax.Array, Any, dict[str, Any]]:
    """The implicit hypergradient at weights ``params`` taken as a stationary point of
    the training loss (Pedregosa 2016, eq. 4; Lorraine et al. 2020, eq. 3).

    Solves ``H v = grad_w val_loss`` with ``solve(hvp, g) -> (v, iterations)`` (``H`` the
    training loss's Hessian, by Hessian-vector products) and differentiates
    ``val_loss(w, phi) - grad_w train_loss(w, phi) . v`` in ``phi`` with ``w`` and ``v``
    held fixed. Hyperparameters are read as at the last inner step.

    Returns:
      ``(value, grad, info)``: the validation loss, the hypergradient, and ``info`` with
      ``v``, ``iterations`` and ``residual`` (``|g - H v| / |g|``).
    """
    last = task.steps - 1
    hp = task.space.at_step(jax.lax.stop_gradient(task.space.constrain(phi)), last)
    w, unravel = ravel_pytree(params)

    def train_grad(w, hparams):
        return ravel_pytree(jax.grad(task.train_loss)(unravel(w), hparams, task.train_data))[0]

    def hvp(v):
        return jax.jvp(lambda w: train_grad(w, hp), (w,), (v,))[1]

    value, g = jax.value_and_grad(lambda w: task.mean_val_loss(unravel(w), hp))(w)
    v, iterations = solve(hvp, g)
    gnorm = jnp.linalg.norm(g)
    rnorm = jnp.linalg.norm(g - hvp(v))
    residual = jnp.where(gnorm > 0, rnorm / jnp.where(gnorm > 0, gnorm, 1), rnorm)
    v = jax.lax.stop_gradient(v)

    def lagrangian(p):
        hparams = task.space.at_step(task.space.constrain(p), last)
        return task.mean_val_loss(params, hparams) - jnp.vdot(
            train_grad(w, hparams), v)

    grad = jax.grad(lagrangian)(phi)
    return value, grad, {"v": v, "iterations": iterations, "residual": residual}


def root(
    solver: Callable, optimality: Callable, *, solve: str = "cg", maxiter: int = 100,
    tol: float = 1e-6, alpha: float | None = None, has_aux: bool = False,
    check: bool = True,
) -> Callable:
    """Make any inner solver's output differentiable through its optimality condition.

    ``solver(init, *args) -> x`` is any function that returns (close to) a root of
    ``optimality(x, *args)``: L-BFGS in a ``lax.while_loop``, a closed form, a call into
    C. The returned function runs it unchanged; in reverse mode (``jax.grad``,
    ``jax.vjp``) it differentiates ``x`` in ``args`` by the implicit function theorem,
    ``dx/dargs = -J^-1 d optimality/dargs`` with ``J = d optimality/dx`` at ``x``, so the
    solver's iterations are never differentiated (jaxopt's ``custom_root`` is the model).
    ``init`` gets a zero gradient. For a minimizer, ``optimality`` is the gradient of
    the objective in ``x``, ``J`` its Hessian, and ``"cg"`` the natural solve. For a
    fixed point ``x = T(x, *args)`` (jaxopt's ``custom_fixed_point``) use
    :func:`fixed_point`, or ``optimality = T(x, *args) - x`` with ``solve="gmres"``.

    The backward pass solves ``J' v = cotangent`` by vector-Jacobian products only, with
    the solves of :func:`hypergrad.estimators.implicit`:

    - ``"cg"``: conjugate gradients; needs ``J`` symmetric positive definite.
    - ``"gmres"``: restarted GMRES; any non-singular ``J`` (non-symmetric, indefinite),
      e.g. ``J = dT - I`` of a fixed point. ``maxiter`` counts its matrix-vector products.
    - ``"neumann"``, ``"fixed_point"``: the Richardson iteration ``v <- v + alpha
      (cotangent - J' v)``, which converges only when every eigenvalue of ``alpha J``
      lies in the disc ``|z - 1| < 1`` (for ``J`` symmetric: ``0 < alpha < 2 /
      lambda_max(J)``, and never for a negative definite ``J`` such as that of
      ``T(x) - x`` with ``T(x) = x - grad f(x)``). It is stopped when its residual grows
      past ``1e4 |cotangent|`` and then returns NaN, with the warning below naming the
      fix (``solve="gmres"``), instead of an overflowing iterate.

    With ``check`` (the default) the backward pass also computes the relative residual
    ``|cotangent - J' v| / |cotangent|`` (one more vector-Jacobian product) and warns with
    :class:`NotConvergedWarning`, eagerly and under ``jax.jit`` (each time the compiled
    function runs), when it stays above ``tol`` (or the solve diverged). Under
    ``jax.jit`` the warning is a host callback in the untaken branch of a ``lax.cond``:
    a converged call makes no host round trip, and the callback is a side-effect-free
    ``jax.pure_callback``, so the jitted function keeps JAX's C++ dispatch (a
    ``jax.debug.callback`` anywhere in the program costs ~0.1 ms per call on a CPU, as
    much as a whole hypergradient of a small problem). What the check costs is one more
    vector-Jacobian product and a few norms: ``scripts/bench_root.py`` measures it on
    jaxopt's ridge example. ``check=False`` skips it (no residual, no callback).
    :func:`root_vjp` returns the same cotangents with the solve's diagnostics.
    Forward mode (``jax.jvp``) is not defined. The answer is exact only as far as ``x``
    is a root: stop the solver tightly.

    Args:
      solver: ``(init, *args) -> x``, or ``-> (x, aux)`` with ``has_aux``; ``x`` a
        pytree of float arrays.
      optimality: ``(x, *args) -> residual``, a pytree with as many elements as ``x``,
        zero at the solution.
      solve: the linear solve of the backward pass, ``"cg"``, ``"gmres"``,
        ``"neumann"`` or ``"fixed_point"``.
      maxiter, tol, alpha: as in :func:`hypergrad.estimators.implicit`.
      has_aux: the solver returns ``(x, aux)``; ``aux`` is passed through and not
        differentiated.
      check: compute the backward solve's residual and warn when it is above ``tol``.

    Returns:
      ``solution(init, *args)``, the solver's output, differentiable in ``args``.
    """
    linear = linear_solver(solve, maxiter, tol, alpha, label="solve")
    warn = _warn_root(solve, tol)

    @jax.custom_vjp
    def run(init, args):
        return solver(init, *args)

    def fwd(init, args):
        out = solver(init, *args)
        return out, (init, out[0] if has_aux else out, args)

    def bwd(res, ct):
        init, x, args = res
        ct_args, info = root_vjp(optimality, x, args, ct[0] if has_aux else ct, linear)
        if check:  # else XLA drops the residual's product as unused
            residual, iterations = jax.lax.stop_gradient((info["residual"],
                                                          info["iterations"]))
            converged = residual <= tol  # False for NaN
            if isinstance(converged, jax.core.Tracer):
                ct_args = _warn_in_graph(warn, converged, residual, iterations, ct_args)
            else:
                warn(converged, residual, iterations)
        return jax.tree.map(_zero_cotangent, init), ct_args

    run.defvjp(fwd, bwd)

    def solution(init, *args):
        return run(init, args)

    return solution


def fixed_point(
    solver: Callable, fixed_point_fun: Callable, *, solve: str = "gmres",
    maxiter: int = 100, tol: float = 1e-6, alpha: float | None = None,
    has_aux: bool = False, check: bool = True,
) -> Callable:
    """:func:`root` for a fixed point ``x = fixed_point_fun(x, *args)`` (jaxopt's
    ``custom_fixed_point``): the optimality is ``fixed_point_fun(x, *args) - x``, so
    ``J = dT - I``, in general neither symmetric nor definite, and the backward pass
    solves ``J' v = cotangent`` by GMRES by default. ``solve="fixed_point"`` (Richardson,
    with ``alpha``) also works when ``T`` is a contraction; the arguments are those of
    :func:`root`.
    """

    def optimality(x, *args):
        return jax.tree.map(jnp.subtract, fixed_point_fun(x, *args), x)

    return root(solver, optimality, solve=solve, maxiter=maxiter, tol=tol, alpha=alpha,
                has_aux=has_aux, check=check)


def root_vjp(
    optimality: Callable, x: Any, args: tuple, cotangent: Any, solve: Callable,
) -> tuple[tuple, dict[str, Any]]:
    """The cotangents of ``args`` for a root ``x`` of ``optimality(x, *args)``, by the
    implicit function theorem: ``-(d optimality/dargs)' v`` with ``J' v = cotangent``.

    Args:
      optimality: ``(x, *args) -> residual``, zero at ``x``.
      x: the root (a pytree).
      args: the tuple of arguments to differentiate.
      cotangent: the cotangent of ``x`` (shaped like ``x``).
      solve: ``solve(matvec, b) -> (v, iterations)`` for ``matvec(v) = J' v``, as
        :func:`stationary_hypergradient` takes it.

    Returns:
      ``(cotangents, info)``: one cotangent per element of ``args``, and ``info`` with
      ``iterations``, ``residual`` (``|cotangent - J' v| / |cotangent|``) and
      ``optimality`` (``|optimality(x, *args)|``, how far ``x`` is from a root).
    """
    w, unravel = ravel_pytree(x)

    def residual(w, *a):
        return ravel_pytree(optimality(unravel(w), *a))[0]

    at_x, vjp_x = jax.vjp(lambda w: residual(w, *args), w)
    if at_x.shape != w.shape:
        raise ValueError(f"optimality returns {at_x.size} numbers for {w.size} unknowns; "
                         "it must return one per element of x")
    g = ravel_pytree(cotangent)[0].astype(w.dtype)

    def matvec(u):
        return vjp_x(u)[0]

    v, iterations = solve(matvec, g)
    gnorm = jnp.linalg.norm(g)
    rnorm = jnp.linalg.norm(g - matvec(v))
    rel = jnp.where(gnorm > 0, rnorm / jnp.where(gnorm > 0, gnorm, 1), rnorm)
    _, vjp_args = jax.vjp(lambda *a: residual(w, *a), *args)
    info = {"iterations": iterations, "residual": rel,
            "optimality": jnp.linalg.norm(at_x)}
    return vjp_args(-v), info


def _warn_in_graph(warn: Callable, converged: Any, residual: Any, iterations: Any,
                   cotangents: Any) -> Any:
    """Call ``warn(converged, residual, iterations)`` on the host, from traced code, only
    when not ``converged``; returns ``cotangents`` unchanged in value.

    The call is a ``jax.pure_callback`` in the false branch of a ``lax.cond`` whose zero
    result is added to the cotangents (so it is not dropped as unused). Unlike
    ``jax.debug.callback`` it gives the program no side effect, and JAX keeps dispatching
    it by its C++ fast path: a converged call costs one comparison, not the ~0.1 ms of the
    Python dispatch path that any effect forces (``scripts/bench_root.py --profile``).
    """

    def host(converged, residual, iterations):
        warn(converged, residual, iterations)
        return np.zeros(np.shape(residual), np.asarray(residual).dtype)

    def call():
        return jax.pure_callback(host, jax.ShapeDtypeStruct(residual.shape, residual.dtype),
                                 converged, residual, iterations, vmap_method="expand_dims")

    zero = jax.lax.cond(converged, lambda: jnp.zeros_like(residual), call)

    def add(leaf):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            return leaf + zero.astype(jnp.result_type(leaf))
        return leaf

    return jax.tree.map(add, cotangents)


def _zero_cotangent(leaf: Any) -> Any:
    leaf = jnp.asarray(leaf)
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
        return jnp.zeros_like(leaf)
    return np.zeros(leaf.shape, jax.dtypes.float0)


def _warn_root(solve: str, tol: float):
    def warn(converged, residual, iterations):
        if np.all(converged):
            return
        residual = np.max(residual)
        message = (f"root({solve!r}): the backward linear solve did not converge: relative "
                   f"residual {residual:.3g} > tol {tol:g} after {np.max(iterations)} "
                   "iterations; the gradient is inexact")
        if not residual <= 1:  # worse than v = 0, or NaN: the solve diverged
            fix = {"cg": "cg needs J = d optimality/dx symmetric positive definite",
                   "gmres": "J = d optimality/dx may be singular"}.get(
                solve, "the iteration v <- v + alpha (g - J'v) needs every eigenvalue of "
                       "alpha J in the disc |z - 1| < 1")
            message = (f"root({solve!r}): the backward linear solve diverged (relative "
                       f"residual {residual:.3g} after {np.max(iterations)} iterations); "
                       f"the gradient is NaN or meaningless. {fix}; use solve='gmres' "
                       "(hg.implicit.fixed_point uses it) for a non-symmetric or "
                       "indefinite J, e.g. the optimality T(x) - x of a fixed point")
        warnings.warn(message, NotConvergedWarning, stacklevel=2)

    return warn


def _refuse_optimizer_hparams(task: Task) -> None:
    if task.stochastic or task.stateful:
        what = "draws noise at every step" if task.stochastic else "carries model state"
        raise ValueError(
            f"implicit needs a deterministic training loss of the weights alone, and this "
            f"task's {what}; use reverse(), forward() or truncated() instead")
    if task.space.scheduled:
        raise ValueError(
            f"implicit cannot differentiate the schedule of {', '.join(task.space.scheduled)}: "
            "a training loss that changes over the steps has no single stationary point; "
            "use reverse(), forward() or truncated() instead")
    tuned = [name for name in task.optimizer.reads if name in task.space]
    if tuned:
        raise ValueError(
            f"implicit cannot differentiate {', '.join(tuned)}: the inner optimizer reads "
            f"it, so it does not appear in the stationarity condition grad_w L_train = 0; "
            f"use reverse(), forward() or truncated() instead"
        )


def _warn_unless_converged(solver: str, tol: float, fallback: str | None, window: int):
    def warn(converged, residual, iterations):
        if np.all(converged):
            return
        then = (f"returning the {window}-step truncated hypergradient instead"
                if fallback else "the hypergradient is inexact (aux['converged'] is False)")
        if not np.max(residual) <= 1 and solver in ("neumann", "fixed_point"):
            then += (f"; {solver} diverged (it returns NaN): alpha must be below "
                     "2 / lambda_max(H), or use solver='cg' or 'gmres', which need no alpha")
        warnings.warn(
            f"implicit({solver!r}) did not converge: relative residual "
            f"{np.max(residual):.3g} > tol {tol:g} after {np.max(iterations)} iterations; "
            f"{then}", NotConvergedWarning, stacklevel=2)

    return warn


def conjugate_gradient(hvp: Callable, b: jax.Array, x0: jax.Array | None = None, *,
                       maxiter: int, atol: Any) -> tuple[jax.Array, Any, jax.Array]:
    """Solve ``H x = b`` for a symmetric positive-definite ``H`` given as ``hvp``, by
    conjugate gradients (Hestenes & Stiefel 1952) in a ``lax.while_loop``.

    Stops when the residual norm ``|b - H x|`` is at most ``atol`` (which may be traced,
    so a shrinking tolerance does not recompile) or after ``maxiter`` iterations.

    Returns:
      ``(x, iterations, residual_norm)``.
    """
    r = b if x0 is None else b - hvp(x0)
    x0 = jnp.zeros_like(b) if x0 is None else x0

    def cond(s):
        i, _, _, _, rs = s
        return (i < maxiter) & (jnp.sqrt(rs) > atol)

    def body(s):
        i, x, r, p, rs = s
        hp_ = hvp(p)
        a = rs / jnp.vdot(p, hp_)
        x, r = x + a * p, r - a * hp_
        rs_new = jnp.vdot(r, r)
        return i + 1, x, r, r + (rs_new / rs) * p, rs_new

    i, x, _, _, rs = jax.lax.while_loop(cond, body, (0, x0, r, r, jnp.vdot(r, r)))
    return x, i, jnp.sqrt(rs)


def gmres(matvec: Callable, b: jax.Array, *, restart: int, maxiter: int,
          atol: Any) -> tuple[jax.Array, Any, jax.Array]:
    """Solve ``A x = b`` for any non-singular ``A`` given as ``matvec`` by restarted GMRES
    (Saad & Schultz 1986) in ``lax`` loops, from ``x = 0``.

    Each cycle builds an orthonormal basis of the Krylov space of ``min(restart, n)``
    products (Arnoldi, Gram-Schmidt done twice) and takes the ``x`` that minimizes
    ``|b - A x|`` over it (a small least-squares problem); cycles repeat until the
    residual norm is at most ``atol`` (may be traced) or at least ``maxiter`` products
    were made (whole cycles: up to ``maxiter + restart - 1``).

    Returns:
      ``(x, iterations, residual_norm)``, ``iterations`` the products made by the cycles.
    """
    n = b.size
    m = max(1, min(restart, n))
    rows = jnp.arange(m + 1)

    def cycle(x, r, beta):
        basis = jnp.zeros((m + 1, n), b.dtype).at[0].set(r / jnp.where(beta > 0, beta, 1))
        hess = jnp.zeros((m + 1, m), b.dtype)

        def arnoldi(j, carry):
            basis, hess = carry
            w = matvec(basis[j])
            mask = rows <= j
            h = jnp.where(mask, basis @ w, 0)
            w = w - h @ basis
            h2 = jnp.where(mask, basis @ w, 0)  # the second pass keeps the basis orthogonal
            w, h = w - h2 @ basis, h + h2
            norm = jnp.linalg.norm(w)
            # A zero norm is the lucky breakdown: the Krylov space holds the solution.
            basis = basis.at[j + 1].set(w / jnp.where(norm > 0, norm, 1))
            return basis, hess.at[:, j].set(h.at[j + 1].set(norm))

        basis, hess = jax.lax.fori_loop(0, m, arnoldi, (basis, hess))
        e1 = jnp.zeros(m + 1, b.dtype).at[0].set(beta)
        y = jnp.linalg.lstsq(hess, e1)[0]
        return x + y @ basis[:m]

    def cond(s):
        i, _, _, rnorm = s
        return (i < maxiter) & (rnorm > atol)

    def body(s):
        i, x, r, rnorm = s
        x = cycle(x, r, rnorm)
        r = b - matvec(x)
        return i + m, x, r, jnp.linalg.norm(r)

    i, x, _, rnorm = jax.lax.while_loop(
        cond, body, (0, jnp.zeros_like(b), b, jnp.linalg.norm(b)))
    return x, i, rnorm


def linear_solver(name: str, maxiter: int, tol: float, alpha: float | None = None, *,
                  label: str = "solver", restart: int = 20) -> Callable:
    """``solve(hvp, g) -> (v, iterations)`` for ``H v = g`` by ``"cg"``, ``"neumann"``,
    ``"fixed_point"`` (see :func:`implicit`) or ``"gmres"`` (:func:`gmres` with
    ``restart``; any non-singular ``H``), as ``lax`` loops, stopped at ``maxiter``
    iterations (matrix-vector products) or a relative residual of ``tol``.

    ``"gmres"`` keeps ``restart + 1`` vectors of ``g``'s size (``"cg"`` four).
    ``"neumann"`` and ``"fixed_point"`` stop early when their residual grows past
    ``1e4 |g|`` (they diverge: ``alpha`` is too large, or ``H`` has an eigenvalue of
    negative real part) and then return ``v = NaN``, not an overflowing iterate.

    The ``solve`` that :func:`stationary_hypergradient` and :func:`root_vjp` take;
    ``label`` names the option in error messages.
    """
    if name not in SOLVERS:
        raise ValueError(f"{label} must be one of {SOLVERS}, got {name!r}")
    if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 0:
        raise ValueError(f"maxiter must be a non-negative integer, got {maxiter!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    if isinstance(restart, bool) or not isinstance(restart, int) or restart < 1:
        raise ValueError(f"restart must be a positive integer, got {restart!r}")
    if name in ("neumann", "fixed_point") and (alpha is None or not alpha > 0):
        raise ValueError(
            f"{label}={name!r} needs a step alpha > 0 below 2 / (largest Hessian "
            f"eigenvalue), e.g. the inner learning rate; got alpha={alpha!r} "
            f"({label}='gmres' needs no step and works for any non-singular matrix)"
        )

    def solve(hvp, g):
        gnorm = jnp.linalg.norm(g)
        target = tol * gnorm

        def norm(x):
            return jnp.linalg.norm(x)

        if name == "cg":
            v, i, _ = conjugate_gradient(hvp, g, maxiter=maxiter, atol=target)
            return v, i
        if name == "gmres":
            v, i, _ = gmres(hvp, g, restart=restart, maxiter=maxiter, atol=target)
            return v, i

        a = jnp.asarray(alpha, g.dtype)
        if name == "neumann":
            # v_K = alpha sum_{k<K} t_k with t_k = (I - alpha H)^k g; t_K = g - H v_K.
            def body(s):
                i, v, t = s
                return i + 1, v + a * t, t - a * hvp(t)
        else:
            # v_{k+1} = v_k + alpha r_k with r_k = g - H v_k.
            def body(s):
                i, v, r = s
                v = v + a * r
                return i + 1, v, g - hvp(v)

        limit = _DIVERGED * gnorm

        def cond(s):
            i, _, r = s
            rnorm = norm(r)
            return (i < maxiter) & (rnorm > target) & (rnorm <= limit)  # NaN stops too

        i, v, r = jax.lax.while_loop(cond, body, (0, jnp.zeros_like(g), g))
        rnorm = norm(r)
        return jnp.where((rnorm <= limit) | (gnorm == 0), v, jnp.nan), i

    return solve
