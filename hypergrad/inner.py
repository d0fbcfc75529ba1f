"""Differentiable inner optimizers and the inner training step.

An inner optimizer is an optax-style pair of pure functions whose hyperparameters are
read from ``hparams`` (arrays, so they receive gradients) when the space tunes them, and
otherwise take the fixed values given to the factory. The inner step is the body of the
``lax.scan`` in :mod:`hypergrad.unroll`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


class InnerOptimizer(NamedTuple):
    """A differentiable optimizer: ``init(params) -> state`` and
    ``update(grads, state, params, hparams) -> (updates, state)``; ``params + updates`` is
    the next iterate. ``reads`` names the hyperparameters it looks up in ``hparams``;
    ``name`` and ``defaults`` (``(name, fixed value)`` pairs, a tuple so the optimizer
    stays hashable as static jit data) let an estimator that reimplements the dynamics,
    such as ``reversible``, recognize it."""

    init: Callable[[PyTree], PyTree]
    update: Callable[[PyTree, PyTree, PyTree, Mapping[str, Any]], tuple[PyTree, PyTree]]
    reads: tuple[str, ...]
    name: str = "custom"
    defaults: tuple[tuple[str, Any], ...] = ()


class SgdState(NamedTuple):
    """State of :func:`sgd`: the heavy-ball velocity, shaped like ``params``."""

    velocity: PyTree


class InnerState(NamedTuple):
    """The carry of the unroll: weights and inner-optimizer state."""

    params: PyTree
    opt_state: PyTree


def lookup(hparams: Mapping[str, Any], name: str, default: Any, owner: str) -> Any:
    """``hparams[name]`` when the space tunes it, else the fixed ``default``."""
    if name in hparams:
        return hparams[name]
    if default is None:
        raise ValueError(
            f"{owner} needs {name}: tune it in the HyperSpace or give {owner}({name}=...)"
        )
    return default


def per_leaf(value: Any, params: PyTree) -> PyTree:
    """Broadcast a hyperparameter onto the leaves of ``params``.

    A value with the tree structure of ``params`` is used leaf by leaf; anything else (a
    scalar, or an array that broadcasts against every leaf) is shared by all leaves.
    """
    if jax.tree.structure(value) == jax.tree.structure(params):  # type: ignore[operator]
        return value
    return jax.tree.map(lambda _: value, params)


def sgd(
    learning_rate: float | None = None, momentum: float = 0.0, weight_decay: float = 0.0
) -> InnerOptimizer:
    """SGD with heavy-ball momentum and L2 weight decay, differentiable in all three.

    ``v <- momentum * v + (g + weight_decay * w)``;  ``w <- w - learning_rate * v``.
    Each hyperparameter is read from ``hparams`` under its own name when the space tunes
    it, and otherwise takes the value given here.

    Args:
      learning_rate: the fixed step size; ``None`` means the space must tune it.
      momentum: the fixed momentum coefficient.
      weight_decay: the fixed L2 coefficient.
    """

    def init(params):
        return SgdState(jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params, hparams):
        lr = per_leaf(lookup(hparams, "learning_rate", learning_rate, "sgd"), params)
        mu = per_leaf(lookup(hparams, "momentum", momentum, "sgd"), params)
        wd = per_leaf(lookup(hparams, "weight_decay", weight_decay, "sgd"), params)
        # Keep the weights' dtype: float32 weights stay float32 under float64 hparams.
        velocity = jax.tree.map(
            lambda v, g, w, mu, wd: (mu * v + g + wd * w).astype(w.dtype),
            state.velocity, grads, params, mu, wd,
        )
        updates = jax.tree.map(
            lambda v, lr: (-lr * v).astype(v.dtype), velocity, lr
        )
        return updates, SgdState(velocity)

    defaults = (("learning_rate", learning_rate), ("momentum", momentum),
                ("weight_decay", weight_decay))
    return InnerOptimizer(init, update, tuple(n for n, _ in defaults), "sgd", defaults)


class AdamState(NamedTuple):
    """State of :func:`adam`: the step count and both moment estimates."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    mu: PyTree
    nu: PyTree


def _safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt(x)`` whose derivative at 0 is 0 instead of infinity (a weight whose gradient
    has always been 0 must not turn the hypergradient into NaN)."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), 0)


