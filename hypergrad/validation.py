"""Checks of tuning arguments, each refusal written once.

``hg.tune`` (:mod:`hypergrad.tune.checks`), :class:`hypergrad.Guard`,
:func:`hypergrad.inner.from_optax` and the command line's
:meth:`hypergrad.config.Config.validate` call these before anything compiles, so the
Python API refuses what the command line refuses, with the same line: it names the
argument, its value and what would be accepted. Nothing here imports the rest of the
library (the inner optimizers and the config import it).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from hypergrad.messages import show

P = ParamSpec("P")
R = TypeVar("R")

MAX_INT = 2**31 - 1
"""The largest count (meta-steps, members, a guard's counters, any integer config key
but ``seed``): JAX counts in int32."""
MAX_SEED = 2**32 - 1
"""The largest seed: ``jax.random.key`` takes 32-bit seeds (64-bit only under x64)."""


def _real(value: Any) -> bool:
    """A real number: a Python or NumPy int or float, or a 0-d real array (not a bool)."""
    if isinstance(value, bool | np.bool_):
        return False
    if isinstance(value, int | float | np.integer | np.floating):
        return True
    return (isinstance(value, np.ndarray | jax.Array) and np.ndim(value) == 0
            and (jnp.issubdtype(value.dtype, jnp.integer)
                 or jnp.issubdtype(value.dtype, jnp.floating)))


def integer(name: str, value: Any, low: int | None = 0, high: int | None = MAX_INT) -> int:
    """``value`` as an ``int`` if it is an integer from ``low`` to ``high`` (``None``: no
    bound); otherwise a ``TypeError`` (not an integer: ``2.5``, ``"3"``, ``True``) or a
    ``ValueError``, naming ``name``."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an integer, got {show(value)}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be at least {low}, got {show(value)}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be at most {high}, got {show(value)}")
    return int(value)


def number(name: str, value: Any, *, low: float | None = None, strict: bool = False,
           finite: bool = True, note: str = "") -> float:
    """``value`` as a ``float`` if it is a number at least ``low`` (above it with
    ``strict``; NaN never is) and, with ``finite``, not infinite; otherwise a
    ``TypeError`` or ``ValueError`` naming ``name`` (``note`` says what the bound means,
    e.g. ``" (0 turns it off)"``)."""
    if not _real(value):
        raise TypeError(f"{name} must be a number, got {show(value)}")
    v = float(value)
    if low is not None and not (v > low if strict else v >= low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low:g}{note}, got {v:g}")
    if finite and not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v:g}")
    return v


def function(name: str, value: Any, signature: str) -> Any:
    """``value`` if it can be called, else a ``TypeError`` naming ``name`` and the
    ``signature`` expected."""
    if not callable(value):
        raise TypeError(f"{name} must be a function {signature}, got {show(value)}")
    return value


