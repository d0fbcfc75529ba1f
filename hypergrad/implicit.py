"""Implicit differentiation of any inner solver through its optimality condition.

``hg.implicit.root(solver, optimality)`` makes ``solver(init, *args)`` differentiable in
``args``, and ``hg.implicit.fixed_point(solver, T)`` does the same for a fixed point
``x = T(x, *args)`` (jaxopt's ``custom_root`` and ``custom_fixed_point``); the estimator
that differentiates a task's own training this way is
:func:`hypergrad.estimators.implicit`, and all share the linear solves defined there.
"""

from hypergrad.estimators.implicit import (
    SOLVERS,
    NotConvergedWarning,
    conjugate_gradient,
    fixed_point,
    gmres,
    linear_solver,
    root,
    root_vjp,
    stationary_hypergradient,
)

__all__ = ["SOLVERS", "NotConvergedWarning", "conjugate_gradient", "fixed_point", "gmres",
           "linear_solver", "root", "root_vjp", "stationary_hypergradient"]
