"""The explicit Runge-Kutta step, generic over Butcher tableaus, in mixed precision.

Stage states and the new state are formed in the state's own dtype (the high precision ``H``)
from upcast stage derivatives; only the velocity runs in the low precision. The same code runs
the forward solve (under ``no_grad``) and the per-step recomputation of the backward pass.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Callable

import torch

from .grid import interpolate_cubic, interpolate_linear
from .tableaus import ButcherTableau

State = tuple[torch.Tensor, ...]


class Nudge(enum.Enum):
    """torchdiffeq's ``perturb``: evaluate just after the step's start or just before its end,
    so a velocity with a jump at a grid point sees the right side of it."""

    NONE = 0
    NEXT = 1
    PREV = -1


@dataclasses.dataclass
class Stepper:
    """Everything a step needs besides the state and the times.

    Attributes:
        velocity: ``velocity(t, y) -> k``, low precision inside, any dtype out.
        tableau: the method.
        perturb: torchdiffeq's ``perturb`` option.
        time_sign: -1 when integrating backwards: internal time runs forwards, the velocity sees
            ``-tau`` and its result is negated (as torchdiffeq does).
        interp: 'linear' or 'cubic' interpolation of outputs inside a step.
        evaluations: counter of velocity evaluations.
        compiled_step: a compiled twin of :meth:`step` to use instead (see ``compiled``).
    """

    velocity: Callable[[torch.Tensor, State], State]
    tableau: ButcherTableau
    perturb: bool
    time_sign: float
    interp: str
    evaluations: int = 0
    compiled_step: Callable[[torch.Tensor, torch.Tensor, State], tuple[State, State]] | None = None

    def derivative(self, tau: torch.Tensor, y: State, nudge: Nudge = Nudge.NONE) -> State:
        """The velocity at internal time ``tau``, upcast to each component's dtype."""
        t = tau.to(functools.reduce(torch.promote_types, (c.dtype for c in y)))
        if nudge is not Nudge.NONE:
            with torch.no_grad():
                nudged = torch.nextafter(t, t + nudge.value)
            t = t + (nudged - t).detach()  # the value of nudged, the gradient of t
        if self.time_sign < 0:
            t = -t
        k = self.velocity(t, y)
        if self.time_sign < 0:
            return tuple(-k_c.to(y_c.dtype) for k_c, y_c in zip(k, y))
        return tuple(k_c.to(y_c.dtype) for k_c, y_c in zip(k, y))

    def step(self, t0: torch.Tensor, t1: torch.Tensor, y: State) -> tuple[State, State]:
        """One step from ``t0`` to ``t1``; returns the new state and the first stage derivative."""
        dt = t1 - t0
        stages: list[State] = []
        for c, a_row in zip(self.tableau.c, self.tableau.a):
            y_stage = _combine(y, dt, a_row, stages) if stages else y
            if c == 0.0:
                tau, nudge = t0, Nudge.NEXT if self.perturb else Nudge.NONE
            elif c == 1.0:
                tau, nudge = t1, Nudge.PREV if self.perturb else Nudge.NONE
            else:
                tau, nudge = t0 + c * dt, Nudge.NONE
            stages.append(self.derivative(tau, y_stage, nudge))
        return _combine(y, dt, self.tableau.b, stages), stages[0]

    def advance(self, t0: torch.Tensor, t1: torch.Tensor, y0: State,
                outputs: list[tuple[torch.Tensor, float]], t0_value: float,
                t1_value: float) -> tuple[State, list[State]]:
        """A step, and the state at each output time ``(t, t_value)`` that falls inside it."""
        y1, f0 = (self.compiled_step or self.step)(t0, t1, y0)
        self.evaluations += self.tableau.stages
        if not outputs:
            return y1, []
        if self.interp == "cubic":
            f1 = self.derivative(t1, y1)
            self.evaluations += 1
            return y1, [tuple(interpolate_cubic(t0, t1, a, b, fa, fb, t)
                              for a, b, fa, fb in zip(y0, y1, f0, f1)) for t, _ in outputs]
        return y1, [tuple(interpolate_linear(t0, t1, a, b, t, t0_value, t1_value, t_value)
                          for a, b in zip(y0, y1)) for t, t_value in outputs]


def _combine(y: State, dt: torch.Tensor, weights: tuple[float, ...], stages: list[State]) -> State:
    """``y + dt * sum_i weights[i] * stages[i]`` per component, skipping zero weights."""
    out = []
    for c, y_c in enumerate(y):
        terms = [w * k[c] for w, k in zip(weights, stages) if w != 0.0]
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        out.append(y_c + dt * total)
    return tuple(out)
