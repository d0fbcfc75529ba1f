"""Typed experiment configs and ``--set key=value`` overrides, validated in one place."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable
from typing import Any

from hypergrad import estimators, outer, validation
from hypergrad.estimators.implicit import SOLVERS
from hypergrad.hparams import HyperSpace
from hypergrad.inner import HVP_MODES
from hypergrad.messages import LIMIT, show
from hypergrad.tune import DEFAULT_CLIP, DEFAULT_GUARD
from hypergrad.validation import MAX_INT, MAX_SEED


class ConfigError(ValueError):
    """A config value is wrong; the message names it and says what would be right."""


LOSSES = ("mse", "ce")
#: The strategies a config can name (:data:`hypergrad.tune.strategies.BY_NAME`).
STRATEGIES = ("default", "local", "explore-refine")
DTYPES = ("float32", "float64")
HPARAM_OPTIONS = ("per", "schedule")


@dataclasses.dataclass(frozen=True)
class Config:
    """Keys every experiment understands. Experiments subclass it, adding their own keys
    and the initial value of each hyperparameter by name.

    Attributes:
      steps: inner training steps T per meta-step.
      meta_steps: hyper-updates in the run.
      batch_size: examples per inner step; 0 trains on the full batch.
      outer: the hyper-update: ``adam`` (default; step 0.2 in log/logit units), ``gd`` or
        ``ncg`` (nonlinear CG with line search).
      outer_lr: the hyper-update's step size (for ``ncg``, the first trial step); ``None``
        takes the hyper-update's own default (:data:`hypergrad.outer.DEFAULT_LR`).
      clip: hypergradients with a larger global norm are scaled down to it before a
        ``gd`` or ``adam`` update (0 turns clipping off); hypergradients of long unrolls
        spike near the edge of stability, and one spike can throw ``phi`` far away.
      seed: decides the data split, the initial weights and the minibatch order; at most
        :data:`MAX_SEED` (with ``population_seeds``, ``seed + population - 1`` too).
      data: the dataset: ``digits``, ``mnist``, ``fashion_mnist``, ``kmnist``, ``cifar10``
        (tfds), ``idx:DIR`` (MNIST-format files) or ``npz:FILE``; see :mod:`hypergrad.data`.
      data_train_size, data_val_size, data_test_size: the split sizes, set as
        ``data.train_size`` etc.; ``data.test_size=0`` takes the source's own test split,
        or the rest of the examples if it has none.
      data_dir: where tfds keeps prepared datasets (``data.data_dir``; empty: tfds's default).
      loss: ``mse`` (on one-hot targets) or ``ce`` (cross-entropy).
      checkpoint: ``auto`` (default) takes the policy measured fastest on the backend
        (:func:`hypergrad.unroll.auto_policy`: ``step`` on CPU, ``none`` elsewhere);
        ``none`` stores every inner step for the backward pass; ``step`` stores each
        step's weights; an integer k stores the weights every k steps and recomputes the
        rest; ``nested`` checkpoints at two levels (memory ~ sqrt(T)).
      hvp: how ``reverse`` and ``truncated`` backpropagate through each inner step's
        gradient: ``reverse`` (plain autodiff; stores every activation) or ``forward`` (a
        forward-over-reverse Hessian-vector product; stores only each step's inputs).
      hvp_batch_size: with ``hvp=forward``, run each step's Hessian-vector product over the
        batch in chunks of this many examples (0: all at once); less memory, more time.
      val_batch_size: evaluate and differentiate the validation loss in chunks of this
        many examples (0: all at once); bounds the memory a large validation set takes.
        ``seed-cnn`` also scores its test split in these chunks.
      dtype: ``float32`` or ``float64`` for weights, data and hyperparameters.
      deterministic: make GPU runs reproducible bit for bit (XLA's
        ``--xla_gpu_deterministic_ops``: deterministic reductions and scatters, no autotuned
        nondeterministic kernels); set before JAX starts its devices. CPU runs are
        deterministic already.
      save_every: meta-steps between checkpoints of the run (it also saves at the end,
        on SIGINT/SIGTERM and before stopping on an error).
      estimator: the hypergradient method: ``reverse``, ``truncated`` (through the last
        ``window`` steps), ``forward``, ``implicit`` (with ``solver``, ``maxiter``),
        ``reversible`` (exact reversible SGD; needs float64), ``es`` (evolution strategies
        on the whole run, with ``sigma``, ``num_pairs``, ``cap``) or ``pes`` (persistent ES
        over windows of ``window`` steps).
      window: the truncated estimator's window K (at most ``steps``); ``pes``'s window.
      solver: the implicit estimator's linear solver: ``cg``, ``gmres`` (non-symmetric
        systems, no step), ``neumann``, ``fixed_point``.
      maxiter: the implicit solver's iterations.
      tol: the implicit solver's relative residual tolerance.
      solver_step: the step of the ``neumann`` and ``fixed_point`` solvers (needed by them).
      sigma: ``es`` and ``pes``: the standard deviation of the Gaussian perturbations of
        ``phi`` (log / logit units): the scale over which the validation loss is smoothed.
      num_pairs: ``es`` and ``pes``: antithetic pairs of perturbed training runs per
        hypergradient (their cost: 2 * num_pairs training runs).
      cap: ``es`` and ``pes``: a perturbed run whose validation loss is not finite or above
        ``cap`` counts as ``cap`` (none: no cap), so a diverging neighbour does not make the
        estimate NaN.
      online: tune while training: one training run of ``steps`` inner steps whose
        hyperparameters are updated every ``window`` steps by the hypergradient through
        the next ``window`` steps, continuing from the current weights (``meta_steps`` is
        not used). The hypergradient through a window is truncated backpropagation,
        except with ``estimator=pes``: Persistent ES over ``2 * num_pairs`` perturbed
        runs that keep their weights (``sigma``, ``num_pairs``, ``cap``).
      resample: train meta-step t with ``fold_in(key(seed), t)``: fresh minibatches and
        noise each meta-step (for dropout and augmentation strengths: their expected
        effect, not one draw's); see :func:`hypergrad.tune`. ``none`` (default): on for
        a task with a distribution of tasks (meta-learning: fresh tasks each meta-step),
        off otherwise.
      explore: before tuning, train this many configurations drawn at random from
        :func:`hypergrad.search.box` and start from the best of them and the configured
        values (0: start at the configured values); a single run (``population=1``).
        See :func:`hypergrad.search.explore`.
      budget: wall-clock seconds for the tuning (compilation included; ``meta_steps`` still
        caps the meta-steps): no meta-step starts that is expected to end past it; ``none``
        (default) runs ``meta_steps``. See :func:`hypergrad.tune`.
      strategy: ``default``: what ``hg.tune`` does by default
        (:func:`hypergrad.tune.strategies.chosen`): ``explore-refine``, or ``local``
        where ``population``, ``explore`` or ``online`` is set; ``local``: one run from
        the configured values, or a population around them; ``explore-refine``: explore
        the search box, then refine from the configured values (and the best explored
        starts, ``population`` of them at once) while the search goes on between
        meta-steps; with ``explore=N`` it explores N configurations first, else 15% of
        ``budget`` or 24 configurations. See :mod:`hypergrad.tune.strategies`. The
        experiments that reproduce a paper's method default to ``local``.
      population: tune this many hyperparameter initializations at once, as one vmapped
        meta-step (``gd`` and ``adam`` only); see :mod:`hypergrad.population`.
      population_spread: member 0 starts at the configured values, member m > 0 at
        ``phi + population_spread * N(0, 1)`` (unconstrained coordinates, one draw per
        element in ``dtype``, from ``fold_in(key(seed), m)``).
      population_seeds: give member m the key ``key(seed + m)`` (minibatch order, and
        initial weights where the task draws them); otherwise every member uses ``seed``.
      devices: shard the population across this many devices (a divisor of
        ``population``); 0 takes the largest divisor of ``population`` that is at most
        ``len(jax.devices())``.
      hparam_options: ``(name, option, value)`` triples set as ``hparams.NAME.per=layer``
        (``global``, ``layer``, ``tensor``, ``parameter``) and ``hparams.NAME.schedule=
        per_step`` (``constant``, ``per_step``, ``windows:K``, ``linear``,
        ``exponential``); see :mod:`hypergrad.hparams`.
    """

    steps: int = 100
    meta_steps: int = 30
    batch_size: int = 100
    outer: str = outer.DEFAULT
    outer_lr: float | None = None
    clip: float = DEFAULT_CLIP
    seed: int = 0
    data: str = "digits"
    data_train_size: int = dataclasses.field(default=1000, metadata={"key": "data.train_size"})
    data_val_size: int = dataclasses.field(default=400, metadata={"key": "data.val_size"})
    data_test_size: int = dataclasses.field(default=0, metadata={"key": "data.test_size"})
    data_dir: str = dataclasses.field(default="", metadata={"key": "data.data_dir"})
    loss: str = "mse"
    checkpoint: str = "auto"
    hvp: str = "reverse"
    hvp_batch_size: int = 0
    val_batch_size: int = 0
    dtype: str = "float32"
    deterministic: bool = False
    save_every: int = 5
    estimator: str = "reverse"
    window: int = 10
    solver: str = "cg"
    maxiter: int = 50
    tol: float = 1e-6
    solver_step: float | None = None
    sigma: float = 0.1
    num_pairs: int = 16
    cap: float | None = None
    online: bool = False
    resample: bool | None = None
    explore: int = 0
    budget: float | None = None
    strategy: str = "default"
    population: int = 1
    population_spread: float = 0.5
    population_seeds: bool = False
    devices: int = 0
    hparam_options: tuple[tuple[str, str, str], ...] = ()

    def space(self) -> HyperSpace:
        """The tuned hyperparameters with this config's initial values."""
        raise NotImplementedError(f"{type(self).__name__} must define space()")

    def hyperspace(self) -> HyperSpace:
        """:meth:`space` with the ``hparams.NAME.per`` and ``hparams.NAME.schedule``
        options applied."""
        space = self.space()
        options: dict[str, dict[str, str]] = {}
        for name, option, value in self.hparam_options:
            options.setdefault(name, {})[option] = value
        for name, opts in options.items():
            if name not in space:
                raise ConfigError(f"hparams.{name}: this experiment tunes no {name!r} "
                                  f"(it tunes {', '.join(space.names)})")
            c = space.constraints[name]
            per = opts.get("per", c.per)
            schedule = opts.get("schedule", c.schedule)
            try:
                space = space.with_options(name, per=per, schedule=schedule)
            except ValueError as e:
                raise ConfigError(f"hparams.{name}: {e}") from None
        return space

    def validate(self) -> Config:
        """Check every value; raise :class:`ConfigError` naming the first bad one.

        Every float key, an experiment's own included, must be finite, and every integer
        key at most :data:`MAX_INT` (``seed`` at most :data:`MAX_SEED`).
        """
        from hypergrad.data import DataError, check_name  # here: data imports scikit-learn

        _bounded_ints(self)
        _at_least(self, "steps", 1)
        _at_least(self, "meta_steps", 1)
        _at_least(self, "batch_size", 0)
        self.checkpoint_policy()
        _at_least(self, "seed", 0)
        last = self.seed + (self.population - 1 if self.population_seeds else 0)
        if last > MAX_SEED:
            what = "seed + population - 1" if last != self.seed else "seed"
            raise ConfigError(f"{what} must be at most {MAX_SEED} (2^32 - 1, what "
                              f"jax.random.key takes), got {show(last)}")
        _at_least(self, "save_every", 1)
        _at_least(self, "window", 1)
        _at_least(self, "maxiter", 1)
        _at_least(self, "num_pairs", 1)
        if not self.sigma > 0:
            raise ConfigError(f"sigma must be > 0, got {self.sigma:g}")
        _one_of(self, "estimator", estimators.NAMES)
        _one_of(self, "solver", SOLVERS)
        if (self.estimator in ("truncated", "pes") or self.online) and self.window > self.steps:
            raise ConfigError(f"window must be at most steps ({self.steps}), got {self.window}")
        if not self.tol > 0:
            raise ConfigError(f"tol must be > 0, got {self.tol:g}")
        if self.solver_step is not None and not self.solver_step > 0:
            raise ConfigError(f"solver_step must be > 0, got {self.solver_step:g}")
        if (self.estimator == "implicit" and self.solver in ("neumann", "fixed_point")
                and self.solver_step is None):
            raise ConfigError(f"solver {self.solver} needs solver_step (for example the "
                              "inner learning rate): --set solver_step=0.01")
        _one_of(self, "outer", outer.NAMES)
        _one_of(self, "strategy", STRATEGIES)
        _one_of(self, "loss", LOSSES)
        _one_of(self, "hvp", HVP_MODES)
        try:
            check_name(self.data)
        except DataError as e:
            raise ConfigError(f"data: {e}") from None
        _at_least(self, "data_train_size", 1)
        _at_least(self, "data_val_size", 1)
        _at_least(self, "data_test_size", 0)
        _at_least(self, "val_batch_size", 0)
        _at_least(self, "hvp_batch_size", 0)
        if self.hvp_batch_size and self.hvp != "forward":
            raise ConfigError(f"hvp_batch_size chunks hvp=forward's Hessian-vector products; "
                              f"set hvp=forward or hvp_batch_size=0 (hvp is {self.hvp})")
        _one_of(self, "dtype", DTYPES)
        if self.outer_lr is not None and not self.outer_lr > 0:
            raise ConfigError(f"outer_lr must be > 0 (or none for the default), got "
                              f"{self.outer_lr:g}")
        _shared(validation.clip, "clip", self.clip)
        _at_least(self, "population", 1)
        _at_least(self, "devices", 0)
        _shared(validation.spread, "population_spread", self.population_spread)
        _shared(lambda: validation.population(self.population, ncg=self.outer == "ncg",
                                              online=self.online))
        _at_least(self, "explore", 0)
        if self.budget is not None and not 0 < self.budget < math.inf:
            raise ConfigError(f"budget must be a positive number of seconds (or none), got "
                              f"{self.budget:g}")
        if self.strategy == "explore-refine" and self.online:
            raise ConfigError("online tuning is one training run: set strategy=local")
        if self.explore and self.population > 1 and self.strategy != "explore-refine":
            raise ConfigError("explore picks one start; with population > 1 set explore=0 "
                              "(members start around the configured values)")
        try:
            self.hyperspace()
        except ValueError as e:  # ConfigError included
            raise ConfigError(str(e)) from None
        _finite_floats(self)
        _reachable(self.space())
        return self

    def load_data(self) -> Any:
        """The dataset these keys name (``data``, ``data.*``, ``seed``, ``dtype``): a
        :class:`hypergrad.data.Dataset`, split by ``seed``."""
        import jax.numpy as jnp

        from hypergrad.data import load

        return load(self.data, seed=self.seed, train_size=self.data_train_size,
                    val_size=self.data_val_size, test_size=self.data_test_size or None,
                    data_dir=self.data_dir or None, dtype=jnp.dtype(self.dtype))

    def checkpoint_policy(self) -> str | int | None:
        """``checkpoint`` as :func:`hypergrad.estimators.reverse` takes it."""
        if self.checkpoint in ("auto", "none", "step", "nested"):
            return None if self.checkpoint == "none" else self.checkpoint
        # Only ASCII digits: str.isdigit() also accepts '²', which int() refuses.
        if re.fullmatch(r"[0-9]+", self.checkpoint) and int(self.checkpoint) >= 1:
            return int(self.checkpoint)
        raise ConfigError(f"checkpoint must be auto, none, step, nested or a positive integer k, "
                          f"got {show(self.checkpoint)}")

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict, keyed as ``--set`` spells the keys."""
        out = {_key(f): getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "hparam_options"}
        out.update({f"hparams.{n}.{o}": v for n, o, v in self.hparam_options})
        return out


def _key(field: dataclasses.Field) -> str:
    """A field's ``--set`` key: its name, or a dotted name such as ``data.train_size``."""
    return field.metadata.get("key", field.name)


def parse_widths(key: str, text: str, at_least: int = 1) -> tuple[int, ...]:
    """Layer widths from ``"8,16,16"`` (at least ``at_least`` positive integers); a
    :class:`ConfigError` naming ``key`` otherwise. Channel and size lists of experiments."""
    try:
        widths = tuple(int(c) for c in text.split(","))
    except ValueError:
        widths = ()
    if len(widths) < at_least or min(widths, default=0) < 1:
        what = "positive integers" if at_least == 1 else f"at least {at_least} positive integers"
        raise ConfigError(f"{key} must be {what} separated by commas, got {show(text)}")
    return widths


def _shared(check: Callable[..., Any], *args: Any) -> Any:
    """A rule of :mod:`hypergrad.validation` (the one ``hg.tune`` runs too), its
    refusal a :class:`ConfigError`."""
    try:
        return check(*args)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def _at_least(config: Config, name: str, low: int) -> None:
    key = _key(next(f for f in dataclasses.fields(config) if f.name == name))
    # No upper bound here: _bounded_ints checks it first (and seed has its own).
    _shared(validation.integer, key, getattr(config, name), low, None)


def _bounded_ints(config: Config) -> None:
    """Integer keys fit in int32 (``steps=10**20`` is an OverflowError deep in JAX)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name != "seed" and isinstance(value, int) and not isinstance(value, bool):
            _shared(validation.integer, _key(f), value, None, MAX_INT)


def _reachable(space: HyperSpace) -> None:
    """Each constrained hyperparameter's initial value lies where the guard of ``hypergrad
    run`` (:data:`hypergrad.tune.DEFAULT_GUARD`) accepts steps: ``learning_rate=1e-300``
    is -690 in log units, beyond ``max_phi``, and every step from it would be rejected.
    (``real`` ones are left to ``hg.tune``, which knows the guard: an experiment with its
    own, such as ``seed-recurrence``, bounds its slope itself.)"""
    import jax.numpy as jnp

    max_phi = DEFAULT_GUARD.max_phi
    for name, c in space.constraints.items():
        if c.kind != "real":
            low, high = (float(c.to_natural(jnp.asarray(b))) for b in (-max_phi, max_phi))
            _shared(validation.start, name, c.value, low, high, max_phi)


def _finite_floats(config: Config) -> None:
    """Every float key (of any experiment) must be finite: ``inf`` and ``nan`` pass
    range checks such as ``>= 0`` and then poison a run."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        kind = hints[f.name]
        options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
        value = getattr(config, f.name)
        if float in options and isinstance(value, float):
            _shared(validation.number, _key(f), value)


def _one_of(config: Config, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {show(value)}")


def _parse(name: str, text: str, kind: Any) -> Any:
    """Convert ``text`` to the field's type, or raise a one-line :class:`ConfigError`."""
    if kind is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"{name} must be true or false, got {show(text)}")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {show(text)}") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {show(text)}") from None
    return text


def override(config: Config, assignments: list[str]) -> Config:
    """Apply ``key=value`` strings to ``config`` and validate the result.

    An unknown key names the closest valid ones; a value is parsed by the field's type.
    """
    hints = typing.get_type_hints(type(config))
    fields = {_key(f): f.name for f in dataclasses.fields(config)
              if f.name != "hparam_options"}
    changes: dict[str, Any] = {}
    per_name = {(n, o): v for n, o, v in config.hparam_options}
    for item in assignments:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {show(item)}")
        if len(key) > LIMIT:  # no key is this long; echo it cut, not whole
            raise ConfigError(f"unknown config key {show(key)}")
        if key.startswith("hparams."):
            name, dot, option = key[len("hparams."):].rpartition(".")
            if not dot or not name or option not in HPARAM_OPTIONS:
                raise ConfigError(f"{key}: expected hparams.NAME.per or hparams.NAME.schedule")
            per_name[(name, option)] = text.strip()
            changes["hparam_options"] = tuple((n, o, v) for (n, o), v in per_name.items())
            continue
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(
                f"unknown config key {key!r}{hint} (valid keys: {', '.join(sorted(fields))}, "
                "hparams.NAME.per, hparams.NAME.schedule)"
            )
        kind, text = hints[fields[key]], text.strip()
        if isinstance(kind, types.UnionType):  # e.g. float | None
            options = typing.get_args(kind)
            if type(None) in options and text.lower() == "none":
                changes[fields[key]] = None
                continue
            kind = options[0]
        changes[fields[key]] = _parse(key, text, kind)
    return dataclasses.replace(config, **changes).validate()


def from_dict(default: Config, values: dict[str, Any], source: str = "config") -> Config:
    """A config of ``default``'s type from a dict such as a run's ``config.json``.

    Each value goes through the same parsing and validation as ``--set``, so a
    hand-edited file cannot smuggle in a value of the wrong type.
    """
    try:
        return override(default, [f"{key}={value}" for key, value in values.items()])
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
