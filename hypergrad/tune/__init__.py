"""The tuning loop, as a package: the guard, the jitted meta-step, the History, the host
loop, its reactions and its result, and the strategies (see each module). Re-exports only."""

from hypergrad.tune.guard import DEFAULT_GUARD, Guard
from hypergrad.tune.history import History, Point, json_safe
from hypergrad.tune.loop import DEFAULT_BUDGET, default_estimator, tune
from hypergrad.tune.result import RESCORE_KEYS, TuneError, TuneWarning
from hypergrad.tune.step import (
    DEFAULT_CLIP,
    TuneState,
    init_state,
    initial_state,
    make_final,
    make_step,
    online_weights,
    states,
    with_key,
)
from hypergrad.tune.strategies import DEFAULT as DEFAULT_STRATEGY
from hypergrad.tune.strategies import ExploreRefine, Local, Plan

__all__ = ["DEFAULT_BUDGET", "DEFAULT_CLIP", "DEFAULT_GUARD", "DEFAULT_STRATEGY",
           "ExploreRefine", "Guard", "History", "Local", "Plan", "Point", "RESCORE_KEYS",
           "TuneError", "TuneState", "TuneWarning", "default_estimator", "init_state",
           "initial_state", "json_safe", "make_final", "make_step", "online_weights", "states",
           "tune", "with_key"]
