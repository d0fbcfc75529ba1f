"""Implicit differentiation of any inner solver through its optimality condition.

``hg.implicit.root(solver, optimality)`` makes ``solver(init, *args)`` differentiable in
``args``; the estimator that differentiates a task's own training this way is
:func:`hypergrad.estimators.implicit`, and both share the linear solves defined there.
"""

from hypergrad.estimators.implicit import (
    SOLVERS,
    NotConvergedWarning,
    conjugate_gradient,
    linear_solver,
    root,
    root_vjp,
    stationary_hypergradient,
)

__all__ = ["SOLVERS", "NotConvergedWarning", "conjugate_gradient", "linear_solver", "root",
           "root_vjp", "stationary_hypergradient"]
