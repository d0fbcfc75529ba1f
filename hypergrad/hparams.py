"""Hyperparameter spaces: constraints and the map between ``phi`` and ``hparams``.

A hyperparameter is optimized in unconstrained coordinates ``phi`` (log for positive
values, logit for the unit interval, a scaled logit for a bounded interval) and read by
the training code in its natural units (``hparams``). A :class:`HyperSpace` declares each
hyperparameter and maps ``phi <-> hparams``. Values may be scalars or arrays; nothing
here assumes scalars.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any


class Constraint(NamedTuple):
    """One hyperparameter's declaration: its initial value and its bijection to R.

    Attributes:
      value: the initial value in natural units (a scalar or an array).
      kind: ``"positive"``, ``"unit"``, ``"bounded"`` or ``"real"``.
      to_natural: ``phi -> value``, elementwise.
      to_phi: ``value -> phi``, elementwise; the inverse of ``to_natural``.
      low, high: the open interval the value must lie in.
    """

    value: Any
    kind: str
    to_natural: Callable[[Array], Array]
    to_phi: Callable[[Array], Array]
    low: float
    high: float

    def check(self, value: Any, name: str = "value") -> None:
        """Raise ``ValueError`` unless every entry of ``value`` lies in ``(low, high)``."""
        v = np.asarray(value, dtype=np.float64)
        if not np.all(np.isfinite(v)) or np.any(v <= self.low) or np.any(v >= self.high):
            raise ValueError(f"{name} must be {_describe(self)}, got {_show(value)}")



def _describe(c: Constraint) -> str:
    if c.kind == "positive":
        return "> 0"
    if c.kind == "unit":
        return "strictly between 0 and 1"
    if c.kind == "bounded":
        return f"strictly between {c.low:g} and {c.high:g}"
    return "finite"


def _show(value: Any) -> str:
    v = np.asarray(value)
    if v.size == 1:
        return f"{v.item():g}"
    return f"an array with entries in [{v.min():g}, {v.max():g}]"


def positive(value: Any) -> Constraint:
    """A positive hyperparameter, optimized as ``phi = log(value)``."""
    return Constraint(value, "positive", jnp.exp, jnp.log, 0.0, np.inf)


def unit(value: Any) -> Constraint:
    """A hyperparameter in (0, 1), optimized as ``phi = logit(value)``."""
    return Constraint(value, "unit", jax.nn.sigmoid, jax.scipy.special.logit, 0.0, 1.0)


def bounded(value: Any, low: float, high: float) -> Constraint:
    """A hyperparameter in (low, high), optimized as a scaled logit."""
    low, high = float(low), float(high)
    if not low < high:
        raise ValueError(f"bounded() needs low < high, got low={low:g}, high={high:g}")
    width = high - low
    return Constraint(
        value,
        "bounded",
        lambda phi: low + width * jax.nn.sigmoid(phi),
        lambda v: jax.scipy.special.logit((v - low) / width),
        low,
        high,
    )


def real(value: Any) -> Constraint:
    """An unconstrained hyperparameter: ``phi = value``."""
    return Constraint(value, "real", lambda phi: phi, lambda v: v, -np.inf, np.inf)


class HyperSpace:
    """Declares the hyperparameters being tuned and maps ``phi <-> hparams``.

    Example::

      space = HyperSpace({"learning_rate": positive(0.1), "momentum": unit(0.5)})
      phi = space.init()               # {"learning_rate": log 0.1, "momentum": 0.0}
      hparams = space.constrain(phi)   # {"learning_rate": 0.1, "momentum": 0.5}

    Args:
      constraints: a mapping from hyperparameter name to :class:`Constraint`. Each
        initial value is checked here, and an error names the hyperparameter.
    """

    def __init__(self, constraints: Mapping[str, Constraint]):
        for name, c in constraints.items():
            if not isinstance(c, Constraint):
                raise TypeError(
                    f"hyperparameter {name!r} must be declared with positive(), unit(), "
                    f"bounded() or real(), got {type(c).__name__}"
                )
            c.check(c.value, name)
        self.constraints: dict[str, Constraint] = dict(constraints)

    @property
    def names(self) -> tuple[str, ...]:
        """The hyperparameter names, in declaration order."""
        return tuple(self.constraints)

    def __contains__(self, name: object) -> bool:
        return name in self.constraints

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={c.kind}({_show(c.value)})" for n, c in self.constraints.items())
        return f"HyperSpace({inner})"

    def init(self, dtype: Any = None) -> dict[str, Array]:
        """The initial values in unconstrained coordinates ``phi``.

        Args:
          dtype: a floating dtype; defaults to JAX's default float (float64 under x64).
        """
        dtype = dtype or jnp.result_type(float)
        return {
            n: c.to_phi(jnp.asarray(c.value, dtype=dtype)) for n, c in self.constraints.items()
        }

    def constrain(self, phi: Mapping[str, Array]) -> dict[str, Array]:
        """Map unconstrained ``phi`` to ``hparams`` in natural units."""
        return {n: c.to_natural(phi[n]) for n, c in self.constraints.items()}

    def unconstrain(self, hparams: Mapping[str, Any]) -> dict[str, Array]:
        """Map ``hparams`` in natural units to unconstrained ``phi``."""
        return {n: c.to_phi(jnp.asarray(hparams[n])) for n, c in self.constraints.items()}

    def with_values(self, **values: Any) -> HyperSpace:
        """A copy whose initial values are replaced by ``values`` (each checked)."""
        unknown = sorted(set(values) - set(self.constraints))
        if unknown:
            raise KeyError(f"unknown hyperparameter(s) {unknown}; this space has {self.names}")
        new = dict(self.constraints)
        for name, value in values.items():
            new[name] = self.constraints[name]._replace(value=value)
        return HyperSpace(new)


def summarize(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-ready summary of ``hparams``: scalars as floats, arrays as mean/min/max."""
    out: dict[str, Any] = {}
    for name, value in hparams.items():
        leaves = [np.asarray(x, dtype=np.float64) for x in jax.tree.leaves(value)]
        if len(leaves) == 1 and leaves[0].size == 1:
            out[name] = float(leaves[0].reshape(()))
        else:
            flat = np.concatenate([x.ravel() for x in leaves])
            out[name] = {
                "mean": float(flat.mean()),
                "min": float(flat.min()),
                "max": float(flat.max()),
            }
    return out
