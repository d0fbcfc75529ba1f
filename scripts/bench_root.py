"""Time one hypergradient through ``hg.implicit.root`` against jaxopt's ``custom_root``.

Run:  pip install --no-deps jaxopt   # only for this script; hypergrad does not need it
      python scripts/bench_root.py [--dims 3 10 100] [--repeats 500] [--profile]

The problem is jaxopt's ridge example (``examples/implicit_diff/ridge_reg_implicit_diff.py``)
on synthetic data: inner objective ``0.5 mean (X w - y)^2 + 0.5 l2 |w|^2`` with ``l2 =
exp(theta)``, solved in closed form, optimality = its gradient in ``w``, backward solve
conjugate gradients (tolerance ``--tol`` in both) and outer loss the validation mean squared
error. For each dimension ``d`` (n = 200 training rows, 100 validation rows, rows scaled to
unit norm as in the example) it compiles ``jax.jit(jax.grad(outer))`` for

- ``ours``: ``hg.implicit.root`` with its defaults (``check=True``: the residual, and a
  warning ``jax.pure_callback`` in a ``lax.cond`` branch taken only when the solve did not
  converge);
- ``nocheck``: ``hg.implicit.root(..., check=False)``;
- ``jaxopt``: ``jaxopt.implicit_diff.custom_root`` with ``linear_solve.solve_cg``;
- ``jaxopt_cb``: the same with a ``jax.pure_callback`` in a never-taken ``lax.cond``
  branch added to the hypergradient, as ``ours`` has. The mere presence of a host callback
  makes XLA:CPU run a small program ~0.03 ms faster here (measured, cause not profiled),
  so ``ours/jaxopt_cb`` is the ratio of the work alone;

then calls them in turn ``--repeats`` times (so a machine busier this second than the last
moves all alike) and prints the median time of each, the ratios to jaxopt, the largest
relative difference between the hypergradients, and ours' relative error against the
closed-form ``d/dtheta`` of the validation loss through ``w* = (X'X + n l2 I)^-1 X'y``.

``--profile`` adds columns that take the default apart (built from
``hg.implicit.root_vjp`` and ``linear_solver``): ``bare`` (the solve only), ``+residual``
(the extra product), ``cond_debug`` (a ``jax.debug.callback`` inside the ``lax.cond``,
never taken) and ``always_debug`` (a ``jax.debug.callback`` on every call, what ``root``
did before ``check``). Times are in milliseconds, in float64, on whatever device JAX picks.
Exits with status 2 if jaxopt is not installed.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[3, 10, 100])
    parser.add_argument("--repeats", type=int, default=500)
    parser.add_argument("--tol", type=float, default=1e-10)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    try:
        from jaxopt import implicit_diff, linear_solve
    except ImportError:
        print("bench_root.py needs jaxopt: pip install --no-deps jaxopt", file=sys.stderr)
        return 2

    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np

    import hypergrad as hg
    from hypergrad.estimators.implicit import _warn_root

    def objective(w, l2reg, data):
        x, y = data
        return 0.5 * jnp.mean((x @ w - y) ** 2) + 0.5 * l2reg * jnp.sum(w**2)

    def inner(init, l2reg, data):
        x, y = data
        n, d = x.shape
        return jnp.linalg.solve(x.T @ x + n * l2reg * jnp.eye(d), x.T @ y)

    optimality = jax.grad(objective)
    solutions = {
        "ours": hg.implicit.root(inner, optimality, tol=args.tol),
        "nocheck": hg.implicit.root(inner, optimality, tol=args.tol, check=False),
        "jaxopt": implicit_diff.custom_root(
            optimality, solve=functools.partial(linear_solve.solve_cg, tol=args.tol))(inner),
    }
    if args.profile:
        for name in ("bare", "+residual", "cond_debug", "always_debug"):
            solutions[name] = _variant(name, inner, optimality, args.tol, hg, _warn_root)

    solutions["jaxopt_cb"] = solutions["jaxopt"]
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, float64, median of "
          f"{args.repeats} calls, ms")
    names = list(solutions)
    head = "".join(f"{n:>13}" for n in names)
    print(f"{'d':>5}{head}{'ours/jaxopt':>13}{'ours/jaxopt_cb':>16}{'nocheck/jaxopt':>16}"
          f"{'max_rel_diff':>14}{'ours_vs_exact':>15}")
    for d in args.dims:
        rng = np.random.default_rng(d)
        x = rng.standard_normal((300, d))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        y = x @ rng.standard_normal(d) + 0.1 * rng.standard_normal(300)
        xt, yt, xv, yv = (jnp.asarray(a) for a in (x[:200], y[:200], x[200:], y[200:]))
        theta = jnp.asarray(np.log(0.01))

        def compile_(solution, name, d=d, xt=xt, yt=yt, xv=xv, yv=yv, theta=theta):
            def outer(log_l2):
                w = solution(jnp.zeros(d), jnp.exp(log_l2), (xt, yt))
                return jnp.mean((xv @ w - yv) ** 2)

            f = jax.jit(_with_idle_callback(jax.grad(outer)) if name == "jaxopt_cb"
                        else jax.grad(outer))
            f(theta).block_until_ready()
            return f

        fns = {n: compile_(solutions["jaxopt" if n == "jaxopt_cb" else n], n) for n in names}
        grads = {n: float(f(theta)) for n, f in fns.items()}
        times: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(args.repeats):
            for n, f in fns.items():
                t = time.perf_counter()
                f(theta).block_until_ready()
                times[n].append(time.perf_counter() - t)
        med = {n: 1e3 * statistics.median(t) for n, t in times.items()}
        ref = grads["jaxopt"]
        diff = max(abs(g - ref) / abs(ref) for g in grads.values())
        exact = _exact(*(np.asarray(a) for a in (xt, yt, xv, yv)), float(np.exp(theta)))
        err = abs(grads["ours"] - exact) / abs(exact)
        row = "".join(f"{med[n]:>13.3f}" for n in names)
        print(f"{d:>5}{row}{med['ours'] / med['jaxopt']:>13.2f}"
              f"{med['ours'] / med['jaxopt_cb']:>16.2f}"
              f"{med['nocheck'] / med['jaxopt']:>16.2f}{diff:>14.1e}{err:>15.1e}")
    return 0


def _exact(xt, yt, xv, yv, l2reg):
    """The closed-form ``d val_mse / d theta`` at ``l2reg = exp(theta)``."""
    import numpy as np

    n, d = xt.shape
    m = xt.T @ xt + n * l2reg * np.eye(d)
    w = np.linalg.solve(m, xt.T @ yt)
    g = 2 / len(yv) * xv.T @ (xv @ w - yv)
    return float(l2reg * g @ np.linalg.solve(m, -n * w))


def _with_idle_callback(f):
    """``f`` with a ``jax.pure_callback`` in a ``lax.cond`` branch that is never taken, as
    in ``ours``: on a CPU such a program runs ~0.03 ms faster (measured, cause not
    profiled), so ``ours/jaxopt_cb`` compares the work alone."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    def g(x):
        y = f(x)
        zero = jax.lax.cond(jnp.isfinite(y), lambda: jnp.zeros_like(y), lambda: jax.pure_callback(
            lambda: np.zeros((), y.dtype), jax.ShapeDtypeStruct((), y.dtype)))
        return y + zero

    return g


def _variant(name, inner, optimality, tol, hg, warn_root):
    """``root``'s backward pass with parts of the convergence check switched on."""
    import jax

    linear = hg.implicit.linear_solver("cg", 100, tol)
    warn = warn_root("cg", tol)

    @jax.custom_vjp
    def run(init, args):
        return inner(init, *args)

    def fwd(init, args):
        x = inner(init, *args)
        return x, (init, x, args)

    def bwd(res, ct):
        init, x, args = res
        cts, info = hg.implicit.root_vjp(optimality, x, args, ct, linear)
        ok = info["residual"] <= tol
        if name == "+residual":  # keep the residual alive without a callback
            cts = jax.tree.map(lambda c: c + 0 * info["residual"], cts)
        elif name == "cond_debug":
            jax.lax.cond(ok, lambda: None, lambda: jax.debug.callback(
                warn, ok, info["residual"], info["iterations"]))
        elif name == "always_debug":
            jax.debug.callback(warn, ok, info["residual"], info["iterations"])
        return jax.tree.map(jax.numpy.zeros_like, init), cts

    run.defvjp(fwd, bwd)
    return lambda init, *args: run(init, args)


if __name__ == "__main__":
    sys.exit(main())
