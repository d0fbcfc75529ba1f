"""Exact reversible learning: reverse-mode hypergradients without storing the trajectory.

Maclaurin, Duvenaud & Adams (2015), "Gradient-based Hyperparameter Optimization through
Reversible Learning", Algorithms 2-3 and §2.3. SGD with momentum runs forward in exact
fixed-point arithmetic; the bits that multiplying the velocity by ``mu < 1`` destroys are
pushed into an information buffer; the backward pass runs the dynamics in reverse,
recovering every step's weights bit for bit, while it accumulates the hypergradient.

Representation (all integer arrays, one entry per parameter, raveled over the pytree):

- a weight is ``w = W * 2**-k`` and a velocity ``v = V * 2**-k`` (``k = radix_bits``);
- the momentum is quantized to ``mu_q = n / d`` with ``d = 2**m`` (``m = momentum_bits``);
- the buffer is one big non-negative integer per parameter, held in ``K`` words of ``b``
  bits each (``int[K, P]``, word 0 least significant).

One step in our convention (``v <- mu v + g + wd w``; ``w <- w - lr v``)::

    r  = pop(buffer, n)                   # a digit in [0, n), 0 from an empty buffer
    V' = floor((n V + r) / d) + Q(g(w)) + Q(wd w)
    push(buffer, (n V + r) mod d, d)      # the destroyed bits, log2(d / n) net per step
    W' = W - Q(lr v')

with ``Q(x) = round(x * 2**k)``. Each line is a bijection given what the next step knows,
so the backward pass undoes it exactly: ``W = W' + Q(lr v')``, recompute ``g(w)``, and
``n V + r = d (V' - G) + pop(buffer, d)``, ``push(buffer, r, n)``. ``floor((n V + r)/d)``
is within one unit of ``mu_q V``, so the fixed-point run tracks the float one to ``2**-k``
per step. The buffer grows by ``log2(1/mu_q)`` bits per parameter per step on average,
plus ``m`` bits once (the first push into an empty buffer).

The hypergradient is reverse-mode differentiation of the *straight-through surrogate*:
the float dynamics above with ``mu`` in place of ``mu_q`` (``d mu_q / d mu = 1``) and each
rounding ``Q`` treated as the identity, evaluated along the exact fixed-point trajectory.
Its vector-Jacobian products come from ``jax.vjp`` of one float step at the recovered
``(w_t, v_t)``, whose gradient is differentiated by a forward-over-reverse Hessian-vector
product (:func:`hypergrad.inner.value_and_grad` with ``hvp="forward"``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from hypergrad.estimators.base import Estimator
from hypergrad.inner import lookup, per_leaf, takes_key, value_and_grad
from hypergrad.task import Task
from hypergrad.unroll import order, step_key
from hypergrad.validation import keywords

SGD_NAMES = ("learning_rate", "momentum", "weight_decay")


class FixedPoint(NamedTuple):
    """The static layout of the exact representation.

    Attributes:
      radix_bits: ``k``; a weight or velocity is an integer times ``2**-k``.
      momentum_bits: ``m``; the momentum is quantized to ``n / 2**m``.
      word_bits: ``b``; bits held in each buffer word.
      words: ``K``; buffer words per parameter (capacity ``K * b`` bits).
      int_dtype: ``int64`` (needs x64) or ``int32``.
    """

    radix_bits: int
    momentum_bits: int
    word_bits: int
    words: int
    int_dtype: Any

    @property
    def int_bits(self) -> int:
        return jnp.iinfo(self.int_dtype).bits

    @property
    def word_dtype(self) -> Any:
        """The unsigned type the buffer is stored in: the smallest that holds a word
        (``uint32`` for 32-bit words), so storage is not twice the information."""
        return jnp.dtype(jnp.uint16 if self.word_bits <= 16 else jnp.uint32)

    @property
    def limit(self) -> int:
        """Largest magnitude a weight, velocity or rounded update may take."""
        return 2 ** (self.int_bits - 2)


class ExactState(NamedTuple):
    """The exact training state: integer weights, velocities and the buffer."""

    w: jax.Array  # int[P]
    v: jax.Array  # int[P]
    buffer: jax.Array  # uint[K, P] (word_dtype), word 0 least significant
    buffer_overflow: jax.Array  # bool, sticky
    range_overflow: jax.Array  # bool, sticky


def layout(steps: int, *, radix_bits: int | None = None, momentum_bits: int | None = None,
           bits_per_step: float = 4.0, int_dtype: Any = None) -> FixedPoint:
    """The :class:`FixedPoint` layout for a horizon of ``steps`` (see :func:`reversible`)."""
    if int_dtype is None:
        int_dtype = jnp.int64 if jax.config.read("jax_enable_x64") else jnp.int32
    int_dtype = jnp.dtype(int_dtype)
    if int_dtype not in (jnp.dtype(jnp.int64), jnp.dtype(jnp.int32)):
        raise ValueError(f"int_dtype must be int64 or int32, got {int_dtype}")
    if int_dtype == jnp.int64 and not jax.config.read("jax_enable_x64"):
        raise ValueError("int64 fixed point needs jax_enable_x64; use int_dtype=int32")
    bits = jnp.iinfo(int_dtype).bits
    big = bits == 64
    k = (40 if big else 16) if radix_bits is None else radix_bits
    m = (30 if big else 15) if momentum_bits is None else momentum_bits
    # Word arithmetic needs word * 2**m + carry < 2**(bits - 1); popping 2**m needs m <= b.
    b = min(32, bits - 2 - m)
    if not 1 <= m <= b:
        raise ValueError(f"momentum_bits must be in [1, {(bits - 2) // 2}] for {int_dtype}, "
                         f"got {m}")
    if not 1 <= k <= bits - 4:
        raise ValueError(f"radix_bits must be in [1, {bits - 4}] for {int_dtype}, got {k}")
    if not bits_per_step > 0:
        raise ValueError(f"bits_per_step must be positive, got {bits_per_step!r}")
    words = math.ceil((m + bits_per_step * steps) / b) + 1
    return FixedPoint(k, m, b, words, int_dtype)


# --- the buffer: a big non-negative integer per parameter in K words of b bits -------------


# Words are stored unsigned in ``word_dtype`` and widened to ``int_dtype`` one at a time for
# the arithmetic, which needs ``word * 2**m + carry`` to fit.


def _push(buf, x, base, fp: FixedPoint):
    """``buf <- buf * base + x`` for ``0 <= x < base <= 2**m``; returns (buf, overflow)."""
    mask = (1 << fp.word_bits) - 1

    def body(carry, word):
        t = word.astype(fp.int_dtype) * base + carry
        return t >> fp.word_bits, (t & mask).astype(fp.word_dtype)

    carry, new = jax.lax.scan(body, x, buf)
    return new, jnp.any(carry != 0)


def _pop(buf, base, fp: FixedPoint):
    """``x = buf mod base; buf <- buf // base``; returns (x, buf)."""

    def body(rem, word):
        t = (rem << fp.word_bits) | word.astype(fp.int_dtype)
        return t % base, (t // base).astype(fp.word_dtype)

    rem, new = jax.lax.scan(body, jnp.zeros(buf.shape[1:], fp.int_dtype), buf, reverse=True)
    return rem, new


def _push_pow2(buf, x, fp: FixedPoint):
    """``buf <- buf * 2**m + x`` by shifting; returns (buf, overflow)."""
    m, b = fp.momentum_bits, fp.word_bits
    wide = buf.astype(fp.int_dtype)
    spill = wide >> (b - m)
    new = ((wide << m) & ((1 << b) - 1)) | jnp.concatenate([x[None], spill[:-1]])
    return new.astype(fp.word_dtype), jnp.any(spill[-1] != 0)


def _pop_pow2(buf, fp: FixedPoint):
    """``x = buf mod 2**m; buf <- buf // 2**m`` by shifting; returns (x, buf)."""
    m, b = fp.momentum_bits, fp.word_bits
    wide = buf.astype(fp.int_dtype)
    low = wide & ((1 << m) - 1)
    carried = jnp.concatenate([low[1:] << (b - m), jnp.zeros_like(low[:1])])
    return low[0], ((wide >> m) | carried).astype(fp.word_dtype)


def buffer_bits(buf, fp: FixedPoint) -> jax.Array:
    """Bits each parameter's buffer holds (the bit length of its big integer), ``int[P]``."""
    wide = buf.astype(fp.int_dtype)
    length = fp.int_bits - jax.lax.clz(wide)
    offset = (jnp.arange(fp.words, dtype=fp.int_dtype) * fp.word_bits)[:, None]
    return jnp.max(jnp.where(wide != 0, offset + length, 0), axis=0)


def _mul_mu(v, buf, n, fp: FixedPoint):
    """``v <- floor((n v + pop(n)) / d)``, pushing ``(n v + r) mod d``; exact and invertible."""
    m = fp.momentum_bits
    r, buf = _pop(buf, n, fp)
    # n v + r without overflow: v = a d + c with 0 <= c < d, so n v + r = n a d + (n c + r).
    t = n * (v & ((1 << m) - 1)) + r
    v = n * (v >> m) + (t >> m)
    buf, overflow = _push_pow2(buf, t & ((1 << m) - 1), fp)
    return v, buf, overflow


def _div_mu(v, buf, n, fp: FixedPoint):
    """The inverse of :func:`_mul_mu`."""
    m = fp.momentum_bits
    q, buf = _pop_pow2(buf, fp)
    # x = v d + q = n v_old + r; with v = n a + c: x = n a d + (c d + q), c d + q < n d.
    a, c = v // n, v % n
    u = (c << m) + q
    v = (a << m) + u // n
    buf, overflow = _push(buf, u % n, n, fp)
    return v, buf, overflow


def _quantize(x, fp: FixedPoint):
    """``round(x * 2**k)`` as an integer, and whether any entry left the safe range."""
    y = jnp.round(x * (2.0 ** fp.radix_bits))
    bad = ~(jnp.abs(y) <= fp.limit)  # also catches NaN
    return jnp.where(bad, 0, y).astype(fp.int_dtype), jnp.any(bad)


def _decode(z, dtype, fp: FixedPoint):
    return z.astype(dtype) * (2.0 ** -fp.radix_bits)


# --- the task, read as the other estimators read it -----------------------------------------


def sgd_defaults(task: Task) -> dict[str, Any]:
    """The fixed values given to :func:`hypergrad.inner.sgd`; ValueError for any other."""
    if task.optimizer.name != "sgd":
        raise ValueError(
            "the reversible estimator supports the inner optimizer hypergrad.inner.sgd only, "
            f"got {task.optimizer.name!r}"
        )
    defaults = dict(task.optimizer.defaults)
    return {name: defaults[name] for name in SGD_NAMES}


class _Problem(NamedTuple):
    """Everything one run needs, derived from the task (functions and arrays)."""

    loss: Any  # (w_flat, hparams, batch) -> scalar
    batch: Any  # idx -> batch
    xs: Any  # per-step scan inputs (t, idx)
    vectors: Any  # (hparams, t) -> (lr, mu, wd), each float[P]
    dtype: Any


def _problem(task: Task, hparams, data_key, unravel, template) -> _Problem:
    defaults = sgd_defaults(task)
    flat0, _ = ravel_pytree(template)
    dtype = flat0.dtype
    data, steps = task.train_data, task.steps
    ts = jnp.arange(steps, dtype=jnp.int32)
    if task.batch_size is None:
        xs = (ts, jnp.zeros((steps, 0), jnp.int32))

        def batch(idx):
            return data
    else:
        xs = (ts, order(task, data_key))

        def batch(idx):
            return jax.tree.map(lambda a: jnp.take(a, idx, axis=0), data)

    if task.stateful:
        raise ValueError("the reversible estimator cannot run a model's non-parameter state "
                         "(BatchNorm statistics) backward; use reverse() or forward()")
    # A train_loss that takes a key gets the same key at step t as in hypergrad.unroll,
    # forward and backward alike.
    keyed = takes_key(task.train_loss)

    def loss(w, hp, b, t):
        kw = {"key": step_key(data_key, t)} if keyed else {}
        return task.train_loss(unravel(w), task.space.at_step(hp, t), b, **kw)

    def vectors(hp, t):
        hp = task.space.at_step(hp, t)
        out = []
        for name in SGD_NAMES:
            tree = per_leaf(lookup(hp, name, defaults[name], "sgd"), template)
            out.append(jnp.concatenate([
                jnp.broadcast_to(jnp.asarray(h, dtype), p.shape).ravel()
                for h, p in zip(jax.tree.leaves(tree), jax.tree.leaves(template), strict=True)
            ]))
        return tuple(out)

    return _Problem(loss, batch, xs, vectors, dtype)


def _n(mu, fp: FixedPoint):
    """The numerator ``n`` of ``mu_q = n / 2**m``, in ``[1, 2**m]``."""
    d = 2 ** fp.momentum_bits
    return jnp.clip(jnp.round(mu * d), 1, d).astype(fp.int_dtype)


def _gradient_term(prob: _Problem, hparams, w_int, wd, b, t, fp: FixedPoint):
    """``G = Q(g(w)) + Q(wd w)``, rounded separately so no fused multiply-add can differ."""
    w = _decode(w_int, prob.dtype, fp)
    loss, g = jax.value_and_grad(prob.loss)(w, hparams, b, t)
    qg, bad_g = _quantize(g, fp)
    qd, bad_d = _quantize(wd * w, fp)
    return loss, qg + qd, bad_g | bad_d


def _forward_step(prob: _Problem, hparams, fp: FixedPoint, s: ExactState, x):
    t, idx = x
    lr, mu, wd = prob.vectors(hparams, t)
    loss, g, bad = _gradient_term(prob, hparams, s.w, wd, prob.batch(idx), t, fp)
    v, buf, over = _mul_mu(s.v, s.buffer, _n(mu, fp), fp)
    v = v + g
    step, bad_u = _quantize(lr * _decode(v, prob.dtype, fp), fp)
    w = s.w - step
    bad = bad | bad_u | jnp.any(jnp.abs(v) > fp.limit) | jnp.any(jnp.abs(w) > fp.limit)
    return ExactState(w, v, buf, s.buffer_overflow | over, s.range_overflow | bad), loss


def _backward_step(prob: _Problem, hparams, fp: FixedPoint, s: ExactState, x):
    t, idx = x
    lr, mu, wd = prob.vectors(hparams, t)
    step, _ = _quantize(lr * _decode(s.v, prob.dtype, fp), fp)
    w = s.w + step
    _, g, _ = _gradient_term(prob, hparams, w, wd, prob.batch(idx), t, fp)
    v, buf, _ = _div_mu(s.v - g, s.buffer, _n(mu, fp), fp)
    return ExactState(w, v, buf, s.buffer_overflow, s.range_overflow)


def surrogate_step(prob: _Problem, fp: FixedPoint, w, v, hparams, x):
    """One float step of the straight-through surrogate (what the hypergradient differentiates)."""
    t, idx = x
    lr, mu, wd = prob.vectors(hparams, t)
    mu = mu + jax.lax.stop_gradient(_n(mu, fp).astype(mu.dtype) / 2 ** fp.momentum_bits - mu)
    # Differentiated by a forward-over-reverse Hessian-vector product (the step index rides
    # with the batch, which is not differentiated): no activations are stored.
    _, g = value_and_grad(lambda w, hp, bt: prob.loss(w, hp, *bt), "forward")(
        w, hparams, (prob.batch(idx), t))
    v = mu * v + g + wd * w
    return w - lr * v, v


def forward(prob: _Problem, hparams, fp: FixedPoint, state: ExactState, *, record=False):
    """Run all steps forward; returns ``(state, (losses, bits_after_each_step[, W, V]))``."""

    def body(s, x):
        s, loss = _forward_step(prob, hparams, fp, s, x)
        used = jnp.sum(buffer_bits(s.buffer, fp))
        return s, (loss, used, s.w, s.v) if record else (loss, used)

    return jax.lax.scan(body, state, prob.xs)


def rewind(prob: _Problem, hparams, fp: FixedPoint, state: ExactState) -> ExactState:
    """Run all steps backward, recovering the initial state exactly."""

    def body(s, x):
        return _backward_step(prob, hparams, fp, s, x), None

    return jax.lax.scan(body, state, prob.xs, reverse=True)[0]


def start(task: Task, hparams, key, fp: FixedPoint):
    """The problem, the initial exact state and the float initial weights for one run.

    ``key`` is split as :func:`hypergrad.unroll.unroll` splits it.
    """
    init_key, data_key = jax.random.split(key)
    params = task.init_params(init_key, hparams)
    w0, unravel = ravel_pytree(params)
    prob = _problem(task, hparams, data_key, unravel, params)
    w, bad = _quantize(w0, fp)
    if task.opt_state is None:
        v = jnp.zeros_like(w)
    else:  # sgd's starting velocity, on the same grid as the weights
        v, bad_v = _quantize(ravel_pytree(task.opt_state.velocity)[0].astype(w0.dtype), fp)
        bad = bad | bad_v
    state = ExactState(w, v, jnp.zeros((fp.words, w.size), fp.word_dtype),
                       jnp.zeros((), bool), bad)
    return prob, state, unravel, init_key


def auto_bits_per_step(task: Task, momentum_bits: int, slack: float = 1.25) -> float:
    """Buffer capacity per parameter per step for the task's initial momentum: ``slack``
    times ``log2(1 / mu_q)`` for its smallest value (entries, schedule endpoints or the
    fixed value), the bits one step destroys."""
    if "momentum" in task.space:
        c = task.space.constraints["momentum"]
        values = [c.value] + ([c.schedule.end] if c.schedule is not None
                              and c.schedule.end is not None else [])
        mu = min(float(np.min(np.asarray(v, np.float64))) for v in values)
    else:
        mu = float(sgd_defaults(task)["momentum"])
    d = 2 ** momentum_bits
    mu_q = max(1, round(mu * d)) / d
    return max(slack * math.log2(1 / mu_q), 1e-3)


@keywords
def reversible(radix_bits: int | None = None, momentum_bits: int | None = None,
               bits_per_step: float | str = "auto", int_dtype: Any = None) -> Estimator:
    """Hypergradients by running exact fixed-point SGD with momentum backward.

    Memory does not grow with the trajectory: only the buffer of destroyed bits, about
    ``log2(1/momentum)`` bits per parameter per step, is kept (Maclaurin et al. 2015, Alg. 3).
    Supports the inner optimizer :func:`hypergrad.inner.sgd` only. Momentum 0 cannot be
    reversed: it is quantized to ``2**-momentum_bits`` and costs that many bits per step.

    Args:
      radix_bits: resolution ``2**-radix_bits`` of weights and velocities; default 40 for
        int64 (weights up to ``2**21``), 16 for int32 (up to ``2**13``).
      momentum_bits: momentum is quantized to a multiple of ``2**-momentum_bits``;
        default 30 for int64, 15 for int32. Also a one-off buffer cost per parameter.
      bits_per_step: buffer capacity per parameter per step (beyond the one-off
        ``momentum_bits``): ``"auto"`` (default) sizes it from the task's initial
        momentum, 1.25 ``log2(1/momentum)`` (0.19 bits at 0.9, 1.25 at 0.5), so the
        buffer takes a fraction of the memory of storing the weights; a number fixes it
        (4 holds momenta down to about 1/16) for runs whose momentum may fall far below
        where it started. Running out is detected (``aux["buffer_overflow"]``, NaN
        hypergradient), never silent.
      int_dtype: ``int64`` (default under x64) or ``int32`` (default otherwise).

    Learning-rate, momentum and weight-decay schedules and per-layer values are declared
    in the space (``positive(0.1, per="layer", schedule="per_step")``) and read step by
    step as the other estimators read them. A task's ``opt_state`` (sgd's starting
    velocity) starts the exact run, on the weights' grid; its ``batches`` order the steps.

    Other momentum forms map onto this one exactly. HIPS/hypergrad's ``V <- b V - (1 - b)
    g; W <- W + a V`` (a decay ``b`` and a step ``a``) is this sgd at ``learning_rate =
    a (1 - b)``, ``momentum = b``, with the starting velocity ``-V0 / (1 - b)``: tune
    those (the chain rule gives the hypergradient in ``a, b``;
    ``tests/test_task_inputs.py`` checks it against central differences of HIPS's loop).

    Returns:
      an estimator ``(task, phi, key) -> (value, grad, aux)``. ``value`` is the validation
      loss at the fixed-point weights; ``grad`` the hypergradient of the straight-through
      surrogate, all NaN when ``aux["overflow"]`` or not ``aux["exact"]``. ``aux`` holds
      ``train_loss``, ``train_losses``, ``params``, ``buffer_bits`` (bits held after each
      step, summed over parameters), ``bits_per_param_step``, ``max_param_bits``,
      ``capacity_bits`` (per parameter), ``storage_bits_per_param_step`` (the buffer's
      allocated storage over the horizon; 32 for float32 weights stored every step),
      ``buffer_overflow``, ``range_overflow``,
      ``overflow`` and ``exact`` (the backward pass recovered the initial weights,
      velocities and empty buffer bit for bit).

    Exactness needs the backward pass to recompute each step's gradient with the same
    rounding as the forward pass. On CPU this held in every test; on a GPU (H200) a tiny
    CNN at momentum 0.5 over 200 steps did not reverse (``exact`` False, grad NaN) while
    logistic regression did: XLA compiles the two passes' gradients separately.
    """
    options = dict(radix_bits=radix_bits, momentum_bits=momentum_bits,
                   bits_per_step=bits_per_step, int_dtype=int_dtype)
    auto = bits_per_step == "auto"
    if isinstance(bits_per_step, str) and not auto:
        raise ValueError(f"bits_per_step must be 'auto' or a positive number, got "
                         f"{bits_per_step!r}")
    fixed = 1.0 if isinstance(bits_per_step, str) else float(bits_per_step)
    fp1 = layout(1, radix_bits=radix_bits, momentum_bits=momentum_bits, bits_per_step=fixed,
                 int_dtype=int_dtype)  # validate now, not at the first call

    def estimate(task: Task, phi: Any, key: jax.Array):
        task.require_final("reversible")
        per_step = auto_bits_per_step(task, fp1.momentum_bits) if auto else fixed
        fp = layout(task.steps, radix_bits=radix_bits, momentum_bits=momentum_bits,
                    bits_per_step=per_step, int_dtype=int_dtype)
        hparams, constrain_vjp = jax.vjp(task.space.constrain, phi)
        prob, s0, unravel, init_key = start(task, hparams, key, fp)
        s_t, (losses, used) = forward(prob, hparams, fp, s0)

        w_t = _decode(s_t.w, prob.dtype, fp)
        value, (dw, dhp) = jax.value_and_grad(
            lambda w, hp: task.validation_loss(unravel(w), hp), argnums=(0, 1)
        )(w_t, hparams)

        def body(carry, x):
            s, dw, dv, dhp = carry
            s = _backward_step(prob, hparams, fp, s, x)
            w, v = _decode(s.w, prob.dtype, fp), _decode(s.v, prob.dtype, fp)
            _, vjp = jax.vjp(lambda w, v, hp: surrogate_step(prob, fp, w, v, hp, x), w, v,
                             hparams)
            dw, dv, dh = vjp((dw, dv))
            return (s, dw, dv, jax.tree.map(jnp.add, dhp, dh)), None

        (s_0, dw, _, dhp), _ = jax.lax.scan(
            body, (s_t, dw, jnp.zeros_like(dw), dhp), prob.xs, reverse=True
        )
        _, init_vjp = jax.vjp(
            lambda hp: ravel_pytree(task.init_params(init_key, hp))[0], hparams
        )
        (dinit,) = init_vjp(dw)
        (grad,) = constrain_vjp(jax.tree.map(jnp.add, dhp, dinit))

        exact = (jnp.all(s_0.w == s0.w) & jnp.all(s_0.v == s0.v) & jnp.all(s_0.buffer == 0))
        overflow = s_t.buffer_overflow | s_t.range_overflow
        # Never silently wrong: an overflowed buffer or a reversal that did not land back on
        # the initial state bit for bit (a gradient recomputed with different rounding)
        # poisons the hypergradient, which the outer loop then rejects.
        grad = jax.tree.map(lambda g: jnp.where(overflow | ~exact, jnp.nan, g), grad)
        value = jnp.where(s_t.range_overflow, jnp.nan, value)
        per_param = buffer_bits(s_t.buffer, fp)
        aux = {
            "train_loss": losses[-1], "train_losses": losses, "params": unravel(w_t),
            "buffer_bits": used, "bits_per_param_step": used[-1] / (s_t.w.size * task.steps),
            "max_param_bits": jnp.max(per_param),
            "capacity_bits": fp.words * fp.word_bits,
            "storage_bits_per_param_step": fp.words * fp.word_dtype.itemsize * 8 / task.steps,
            "buffer_overflow": s_t.buffer_overflow, "range_overflow": s_t.range_overflow,
            "overflow": overflow, "exact": exact,
        }
        return value, grad, aux

    return Estimator(estimate, "reversible", options)
