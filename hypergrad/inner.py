"""Differentiable inner optimizers and the inner training step.

An inner optimizer is an optax-style pair of pure functions whose hyperparameters are
read from ``hparams`` (arrays, so they receive gradients) when the space tunes them, and
otherwise take the fixed values given to the factory. :func:`from_optax` turns any optax
optimizer into one; :func:`sgd` and :func:`adam` are written out because they read
per-layer and per-parameter values leaf by leaf (optax takes scalars) and because the
reversible estimator recognizes :func:`sgd` and runs it backward. The inner step is the
body of the ``lax.scan`` in :mod:`hypergrad.unroll`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hypergrad import validation
from hypergrad.validation import keywords

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
    """The carry of the unroll: weights, inner-optimizer state and the model's
    non-parameter state (BatchNorm statistics; ``None`` for a model without any)."""

    params: PyTree
    opt_state: PyTree
    model_state: PyTree = None


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
    This is how code that reads a hyperparameter declared with ``per="layer"``,
    ``"tensor"`` or ``"parameter"`` (a tree of values, not a number) uses it::

        l2 = hg.inner.per_leaf(hparams["l2"], params)   # a value for every leaf
        penalty = sum(jnp.sum(c * w ** 2) for c, w in
                      zip(jax.tree.leaves(l2), jax.tree.leaves(params)))
    """
    if jax.tree.structure(value) == jax.tree.structure(params):  # type: ignore[operator]
        return value
    return jax.tree.map(lambda _: value, params)


@keywords
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


@keywords
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


class Schedule(NamedTuple):
    """An optax schedule factory and its arguments, for :func:`from_optax`; see
    :func:`schedule`."""

    factory: Callable[..., Callable]
    values: tuple[tuple[str, Any], ...]


def schedule(factory: Callable[..., Callable], **values: Any) -> Schedule:
    """An optax schedule whose float arguments are hyperparameters, for :func:`from_optax`.

    ``hg.inner.schedule(optax.warmup_cosine_decay_schedule, init_value=0.0,
    peak_value=0.1, warmup_steps=10, decay_steps=100)``: each float argument (here
    ``init_value`` and ``peak_value``; integers such as ``warmup_steps`` stay fixed) is
    read from ``hparams`` under its own name when the space tunes it, and the schedule is
    rebuilt from those values at every step, so its hypergradient flows to them.

    The factory must accept traced values. ``optax.warmup_cosine_decay_schedule`` tests
    ``peak_value == 0`` in Python, so it is replaced by :func:`warmup_cosine_decay`, the
    same schedule written without that test.
    """
    import optax

    if factory is optax.warmup_cosine_decay_schedule:
        factory = warmup_cosine_decay
    return Schedule(factory, tuple(values.items()))


def warmup_cosine_decay(init_value: Any, peak_value: Any, warmup_steps: int,
                        decay_steps: int, end_value: Any = 0.0,
                        exponent: Any = 1.0) -> Callable:
    """``optax.warmup_cosine_decay_schedule`` for traced ``peak_value``: a linear warm-up
    from ``init_value`` to ``peak_value`` over ``warmup_steps``, then cosine decay to
    ``end_value`` at ``decay_steps``; the same values (optax's own pieces, joined)."""
    import optax

    nonzero = jnp.where(peak_value == 0, 1, peak_value)
    alpha = jnp.where(peak_value == 0, 0.0, end_value / nonzero)
    return optax.join_schedules([
        optax.linear_schedule(init_value, peak_value, warmup_steps),
        optax.cosine_decay_schedule(peak_value, decay_steps - warmup_steps, alpha, exponent),
    ], [warmup_steps])


def _is_float(value: Any) -> bool:
    return isinstance(value, float) or (
        isinstance(value, np.ndarray | jax.Array) and jnp.issubdtype(value.dtype, jnp.floating))


