"""The explicit Runge-Kutta step, generic over Butcher tableaus, in mixed precision.

Stage states and the new state are formed in the state's own dtype (the high precision ``H``)
from upcast stage derivatives; only the velocity runs in the low precision. The same code runs
the forward solve (under ``no_grad``) and the per-step recomputation of the backward pass.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Callable, Iterable, Protocol, Sequence

import torch

from ..capture import State, evaluating
from .interpolation import (dense_output_coefficients, evaluate_polynomial, interpolate_cubic,
                            interpolate_linear)
from .tableaus import ButcherTableau


class Nudge(enum.Enum):
    """torchdiffeq's ``perturb``: evaluate just after the step's start or just before its end,
    so a velocity with a jump at a grid point sees the right side of it."""

    NONE = 0
    NEXT = 1
    PREV = -1


class StepExecutor(Protocol):
    """Runs a stepper's steps in its place: the way compiled kernels plug into the engine.

    ``step`` is :meth:`Stepper.step` (without the stages, ``[]``, where ``stages_read`` is
    False); ``backward_step`` is one step of the discrete adjoint from a step's checkpoint
    (see ``rampde_fx.compiled.kernels.StepKernels``); ``lifted()`` lists the tensors it reads
    as inputs, in the order ``backward_step``'s ``wanted`` positions refer to.
    """

    def step(self, t0: torch.Tensor, t1: torch.Tensor, y: State, first: State | None,
             start_nudge: Nudge | None, stages_read: bool) -> tuple[State, list[State]]: ...

    def backward_step(self, t0: torch.Tensor, t1: torch.Tensor,
                      checkpoint: Sequence[torch.Tensor], state_dtypes: Sequence[torch.dtype],
                      cotangent: Sequence[torch.Tensor],
                      stage_cotangents: Sequence[torch.Tensor] | None,
                      scale: torch.Tensor | None, start_nudge: Nudge | None, wanted: list[int],
                      accumulators: list[torch.Tensor] | None, times: bool
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]: ...

    def lifted(self) -> list[torch.Tensor]: ...


@dataclasses.dataclass
class Stepper:
    """Everything a step needs besides the state and the times.

    Attributes:
        velocity: ``velocity(t, y) -> k``, low precision inside, any dtype out.
        tableau: the method.
        start_nudge: where a step's first stage is evaluated by default (torchdiffeq's
            ``perturb`` option of fixed grids: just after the step's start).
        end_nudge: where stages at the step's end are evaluated (``perturb``: just before it;
            adaptive methods always do so, as torchdiffeq does).
        time_sign: -1 when integrating backwards: internal time runs forwards, the velocity sees
            ``-tau`` and its result is negated (as torchdiffeq does).
        interp: outputs inside a step: 'linear' or 'cubic' (fixed grids), or 'dense' (the
            adaptive methods' 4th-order interpolant through the step's midpoint).
        evaluations: counter of velocity evaluations.
        executor: runs the steps instead of :meth:`step` where set (compiled kernels).
    """

    velocity: Callable[[torch.Tensor, State], State]
    tableau: ButcherTableau
    start_nudge: Nudge
    end_nudge: Nudge
    time_sign: float
    interp: str
    evaluations: int = 0
    executor: StepExecutor | None = None

    # Whether a step reads the derivatives of earlier steps (the Adams methods,
    # ``engine.adams``): its checkpoint, and what a budget keeps, then hold more than its start.
    multistep = False

    def restart(self) -> None:
        """Called before a solve's first step (a multistep method forgets its history)."""

    def rewind(self) -> None:
        """Called before the steps of the last solve are taken again from its first one (a
        multistep method goes back to an empty history, and repeats what its steps recorded)."""

    @property
    def checkpoint_width(self) -> int:
        """The number of tensors per state component in a step's checkpoint."""
        return 1

    def checkpoint_of(self, y: State) -> State:
        """At the start ``y`` of the next step: what the backward pass recomputes the step
        from, ``y``."""
        return y

    @property
    def resume_width(self) -> int:
        """The number of tensors per state component in a :meth:`resume_point`."""
        return 1

    def resume_point(self, y: State) -> State:
        """At the start ``y`` of the next step: what the solve can go on from (a budget keeps
        it), ``y``."""
        return y

    def resume(self, step: int, kept: State) -> State:
        """Go on from step ``step``'s :meth:`resume_point` ``kept``; returns the step's start."""
        return kept

    def derivative(self, tau: torch.Tensor, y: State, nudge: Nudge | torch.Tensor = Nudge.NONE,
                   velocity: Callable[[torch.Tensor, State], State] | None = None) -> State:
        """The velocity (``velocity`` where given) at internal time ``tau``, upcast to each
        component's dtype."""
        with evaluating():
            k = (velocity or self.velocity)(velocity_time(tau, y, nudge, self.time_sign), y)
        if self.time_sign < 0:
            return tuple(-k_c.to(y_c.dtype) for k_c, y_c in zip(k, y))
        return tuple(k_c.to(y_c.dtype) for k_c, y_c in zip(k, y))

    def step(self, t0: torch.Tensor, t1: torch.Tensor, y: State, first: State | None = None,
             start_nudge: Nudge | torch.Tensor | None = None) -> tuple[State, list[State]]:
        """One step from ``t0`` to ``t1``; returns the new state and the stage derivatives.

        ``first``: the first stage when it is already known (the last stage of the previous
        step of a first-same-as-last method); otherwise it is evaluated at ``t0``, nudged by
        ``start_nudge`` (default :attr:`start_nudge`; an offset tensor: see
        :func:`nudge_offset`).
        """
        dt = t1 - t0
        stages: list[State] = [] if first is None else [first]
        y_stage = y
        for c, a_row in list(zip(self.tableau.c, self.tableau.a))[len(stages):]:
            y_stage = _combine(y, dt, a_row, stages) if stages else y
            tau, nudge = self._stage_point(c, t0, t1, dt, start_nudge)
            stages.append(self.derivative(tau, y_stage, nudge))
        if self.tableau.fsal:  # the last stage was evaluated on the new state
            return y_stage, stages
        return _combine(y, dt, self.tableau.b, stages), stages

    def evaluation_times(self, t0: torch.Tensor, t1: torch.Tensor, y: State, known: int,
                         start_nudge: Nudge | None) -> list[torch.Tensor]:
        """The times the velocity receives in :meth:`step`, in order, where the first ``known``
        stages are given."""
        dt = t1 - t0
        points = [self._stage_point(c, t0, t1, dt, start_nudge) for c in self.tableau.c[known:]]
        return [velocity_time(tau, y, nudge, self.time_sign) for tau, nudge in points]

    def _stage_point(self, c: float, t0: torch.Tensor, t1: torch.Tensor, dt: torch.Tensor,
                     start_nudge: Nudge | torch.Tensor | None
                     ) -> tuple[torch.Tensor, Nudge | torch.Tensor]:
        """The internal time and nudge of a stage at fraction ``c`` of the step."""
        if c == 0.0:
            return t0, self.start_nudge if start_nudge is None else start_nudge
        if c == 1.0:
            return t1, self.end_nudge
        return t0 + c * dt, Nudge.NONE

    def reevaluate(self, velocity: Callable[[torch.Tensor, State], State], t0: torch.Tensor,
                   t1: torch.Tensor, y: State, stages: list[State], start_nudge: Nudge,
                   which: Sequence[int]) -> list[State]:
        """Stages ``which`` of the step from ``y`` that gave ``stages`` (its first stage
        evaluated with ``start_nudge``), evaluated again by ``velocity`` on the same stage states
        at the same times."""
        dt = t1 - t0
        again = []
        for i in which:
            y_stage = _combine(y, dt, self.tableau.a[i], stages[:i]) if i else y
            tau, nudge = self._stage_point(self.tableau.c[i], t0, t1, dt, start_nudge)
            again.append(self.derivative(tau, y_stage, nudge, velocity))
        return again

    def take_step(self, t0: torch.Tensor, t1: torch.Tensor, y: State, first: State | None = None,
                  start_nudge: Nudge | None = None, stages_read: bool = True
                  ) -> tuple[State, list[State]]:
        """:meth:`step`, by the executor where one is set; counts the evaluations. Where the
        caller does not read the stages (``stages_read=False``), an executor need not store
        them and may return none."""
        if self.executor is not None:
            result = self.executor.step(t0, t1, y, first, start_nudge, stages_read)
        else:
            result = self.step(t0, t1, y, first, start_nudge)
        self.evaluations += self.tableau.stages - (first is not None)
        return result

    @property
    def interpolation_is_linear(self) -> bool:
        """Whether :meth:`interpolate` is linear in the step's start, end and stages for fixed
        times ('cubic' evaluates the velocity at the step's end)."""
        return self.interp != "cubic"

    def interpolation_reads_stages(self, outputs: Sequence[object]) -> bool:
        """Whether :meth:`interpolate` reads the step's stages for these outputs (see
        :meth:`interpolant`)."""
        return bool(outputs) and self.interp != "linear"

    def interpolate(self, t0: torch.Tensor, t1: torch.Tensor, y0: State, y1: State,
                    stages: list[State], outputs: list[tuple[torch.Tensor, float]],
                    t0_value: float, t1_value: float) -> list[State]:
        """The state at each output time ``(t, t_value)`` inside the step from ``y0`` to ``y1``;
        linear interpolation returns exact ends as they are (as torchdiffeq does)."""
        if not outputs:
            return []
        at = self.interpolant(t0, t1, y0, y1, stages)
        if self.interp == "linear":
            ends = {t0_value: y0, t1_value: y1}
            return [ends[t_value] if t_value in ends else at(t) for t, t_value in outputs]
        return [at(t) for t, _ in outputs]

    def interpolant(self, t0: torch.Tensor, t1: torch.Tensor, y0: State, y1: State,
                    stages: list[State]) -> Callable[[torch.Tensor], State]:
        """The state inside the step from ``y0`` to ``y1`` as a function of the (internal) time,
        by the stepper's interpolation ('cubic' evaluates the velocity at the step's end once,
        here). Reads the stages unless the interpolation is 'linear'."""
        if self.interp == "dense":
            dt = t1 - t0
            mid = _combine(y0, dt, self.tableau.mid, stages)
            coefficients = [dense_output_coefficients(a, b, m, fa, fb, dt)
                            for a, b, m, fa, fb in zip(y0, y1, mid, stages[0], stages[-1])]
            return lambda t: tuple(evaluate_polynomial(c, (t - t0) / dt) for c in coefficients)
        if self.interp == "cubic":
            f1 = self.derivative(t1, y1)
            self.evaluations += 1
            return lambda t: tuple(interpolate_cubic(t0, t1, a, b, fa, fb, t)
                                   for a, b, fa, fb in zip(y0, y1, stages[0], f1))
        return lambda t: tuple(interpolate_linear(t0, t1, a, b, t) for a, b in zip(y0, y1))

    def advance(self, t0: torch.Tensor, t1: torch.Tensor, y0: State,
                outputs: list[tuple[torch.Tensor, float]], t0_value: float, t1_value: float,
                start_nudge: Nudge | None = None) -> tuple[State, list[State]]:
        """A step, and the state at each output time ``(t, t_value)`` that falls inside it."""
        y1, stages = self.take_step(t0, t1, y0, start_nudge=start_nudge,
                                    stages_read=self.interpolation_reads_stages(outputs))
        return y1, self.interpolate(t0, t1, y0, y1, stages, outputs, t0_value, t1_value)