def adam(
    learning_rate: float | None = None, b1: float = 0.9, b2: float = 0.999,
    eps: float = 1e-8, weight_decay: float = 0.0,
) -> InnerOptimizer:
    """Adam with decoupled weight decay (AdamW), differentiable in all five.

    ``m <- b1 m + (1 - b1) g``; ``v <- b2 v + (1 - b2) g^2``;
    ``w <- w - learning_rate * (m_hat / (sqrt(v_hat) + eps) + weight_decay * w)`` with the
    bias corrections ``m_hat = m / (1 - b1^t)``, ``v_hat = v / (1 - b2^t)`` (Kingma & Ba
    2015, Alg. 1; Loshchilov & Hutter 2019 for the decay). Each hyperparameter is read
    from ``hparams`` under its own name when the space tunes it (with any granularity or
    schedule), and otherwise takes the value given here.

    Args:
      learning_rate: the fixed step size; ``None`` means the space must tune it.
      b1, b2: the fixed decay rates of the first and second moment estimates.
      eps: the fixed denominator offset.
      weight_decay: the fixed decoupled decay coefficient.
    """

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return AdamState(jnp.zeros((), jnp.int32), zeros, zeros)

    def update(grads, state, params, hparams):
        def read(name, default):
            return per_leaf(lookup(hparams, name, default, "adam"), params)

        lr, beta1, beta2 = read("learning_rate", learning_rate), read("b1", b1), read("b2", b2)
        epsilon, wd = read("eps", eps), read("weight_decay", weight_decay)
        count = state.count + 1
        t = count.astype(jnp.result_type(float))

        mu = jax.tree.map(lambda g, m, w, b: (b * m + (1 - b) * g).astype(w.dtype),
                          grads, state.mu, params, beta1)
        nu = jax.tree.map(lambda g, v, w, b: (b * v + (1 - b) * g * g).astype(w.dtype),
                          grads, state.nu, params, beta2)

        def step(m, v, w, lr, beta1, beta2, epsilon, wd):
            m_hat = m / (1 - beta1 ** t)
            v_hat = v / (1 - beta2 ** t)
            return (-lr * (m_hat / (_safe_sqrt(v_hat) + epsilon) + wd * w)).astype(w.dtype)

        updates = jax.tree.map(step, mu, nu, params, lr, beta1, beta2, epsilon, wd)
        return updates, AdamState(count, mu, nu)

    defaults = (("learning_rate", learning_rate), ("b1", b1), ("b2", b2), ("eps", eps),
                ("weight_decay", weight_decay))
    return InnerOptimizer(init, update, tuple(n for n, _ in defaults), "adam", defaults)


def by_name(name: str, **fixed: Any) -> InnerOptimizer:
    """The inner optimizer called ``name`` (``"sgd"`` or ``"adam"``) with fixed values."""
    makers: dict[str, Callable[..., InnerOptimizer]] = {"sgd": sgd, "adam": adam}
    if name not in makers:
        raise ValueError(f"unknown inner optimizer {name!r}; choose sgd or adam")
    return makers[name](**fixed)


HVP_MODES = ("reverse", "forward")
SymbolicZero = jax.custom_derivatives.SymbolicZero


def _check_hvp(hvp: Any) -> str:
    if hvp not in HVP_MODES:
        raise ValueError(f"hvp must be 'forward' or 'reverse', got {hvp!r}")
    return hvp


def batch_mean(fn: Callable, data: PyTree, batch_size: int | None) -> PyTree:
    """The mean of ``fn`` over ``data`` taken ``batch_size`` examples at a time.

    ``fn(chunk)`` returns a pytree of arrays that is a mean over the chunk's examples (the
    leading axis of every leaf of ``data``), plus, optionally, terms that do not depend on
    the data. The chunks' values are averaged weighted by their sizes, which gives
    ``fn(data)`` up to rounding; full chunks run in a ``lax.scan`` whose body is
    rematerialized (so differentiating it also holds one chunk at a time), a smaller
    remainder chunk after it. ``batch_size=None`` (or at least the number of examples)
    is ``fn(data)``.
    """
    n = jax.tree.leaves(data)[0].shape[0]
    if batch_size is None or batch_size >= n:
        return fn(data)
    full, rest = divmod(n, batch_size)
    chunks = jax.tree.map(
        lambda a: a[: full * batch_size].reshape(full, batch_size, *a.shape[1:]), data)
    shapes = jax.eval_shape(fn, jax.tree.map(lambda a: a[0], chunks))
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)

    def add(total, chunk):
        return jax.tree.map(jnp.add, total, fn(chunk)), None

    total, _ = jax.lax.scan(jax.checkpoint(add, prevent_cse=False), zeros, chunks)
    total = jax.tree.map(lambda t: t * batch_size, total)
    if rest:
        tail = fn(jax.tree.map(lambda a: a[full * batch_size:], data))
        total = jax.tree.map(lambda t, r: t + rest * r, total, tail)
    return jax.tree.map(lambda t: t / n, total)


