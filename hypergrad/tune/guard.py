"""The guard: when a meta-step's point and step are accepted, and why a member stops.

Every rule of acceptance and every way a member can stop lives here with its message
(as optimistix's ``RESULTS`` keeps outcomes with their messages), so the jitted
meta-step (:mod:`hypergrad.tune.step`), the records and the History say the same thing.

A meta-step evaluates a point ``phi_t`` (validation loss and hypergradient). The point is
accepted when

- its loss and hypergradient are finite (:data:`NONFINITE` otherwise);
- it does not diverge: its loss has not risen above the start's by more than
  ``value_ratio`` times the start's magnitude and its hypergradient's norm is at most
  ``grad_ratio`` times the larger of the start's loss magnitude and the largest accepted
  hypergradient norm so far (:data:`DIVERGENT`: an exploding unroll returns finite
  hypergradients of 1e100);
- on a deterministic objective (the trust region): its loss is at most the last accepted
  point's plus ``tolerance`` times that loss's magnitude, and never above the start's
  (:data:`INCREASE`). The step that led there raised the validation loss: the run goes
  back to the last accepted point and tries half the step. The returned points are
  therefore never worse than the start.

The new ``phi`` must be finite and within ``max_phi`` (:data:`OUT_OF_RANGE`).

Rejections in a row tell the guard what it is looking at. Where the increases shrink as
the step shrinks, the run sits at the bottom of its basin (:data:`RETIRED_CONVERGED`).
Where they do not (the loss changes by as much at an eighth of the step as at the whole
step), the objective is rough at the step's scale: the training run is chaotic there and
its exact hypergradient says nothing about a step of that size
(:data:`RETIRED_CHAOTIC`; a strategy may then smooth the objective, see
:mod:`hypergrad.tune.strategies`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from hypergrad import validation

# -- why a point was rejected (``metrics["reason"]``) ---------------------------------
OK, NONFINITE, DIVERGENT, INCREASE, OUT_OF_RANGE = 0, 1, 2, 3, 4

REJECTIONS = {
    NONFINITE: "non-finite validation loss or hypergradient",
    DIVERGENT: "divergent validation loss ({value:.4g}) or hypergradient (norm {gnorm:.4g})",
    INCREASE: "the last step raised the {loss} ({last:.6g} -> {value:.6g}); "
              "back to the last accepted point with half the step",
    OUT_OF_RANGE: "non-finite or out-of-range new hyperparameters",
}

# -- why a member stopped (``TuneState.retired``) -------------------------------------
ACTIVE, RETIRED_START, RETIRED_REJECTED, RETIRED_STALLED = 0, 1, 2, 3
RETIRED_CONVERGED, RETIRED_CHAOTIC = 4, 5

RETIREMENTS = {
    RETIRED_START: "the starting point's validation loss or hypergradient is not finite or "
                   "diverges; start from other hyperparameters (a smaller learning rate, say)",
    RETIRED_REJECTED: "rejected {max_rejections} times in a row (non-finite or divergent); "
                      "lower the outer step or start from other hyperparameters",
    RETIRED_STALLED: "the line search found no step {max_search_failures} times in a row; "
                     "no step along the hypergradient lowers the validation loss measurably",
    RETIRED_CONVERGED: "converged: {max_rejections} shorter and shorter steps in a row each "
                       "raised the validation loss, by less each time (the bottom of a basin)",
    RETIRED_CHAOTIC: "chaotic at the step's scale: halving the step {chaos_halvings} times "
                     "did not shrink the change in validation loss, so the hypergradient "
                     "does not predict a step of this size",
}


class Guard(NamedTuple):
    """When a meta-step is rejected, and when a member gives up (see the module docstring).

    Attributes:
      max_rejections: a member rejected this many times in a row is retired.
      value_ratio: a point whose validation loss exceeds the start's by more than this
        times the start's magnitude is divergent (``inf`` turns the check off).
      grad_ratio: a hypergradient whose norm exceeds this times the larger of the start's
        loss magnitude and the largest accepted hypergradient norm is divergent.
      max_phi: a new ``phi`` with a coordinate beyond ``+-max_phi`` is rejected (in
        unconstrained coordinates: ``exp(50)`` is no learning rate).
      max_search_failures: a member whose line search found no step (it failed, or its
        best step was 0) this many times in a row has stalled and is retired.
      tolerance: on a deterministic objective, a point whose validation loss exceeds the
        last accepted one's by more than this times its magnitude (or exceeds the
        start's) is rejected (1e-2: a training run's loss is rough at the scale of 1e-3
        near the edge of stability, and 1e-3 stopped the seed CNN's run at 0.249 where
        1e-2 reached 0.225); ``inf`` turns the trust region off (the acceptance rule
        before it: only non-finite and divergent points are rejected).
      chaos_halvings: after this many rejected increases in a row, an increase at least
        ``chaos_ratio`` times the first one of the row marks the objective as chaotic at
        the step's scale.
      chaos_ratio: see ``chaos_halvings``.
    """

    max_rejections: int = 5
    value_ratio: float = 100.0
    grad_ratio: float = 1e6
    max_phi: float = 50.0
    max_search_failures: int = 2
    tolerance: float = 1e-2
    chaos_halvings: int = 3
    chaos_ratio: float = 0.25

    def validate(self) -> Guard:
        """This guard, or a ``TypeError``/``ValueError`` naming the field that is wrong.

        The counters are integers from 1 to :data:`hypergrad.validation.MAX_INT` (the
        meta-step counts in int32); the ratios, ``max_phi`` and ``tolerance`` are numbers
        (``inf`` turns a check off, NaN is refused: every comparison with it fails, so
        it would reject a healthy start); ``grad_ratio`` and ``max_phi`` are positive (0
        would reject every hypergradient or every step).
        """
        for name in ("max_rejections", "max_search_failures", "chaos_halvings"):
            validation.integer(f"Guard.{name}", getattr(self, name), low=1)
        for name in ("value_ratio", "tolerance", "chaos_ratio"):
            validation.number(f"Guard.{name}", getattr(self, name), low=0.0, finite=False,
                              note=" (inf turns it off)")
        for name in ("grad_ratio", "max_phi"):
            validation.number(f"Guard.{name}", getattr(self, name), low=0.0, strict=True,
                              finite=False, note=" (inf turns it off)")
        return self

    def rejection(self, reason: int, **values: Any) -> str:
        """The message of a rejected meta-step (``reason`` one of the codes above)."""
        return REJECTIONS[reason].format(**values)

    def retirement(self, code: int) -> str:
        """Why a member with retirement ``code`` stopped."""
        return RETIREMENTS[code].format(**self._asdict())


DEFAULT_GUARD = Guard()
