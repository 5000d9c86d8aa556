"""The rounding floor of an adaptive solve's error estimates, measured.

The rounding floor is measured, not modelled. A low-precision velocity returns each stage with a
rounding error ``d_i``, and the error estimate ``h * sum_i e_i k_i`` carries ``h * sum_i e_i d_i``
of it: noise that shrinks only in proportion to the step, while the truncation error shrinks
like ``h**order``, so a tolerance below it is met only by steps that shrink with the tolerance,
whatever they cost. How large ``d_i`` is depends on the velocity and on the precision policy
(which keeps reductions, normalisations and exp/log in float32, and the time until it meets the
state), so it is measured: the attempted step's stages that have a non-zero error weight are
evaluated again by the velocity as written (the captured graph without the precision rewrite:
float32 for a float32 model) on the same stage states at the same times, and::

    noise = sum_i |e_i| |k_i - k_i(as written)|          (per element, per unit step)

bounds the rounding in that attempt's error estimate (a bound rather than the realisation,
whose terms cancel differently on every step). Every later attempt is judged against its
tolerance relaxed to this floor, ``ratio / max(1, nu)`` with ``nu = norm(|h| noise /
tolerance)``: the tolerance changes only where it is below the measured noise. At the floor the
ratio is mostly rounding, so it says little about the truncation error; the measurement's
noise-free estimate ``h * sum_i e_i k_i(as written)`` does, and caps the steps at the floor at
the size where it would sit at the fixed point of torchdiffeq's controller for the relaxed
tolerance (``safety**order`` of it; truncation grows like ``h**order``, the floor like ``h``).
Without the cap, an estimate whose weights amplify rounding (dopri8's sum |e_i| is 5.8, its
solution's sum |b_i| 3.1) lets the truncation error grow to many times the rounding of the
solution itself.

A measurement costs one evaluation per weighted stage in float32 and a host synchronisation, so
it is made only where rounding may matter, that is where a rough estimate
``2 u |h| sum_i |e_i| |k_i|`` (``u`` the low dtype's unit roundoff, once for the velocity's input
and once for its output) reaches the tolerance: at the first such attempt; again when
``sum_i |e_i| |k_i|`` has changed by a factor of 2 since the last measurement (the solution has
moved on); when a step at the floor reaches a cap that only limited its growth (``ifactor``);
and on an attempt that the floor did not save from rejection, measured on its own stages, whose
rounding then lies within the floor: a rejection that remains is truncation, which a smaller
step removes, so a stale floor cannot stall the controller. Accepted steps at the floor are
counted, and a :class:`ToleranceWarning` gives the attainable tolerance (the requested one times
the largest relaxation) and what to do.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import torch

from ...capture import State, Velocity, replayed_rng, rng_state
from ..step import Nudge, Stepper, weighted_sum
from ..tableaus import ButcherTableau

# The rough estimate of a stage's rounding that decides whether to measure it: the velocity's
# input and its output rounded once each, in units of the low dtype's unit roundoff times |k|.
ROUGH_ROUNDOFFS = 2.0
# A change of the stages' weighted magnitude, since the last measurement, that calls for a new
# one.
REMEASURE_FACTOR = 2.0


class StepSizeControl(Protocol):
    """What a measurement reads of the adaptive controller (``adaptive``)."""

    tableau: ButcherTableau
    safety: float
    ifactor: float
    dfactor: float

    def tolerance(self, y0: State, y1: State) -> list[torch.Tensor]: ...

    def step_ratio(self, dt: float, per_unit_step: list[torch.Tensor],
                   tolerance: list[torch.Tensor]) -> torch.Tensor: ...


@dataclasses.dataclass
class RoundingFloor:
    """The measured rounding noise of one solve's error estimates (see the module docstring).

    Attributes:
        reference: the velocity as written, which the low-precision one is measured against.
        noise: per component, ``sum_i |e_i| |k_i - k_i(as written)|`` of the last measurement.
        magnitude: the norm of ``sum_i |e_i| |k_i|`` at the last measurement.
        cap: the largest step at the floor, from the last measurement's noise-free estimate.
        cap_provisional: whether the cap only limits growth (``ifactor``): reaching it calls for
            a new measurement.
        limited: accepted steps whose tolerance was relaxed to the floor.
        worst: the largest relaxation of an accepted step.
    """

    reference: Velocity
    noise: list[torch.Tensor] | None = None
    magnitude: float = 0.0
    cap: float = math.inf
    cap_provisional: bool = False
    limited: int = 0
    worst: float = 1.0

    def due(self, magnitude: float, rejected: bool, relaxed: bool, step: float) -> bool:
        """Whether to measure an attempt where rounding may matter: no measurement yet, the
        magnitude has moved on, the floor did not save the attempt from rejection, or the step
        has grown to a provisional cap."""
        return (self.noise is None or rejected and relaxed
                or relaxed and self.cap_provisional and step >= self.cap
                or not self.magnitude / REMEASURE_FACTOR <= magnitude
                <= self.magnitude * REMEASURE_FACTOR)

    def measure(self, controller: StepSizeControl, stepper: Stepper, t0: torch.Tensor,
                t1: torch.Tensor, dt: float, y: State, y1: State, stages: list[State],
                start_nudge: Nudge, magnitude: float) -> float:
        """Measure the floor on an attempt of step ``dt``, and return its ratio to the attempt's
        tolerance (0 where a stage overflowed: nothing is learnt).

        The attempt's stages that weigh in its error estimate are evaluated again, as written,
        on the same stage states; the random generators and the velocity's buffers are left as
        they were. Where the floor exceeds the tolerance, the noise-free estimate also sets
        :attr:`cap`: the step at which it would be at the fixed point of torchdiffeq's
        controller (``safety**order`` of the relaxed tolerance; the truncation error grows like
        ``dt**order``, the floor like ``dt``).
        """
        weights = stepper.tableau.error
        which = [i for i, w in enumerate(weights) if w != 0.0]
        with torch.no_grad(), self.reference.recomputing(), \
                replayed_rng(rng_state(t0.device, stepper.velocity.generators), t0.device):
            again = stepper.reevaluate(self.reference, t0, t1, y, stages, start_nudge, which)
        stepper.evaluations += len(which)
        noise = [weighted_sum([abs(weights[i]) for i in which],
                              [(stages[i][c] - k[c]).abs() for i, k in zip(which, again)])
                 for c in range(len(y))]
        clean = [weighted_sum([weights[i] for i in which], [k[c] for k in again])
                 for c in range(len(y))]
        tolerance = controller.tolerance(y, y1)
        ratio, clean_ratio = torch.stack([controller.step_ratio(dt, noise, tolerance),
                                          controller.step_ratio(dt, clean, tolerance)]).tolist()
        if not math.isfinite(ratio):
            return 0.0
        self.noise, self.magnitude = noise, magnitude
        if ratio > 1:
            order = controller.tableau.order
            truncation = clean_ratio / ratio  # a fraction of the floor
            growth = math.inf if truncation == 0 else \
                (controller.safety ** order / truncation) ** (1.0 / (order - 1))
            self.cap_provisional = growth >= controller.ifactor
            self.cap = abs(dt) * min(controller.ifactor, max(controller.dfactor, growth))
        return ratio