def value_and_grad(
    train_loss: Callable, hvp: str = "reverse", batch_size: int | None = None,
) -> Callable:
    """``(params, hparams, batch) -> (loss, grad_params)`` of ``train_loss``.

    ``hvp`` decides how reverse mode differentiates *through* this gradient, which is
    what the reverse pass of an unroll spends its time on:

    - ``"reverse"``: plain ``jax.value_and_grad``; reverse-over-reverse, storing the
      gradient computation's intermediates. Works under every transformation.
    - ``"forward"``: a ``jax.custom_vjp`` whose backward rule is one forward-over-reverse
      Hessian-vector product. With ``g = grad_w L(w, h)`` and cotangent ``u`` on ``g``,
      ``(dg/dw)^T u = H_ww u`` and ``(dg/dh)^T u = H_hw u`` because the Hessian of ``L``
      in ``(w, h)`` is symmetric, so both come from ``jax.jvp`` of ``grad_(w, h) L`` along
      ``(u, 0)``. The forward pass keeps only the inputs (weights, hyperparameters,
      batch), not the activations. Same result up to rounding; faster and far leaner
      on the seed CNN (``scripts/bench_unroll.py``), but not forward-differentiable (a
      ``custom_vjp``), and the training data must not be differentiated (make them a
      hyperparameter instead): that raises ``ValueError``.

    ``batch_size`` (only with ``hvp="forward"``) runs that Hessian-vector product over the
    batch ``batch_size`` examples at a time (:func:`batch_mean`), so the backward pass holds
    one chunk's activations instead of the whole batch's, for some time. ``train_loss``
    must then be a mean over the batch's examples plus terms that do not depend on the
    batch (every built-in task's is). Plain autodiff (``hvp="reverse"``) ignores it.
    """
    if _check_hvp(hvp) == "reverse":
        return jax.value_and_grad(train_loss)

    @jax.custom_vjp
    def vg(params, hparams, batch):
        return jax.value_and_grad(train_loss)(params, hparams, batch)

    def fwd(params, hparams, batch):
        if any(leaf.perturbed for leaf in jax.tree.leaves(batch)):
            raise ValueError(
                "hvp='forward' does not differentiate the training data; use hvp='reverse' "
                "or read the data from hparams")
        p, h, b = (jax.tree.map(lambda x: x.value, t) for t in (params, hparams, batch))
        return vg(p, h, b), (p, h, b)

    def bwd(res, cotangents):
        params, hparams, batch = res
        loss_ct, grad_ct = cotangents
        grad_ct = jax.tree.map(_instantiate, grad_ct, params)
        with_loss = not isinstance(loss_ct, SymbolicZero)

        def on(chunk):
            joint = lambda p: jax.grad(train_loss, argnums=(0, 1))(p, hparams, chunk)  # noqa: E731
            grads, hvps = jax.jvp(joint, (params,), (grad_ct,))
            if with_loss:  # d loss / d(w, h) = the gradient
                hvps = jax.tree.map(lambda a, g: a + loss_ct * g, hvps, grads)
            return hvps

        return (*batch_mean(on, batch, batch_size), None)

    vg.defvjp(fwd, bwd, symbolic_zeros=True)
    return vg


def _instantiate(ct: Any, like: jax.Array) -> jax.Array:
    return jnp.zeros(like.shape, like.dtype) if isinstance(ct, SymbolicZero) else ct


def train_step(
    train_loss: Callable, optimizer: InnerOptimizer, hparams: Mapping[str, Any],
    state: InnerState, batch: PyTree, *, hvp: str = "reverse",
    hvp_batch_size: int | None = None,
) -> tuple[InnerState, jax.Array]:
    """One differentiable training step; returns the new state and the batch loss.

    ``hvp`` is how reverse mode differentiates through the step's gradient and
    ``hvp_batch_size`` the chunks of its Hessian-vector product (see
    :func:`value_and_grad`)."""
    loss, grads = value_and_grad(train_loss, hvp, hvp_batch_size)(
        state.params, hparams, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params, hparams)
    params = jax.tree.map(jnp.add, state.params, updates)
    return InnerState(params, opt_state), loss