def velocity_time(tau: torch.Tensor, y: State, nudge: Nudge | torch.Tensor,
                  time_sign: float) -> torch.Tensor:
    """The time the velocity receives at internal time ``tau``: in the state's dtype, moved to
    the adjacent representable time by ``nudge`` (or by an offset :func:`nudge_offset` gave),
    negated when integrating backwards (the velocity sees the user's time)."""
    t = tau.to(time_dtype(y))
    if isinstance(nudge, Nudge):
        nudge = None if nudge is Nudge.NONE else nudge_offset(t, nudge)
    if nudge is not None:
        t = t + nudge.detach()  # the value of the nudged time, the gradient of t
    return -t if time_sign < 0 else t


def nudge_offset(t: torch.Tensor, nudge: Nudge) -> torch.Tensor:
    """What ``nudge`` adds to the time ``t`` (in the time dtype): the distance to the adjacent
    representable time, or zero. Given as a tensor, a compiled step takes it as an input
    instead of being compiled once per nudge."""
    with torch.no_grad():
        return torch.nextafter(t, t + nudge.value) - t


def time_dtype(y: State) -> torch.dtype:
    """The dtype of the times next to state ``y`` (see :func:`promoted_time_dtype`)."""
    return promoted_time_dtype(c.dtype for c in y)


def promoted_time_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The dtype of the times next to a state of ``dtypes``: the promotion of their real dtypes
    (a complex state's times are real, as torchdiffeq's)."""
    return functools.reduce(torch.promote_types, (d.to_real() for d in dtypes))


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite, with one host synchronisation. Reads
    each tensor's extremes (nan propagates into them, an infinity is one): a reduction, with no
    boolean tensor of the tensor's size as ``isfinite`` would write."""
    extremes = [torch.stack(torch.aminmax(torch.view_as_real(x.detach()) if x.is_complex()
                                          else x.detach())) for x in tensors if x.numel()]
    return not extremes or bool(torch.isfinite(torch.cat(extremes)).all())


def weighted_sum(weights: Sequence[float], values: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_i weights[i] * values[i]``, skipping zero weights (at least one is not zero)."""
    terms = [w * v for w, v in zip(weights, values) if w != 0.0]
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _combine(y: State, dt: torch.Tensor, weights: Sequence[float], stages: list[State]) -> State:
    """``y + dt * sum_i weights[i] * stages[i]`` per component."""
    return tuple(y_c + dt * weighted_sum(weights, [k[c] for k in stages])
                 for c, y_c in enumerate(y))
