"""The bilevel problem: :class:`Task`, and builders for the built-in tasks.

A ``Task`` is a pytree: its arrays (initial weights, training and validation data) are
leaves, so a jitted estimator receives them as arguments instead of baking them into the
compiled program as constants; everything else (functions, the space, the horizon) is
static.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hypergrad.hparams import HyperSpace
from hypergrad.inner import InnerOptimizer, batch_mean, step_loss, takes_key
from hypergrad.messages import show
from hypergrad.tasks import Tasks
from hypergrad.validation import keywords

PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """A bilevel problem: train on ``train_data``, score on ``val_data``.

    Attributes:
      params: initial weights (a pytree), or a function ``(key, hparams) -> params`` so the
        initialization itself can depend on hyperparameters.
      train_loss: ``f(params, hparams, batch) -> scalar``, minimized by the inner loop.
        With a parameter named ``key`` (``f(params, hparams, batch, key)``, detected
        from its signature) it gets a fresh random key at every step for dropout or data
        augmentation: :func:`hypergrad.unroll.step_key`, a function of the run's key and
        the step, so one key gives one training run under every estimator.
      val_loss: ``g(params, hparams, batch) -> scalar``, the outer objective at the
        trained weights (evaluated on all of ``val_data``).
      train_data, val_data: pytrees of arrays whose leading axis indexes examples.
      space: the :class:`HyperSpace` of tuned hyperparameters.
      optimizer: the differentiable inner optimizer (:func:`hypergrad.inner.sgd`).
      steps: the horizon T, the number of inner steps.
      batch_size: examples per inner step, drawn without replacement within an epoch;
        ``None`` trains on the full batch.
      val_batch_size: evaluate (and differentiate) the validation loss in chunks of this
        many examples, one chunk's activations in memory at a time, and average them
        weighted by size; ``None`` takes all of ``val_data`` at once. Only for a
        ``val_loss`` that is a mean over examples (every built-in task's is).
      hvp_batch_size: backpropagate through each inner step's gradient in chunks of this
        many examples of the step's batch when the estimator does so with a
        forward-over-reverse Hessian-vector product (``hvp="forward"``, see
        :func:`hypergrad.inner.value_and_grad`); ``None`` takes the whole batch at once.
        Plain autodiff, and estimators that do not backpropagate through the steps,
        ignore it. Only for a ``train_loss`` that is a mean over examples plus terms that
        do not depend on the batch (every built-in task's is).
      state: the model's initial non-parameter state (BatchNorm running statistics, a
        pytree of arrays), carried through the unroll and differentiated like the
        weights; ``None`` for a model without any. With a state the losses are called
        as ``f(params, hparams, batch, state=s) -> (loss, new_state)`` (``key=`` too if
        it takes one) and ``g(params, hparams, batch, state=s) -> scalar`` with the
        state after the last step. The optimizer updates ``params`` only.
      batches: an explicit minibatch order, integers ``[steps, b]``: step ``t`` trains on
        the examples ``batches[t]`` of ``train_data`` (in-order batches; a stream of
        fresh examples laid out one batch after another, ``arange(steps * b).reshape(
        steps, b)``). ``None`` draws shuffled epochs from the run's key. It is data (a
        leaf of the task): another order does not compile again. ``batch_size`` becomes
        ``b``.
      opt_state: the inner optimizer's starting state (a momentum's starting velocity, a
        carried RMSProp state), shaped as ``optimizer.init(params)`` returns it; ``None``
        starts from ``optimizer.init(params)``. Data like ``batches``: a new starting
        state does not compile again, and ``jax.grad`` with respect to the task gives
        its gradient as it gives the initial weights'.
      meta_loss: what the tuner minimizes: ``"final"`` (default), the validation loss
        after the last step; ``"train_mean"``, the training batch loss averaged over
        every step (learned_optimization's ES/PES meta-loss; no extra evaluation); or a
        tuple of step counts ``(t1, t2, ...)`` in ``[1, steps]``, the validation loss
        averaged over the weights after ``t1, t2, ...`` steps. The reverse, forward and
        ES estimators take all three, PES ``"final"`` and ``"train_mean"``; the
        truncated, implicit and reversible estimators only ``"final"``.
      tasks: a distribution of tasks (:class:`hypergrad.tasks.Tasks`): each estimate
        draws ``tasks.batch`` tasks' ``(train_data, val_data)`` from its key, trains on
        each (one ``vmap``) and averages the meta-loss over them, MAML's objective
        (:mod:`hypergrad.meta`). ``train_data`` and ``val_data`` are then left out: they
        hold one drawn task, the example the checks read. ``None``: one task, the data
        given.
    """

    params: PyTree | Callable[[jax.Array, Any], PyTree]
    train_loss: Callable[..., Any]
    val_loss: Callable[..., jax.Array]
    train_data: PyTree = dataclasses.field(default=None, kw_only=True)
    val_data: PyTree = dataclasses.field(default=None, kw_only=True)
    space: HyperSpace
    optimizer: InnerOptimizer
    steps: int
    batch_size: int | None = None
    val_batch_size: int | None = None
    hvp_batch_size: int | None = None
    state: PyTree = None
    batches: Any = None
    opt_state: PyTree = None
    meta_loss: Any = "final"
    tasks: Tasks | None = None

    def __post_init__(self):
        if not isinstance(self.optimizer, InnerOptimizer):
            import optax  # only to name the usual mistake

            if isinstance(self.optimizer, optax.GradientTransformation):
                raise TypeError(
                    "optimizer is a plain optax GradientTransformation, whose "
                    "hyperparameters are constants; pass its factory instead: "
                    "hg.inner.from_optax(optax.adamw, learning_rate=0.05)")
            raise TypeError(f"optimizer must be an hg.inner.InnerOptimizer (hg.inner.sgd(), "
                            f"hg.inner.from_optax(...)), got {type(self.optimizer).__name__}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not isinstance(self.space, HyperSpace):
            raise TypeError(f"space must be a HyperSpace, got {type(self.space).__name__}")
        if self.tasks is not None:
            _draw_example(self)
        for name, data in (("train_data", self.train_data), ("val_data", self.val_data)):
            if data is None:
                raise ValueError(f"{name} is missing: give the data (a pytree of arrays with "
                                 "a leading example axis), or tasks= for a distribution of "
                                 "tasks")
            sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None
                     for leaf in jax.tree.leaves(data)}
            if not sizes:
                raise ValueError(f"{name} holds no arrays")
            if len(sizes) != 1 or None in sizes:
                shapes = [np.shape(leaf) for leaf in jax.tree.leaves(data)]
                raise ValueError(f"{name} leaves must be arrays sharing one leading "
                                 f"(example) axis, got shapes {show(shapes)}")
            if sizes == {0}:
                raise ValueError(f"{name} holds 0 examples; it needs at least 1")
        n = self.num_examples
        if self.batches is not None:
            object.__setattr__(self, "batches", _check_batches(self.batches, self.steps, n,
                                                               self.batch_size))
            object.__setattr__(self, "batch_size", int(self.batches.shape[1]))
        if self.batch_size is not None:
            b = self.batch_size
            if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= n:
                raise ValueError(f"batch_size must be an integer in [1, {n}] or None, got {b!r}")
        for name in ("val_batch_size", "hvp_batch_size"):
            c = getattr(self, name)
            if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {c!r}")
        # Lay granular and scheduled hyperparameters out for these weights and this T.
        object.__setattr__(self, "space", self.space.resolve(self._param_shapes(), self.steps))
        if self.opt_state is not None:
            _check_opt_state(self)
        object.__setattr__(self, "meta_loss", _check_meta_loss(self.meta_loss, self.steps))
        _check_reads(self)

    def require_final(self, estimator: str) -> None:
        """Refuse a ``meta_loss`` other than ``"final"`` for an estimator that
        differentiates the validation loss after the last step only."""
        if self.meta_loss != "final":
            raise ValueError(f"{estimator} differentiates the validation loss after the last "
                             f"step only, and this task's meta_loss is {self.meta_loss!r}; "
                             "use reverse(), forward() or es() (pes() for 'train_mean')")

    def _param_shapes(self) -> PyTree:
        if not callable(self.params):
            return self.params
        if not self.space.resolved:
            raise ValueError(
                "params is a function of the hyperparameters and the space has granular or "
                "scheduled ones: resolve the space first (space.resolve(params_like, steps))")
        hparams = self.space.constrain(self.space.init())
        return jax.eval_shape(lambda: self.init_params(jax.random.key(0), hparams))

    @property
    def num_examples(self) -> int:
        """The number of training examples."""
        leaves = jax.tree.leaves(self.train_data)
        if not leaves:
            raise ValueError("train_data holds no arrays")
        return leaves[0].shape[0]

    def init_params(self, key: jax.Array, hparams: Any) -> PyTree:
        """The initial weights, from ``params`` or by calling it with ``(key, hparams)``
        (``hparams`` as read at step 0)."""
        if not callable(self.params):
            return self.params
        return self.params(key, self.space.at_step(hparams, 0))

    @property
    def stateful(self) -> bool:
        """Whether the model carries non-parameter state (``state`` is not ``None``)."""
        return self.state is not None

    @property
    def stochastic(self) -> bool:
        """Whether ``train_loss`` takes a random ``key`` (a parameter of that name)."""
        return takes_key(self.train_loss)

    def validation_loss(self, params: PyTree, hparams: Any, state: PyTree = None) -> jax.Array:
        """``val_loss`` on all of ``val_data``, with ``hparams`` as read at the last step
        (and the trained model ``state`` for a stateful task)."""
        return self.mean_val_loss(params, self.space.at_step(hparams, self.steps - 1), state)

    def mean_val_loss(self, params: PyTree, hp: Any, state: PyTree = None) -> jax.Array:
        """``val_loss(params, hp, val_data)`` with ``hp`` already read at a step; in
        chunks of ``val_batch_size`` (a ``lax.scan`` whose body is rematerialized, so the
        backward pass also holds one chunk at a time) when that is set."""
        if not self.stateful:
            return batch_mean(lambda chunk: self.val_loss(params, hp, chunk), self.val_data,
                              self.val_batch_size)
        if state is None:
            raise ValueError("this task's model has state (BatchNorm statistics): pass the "
                             "trained state=, as hypergrad.unroll.objective does")
        return batch_mean(lambda chunk: self.val_loss(params, hp, chunk, state=state),
                          self.val_data, self.val_batch_size)

    def one(self, train_data: PyTree, val_data: PyTree) -> Task:
        """One task of the distribution: a copy with these data and no ``tasks`` (not
        validated again: it runs under ``vmap``, on a task drawn like the example the
        constructor checked)."""
        children, static = _flatten(self)
        arrays, _, _, state, batches, opt_state, _ = children
        return _unflatten(static, (arrays, train_data, val_data, state, batches, opt_state,
                                   None))

    def replace(self, **changes: Any) -> Task:
        """A copy with some fields replaced (validated again)."""
        if changes.get("tasks", self.tasks) is not None:  # the data come from the tasks
            changes.setdefault("train_data", None)
            changes.setdefault("val_data", None)
        return dataclasses.replace(self, **changes)


Task.__init__ = keywords(Task.__init__, "Task")  # type: ignore[method-assign]


def _draw_example(task: Task) -> None:
    """With ``tasks``, fill ``train_data`` and ``val_data`` with one drawn task (the
    example every later check reads), or refuse data given beside ``tasks``."""
    if not isinstance(task.tasks, Tasks):
        raise TypeError(f"tasks must be an hg.tasks.Tasks (hg.tasks.Tasks(sample, batch) "
                        f"or hg.tasks.stacked(...)), got {type(task.tasks).__name__}")
    if task.train_data is not None or task.val_data is not None:
        raise ValueError("with tasks=, each task's data come from tasks.sample; leave "
                         "train_data and val_data out")
    train, val = task.tasks.draw(jax.random.key(0))
    object.__setattr__(task, "train_data", train)
    object.__setattr__(task, "val_data", val)


def _check_batches(batches: Any, steps: int, n: int, batch_size: int | None) -> jax.Array:
    """``batches`` as int32 ``[steps, b]`` indices into ``n`` examples, or ValueError."""
    if isinstance(batches, jax.core.Tracer):
        return batches
    array = np.asarray(batches)
    if not np.issubdtype(array.dtype, np.integer) or array.ndim != 2 \
            or array.shape[0] != steps or array.shape[1] < 1:
        raise ValueError(f"batches must be integers shaped [steps, batch] = [{steps}, b] "
                         f"(example indices per step), got {show(batches)}")
    if array.min() < 0 or array.max() >= n:
        raise ValueError(f"batches holds indices from {array.min()} to {array.max()}; "
                         f"train_data has {n} examples (0 to {n - 1})")
    if batch_size is not None and batch_size != array.shape[1]:
        raise ValueError(f"batch_size={batch_size} but batches has {array.shape[1]} "
                         "examples per step; leave batch_size out")
    return jnp.asarray(array, jnp.int32)


def _check_meta_loss(meta_loss: Any, steps: int) -> Any:
    """``"final"``, ``"train_mean"`` or a sorted tuple of distinct steps in
    ``[1, steps]``; ValueError naming the choices otherwise."""
    if isinstance(meta_loss, str):
        if meta_loss in ("final", "train_mean"):
            return meta_loss
    elif isinstance(meta_loss, tuple | list | np.ndarray):
        counts = [int(t) for t in np.ravel(meta_loss)
                  if isinstance(t, int | np.integer) and not isinstance(t, bool)]
        if counts and len(counts) == np.size(meta_loss) and len(set(counts)) == len(counts) \
                and 1 <= min(counts) and max(counts) <= steps:
            return tuple(sorted(counts))
    raise ValueError(f"meta_loss must be 'final', 'train_mean' or distinct step counts in "
                     f"[1, {steps}] (the validation loss averaged after those steps), got "
                     f"{show(meta_loss)}")


def _check_opt_state(task: Task) -> None:
    """Refuse an ``opt_state`` not shaped as ``optimizer.init(params)`` returns it."""
    expected = jax.eval_shape(task.optimizer.init, task._param_shapes())
    given: Any = jax.tree.structure(task.opt_state)  # PyTreeDef's stubs lack __eq__
    want: Any = jax.tree.structure(expected)
    fix = f"give the state {task.optimizer.name}'s init(params) returns, with your values"
    if given != want:
        raise ValueError(f"opt_state is not shaped as the {task.optimizer.name} optimizer's "
                         f"state: its structure is {given}, where {want} is expected; {fix}")
    for leaf, spec in zip(jax.tree.leaves(task.opt_state), jax.tree.leaves(expected),
                          strict=True):
        if np.shape(leaf) != spec.shape:
            raise ValueError(f"opt_state has a leaf of shape {np.shape(leaf)} where "
                             f"{spec.shape} is expected; {fix}")


class UndeclaredHyperparameter(KeyError):
    """A task function read a hyperparameter the space does not declare."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


class _Reads(dict):
    """A dict that records which keys were read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        if key not in self:
            close = difflib.get_close_matches(str(key), [str(k) for k in self], n=3)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise UndeclaredHyperparameter(
                f"the task reads hyperparameter {key!r}, which the HyperSpace does not "
                f"declare (it declares {', '.join(map(repr, self)) or 'nothing'}){hint}")
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key in self:
            self.read.add(key)
        return super().get(key, default)

    def _all(self):
        self.read.update(self.keys())

    def items(self):
        self._all()
        return super().items()

    def values(self):
        self._all()
        return super().values()


def _check_reads(task: Task) -> None:
    """Raise ``ValueError`` if the space tunes a hyperparameter no function of the task
    reads (traced once, abstractly, on two examples: nothing is computed)."""
    space = task.space
    if not space.names:
        return
    hparams = _Reads(space.at_step(space.constrain(space.init()), 0))

    def head(data):
        return jax.tree.map(lambda a: a[:2], data)

    def probe():
        params = task.params(jax.random.key(0), hparams) if callable(task.params) \
            else task.params
        loss = step_loss(task.train_loss, task.stateful)
        grads, state = jax.grad(loss, has_aux=True)(
            params, hparams, head(task.train_data), jax.random.key(0), task.state)
        task.optimizer.update(grads, task.optimizer.init(params), params, hparams)
        if task.stateful:
            task.val_loss(params, hparams, head(task.val_data), state=state)
        else:
            task.val_loss(params, hparams, head(task.val_data))

    jax.eval_shape(probe)
    unread = [n for n in space.names if n not in hparams.read]
    if unread:
        raise ValueError(
            f"the space tunes {', '.join(unread)}, which this task never reads (its "
            f"optimizer reads {', '.join(task.optimizer.reads) or 'nothing'}); remove "
            f"{'it' if len(unread) == 1 else 'them'} from the space or use a model, loss or "
            "optimizer that reads it")


def _flatten(task: Task):
    fn = task.params if callable(task.params) else None
    arrays = None if fn is not None else task.params
    static = (fn, task.train_loss, task.val_loss, task.space, task.optimizer,
              task.steps, task.batch_size, task.val_batch_size, task.hvp_batch_size,
              task.meta_loss)
    children = (arrays, task.train_data, task.val_data, task.state, task.batches,
                task.opt_state, task.tasks)
    return children, static


def _unflatten(static, children) -> Task:
    # Bypass __post_init__: under a transformation the leaves may be tracers or objects.
    task = object.__new__(Task)
    (fn, train_loss, val_loss, space, optimizer, steps, batch_size, val_batch_size,
     hvp_batch_size, meta_loss) = static
    arrays, train_data, val_data, state, batches, opt_state, tasks = children
    values = dict(params=fn if fn is not None else arrays, train_loss=train_loss,
                  val_loss=val_loss, train_data=train_data, val_data=val_data, space=space,
                  optimizer=optimizer, steps=steps, batch_size=batch_size,
                  val_batch_size=val_batch_size, hvp_batch_size=hvp_batch_size, state=state,
                  batches=batches, opt_state=opt_state, meta_loss=meta_loss, tasks=tasks)
    for name, value in values.items():
        object.__setattr__(task, name, value)
    return task


jax.tree_util.register_pytree_node(Task, _flatten, _unflatten)


MODEL_HPARAMS = ("leaky_slope", "loss_mix", "label_smoothing", "init_scale", "example_weight",
                 "dropout", "augment_shift", "augment_noise")
NOISE_HPARAMS = ("dropout", "augment_shift", "augment_noise")


def classification(
    model: Any, data: Any, space: HyperSpace, *, steps: int, batch_size: int | None = None,
    loss: str = "mse", optimizer: InnerOptimizer | None = None, slope: float = 0.0,
    val_batch_size: int | None = None, dropout: float = 0.0, augment_shift: float = 0.0,
    augment_noise: float = 0.0,
) -> tuple[Task, Callable[[PyTree, Any, jax.Array], jax.Array]]:
    """A classification task from an NNX model called as ``model(x, slope)``.

    Besides the optimizer's, the task reads these hyperparameters when the space tunes
    them (each is differentiable):

    - ``leaky_slope``: the leaky-ReLU slope (``slope`` otherwise); global, or one per
      activation layer with ``per="layer"`` (the layers followed by an activation).
    - ``loss_mix``: the training loss is ``(1 - m) * MSE + m * cross-entropy``.
    - ``label_smoothing``: training targets ``(1 - s) * onehot + s / classes``.
    - ``init_scale``: the initial weights are the model's times this scale (global, or
      per layer/tensor/parameter), differentiated through the initialization.
    - ``example_weight``: one real value per training example; example ``i`` weighs
      ``sigmoid(example_weight[i])`` in the training loss (data hyper-cleaning,
      Franceschi et al. 2017).
    - ``dropout``: the rate of Gaussian dropout after every hidden activation while
      training (:func:`hypergrad.models.gaussian_dropout`; declare it ``unit``).
    - ``augment_shift``: training images are translated by up to this many pixels in
      each direction, by a uniform random real amount per image, bilinearly
      (:func:`hypergrad.models.random_translate`).
    - ``augment_noise``: the standard deviation of Gaussian noise added to training
      inputs (:func:`hypergrad.models.gaussian_noise`).

    The last three draw fresh noise at every inner step (the train loss then takes a
    ``key``, see :class:`Task`); untuned, they keep the fixed values given here (0: off).
    The validation loss is always the plain ``loss`` on the clean validation set, with
    no dropout, so no hyperparameter can lower it except through the trained weights.

    Args:
      model: an NNX module (see :mod:`hypergrad.models`).
      data: a :class:`hypergrad.data.Dataset`.
      space: the tuned hyperparameters.
      steps, batch_size: the horizon and the minibatch size (``None`` = full batch).
      loss: ``"mse"`` on one-hot targets or ``"ce"``.
      optimizer: the inner optimizer; :func:`hypergrad.inner.sgd` by default.
      slope: the fixed leaky-ReLU slope when the space does not tune it.
      val_batch_size: the validation loss's chunk size (see :class:`Task`).
      dropout, augment_shift, augment_noise: the fixed values when not tuned.

    Returns:
      ``(task, predict)`` with ``predict(params, hparams, x) -> logits``.
    """
    from hypergrad import models
    from hypergrad.inner import lookup, per_leaf, sgd

    apply, params = models.functional(model)
    loss_fn = models.loss_by_name(loss)
    layers = models.activation_layers(model)
    tuned = set(space.names)
    fixed = {"dropout": dropout, "augment_shift": augment_shift, "augment_noise": augment_noise}
    noise = {name for name in NOISE_HPARAMS if name in tuned or fixed[name]}
    image_shape = tuple(data.input_shape) if "augment_shift" in noise else ()

    def slopes(hparams):
        value = lookup(hparams, "leaky_slope", slope, "the model")
        if isinstance(value, dict):  # one per activation layer, in the model's order
            return jax.tree.leaves(value)
        return value

    def predict(params, hparams, x):
        return apply(params, x, slopes(hparams))

    def val_loss(params, hparams, batch):
        x, y = batch[0], batch[1]
        return loss_fn(predict(params, hparams, x), y)

    def train_logits(params, hparams, x, key):
        if key is None or not noise:
            return predict(params, hparams, x)

        def value(name):
            return lookup(hparams, name, fixed[name], "the task")

        if "augment_shift" in noise:
            x = models.random_translate(jax.random.fold_in(key, 0), x,
                                        value("augment_shift"), image_shape)
        if "augment_noise" in noise:
            x = models.gaussian_noise(jax.random.fold_in(key, 1), x, value("augment_noise"))
        if "dropout" not in noise:
            return predict(params, hparams, x)
        return apply(params, x, slopes(hparams), dropout=value("dropout"),
                     key=jax.random.fold_in(key, 2))

    def loss_with(params, hparams, batch, key):
        x, y = batch[0], batch[1]
        logits = train_logits(params, hparams, x, key)
        if not tuned & {"loss_mix", "label_smoothing", "example_weight"}:
            return loss_fn(logits, y)
        classes = logits.shape[-1]
        target = jax.nn.one_hot(y, classes, dtype=logits.dtype)
        if "label_smoothing" in hparams:
            s = hparams["label_smoothing"]
            target = (1 - s) * target + s / classes
        per_example = {
            "mse": jnp.sum((logits - target) ** 2, axis=-1),
            "ce": -jnp.sum(target * jax.nn.log_softmax(logits), axis=-1),
        }
        if "loss_mix" in hparams:
            m = hparams["loss_mix"]
            losses = (1 - m) * per_example["mse"] + m * per_example["ce"]
        else:
            losses = per_example[loss]
        if "example_weight" in hparams:
            losses = jax.nn.sigmoid(hparams["example_weight"][batch[2]]) * losses
        return jnp.mean(losses)

    train_loss: Callable[..., jax.Array]
    if noise:
        def train_loss(params, hparams, batch, key=None):
            """The training loss on the batch with this step's noise (none without a key)."""
            return loss_with(params, hparams, batch, key)
    else:
        def train_loss(params, hparams, batch):
            return loss_with(params, hparams, batch, None)

    train_data = data.train
    if "example_weight" in tuned:
        n = jax.tree.leaves(train_data)[0].shape[0]
        shape = np.shape(space.constraints["example_weight"].value)
        if shape != (n,):
            raise ValueError(f"example_weight needs one value per training example, shape "
                             f"({n},), got {shape}: declare real(np.zeros({n}))")
        train_data = (*train_data, np.arange(n, dtype=np.int32))

    def scaled(key, hparams):
        del key  # the model's own initialization, scaled
        scale = per_leaf(hparams["init_scale"], params)
        return jax.tree.map(lambda w, s: (s * w).astype(w.dtype), params, scale)

    init = scaled if "init_scale" in tuned else params

    targets = {}
    if "leaky_slope" in tuned and space.constraints["leaky_slope"].per is not None:
        targets["leaky_slope"] = _nest({path: {"slope": np.zeros(())} for path in layers})
    space = space.resolve(params, steps, targets)
    task = Task(params=init, train_loss=train_loss, val_loss=val_loss,
                train_data=train_data, val_data=data.val, space=space,
                optimizer=optimizer or sgd(), steps=steps, batch_size=batch_size,
                val_batch_size=val_batch_size)
    return task, predict


