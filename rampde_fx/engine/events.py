"""Event handling: solve until an event function changes sign, as torchdiffeq 0.2.5 does.

An event solve steps (adaptively, or by fixed steps of ``options['step_size']``) with no end
time; after each accepted step it evaluates the event function ``event_fn(t, y)`` at the step's
end, on the state in its own dtype (float32), and where the sign differs from the start's it
finds the event time by bisection on the step's interpolant, to the tolerance ``atol``, with
torchdiffeq's number of iterations. The event time becomes the solve's second output time, so
the discrete adjoint differentiates the state there like any output (the event time itself a
constant; :mod:`rampde_fx.adjoint.event_time` adds its gradient).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..capture import State
from ..stats import SolveStats
from .controllers import Attempt, StepController
from .step import Stepper

# torchdiffeq's bound on the steps of a fixed-grid event solve.
MAX_FIXED_GRID_EVENT_STEPS = 20000
# More bisection halvings than any time dtype resolves (a tolerance of 0 asks for infinitely
# many).
_MAX_BISECTIONS = 200

EventFn = Callable[[torch.Tensor, Any], torch.Tensor]


def combine_event_functions(event_fn: EventFn, t0: torch.Tensor, y0: Any) -> EventFn:
    """torchdiffeq's combination of an event function of several outputs into one: each output
    made positive at ``(t0, y0)`` by its sign there, and the smallest taken, so the event is the
    first output to change sign."""
    with torch.no_grad():
        initial_signs = torch.sign(event_fn(t0, y0))

    def combined_event_fn(t: torch.Tensor, y: Any) -> torch.Tensor:
        return torch.min(event_fn(t, y) * initial_signs)

    return combined_event_fn


class EventController:
    """The controller of an event solve: wraps the controller of its steps and ends the solve
    at the event.

    The solve's output times are its start and a slot for the event (``times[1]`` and
    ``time_values[1]``, infinite until found): on finding the event, in the step that :meth:`judge`
    accepts, this controller writes its time there, and the wrapped controller then places
    that output in the step and stops. An event function that is 0 at the start makes the start
    the event.

    Attributes:
        steps: the controller of the steps.
        event_fn: the (combined) event function, of the caller's time and state.
        is_tuple: whether the state is a tuple.
        tolerance: the bisection's tolerance on the event time.
        time_sign: -1 when integrating backwards (internal time is the caller's, negated).
        time_dtype: the dtype of the times the event function receives (that of the step
            times: float64 for adaptive methods, the state's for fixed steps, as torchdiffeq).
    """

    def __init__(self, steps: StepController, event_fn: EventFn, is_tuple: bool,
                 tolerance: float, time_sign: float, time_dtype: torch.dtype) -> None:
        self.steps = steps
        self.event_fn = event_fn
        self.is_tuple = is_tuple
        self.tolerance = tolerance
        self.time_sign = time_sign
        self.time_dtype = time_dtype
        self.adaptive = steps.adaptive
        self.known_steps = steps.known_steps

    def start(self, stepper: Stepper, stats: SolveStats, y0: State, grid: torch.Tensor,
              times: torch.Tensor, time_values: list[float]) -> None:
        self.steps.start(stepper, stats, y0, grid, times, time_values)
        self._stepper, self._times, self._time_values = stepper, times, time_values
        self._found = False
        t0 = grid[0].detach().to(self.time_dtype)
        with torch.no_grad():
            self._sign0 = torch.sign(self._event(t0, y0))
        if not bool(self._sign0):
            self._place(t0)

    def attempt(self, y: State) -> Attempt | None:
        return self.steps.attempt(y)

    def judge(self, attempt: Attempt, y: State, y1: State, stages: list[State]) -> bool:
        """The wrapped controller's judgement; in a step it accepts, look for the event (one
        host synchronisation, and one more where it is found)."""
        if not self.steps.judge(attempt, y, y1, stages):
            return False
        if not self._found:
            with torch.no_grad():
                crossed = bool(torch.sign(self._event(attempt.t1, y1)) != self._sign0)
                if crossed:
                    at = self._stepper.interpolant(attempt.t0, attempt.t1, y, y1, stages)
                    self._place(self._bisect(at, attempt.t0, attempt.t1))
        return True

    def accept(self, attempt: Attempt, y1: State, stages: list[State]) -> list[int]:
        return self.steps.accept(attempt, y1, stages)

    def grid_of(self, grid_values: list[float]) -> torch.Tensor:
        return self.steps.grid_of(grid_values)

    def finish(self) -> None:
        self.steps.finish()

    def _event(self, tau: torch.Tensor, y: State) -> torch.Tensor:
        """The event function at internal time ``tau``."""
        t = tau.to(self.time_dtype)
        return self.event_fn(-t if self.time_sign < 0 else t, y if self.is_tuple else y[0])

    def _bisect(self, at: Callable[[torch.Tensor], State], t0: torch.Tensor,
                t1: torch.Tensor) -> torch.Tensor:
        """torchdiffeq's ``find_event``: bisection of ``[t0, t1]`` on the interpolant ``at``
        until the interval is below the tolerance; the midpoint of the last interval."""
        t0, t1 = t0.to(self.time_dtype), t1.to(self.time_dtype)
        halvings = float(torch.ceil(torch.log((t1 - t0) / self.tolerance) / math.log(2.0)))
        count = 0 if math.isnan(halvings) else int(min(max(halvings, 0.0), _MAX_BISECTIONS))
        for _ in range(count):
            mid = (t1 + t0) / 2.0
            same = self._sign0 == torch.sign(self._event(mid, at(mid)))
            t0, t1 = torch.where(same, mid, t0), torch.where(same, t1, mid)
        return (t0 + t1) / 2.0

    def _place(self, tau: torch.Tensor) -> None:
        """Make internal time ``tau`` the event: the solve's second output time."""
        self._found = True
        self._times[1] = tau
        self._time_values[1] = float(tau)
