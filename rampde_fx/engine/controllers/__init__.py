"""Step controllers: where the one forward loop (:func:`rampde_fx.engine.integrate.integrate`)
steps next, and whether it accepts a step.

A controller proposes an :class:`Attempt`, judges the step the loop took from it, and on
acceptance names the output times the step reaches and prepares the next attempt. A fixed grid
(``fixed_grid``) is a controller that never rejects: its attempts are the grid's steps, known
before the solve; steps of a fixed size that go on until an event (``SteppingController``) are
decided as the solve goes. The adaptive controller (``adaptive``) is torchdiffeq's, with a
measured rounding floor (``rounding_floor``). An event solve wraps either in
:class:`rampde_fx.engine.events.EventController`.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from ...capture import State
from ...stats import SolveStats
from ..step import Nudge, Stepper


@dataclasses.dataclass
class Attempt:
    """One attempted step, from internal time ``t0`` to ``t1``.

    Attributes:
        t0, t1: the step's ends as tensors (differentiable in the solve's times).
        t0_value, t1_value: their values on the host.
        first: the step's first stage where it is already known, else None.
        start_nudge: where the first stage is (or was) evaluated; None for the stepper's
            default. Recorded for the backward pass's recomputation.
        stages_read: whether the loop needs the stages (to judge the step or interpolate).
    """

    t0: torch.Tensor
    t1: torch.Tensor
    t0_value: float
    t1_value: float
    first: State | None = None
    start_nudge: Nudge | None = None
    stages_read: bool = True


class StepController(Protocol):
    """What the forward loop asks of a controller (one per solve)."""

    adaptive: bool  # whether steps are judged (and may be rejected) during the solve
    # The number of steps, where known before the solve. None: the steps are decided during
    # the solve, and the grid input is their start only (every step time is the start plus a
    # constant, for the backward pass too).
    known_steps: int | None

    def start(self, stepper: Stepper, stats: SolveStats, y0: State, grid: torch.Tensor,
              times: torch.Tensor, time_values: list[float]) -> None:
        """Begin a solve from ``y0`` at ``grid[0]`` with output times ``times``."""

    def attempt(self, y: State) -> Attempt | None:
        """The next step to try from state ``y``; None when the last output time is reached."""

    def judge(self, attempt: Attempt, y: State, y1: State, stages: list[State]) -> bool:
        """Whether to accept the step taken from ``attempt``."""

    def accept(self, attempt: Attempt, y1: State, stages: list[State]) -> list[int]:
        """An accepted step's output indices (the output times it reaches); prepares the next
        attempt."""

    def grid_of(self, grid_values: list[float]) -> torch.Tensor:
        """The tensor of the accepted steps' times (``grid_values``), for the backward pass."""

    def finish(self) -> None:
        """After the last step."""