def _scalar(value: Any, name: str, owner: str) -> Any:
    if isinstance(value, Mapping) or len(jax.tree.leaves(value)) != 1:
        raise ValueError(
            f"{owner} reads {name} as one number (optax takes scalars), but the space gives "
            f"it per layer or per tensor: declare it global, or use hg.inner.sgd / "
            f"hg.inner.adam, which read per-leaf values")
    return value


@keywords
def from_optax(factory: Callable[..., Any], **values: Any) -> InnerOptimizer:
    """Any optax optimizer as a differentiable inner optimizer.

    ``hg.inner.from_optax(optax.adamw, learning_rate=0.05, weight_decay=1e-2)``: each
    float hyperparameter of ``factory`` (those given here, those it has defaults for, and
    required ones such as ``learning_rate``) is read from ``hparams`` under its own name
    when the space tunes it, and otherwise keeps the value given here or the factory's
    default; a required one left out must be tuned. Other arguments (booleans, masks,
    integers, a fixed schedule function) are passed unchanged. A :func:`schedule`
    argument is an optax schedule whose own float arguments are hyperparameters.

    Like ``optax.inject_hyperparams``, this calls ``factory`` again inside every update
    with the current values (traced arrays, so the hypergradient reaches them), but the
    values are not copied into the optimizer state: they come from ``hparams`` at each
    step, so per-step schedules of the space (``schedule="per_step"``) work too, and
    nothing is cast to a lower precision. The optimizer state keeps the dtypes ``init``
    gave it and the updates keep the weights' dtypes. Hyperparameters are scalars here;
    per-layer ones need :func:`sgd` or :func:`adam`.

    Args:
      factory: an optax optimizer factory such as ``optax.adamw``, ``optax.lion`` or
        ``optax.sgd``.
      **values: its arguments.

    Returns:
      an :class:`InnerOptimizer` named ``"optax.NAME"``.

    Raises:
      TypeError: ``factory`` is not a factory (a number, or an optimizer already built:
        ``optax.adam(0.1)``); or, when a task first traces the update, the optimizer
        needs the objective (a line search: ``optax.lbfgs``).
      ValueError: when a task first traces the update, a tuned hyperparameter is one
        optax uses in Python control flow (``exponential_decay``'s ``decay_rate``,
        ``cosine_onecycle_schedule``'s ``pct_start``): it can only be fixed.
    """
    if isinstance(factory, tuple) and hasattr(factory, "init") and hasattr(factory, "update"):
        raise TypeError("from_optax takes an optax optimizer factory and its arguments, not "
                        "an optimizer built from them (it calls the factory again with the "
                        "tuned values at every step): write from_optax(optax.adam, "
                        "learning_rate=0.1), not from_optax(optax.adam(0.1))")
    validation.function("from_optax's factory", factory,
                        "returning an optax GradientTransformation (optax.adamw, say)")
    owner = f"from_optax({getattr(factory, '__name__', 'factory')})"
    signature: Mapping[str, inspect.Parameter]
    try:
        signature = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C function: only the given values
        signature = {}
    tunable: dict[str, Any] = {}  # name -> fixed value, None if it must be tuned
    for name, p in signature.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name not in values and p.default is p.empty:
            tunable[name] = None
        elif name not in values and _is_float(p.default):
            tunable[name] = p.default
    static: dict[str, Any] = {}
    schedules: dict[str, Schedule] = {}
    for name, value in values.items():
        if isinstance(value, Schedule):
            schedules[name] = value
        elif _is_float(value):
            tunable[name] = value
        else:
            static[name] = value
    scheduled: set[str] = set()  # the schedules' arguments, not the factory's
    for name, sched in schedules.items():
        tunable.pop(name, None)
        for arg, value in sched.values:
            scheduled.add(arg)
            if _is_float(value):
                if arg in tunable:
                    raise ValueError(f"{owner}: the schedule of {name} and the optimizer "
                                     f"both have an argument {arg!r}; one hyperparameter "
                                     f"name cannot mean both")
                tunable[arg] = value

    def kwargs(hparams: Mapping[str, Any], placeholder: bool = False) -> dict[str, Any]:
        def read(name, default):
            if placeholder and name not in hparams:
                return 1.0 if default is None else default
            return _scalar(lookup(hparams, name, default, owner), name, owner)

        out = dict(static)
        out.update({n: read(n, d) for n, d in tunable.items() if n not in scheduled
                    and (n in values or n in hparams or d is None)})
        for name, sched in schedules.items():
            args = {a: read(a, v) if _is_float(v) else v for a, v in sched.values}
            out[name] = sched.factory(**args)
        return out

    def init(params):
        return factory(**kwargs({}, placeholder=True)).init(params)

    def untraceable(grads, state, params, hparams) -> list[str]:
        """The tuned names that optax reads as Python values: each traced alone."""
        tuned = [n for n in tunable if n in hparams]
        fixed = {n: 1.0 if tunable[n] is None else tunable[n] for n in tuned}
        found = []
        for name in tuned:
            def probe(v, name=name):
                return factory(**kwargs(fixed | {name: v})).update(grads, state, params)

            value = hparams[name]
            try:
                jax.eval_shape(probe, jax.ShapeDtypeStruct(jnp.shape(value),
                                                           jnp.result_type(value)))
            except _TRACER_ERRORS:
                found.append(name)
            except Exception:  # noqa: BLE001, S110 - another problem: not this name's
                pass
        return found or tuned

    def update(grads, state, params, hparams):
        try:
            updates, new_state = factory(**kwargs(hparams)).update(grads, state, params)
        except _TRACER_ERRORS:
            names = untraceable(grads, state, params, hparams)
            users = sorted({getattr(s.factory, "__name__", "the schedule")
                            for s in schedules.values()
                            if any(a in names for a, _ in s.values)} or {owner[11:-1]})
            target = "hg.inner.schedule(...)" if set(names) & scheduled else owner
            raise ValueError(
                f"{owner}: {', '.join(users)} uses {', '.join(names)} in Python control "
                f"flow (an if or an int() while building the optimizer), so "
                f"{'it' if len(names) == 1 else 'they'} cannot be tuned: remove "
                f"{', '.join(names)} from the HyperSpace and give {target} a fixed "
                f"value") from None
        except TypeError as e:
            if "value_fn" not in str(e):
                raise
            raise TypeError(f"{owner}: its update needs the objective (value, grad, "
                            f"value_fn: a line search, as optax.lbfgs has), which an inner "
                            f"training step does not have; choose an optimizer without a "
                            f"line search (optax.sgd, optax.adam, ...)") from None
        updates = jax.tree.map(lambda u, w: u.astype(w.dtype), updates, params)
        new_state = jax.tree.map(lambda new, old: jnp.asarray(new).astype(old.dtype),
                                 new_state, state)
        return updates, new_state

    # Scalar arrays become floats: the optimizer is static jit data and must hash.
    defaults = tuple((n, v if v is None or isinstance(v, float) or np.ndim(v) else float(v))
                     for n, v in tunable.items())
    return InnerOptimizer(init, update, tuple(tunable), f"optax.{owner[11:-1]}", defaults)