def random_key(name: str, key: Any) -> jax.Array:
    """``key`` as a typed JAX key (or array of keys): a ``jax.random.key`` as it is, a
    legacy ``jax.random.PRNGKey`` (raw ``uint32`` key data, one or stacked) wrapped;
    anything else a ``TypeError`` naming ``name``."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return key
    raw = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    if (isinstance(key, np.ndarray | jax.Array) and dtype == raw.dtype
            and key.shape[key.ndim - raw.ndim:] == raw.shape):
        return jax.random.wrap_key_data(jnp.asarray(key))
    raise TypeError(f"{name} must be a JAX random key (jax.random.key(seed), or "
                    f"jax.random.split(key, P) for one key per member), got {show(key)}")


# -- rules the command line's config and hg.tune share ---------------------------------


def clip(name: str, value: Any) -> float:
    """The hypergradient clipping norm: a finite number >= 0 (0 turns it off); a negative
    one would flip the hypergradient, NaN would reject every step."""
    return number(name, value, low=0.0, note=" (0 turns it off)")


def spread(name: str, value: Any) -> float:
    """A population's spread around the start: a finite number >= 0 (NaN would start
    every member but the first at NaN)."""
    return number(name, value, low=0.0)


def population(size: int, *, ncg: bool, online: bool) -> None:
    """What a population of ``size`` members cannot be tuned with: nonlinear CG (its line
    search stops and restarts each member on its own schedule, while the vmapped
    meta-step moves all members at once) and online tuning (one training run)."""
    if size > 1 and ncg:
        raise ValueError("population > 1 supports outer=gd or adam, not ncg (its line "
                         "search stops and restarts each member on its own schedule)")
    if size > 1 and online:
        raise ValueError("population > 1 does not support online tuning (one training "
                         "run); tune a single run online, or turn online off")


def beyond(name: str, shown: str, low: float, high: float, max_phi: float,
           entry: bool = False) -> ValueError:
    """The error of a hyperparameter that starts (at ``shown``) beyond the guard's
    ``max_phi``: the natural values ``low`` and ``high`` of ``phi = -max_phi`` and
    ``+max_phi`` bound what the guard accepts, and it rejects every step from beyond
    (``entry``: one entry of an array does)."""
    which = f"an entry of {name}" if entry else name
    return ValueError(
        f"{which} starts at {shown}, outside the range the guard accepts ({name} from "
        f"{low:.3g} to {high:.3g}: |phi| <= Guard.max_phi = {max_phi:g} in the tuned "
        f"coordinates); no step from there is accepted: start inside it")


def start(name: str, value: Any, low: float, high: float, max_phi: float) -> None:
    """Refuse a hyperparameter whose initial ``value`` (natural units) lies outside
    ``[low, high]`` (see :func:`beyond`)."""
    leaves = [np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(value)]
    v = np.concatenate(leaves) if leaves else np.zeros(0)
    outside = v[~((v >= low) & (v <= high))]
    if outside.size:
        raise beyond(name, f"{outside[0]:g}", low, high, max_phi, entry=v.size > 1)


SYNONYMS = {
    "rng": "key", "rng_key": "key", "prng_key": "key", "random_key": "key", "seed": "key",
    "num_steps": "meta_steps", "n_steps": "meta_steps", "iterations": "meta_steps",
    "n_trials": "meta_steps", "num_iterations": "meta_steps", "epochs": "meta_steps",
    "time_budget": "budget", "timeout": "budget", "max_time": "budget", "seconds": "budget",
    "hyper_optimizer": "outer", "meta_optimizer": "outer", "outer_optimizer": "outer",
    "hypergradient": "estimator", "method": "estimator",
    "init": "phi", "hparams": "phi", "start": "phi",
    "inner_steps": "steps", "horizon": "steps", "T": "steps",
    "model": "params", "weights": "params", "loss": "train_loss", "hyperspace": "space",
    "lr": "learning_rate", "step_size": "learning_rate", "per_layer": "per", "granularity": "per",
}
"""Names other libraries (optax, jaxopt, Optuna, learned_optimization) use for an
argument that one of ours takes under another name."""


def keywords(fn: Callable[P, R], name: str | None = None) -> Callable[P, R]:
    """``fn``, answering an unknown keyword argument with the name it most likely meant.

    Python's own ``TypeError`` (``got an unexpected keyword argument 'rng'``) names only
    the mistake; this one names the argument to use: a known synonym from another
    library (``rng`` -> ``key``), else the closest spelling, else every accepted name.
    """
    parameters = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return fn
    accepted = [n for n, p in parameters.items() if n != "self"
                and p.kind is not inspect.Parameter.VAR_POSITIONAL]
    shown = name or fn.__name__

    @functools.wraps(fn)
    def checked(*args: P.args, **kwargs: P.kwargs) -> R:
        for given in kwargs:
            if given not in parameters:
                raise TypeError(unexpected(shown, given, accepted))
        return fn(*args, **kwargs)

    return checked


def unexpected(function: str, given: str, accepted: list[str]) -> str:
    """The line for a keyword argument ``given`` that ``function`` does not take."""
    guess = SYNONYMS.get(given)
    if guess not in accepted:
        close = difflib.get_close_matches(given, accepted, n=1, cutoff=0.6)
        guess = close[0] if close else None
    hint = f"did you mean {guess}=?" if guess else f"it takes {', '.join(accepted)}"
    return f"{function}() got an unexpected keyword argument {given!r}; {hint}"