def _nest(flat: dict[tuple, Any]) -> dict:
    """``{("convs", 0): v}`` as ``{"convs": {0: v}}``."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def seed_cnn(
    data: Any, space: HyperSpace, *, steps: int, batch_size: int | None = None,
    loss: str = "mse", seed: int = 0, channels: tuple[int, ...] = (8, 16, 16),
    conv: str = "auto", dtype: Any = None, optimizer: InnerOptimizer | None = None,
    val_batch_size: int | None = None, **noise: float,
) -> tuple[Task, Callable[[PyTree, Any, jax.Array], jax.Array]]:
    """The seed CNN (three 3x3 convolutions with leaky ReLU, a dense head) on ``data``.

    Trained by ``optimizer``, :func:`hypergrad.inner.sgd` by default, which reads
    learning rate, momentum and weight decay from ``hparams``; see
    :func:`classification` for the rest (``noise``: the fixed ``dropout``,
    ``augment_shift`` and ``augment_noise``).
    """
    from flax import nnx

    from hypergrad.models import SeedCNN

    *image_shape, in_channels = data.input_shape
    model = SeedCNN(nnx.Rngs(seed), in_channels=in_channels, channels=channels,
                    num_classes=data.num_classes, image_shape=tuple(image_shape), conv=conv,
                    param_dtype=dtype or data.train[0].dtype)
    return classification(model, data, space, steps=steps, batch_size=batch_size, loss=loss,
                          optimizer=optimizer, val_batch_size=val_batch_size, **noise)
