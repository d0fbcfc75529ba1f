"""Estimators by name, for configs and the command line: the one list of the choices."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from hypergrad.estimators.base import Estimator
from hypergrad.estimators.es import es
from hypergrad.estimators.first_order import first_order
from hypergrad.estimators.forward import forward
from hypergrad.estimators.implicit import implicit
from hypergrad.estimators.pes import pes
from hypergrad.estimators.reverse import reverse
from hypergrad.estimators.reversible import reversible
from hypergrad.estimators.truncated import truncated

#: Every estimator a config can name, with its factory.
FACTORIES: dict[str, Callable[..., Estimator]] = {
    "reverse": reverse, "truncated": truncated, "forward": forward,
    "implicit": implicit, "reversible": reversible, "es": es, "pes": pes,
    "first_order": first_order}
NAMES = tuple(FACTORIES)


def by_name(name: str, **options: Any) -> Estimator:
    """The estimator called ``name`` built with those of ``options`` its factory takes
    (a config passes all of its estimator options; each factory picks its own)."""
    try:
        factory = FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; choose one of "
                         f"{', '.join(NAMES)}") from None
    accepted = inspect.signature(factory).parameters
    return factory(**{k: v for k, v in options.items() if k in accepted})