# What JAX raises where a traced value is used as a Python value (in an ``if``, ``int()``).
_TRACER_ERRORS = (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError,
                  jax.errors.TracerArrayConversionError)

HVP_MODES = ("reverse", "forward", "none")
SymbolicZero = jax.custom_derivatives.SymbolicZero


def check_hvp(hvp: Any) -> str:
    """``hvp`` if it is one of :data:`HVP_MODES`, else a ``ValueError``."""
    if hvp not in HVP_MODES:
        raise ValueError(f"hvp must be 'reverse', 'forward' or 'none', got {hvp!r}")
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

    - ``"none"``: the first-order approximation: the gradient's value, but reverse mode
      treats it as a constant (``stop_gradient``): no second derivatives at all, so an
      unroll's hypergradient keeps only what flows through the optimizer's update and
      the initial weights (first-order MAML, :func:`hypergrad.estimators.first_order`).
    """
    if check_hvp(hvp) == "reverse":
        return jax.value_and_grad(train_loss)
    if hvp == "none":
        plain = jax.value_and_grad(train_loss)

        def first_order(params, hparams, batch):
            loss, grads = plain(params, hparams, batch)
            return loss, jax.lax.stop_gradient(grads)

        return first_order

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


def takes_key(fn: Callable) -> bool:
    """Whether ``fn`` has a parameter named ``key`` (decided once per function)."""
    try:
        return _takes_key(fn)
    except TypeError:  # an unhashable callable: not cached
        return _takes_key.__wrapped__(fn)


@functools.lru_cache(maxsize=256)
def _takes_key(fn: Callable) -> bool:
    try:
        return "key" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def step_loss(train_loss: Callable, stateful: bool) -> Callable:
    """``train_loss`` as ``f(params, hparams, batch, key, state) -> (loss, state)``.

    A training loss may take a random ``key`` (keyword ``key``, detected by
    :func:`takes_key`; it gets the step's key) and, for a model with non-parameter state
    (``stateful``), takes ``state=`` and returns ``(loss, new_state)``. Losses without
    them are called as ``train_loss(params, hparams, batch)``; the state passes through.
    """
    keyed = takes_key(train_loss)

    def f(params, hparams, batch, key, state):
        kw: dict[str, Any] = {}
        if keyed:
            kw["key"] = jax.random.key(0) if key is None else key
        if stateful:
            return train_loss(params, hparams, batch, state=state, **kw)
        return train_loss(params, hparams, batch, **kw), state

    return f


def train_step(
    train_loss: Callable, optimizer: InnerOptimizer, hparams: Mapping[str, Any],
    state: InnerState, batch: PyTree, *, hvp: str = "reverse",
    hvp_batch_size: int | None = None, key: jax.Array | None = None,
) -> tuple[InnerState, jax.Array]:
    """One differentiable training step; returns the new state and the batch loss.

    ``hvp`` is how reverse mode differentiates through the step's gradient and
    ``hvp_batch_size`` the chunks of its Hessian-vector product (see
    :func:`value_and_grad`). ``key`` is the step's random key, passed to a
    ``train_loss`` that takes one (:func:`step_loss`); the model state
    ``state.model_state``, when not ``None``, is passed as ``state=`` and replaced by
    the one the loss returns (cast to its dtypes, so the scan's carry keeps its type).
    """
    stateful = state.model_state is not None
    keyed = takes_key(train_loss)
    if not (stateful or keyed):
        loss, grads = value_and_grad(train_loss, hvp, hvp_batch_size)(
            state.params, hparams, batch)
        model_state = None
    elif stateful:
        if hvp == "forward":
            raise ValueError("hvp='forward' does not carry a model's non-parameter state "
                             "(BatchNorm statistics); use hvp='reverse'")
        f = step_loss(train_loss, True)
        (loss, model_state), grads = jax.value_and_grad(
            lambda p: f(p, hparams, batch, key, state.model_state), has_aux=True)(state.params)
        model_state = jax.tree.map(lambda new, old: new.astype(old.dtype), model_state,
                                   state.model_state)
        if hvp == "none":
            grads = jax.lax.stop_gradient(grads)
    else:
        if hvp == "forward" and hvp_batch_size is not None:
            raise ValueError("hvp_batch_size with a train_loss that takes a key: a chunk "
                             "of the batch would draw different noise than the batch; "
                             "leave hvp_batch_size None")
        f = step_loss(train_loss, False)
        # The key rides with the batch, which is never differentiated.
        loss, grads = value_and_grad(lambda p, h, bk: f(p, h, bk[0], bk[1], None)[0], hvp)(
            state.params, hparams, (batch, key))
        model_state = None
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params, hparams)
    params = jax.tree.map(jnp.add, state.params, updates)
    return InnerState(params, opt_state, model_state), loss
