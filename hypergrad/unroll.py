"""The unroll: T inner steps as one ``lax.scan``, with checkpoint policies.

This is the one place training is run. Estimators differentiate through it (reverse),
push tangents through it (forward), or run it to convergence (implicit).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from hypergrad import tasks as tasks_lib
from hypergrad.inner import InnerState, check_hvp, takes_key, train_step
from hypergrad.task import Task

PyTree = Any


def batch_indices(key: jax.Array, num_examples: int, batch_size: int, steps: int) -> jax.Array:
    """Minibatch indices ``int32[steps, batch_size]``, a fresh permutation each epoch.

    An epoch is ``num_examples // batch_size`` steps; the remainder of each permutation
    is dropped so every batch has the same size.
    """
    per_epoch = num_examples // batch_size
    epochs = math.ceil(steps / per_epoch)
    perms = jax.vmap(lambda k: jax.random.permutation(k, num_examples))(
        jax.random.split(key, epochs)
    )
    idx = perms[:, : per_epoch * batch_size].reshape(epochs * per_epoch, batch_size)
    return idx[:steps].astype(jnp.int32)


def auto_policy(backend: str | None = None) -> str | None:
    """The checkpoint policy ``"auto"`` stands for on ``backend`` (default JAX's).

    On CPU ``"step"``: storing each step's weights and recomputing its activations in the
    backward pass was faster than storing everything for every model measured, with 5-26x
    less memory (issue 20; ``scripts/bench_unroll.py --checkpoint
    none step``, T = 200, batch 100, float32, 2-core CPU, plain reverse mode: seed CNN
    2.09 s against 2.48 s, the 2-conv CNN with 16 and 32 channels 1.94 s against 2.24 s,
    the MLP at T = 10 000 2.82 s against 3.27 s; docs/benchmarks/speed.md, "The default
    checkpoint policy, measured", also has ``hvp="forward"``, faster still on the CNNs but
    not the default since it refuses some tasks). Elsewhere ``None`` (store every step):
    on the GPU only storing everything and every-10 have been timed (equal at T = 200 on
    one H200), so the GPU keeps the policy it was measured with until
    ``scripts/gpu_check.sh`` times ``step`` there.
    """
    return "step" if (backend or jax.default_backend()) == "cpu" else None


def order(task: Task, data_key: jax.Array) -> jax.Array:
    """The task's minibatch indices ``[steps, batch_size]``: its explicit ``batches``, or
    shuffled epochs drawn from ``data_key`` (:func:`batch_indices`)."""
    if task.batches is not None:
        return task.batches
    assert task.batch_size is not None
    return batch_indices(data_key, task.num_examples, task.batch_size, task.steps)


def check_policy(checkpoint: Any) -> int | str | None:
    """Normalize a checkpoint policy to ``None`` (store everything), ``"step"``, a chunk
    length k > 1, or ``"nested"``; ``"auto"`` becomes :func:`auto_policy`'s choice for
    JAX's default backend."""
    if checkpoint == "auto":
        return auto_policy()
    if checkpoint is None or checkpoint == "none":
        return None
    if checkpoint == "step" or (checkpoint == 1 and not isinstance(checkpoint, bool)):
        return "step"
    if checkpoint == "nested":
        return "nested"
    if isinstance(checkpoint, int) and not isinstance(checkpoint, bool) and checkpoint >= 1:
        return checkpoint
    raise ValueError(
        f"checkpoint must be 'auto', None, 'step', 'nested' or a positive integer k (every "
        f"k steps), got {checkpoint!r}"
    )


def _scan(body, carry, xs, length: int, every: int | str | None):
    """``lax.scan(body, carry, xs, length)``, rematerialized in chunks of ``every`` steps.

    ``every = "nested"`` is two-level checkpointing: chunks of about sqrt(T) steps, and
    inside a chunk being recomputed only each step's weights are kept, so memory grows
    like sqrt(T) states plus one step's activations, for about one extra forward pass.

    With ``every = k`` only the carry at every k-th step is kept for the backward pass;
    each chunk's k steps are recomputed from it (memory ~ T/k + k states).
    """
    if every is None:
        return jax.lax.scan(body, carry, xs, length=length)
    if every == "step":  # keep each step's input state, recompute the step's activations
        return jax.lax.scan(jax.checkpoint(body, prevent_cse=False), carry, xs, length=length)
    if every == "nested":
        every = max(1, math.isqrt(length - 1) + 1)  # ceil(sqrt(T))
        body = jax.checkpoint(body, prevent_cse=False)
    assert isinstance(every, int)

    def chunk(c, chunk_xs, n):
        return jax.lax.scan(body, c, chunk_xs, length=n)

    full, rest = divmod(length, every)
    split = jax.tree.map(lambda a: a[: full * every].reshape(full, every, *a.shape[1:]), xs)
    tail = jax.tree.map(lambda a: a[full * every :], xs)
    outs = []
    if full:
        chunk_k = jax.checkpoint(lambda c, x: chunk(c, x, every), prevent_cse=False)
        carry, ys = jax.lax.scan(chunk_k, carry, split, length=full)
        outs.append(jax.tree.map(lambda a: a.reshape(full * every, *a.shape[2:]), ys))
    if rest:
        chunk_r = jax.checkpoint(lambda c, x: chunk(c, x, rest), prevent_cse=False)
        carry, ys = chunk_r(carry, tail)
        outs.append(ys)
    ys = jax.tree.map(lambda *a: jnp.concatenate(a), *outs) if len(outs) > 1 else outs[0]
    return carry, ys


def step_key(data_key: jax.Array, step: Any) -> jax.Array:
    """The random key of inner step ``step``, given to a ``train_loss`` that takes one.

    ``fold_in(fold_in(data_key, 1), step)``: a function of the run's key and the step
    index only, so the same key gives the same noise at every step whichever estimator,
    checkpoint policy or segmentation runs it (a stream apart from the minibatch order,
    which :func:`batch_indices` draws from ``data_key`` by splitting).
    """
    return jax.random.fold_in(jax.random.fold_in(data_key, 1), step)


def start(task: Task, hparams: Any, key: jax.Array) -> tuple[InnerState, jax.Array]:
    """The state before the first inner step, and the key that orders the minibatches
    (and, through :func:`step_key`, draws each step's noise).

    ``key`` is split exactly as :func:`unroll` splits it, so ``start`` followed by
    :func:`resume` over ``[0, steps)`` is the same training run as ``unroll``.
    """
    init_key, data_key = jax.random.split(key)
    params = task.init_params(init_key, hparams)
    opt_state = task.optimizer.init(params) if task.opt_state is None else task.opt_state
    return InnerState(params, opt_state, task.state), data_key


def resume(
    task: Task, hparams: Any, state: InnerState, data_key: jax.Array, begin: int,
    end: int | None = None, *, checkpoint: Any = None, hvp: str = "reverse",
) -> tuple[InnerState, jax.Array]:
    """Run inner steps ``begin, ..., end - 1`` of the training run from ``state``.

    Step t uses the same minibatch as step t of :func:`unroll` with the same key, so a
    run cut into pieces trains exactly as the whole one does.

    Args:
      task, hparams: the problem and its hyperparameters in natural units.
      state: the state before step ``begin``.
      data_key: the second key returned by :func:`start`.
      begin, end: the step range (Python ints); ``end`` defaults to ``task.steps``.
      checkpoint, hvp: as in :func:`unroll`.

    Returns:
      ``(state, losses)``: the state after step ``end - 1`` and each step's batch loss.
    """
    end = task.steps if end is None else end
    if not 0 <= begin <= end <= task.steps:
        raise ValueError(f"need 0 <= begin <= end <= steps={task.steps}, got {begin}, {end}")
    if end == begin:
        return state, jnp.zeros((0,), jnp.result_type(float))
    return segment(task, hparams, state, data_key, begin, end - begin, checkpoint=checkpoint,
                   hvp=hvp)


def segment(
    task: Task, hparams: Any, state: InnerState, data_key: jax.Array, begin: Any,
    length: int, *, checkpoint: Any = None, hvp: str = "reverse",
) -> tuple[InnerState, jax.Array]:
    """Run ``length`` inner steps from step ``begin``, which may be a traced integer.

    The same steps as :func:`resume` over ``[begin, begin + length)``; with a traced
    ``begin`` one compiled function serves every segment of an online run. The caller
    keeps ``begin + length <= task.steps``.
    """
    every = check_policy(checkpoint)
    check_hvp(hvp)
    data = task.train_data
    space = task.space
    # Scheduled hyperparameters enter each step as scan inputs (their values at steps
    # begin, ..., begin + length - 1), so the backward pass stacks their cotangents.
    schedule = space.step_values(hparams, begin + jnp.arange(length)) if space.scheduled \
        else None

    def step(s, idx, values, t):
        batch = data if idx is None else jax.tree.map(lambda a: jnp.take(a, idx, axis=0), data)
        key = None if t is None else step_key(data_key, t)
        return train_step(task.train_loss, task.optimizer, space.expand(hparams, values), s,
                          batch, hvp=hvp, hvp_batch_size=task.hvp_batch_size, key=key)

    if task.batch_size is None:
        idx = None
    else:
        idx = order(task, data_key)
        idx = jax.lax.dynamic_slice_in_dim(idx, begin, length)
    # A train_loss that takes a key gets step_key(data_key, t) at step t.
    ts = begin + jnp.arange(length) if takes_key(task.train_loss) else None
    xs: Any
    if idx is None and schedule is None and ts is None:
        xs = None if every is None else jnp.zeros((length, 0))  # an axis to chunk
        body = lambda s, _: step(s, None, None, None)  # noqa: E731
    else:
        xs = (idx, schedule, ts)
        body = lambda s, x: step(s, *x)  # noqa: E731
    return _scan(body, state, xs, length, every)


def unroll(
    task: Task, hparams: Any, key: jax.Array, *, checkpoint: Any = None,
    hvp: str = "reverse",
) -> tuple[PyTree, jax.Array]:
    """Train for ``task.steps`` inner steps from the task's initial weights.

    Args:
      task: the bilevel problem.
      hparams: hyperparameters in natural units.
      key: decides the initial weights (when ``task.params`` is a function), the
        minibatch order and each step's noise (:func:`step_key`, for a ``train_loss``
        that takes a key); the same key gives the same training run.
      checkpoint: ``None`` keeps every step's activations for the backward pass;
        ``"step"`` keeps only each step's weights; an integer k keeps the weights every k
        steps and recomputes the rest; ``"nested"`` checkpoints at two levels (memory
        ~ sqrt(T) states, about one extra forward pass).
      hvp: how reverse mode differentiates through each step's gradient:
        ``"reverse"`` (plain autodiff, works under every transformation) or
        ``"forward"`` (one forward-over-reverse Hessian-vector product per step, keeping
        only each step's inputs; see :func:`hypergrad.inner.value_and_grad`), in chunks
        of ``task.hvp_batch_size`` examples when that is set.

    Returns:
      ``(params_T, train_losses)``, the trained weights and each step's batch loss.
    """
    state, losses = train(task, hparams, key, checkpoint=checkpoint, hvp=hvp)
    return state.params, losses


def train(
    task: Task, hparams: Any, key: jax.Array, *, checkpoint: Any = None,
    hvp: str = "reverse",
) -> tuple[InnerState, jax.Array]:
    """:func:`unroll`, returning the whole final :class:`hypergrad.inner.InnerState`
    (weights, optimizer state, model state) instead of the weights alone."""
    check_policy(checkpoint)
    state, data_key = start(task, hparams, key)
    return resume(task, hparams, state, data_key, 0, checkpoint=checkpoint, hvp=hvp)


def _outcome(task: Task, hparams: Any, state: InnerState, losses: jax.Array,
             along: list[jax.Array] | None = None):
    """``(meta_loss, aux)`` of a finished run; ``along`` holds the validation losses after
    the steps a tuple ``task.meta_loss`` counts."""
    if along is not None:
        value = jnp.mean(jnp.stack(along))
    elif task.meta_loss == "train_mean":
        value = jnp.mean(losses)
    else:
        value = task.validation_loss(state.params, hparams, state=state.model_state)
    aux = {"train_loss": losses[-1], "train_losses": losses, "params": state.params}
    if state.model_state is not None:
        aux["model_state"] = state.model_state
    return value, aux


def objective(
    task: Task, phi: Any, key: jax.Array, *, checkpoint: Any = None, hvp: str = "reverse",
) -> tuple[jax.Array, dict[str, Any]]:
    """The outer objective: validation loss after training with ``space.constrain(phi)``
    (or along the training run: ``task.meta_loss``).

    Returns:
      ``(val_loss, aux)`` where ``aux`` holds ``train_loss`` (the last step's batch loss),
      ``train_losses`` (every step's), ``params`` (the trained weights) and, for a task
      with model state, ``model_state`` (the state the validation loss used). For a
      task with ``tasks``, the mean over the tasks drawn from ``key``
      (:func:`hypergrad.tasks.mean`; ``params`` per task).
    """
    if task.tasks is not None:  # the mean over a batch of drawn tasks
        return tasks_lib.mean(lambda t, p, k: objective(t, p, k, checkpoint=checkpoint, hvp=hvp),
                              task, phi, key)
    hparams = task.space.constrain(phi)
    if isinstance(task.meta_loss, tuple):
        return _along(task, hparams, key, checkpoint=checkpoint, hvp=hvp)
    state, losses = train(task, hparams, key, checkpoint=checkpoint, hvp=hvp)
    return _outcome(task, hparams, state, losses)


def _along(task: Task, hparams: Any, key: jax.Array, *, checkpoint: Any,
           hvp: str) -> tuple[jax.Array, dict[str, Any]]:
    """The validation loss averaged over the weights after the steps ``task.meta_loss``
    counts: the run cut into segments that end there (one compiled scan each)."""
    state, data_key = start(task, hparams, key)
    begin, along, parts = 0, list[jax.Array](), list[jax.Array]()
    for end in task.meta_loss:
        state, losses = resume(task, hparams, state, data_key, begin, end,
                               checkpoint=checkpoint, hvp=hvp)
        parts.append(losses)
        along.append(task.mean_val_loss(state.params, task.space.at_step(hparams, end - 1),
                                        state.model_state))
        begin = end
    state, losses = resume(task, hparams, state, data_key, begin, checkpoint=checkpoint,
                           hvp=hvp)  # the steps after the last counted one
    return _outcome(task, hparams, state, jnp.concatenate([*parts, losses]), along)


def truncated_unroll(
    task: Task, hparams: Any, key: jax.Array, window: int, *, checkpoint: Any = None,
    hvp: str = "reverse",
) -> tuple[PyTree, jax.Array]:
    """:func:`unroll`, but gradients flow only through the last ``window`` steps.

    The first ``T - window`` steps run with ``hparams`` as usual; their final state is
    cut from the graph (``stop_gradient``), so differentiating the result gives the
    K-step truncated hypergradient of Shaban et al. (2019). ``window >= T`` is the full
    unroll. Same key, same minibatches as :func:`unroll`.
    """
    state, losses = _truncated_train(task, hparams, key, window, checkpoint=checkpoint,
                                     hvp=hvp)
    return state.params, losses


def _truncated_train(task: Task, hparams: Any, key: jax.Array, window: int, *,
                     checkpoint: Any, hvp: str) -> tuple[InnerState, jax.Array]:
    window = check_window(window)
    state, data_key = start(task, hparams, key)
    cut = max(task.steps - window, 0)
    if cut == 0:
        return resume(task, hparams, state, data_key, 0, checkpoint=checkpoint, hvp=hvp)
    state, head = resume(task, hparams, state, data_key, 0, cut)
    state = jax.lax.stop_gradient(state)
    state, tail = resume(task, hparams, state, data_key, cut, checkpoint=checkpoint, hvp=hvp)
    return state, jnp.concatenate([head, tail])


def truncated_objective(
    task: Task, phi: Any, key: jax.Array, window: int, *, checkpoint: Any = None,
    hvp: str = "reverse",
) -> tuple[jax.Array, dict[str, Any]]:
    """:func:`objective` through :func:`truncated_unroll`: same value, truncated gradient
    (for ``task.meta_loss="final"`` only)."""
    task.require_final("truncated")
    hparams = task.space.constrain(phi)
    state, losses = _truncated_train(task, hparams, key, window, checkpoint=checkpoint,
                                     hvp=hvp)
    return _outcome(task, hparams, state, losses)


def check_window(window: Any) -> int:
    """``window`` if it is a positive integer, else a ``ValueError``."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    return window


class Fit(NamedTuple):
    """One training run with given hyperparameters (:func:`fit`).

    Attributes:
      params: the trained weights.
      model_state: the trained model state (BatchNorm statistics), ``None`` without one.
      hparams: the hyperparameters in natural units (scheduled ones over every step).
      val_loss: the validation loss of the trained weights, as the tuner scored it.
      train_losses: each inner step's batch loss.
    """

    params: PyTree
    model_state: PyTree
    hparams: dict[str, PyTree]
    val_loss: jax.Array
    train_losses: jax.Array


_objective = jax.jit(objective)


def fit(task: Task, point: Any, key: jax.Array) -> Fit:
    """Train ``task`` with the hyperparameters of ``point`` and keep the weights.

    ``point`` is a tuning result's :class:`hypergrad.Point` (``history.best``,
    ``history.final``) or a ``phi`` (unconstrained coordinates, as
    ``task.space.init()``). The run is :func:`objective`'s, the one a hypergradient
    differentiates: with the key the point was tuned with (``hg.tune``'s ``key`` for one
    member of a deterministic task) it gives the weights behind the point's validation
    loss exactly; :func:`score` then scores them on any data.
    """
    phi = getattr(point, "phi", point)
    value, aux = _objective(task, phi, key)
    return Fit(aux["params"], aux.get("model_state"), task.space.constrain(phi), value,
               aux["train_losses"])


def score(task: Task, trained: Fit | PyTree, data: PyTree, *,
          metric: Callable[..., jax.Array] | None = None,
          batch_size: int | None = None) -> jax.Array:
    """``metric`` (default ``task.val_loss``) of trained weights, averaged over ``data``.

    Args:
      task: the task the weights were trained on (its space reads the hyperparameters
        at the last inner step, as the validation loss does).
      trained: a :class:`Fit`, or the weights alone (scored with the space's starting
        hyperparameters, for a task without model state).
      data: a pytree of arrays sharing a leading example axis (a test set).
      metric: ``metric(params, hparams, batch) -> scalar``, a mean over the batch's
        examples (an accuracy, a loss); with model state also ``state=``.
      batch_size: score in chunks of this many examples (default the task's
        ``val_batch_size``).
    """
    if isinstance(trained, Fit):
        params, state, hparams = trained.params, trained.model_state, trained.hparams
    else:
        params, state, hparams = trained, None, task.space.constrain(task.space.init())
    scored = task.replace(val_data=data, val_loss=metric or task.val_loss,
                          val_batch_size=batch_size or task.val_batch_size)
    return scored.validation_loss(params, hparams, state)
