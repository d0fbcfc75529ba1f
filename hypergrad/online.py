"""Hypergradient descent (Baydin et al. 2018): optimizers that adapt their own learning rate.

Each transformation updates its learning rate once per step by gradient descent on the
loss with respect to the learning rate used in the previous step. If the previous update
was ``theta_{t-1} = theta_{t-2} - alpha d_{t-2}``, then ``d f(theta_{t-1}) / d alpha =
-grad f(theta_{t-1}) . d_{t-2}`` and (Baydin et al. 2018, §2 and Alg. 1)::

    alpha_t = alpha_{t-1} + beta grad f(theta_{t-1}) . d_{t-2}

where ``d`` is the step's direction: the gradient for SGD, the Nesterov direction for
SGDN and the bias-corrected Adam direction ``m_hat / (sqrt(v_hat) + eps)`` for Adam. The
states hold the current ``learning_rate`` (so a run can log it) and the previous
``direction``. These are ordinary optax ``GradientTransformation``s; they chain with any
other (``optax.chain(optax.clip_by_global_norm(1.0), sgd_hd(0.01, 1e-4))``), in which
case the gradient they see is the one the earlier transformations produced.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any


class SgdHdState(NamedTuple):
    """State of :func:`sgd_hd`: the current learning rate and the previous gradient."""

    learning_rate: jax.Array
    direction: PyTree


class SgdnHdState(NamedTuple):
    """State of :func:`sgdn_hd`: learning rate, velocity and the previous direction."""

    learning_rate: jax.Array
    velocity: PyTree
    direction: PyTree


class AdamHdState(NamedTuple):
    """State of :func:`adam_hd`: learning rate, Adam's moments and the previous direction."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    learning_rate: jax.Array
    mu: PyTree
    nu: PyTree
    direction: PyTree


def _dtype(params: PyTree) -> Any:
    leaves = jax.tree.leaves(params)
    return jnp.result_type(*leaves) if leaves else jnp.result_type(float)


def _dot(a: PyTree, b: PyTree, dtype: Any) -> jax.Array:
    """``sum_leaves <a, b>`` in ``dtype``."""
    terms = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.vdot(x, y).astype(dtype), a, b))
    return sum(terms, jnp.zeros((), dtype))


def _adapt(lr: jax.Array, beta: float, grads: PyTree, direction: PyTree) -> jax.Array:
    """``alpha + beta grad . d_prev``: one gradient step on the previous learning rate."""
    return lr + jnp.asarray(beta, lr.dtype) * _dot(grads, direction, lr.dtype)


def _step(lr: jax.Array, direction: PyTree) -> PyTree:
    return jax.tree.map(lambda d: (-lr * d).astype(d.dtype), direction)


def sgd_hd(learning_rate: float, beta: float) -> optax.GradientTransformation:
    """SGD whose learning rate follows hypergradient descent (SGD-HD, Baydin et al. 2018).

    Args:
      learning_rate: the initial learning rate alpha_0.
      beta: the hypergradient step size for the learning rate.
    """

    def init(params):
        lr = jnp.asarray(learning_rate, _dtype(params))
        return SgdHdState(lr, jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        del params
        lr = _adapt(state.learning_rate, beta, grads, state.direction)
        return _step(lr, grads), SgdHdState(lr, grads)

    return optax.GradientTransformation(init, update)


def sgdn_hd(
    learning_rate: float, beta: float, momentum: float = 0.9
) -> optax.GradientTransformation:
    """SGD with Nesterov momentum and a hypergradient-descent learning rate (SGDN-HD).

    ``v <- mu v + g``, ``d = g + mu v``, ``theta <- theta - alpha d``.

    Args:
      learning_rate: the initial learning rate alpha_0.
      beta: the hypergradient step size for the learning rate.
      momentum: the Nesterov momentum coefficient mu.
    """

    def init(params):
        lr = jnp.asarray(learning_rate, _dtype(params))
        zeros = jax.tree.map(jnp.zeros_like, params)
        return SgdnHdState(lr, zeros, zeros)

    def update(grads, state, params=None):
        del params
        lr = _adapt(state.learning_rate, beta, grads, state.direction)
        velocity = jax.tree.map(lambda v, g: (momentum * v + g).astype(g.dtype),
                                state.velocity, grads)
        direction = jax.tree.map(lambda g, v: (g + momentum * v).astype(g.dtype),
                                 grads, velocity)
        return _step(lr, direction), SgdnHdState(lr, velocity, direction)

    return optax.GradientTransformation(init, update)


def adam_hd(
    learning_rate: float, beta: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
) -> optax.GradientTransformation:
    """Adam whose learning rate follows hypergradient descent (Adam-HD).

    The learning rate moves along ``grad . u_prev`` with ``u = m_hat / (sqrt(v_hat) + eps)``
    the previous step's bias-corrected Adam direction.

    Args:
      learning_rate: the initial learning rate alpha_0.
      beta: the hypergradient step size for the learning rate.
      b1, b2, eps: Adam's decay rates and denominator offset.
    """

    def init(params):
        lr = jnp.asarray(learning_rate, _dtype(params))
        zeros = jax.tree.map(jnp.zeros_like, params)
        return AdamHdState(jnp.zeros((), jnp.int32), lr, zeros, zeros, zeros)

    def update(grads, state, params=None):
        del params
        lr = _adapt(state.learning_rate, beta, grads, state.direction)
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: (b1 * m + (1 - b1) * g).astype(g.dtype),
                          state.mu, grads)
        nu = jax.tree.map(lambda v, g: (b2 * v + (1 - b2) * g * g).astype(g.dtype),
                          state.nu, grads)
        c1, c2 = 1 - b1 ** count, 1 - b2 ** count
        direction = jax.tree.map(
            lambda m, v: ((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(m.dtype), mu, nu)
        return _step(lr, direction), AdamHdState(count, lr, mu, nu, direction)

    return optax.GradientTransformation(init, update)
