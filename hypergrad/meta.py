"""Meta-learning as hyperparameter tuning: MAML, Meta-SGD, iMAML, and more levels.

Meta-learning over a distribution of tasks is a bilevel problem whose inner run is the
adaptation to one task and whose hyperparameters are what adaptation starts from: the
initial weights (MAML, Finn et al. 2017), per-parameter inner learning rates (Meta-SGD,
Li et al. 2017), a proximal strength (iMAML, Rajeswaran et al. 2019). :func:`maml` builds
that :class:`hypergrad.Task` over a :class:`hypergrad.tasks.Tasks`; the estimators
differentiate it as any task (``reverse()`` is MAML, ``first_order()`` FOMAML,
``implicit()`` on the proximal loss iMAML) and :func:`hypergrad.tune` meta-trains it.

:func:`nest` lifts a task one level: its hyperparameters become the weights of a task
whose inner step is a meta-step, so a third level (the meta-learner's own step size, or
an inner learning rate) is tuned by hypergradient like any other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from hypergrad import hparams as hp
from hypergrad.inner import InnerOptimizer, sgd
from hypergrad.messages import show
from hypergrad.task import Task
from hypergrad.tasks import Tasks
from hypergrad.unroll import objective
from hypergrad.validation import keywords

PyTree = Any

#: What ``maml(learn_lr=...)`` takes: a fixed inner learning rate (MAML), one learned
#: (scalar), or one learned per weight (Meta-SGD).
LEARN_LR = (False, True, "per_parameter")

#: The prefix of an upper level's name for a lower level's hyperparameter (:func:`nest`).
LOWER = "lower."


def proximal(loss: Callable[[PyTree, Any], jax.Array], *, init: str = "init",
             strength: str = "proximal", unravel: Callable | None = None) -> Callable:
    """``loss(params, batch) + strength / 2 * ||params - init||^2`` as a task's
    ``train_loss(params, hparams, batch)``: iMAML's inner objective, whose minimizer
    depends on the learned start ``hparams[init]`` only through this term, so
    implicit differentiation (:func:`hypergrad.estimators.implicit`) gives its exact
    meta-gradient at convergence.

    Args:
      loss: the task loss ``loss(params, batch)``.
      init, strength: the hyperparameters' names.
      unravel: maps ``hparams[init]`` (a flat vector, as :func:`maml` declares it) to
        weights; ``None``: ``hparams[init]`` is shaped like the weights.
    """

    def train_loss(params, hparams, batch):
        start = hparams[init] if unravel is None else unravel(hparams[init])
        gap = jax.tree.leaves(jax.tree.map(lambda w, s: jnp.sum((w - s) ** 2), params, start))
        return loss(params, batch) + 0.5 * hparams[strength] * sum(gap)

    return train_loss


@keywords
def maml(params: PyTree, loss: Callable[[PyTree, Any], jax.Array], tasks: Tasks, *,
         steps: int, inner_lr: float = 0.01, learn_lr: bool | str = False,
         proximal_strength: float | None = None, batch_size: int | None = None,
         optimizer: InnerOptimizer | None = None) -> Task:
    """The meta-learning task over ``tasks``: adapt from learned initial weights.

    Each task is trained (adapted) for ``steps`` steps of SGD on its ``train_data`` (the
    support set) from the weights ``hparams["init"]`` and scored on its ``val_data`` (the
    query set); the meta-loss is the mean over the tasks an estimate draws. The initial
    weights are a hyperparameter ``"init"``: a flat vector (``hg.real``) holding
    ``params``'s leaves in ``jax.flatten_util.ravel_pytree`` order.

    Args:
      params: the starting value of the learned initial weights (a pytree).
      loss: ``loss(params, batch) -> scalar``, the task loss for adaptation and scoring.
      tasks: the distribution of tasks (:class:`hypergrad.tasks.Tasks`).
      steps: the adaptation steps K.
      inner_lr: the inner learning rate (its start where it is learned).
      learn_lr: ``False`` (MAML: ``inner_lr`` fixed), ``True`` (one learned rate,
        ``"learning_rate"``) or ``"per_parameter"`` (Meta-SGD: one learned rate per
        weight).
      proximal_strength: iMAML: add ``strength / 2 * ||w - init||^2`` to the adaptation
        loss (:func:`proximal`) with this starting strength, learned as
        ``"proximal"``; differentiate with ``implicit()`` after enough ``steps`` to
        converge. ``None``: no proximal term.
      batch_size: examples per adaptation step (``None``: the whole support set).
      optimizer: the inner optimizer (default ``hg.inner.sgd()``); it reads
        ``learning_rate`` from the space when that is learned.
    """
    if learn_lr not in LEARN_LR or isinstance(learn_lr, int) and not isinstance(learn_lr, bool):
        raise ValueError(f"learn_lr must be one of {', '.join(map(repr, LEARN_LR))}, got "
                         f"{show(learn_lr)}")
    flat, unravel = ravel_pytree(params)
    declared: dict[str, hp.Constraint] = {"init": hp.real(flat)}
    if learn_lr:
        declared["learning_rate"] = hp.positive(
            inner_lr, per="parameter" if learn_lr == "per_parameter" else None)
    if optimizer is None:
        optimizer = sgd() if learn_lr else sgd(learning_rate=inner_lr)
    train_loss: Callable = lambda w, h, batch: loss(w, batch)  # noqa: E731
    if proximal_strength is not None:
        declared["proximal"] = hp.positive(proximal_strength)
        train_loss = proximal(loss, unravel=unravel)
    space = hp.HyperSpace(declared).resolve(params, steps)
    return Task(params=lambda key, h: unravel(h["init"]), train_loss=train_loss,
                val_loss=lambda w, h, batch: loss(w, batch), space=space,
                optimizer=optimizer, steps=steps, batch_size=batch_size, tasks=tasks)


@keywords
def nest(task: Task, *, tuned: Sequence[str], space: hp.HyperSpace, steps: int,
         optimizer: InnerOptimizer | None = None, val_keys: int = 4) -> Task:
    """``task`` one level down: a task whose weights are ``task``'s hyperparameters
    ``tuned`` (in unconstrained coordinates) and whose inner step is a meta-step.

    The returned task trains for ``steps`` meta-steps: each draws a fresh key (fresh
    tasks, fresh minibatches), takes the meta-gradient of ``task``'s meta-loss with
    respect to ``tuned`` and applies ``optimizer`` with the hyperparameters of
    ``space``. Its validation loss is ``task``'s meta-loss on ``val_keys`` held-out keys
    at the meta-trained values. Any estimator then differentiates the whole meta-training
    run with respect to ``space``: a problem of three levels (Betty's multilevel
    examples), checked against central differences like any other.

    Args:
      task: the lower problem (a meta-learning task from :func:`maml`, or any task).
      tuned: the names of ``task``'s hyperparameters meta-trained in the middle level;
        the others stay at their start unless ``space`` declares them as
        ``"lower.NAME"`` (then the upper level tunes them, in natural units).
      space: the upper level's hyperparameters: those ``optimizer`` reads (SGD's
        ``learning_rate``: the meta-learner's step size) and any ``"lower.NAME"``.
      steps: meta-steps of the middle level.
      optimizer: the middle level's update (default ``hg.inner.sgd()``, its learning rate
        read from ``space``).
      val_keys: how many held-out keys the upper validation loss averages.

    The middle level's meta-gradient is exact reverse mode through ``task``'s unroll
    (the inner optimizer's gradient of the meta-loss), so the upper hypergradient is
    exact too.
    """
    missing = [n for n in tuned if n not in task.space]
    lowered = {n[len(LOWER):]: n for n in space.names if n.startswith(LOWER)}
    unknown = [n for n in lowered if n not in task.space]
    if missing or unknown or not tuned:
        raise ValueError(f"tuned must name some of the task's hyperparameters and "
                         f"space's 'lower.NAME' others of them ({', '.join(task.space.names)}); "
                         f"got tuned={list(tuned)}, unknown {missing + unknown}")
    overlap = [n for n in tuned if n in lowered]
    if overlap:
        raise ValueError(f"{overlap} are both meta-trained (tuned) and tuned by the upper "
                         "level (lower.NAME); choose one level for each")
    if isinstance(val_keys, bool) or not isinstance(val_keys, int) or val_keys < 1:
        raise ValueError(f"val_keys must be a positive integer, got {show(val_keys)}")
    start = task.space.init()

    def lower_phi(weights: Mapping[str, Any], upper: Mapping[str, Any]) -> dict[str, Any]:
        phi = dict(start)
        phi.update(weights)
        if lowered:
            natural = {n: upper[up] for n, up in lowered.items()}
            phi.update({n: task.space.constraints[n].to_phi(v) for n, v in natural.items()})
        return phi

    def meta_loss(weights, upper, key):
        return objective(task, lower_phi(weights, upper), key)[0]

    def middle_train_loss(weights, upper, batch, key):
        del batch  # a meta-step's data is its key
        return meta_loss(weights, upper, key)

    def middle_val_loss(weights, upper, seeds):
        return jnp.mean(jax.vmap(lambda s: meta_loss(weights, upper, jax.random.key(s)))(seeds))

    dummy = jnp.zeros((1,))
    held_out = jnp.arange(val_keys, dtype=jnp.uint32) + jnp.uint32(2**31)
    return Task(params={n: start[n] for n in tuned}, train_loss=middle_train_loss,
                val_loss=middle_val_loss, train_data=dummy, val_data=held_out,
                space=space, optimizer=optimizer or sgd(), steps=steps)
