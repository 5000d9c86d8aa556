"""Adaptive step-size control for the embedded Runge-Kutta pairs, in the high precision.

The stages run in the low precision like any step; the solution, the error estimate, its norm
and the step-size arithmetic stay in the state's dtype (at least float32) and in float64 on the
host, so a float16 velocity can never overflow the controller (torchdiffeq in float16 dies with
"underflow in dt" when its norm overflows). The controller is torchdiffeq 0.2.5's: the same
initial step, error ratio, step-size update, options and step callbacks, so the float32 mode
takes the same steps. Its rounding floor is measured (see
:mod:`rampde_fx.engine.controllers.rounding_floor`).

A solve that cannot go on raises instead of stepping without end: a step whose end rounds to
its start (torchdiffeq's "underflow in dt"; step sizes are proposed from the requested sizes,
as torchdiffeq does, not from the rounded ones, so a solve that runs into a blow-up ends with
this error rather than stepping one float64 ulp at a time); a non-finite error estimate right
after an accepted step that left the state unchanged (the solution is pinned against the edge
of the representable range: larger steps overflow, smaller ones change nothing); and a velocity
that is not finite at the start. Otherwise a non-finite error estimate (an overflowed stage of
a step too long) rejects the step and shrinks it by ``dfactor``.

The step sizes are decided once, in the forward solve, and are constants of the backward pass:
the gradient is that of the discrete solve through the accepted steps (the controller itself is
not differentiated; torchdiffeq's autograd mode differentiates it, through the error ratio, which
changes gradients by terms of the order of the tolerance).

Each attempted step costs one host synchronisation (its accept-or-reject decision), and a
measurement one more.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
import warnings
from typing import Any, Callable, Sequence

import torch

from ... import runtime
from ...capture import State
from ...errors import ToleranceWarning
from ...stats import SolveStats
from ..arguments import describe, per_component, real_number, require_data
from ..callbacks import StepCallbacks
from ..step import Nudge, Stepper, all_finite, weighted_sum
from ..tableaus import ButcherTableau
from . import Attempt
from .rounding_floor import ROUGH_ROUNDOFFS, RoundingFloor

ADAPTIVE_OPTIONS = ("first_step", "safety", "ifactor", "dfactor", "max_num_steps", "dtype",
                    "step_t", "jump_t", "min_step", "max_step", "norm")


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return x.abs().pow(2).mean().sqrt()


def max_rms_norm(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """torchdiffeq's default norm of a tuple state: the largest RMS norm of its components."""
    return torch.stack([rms_norm(x) for x in xs]).amax()


@dataclasses.dataclass
class AdaptiveController:
    """The step-size controller of one adaptive solve (torchdiffeq's options and defaults).

    Attributes:
        tableau: the embedded pair (its error weights and order).
        rtol, atol: tolerances per state component.
        norm: torchdiffeq's ``norm`` option: of a tensor, or of a tuple for tuple states.
        is_tuple: whether the state is a tuple.
        first_step, safety, ifactor, dfactor, min_step, max_step, max_num_steps: as in
            torchdiffeq; ``max_num_steps`` bounds the attempts between two output times.
        step_t, jump_t: increasing internal times that steps must land on; after a ``jump_t``
            the velocity is evaluated again, just after it.
        unit_roundoff: the velocity dtype's unit roundoff where it is coarser than the
            state's (the error estimate then has a rounding floor), else ``None``.
        callbacks: the velocity's step callbacks.
    """

    tableau: ButcherTableau
    rtol: tuple[float, ...]
    atol: tuple[float, ...]
    norm: Callable[[Any], Any]
    is_tuple: bool
    first_step: float | None
    safety: float
    ifactor: float
    dfactor: float
    min_step: float
    max_step: float
    max_num_steps: int
    step_t: list[float]
    jump_t: list[float]
    unit_roundoff: float | None
    callbacks: StepCallbacks = dataclasses.field(default_factory=StepCallbacks)

    adaptive = True
    known_steps = None

    def start(self, stepper: Stepper, stats: SolveStats, y0: State, grid: torch.Tensor,
              times: torch.Tensor, time_values: list[float]) -> None:
        """Evaluate the velocity at the start and choose the first step (torchdiffeq's
        initial step unless ``first_step`` is given). Step times are float64 offsets of
        ``grid[0]`` (the internal first time), so gradients with respect to it reach every
        step."""
        self._stepper, self._stats, self._times = stepper, stats, time_values
        self._origin = grid[0].to(torch.float64)
        self._t = time_values[0]
        self._f = stepper.derivative(self._at(self._t), y0)
        stepper.evaluations += 1
        with torch.no_grad():
            self._check_finite_start(self._f)
            self._dt = (self.first_step if self.first_step is not None
                        else self.initial_step(stepper, self._at(self._t), y0, self._f))
        self._floor = None if self.unit_roundoff is None else \
            RoundingFloor(stepper.velocity.as_written())
        self._nudge = Nudge.NONE
        self._target = 1  # the next output index to reach
        self._attempts = 0  # since the last output time
        self._ratio = 0.0
        self._pinned = False  # the last accepted step left the state as it was

    def _at(self, value: float) -> torch.Tensor:
        return self._origin + (value - self._times[0])

    def attempt(self, y: State) -> Attempt | None:
        if self._target >= len(self._times):
            return None
        if self._attempts >= self.max_num_steps:
            raise RuntimeError(
                f"rampde_fx: max_num_steps={self.max_num_steps} exceeded between the output "
                f"times {self._times[self._target - 1]} and {self._times[self._target]} "
                "(internal time); loosen rtol/atol or raise options['max_num_steps']")
        self._attempts += 1
        dt = min(max(self._dt if math.isfinite(self._dt) else self.min_step, self.min_step),
                 self.max_step)
        self.callbacks("callback_step", self._at(self._t), y, dt)
        t1 = self._t + dt
        if not t1 > self._t:
            self._raise_underflow(dt)
        t1, self._landmark = self._land(self._t, t1)
        if self._landmark is not None:
            dt = t1 - self._t
        self._dt = dt
        return Attempt(self._at(self._t), self._at(t1), self._t, t1, first=self._f,
                       start_nudge=self._nudge)

    def judge(self, attempt: Attempt, y: State, y1: State, stages: list[State]) -> bool:
        """Judge the attempt against its tolerance, relaxed to the measured rounding floor
        where the tolerance is below it (one host synchronisation, and one more where the floor
        is measured)."""
        dt = self._dt
        with torch.no_grad():
            judged = self._judge(attempt, y, y1, stages)
        self._ratio = judged.ratio
        if self._pinned and not math.isfinite(judged.ratio):
            self._raise_pinned(y)
        self._judged = judged
        if not (judged.ratio <= 1 or dt <= self.min_step):
            self.callbacks("callback_reject_step", attempt.t0, y, dt)
            self._stats.rejected_steps += 1
            self._dt = self._next_step(judged, dt)
            return False
        self.callbacks("callback_accept_step", attempt.t0, y, dt)
        self._pinned = not judged.moved
        if judged.relaxation > 1:
            self._floor.limited += 1
            self._floor.worst = max(self._floor.worst, judged.relaxation)
        return True

    def accept(self, attempt: Attempt, y1: State, stages: list[State]) -> list[int]:
        t1 = attempt.t1_value
        indices = []
        while self._target < len(self._times) and self._times[self._target] <= t1:
            indices.append(self._target)
            self._target += 1
        self._attempts = 0 if indices else self._attempts
        stepper = self._stepper
        if self._landmark in self.jump_t:  # the velocity jumps here: evaluate just after it
            self._nudge = Nudge.NEXT
        elif stepper.tableau.fsal:  # the last stage, evaluated just before t1, is the next first
            self._nudge = stepper.end_nudge
        else:
            self._nudge = stepper.start_nudge
        if self._nudge is Nudge.NEXT or not stepper.tableau.fsal:
            self._f = stepper.derivative(attempt.t1, y1, self._nudge)
            stepper.evaluations += 1
        else:
            self._f = stages[-1]
        self._t = t1
        self._dt = self._next_step(self._judged, self._dt)
        return indices

    def grid_of(self, grid_values: list[float]) -> torch.Tensor:
        return self._origin + torch.tensor(grid_values, dtype=torch.float64,
                                           device=self._origin.device).sub_(grid_values[0])

    def finish(self) -> None:
        """Count the steps at the rounding floor, and warn where there were any."""
        floor = self._floor
        if floor is not None:
            self._stats.tolerance_limited_steps = floor.limited
            if floor.limited:
                self._warn_tolerance(floor)

    def apply_norm(self, components: Sequence[torch.Tensor]) -> torch.Tensor:
        """The norm of ratios to the tolerance, in at least float32 (a float16 state's squares
        would overflow)."""
        components = [c.to(torch.promote_types(c.dtype, torch.float32)) for c in components]
        value = self.norm(tuple(components) if self.is_tuple else components[0])
        return torch.as_tensor(value, dtype=components[0].dtype.to_real(),
                               device=components[0].device).reshape(())

    def scale(self, y: State) -> list[torch.Tensor]:
        return [a + r * c.abs() for c, r, a in zip(y, self.rtol, self.atol)]

    def tolerance(self, y0: State, y1: State) -> list[torch.Tensor]:
        """The error a step from ``y0`` to ``y1`` may make, per element."""
        return [a + r * torch.maximum(c0.abs(), c1.abs())
                for c0, c1, r, a in zip(y0, y1, self.rtol, self.atol)]

    def initial_step(self, stepper: Stepper, t0: torch.Tensor, y0: State, f0: State) -> float:
        """Hairer, Norsett and Wanner's starting step (Solving ODEs I, II.4), as torchdiffeq
        chooses it: one more velocity evaluation."""
        scale = self.scale(y0)
        ratios = ([c / s for c, s in zip(y0, scale)], [f / s for f, s in zip(f0, scale)])
        d0, d1 = torch.stack([self.apply_norm(r) for r in ratios]).tolist()
        for d, r in zip((d0, d1), ratios):
            self._refuse_nan_norm(d, lambda r=r: r)
        h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        y1 = tuple(c + h0 * f for c, f in zip(y0, f0))
        f1 = stepper.derivative(t0 + h0, y1)
        stepper.evaluations += 1
        d2 = float(self.apply_norm([(b - a) / s for a, b, s in zip(f0, f1, scale)])) / h0
        if not math.isfinite(d2):  # the velocity overflowed a step h0 on: start with h0
            return h0
        if d1 <= 1e-15 and d2 <= 1e-15:
            h1 = max(1e-6, h0 * 1e-3)
        else:
            h1 = (0.01 / max(d1, d2)) ** (1.0 / self.tableau.order)
        return min(100 * h0, h1)

    def error_ratios(self, dt: float, stages: list[State], y0: State, y1: State,
                     noise: list[torch.Tensor] | None) -> torch.Tensor:
        """On the device, as one tensor: the norm of the error estimate over the tolerance
        (accept at most 1); 1 if the step changes the state, else 0; the norm of the measured
        rounding ``noise`` (per unit step) over the tolerance (0 without); without a unit
        roundoff nothing more, else the rough estimate of the rounding over the tolerance and
        the norm of ``sum_i |e_i| |k_i|`` (see the module docstring)."""
        weights = self.tableau.error
        tolerance = self.tolerance(y0, y1)
        values = [self.apply_norm(self.scaled_errors(dt, stages, tolerance))]
        values.append(torch.stack([(a != b).any() for a, b in zip(y0, y1)]).any()
                      .to(values[0].dtype))
        values.append(self.step_ratio(dt, noise, tolerance) if noise is not None
                      else torch.zeros_like(values[0]))
        if self.unit_roundoff is not None:
            magnitude = [weighted_sum([abs(w) for w in weights], [k[c].abs() for k in stages])
                         for c in range(len(y0))]
            rough = ROUGH_ROUNDOFFS * self.unit_roundoff * abs(dt)
            values += [self.apply_norm([rough * m / s for m, s in zip(magnitude, tolerance)]),
                       self.apply_norm(magnitude)]
        return torch.stack(values)

    def scaled_errors(self, dt: float, stages: list[State],
                      tolerance: list[torch.Tensor]) -> list[torch.Tensor]:
        """The error estimate of a step of ``dt`` over its tolerance, per component: what the
        norm of its error ratio is taken of."""
        return [dt * weighted_sum(self.tableau.error, [k[c] for k in stages]) / s
                for c, s in enumerate(tolerance)]

    def step_ratio(self, dt: float, per_unit_step: list[torch.Tensor],
                   tolerance: list[torch.Tensor]) -> torch.Tensor:
        """The norm of what a step of ``dt`` makes of a quantity per unit step (rounding, or an
        error estimate), over the tolerance."""
        return self.apply_norm([abs(dt) * q / s for q, s in zip(per_unit_step, tolerance)])

    def next_step(self, dt: float, ratio: float) -> float:
        """torchdiffeq's step-size update, clamped to [min_step, max_step]; a non-finite ratio
        (an overflowed stage) shrinks the step by ``dfactor``."""
        if ratio == 0:
            factor = self.ifactor
        elif not math.isfinite(ratio):
            factor = self.dfactor
        else:
            shrink = 1.0 if ratio < 1 else self.dfactor
            factor = min(self.ifactor, max(self.safety / ratio ** (1.0 / self.tableau.order),
                                           shrink))
        return min(max(dt * factor, self.min_step), self.max_step)

    def _judge(self, attempt: Attempt, y: State, y1: State,
               stages: list[State]) -> _Judgement:
        dt = attempt.t1_value - attempt.t0_value
        floor = self._floor
        values = self.error_ratios(dt, stages, y, y1, None if floor is None else floor.noise)
        ratio, moved, noise, *rough = values.tolist()
        self._refuse_nan_norm(ratio, lambda: self.scaled_errors(dt, stages, self.tolerance(y, y1)))
        noise = noise if math.isfinite(noise) else 0.0
        if floor is not None and rough[0] >= 1 and floor.due(
                rough[1], rejected=ratio > max(1.0, noise), relaxed=noise > 1, step=abs(dt)):
            noise = floor.measure(self, self._stepper, attempt.t0, attempt.t1, dt, y, y1,
                                  stages, attempt.start_nudge, rough[1])
        relaxation = max(1.0, noise)
        return _Judgement(ratio / relaxation, relaxation, moved > 0)

    def _next_step(self, judged: _Judgement, dt: float) -> float:
        """The step after one of size ``dt``: torchdiffeq's update, at the floor no larger than
        its cap."""
        proposed = self.next_step(dt, judged.ratio)
        if judged.relaxation == 1:
            return proposed
        return max(min(proposed, self._floor.cap), self.min_step)

    def _land(self, t0: float, t1: float) -> tuple[float, float | None]:
        """Shorten a step to end on the first ``step_t`` or ``jump_t`` strictly inside it."""
        landmark = None
        for marks in (self.step_t, self.jump_t):  # a jump takes precedence
            i = bisect.bisect_right(marks, t0)
            if i < len(marks) and marks[i] < t1:
                landmark = t1 = marks[i]
        return t1, landmark

    def _user_time(self, t_value: float) -> float:
        return self._stepper.time_sign * t_value

    def _check_finite_start(self, f: State) -> None:
        if not all_finite(f):
            raise FloatingPointError(
                f"rampde_fx: {self._stepper.velocity.name()} is not finite at the start of the "
                f"solve (t={self._user_time(self._t):g}) in {self._stats.dtype}: it overflows "
                "there (float16 holds magnitudes up to 65504) or is undefined; solve with a "
                "wider dtype (torch.bfloat16 has float32's range), or rescale the state")

    def _refuse_nan_norm(self, value: float, ratios: Callable[[], list[torch.Tensor]]) -> None:
        """Raise where ``value``, the norm of ``ratios()``, is nan though they are finite: no
        overflow makes a nan, so the norm is at fault (its steps would otherwise shrink to an
        underflow). ``ratios`` is recomputed on this rare path only."""
        if math.isnan(value) and all_finite(ratios()):
            raise ValueError("rampde_fx: options['norm'] returned nan for finite error "
                             "ratios; it must return a finite number for finite input")

    def _raise_underflow(self, dt: float) -> None:
        why = ("the last attempted step's error estimate was not finite (the state or the "
               "velocity overflows)" if not math.isfinite(self._ratio) else
               f"the last attempted step's error was {self._ratio:.3g} times the tolerance")
        raise RuntimeError(
            f"rampde_fx: underflow in dt: the step size fell to {dt:.3g} at t="
            f"{self._user_time(self._t):.17g}, below the resolution of the (float64) time; "
            f"{why}. The solution may blow up near this time; otherwise loosen rtol/atol")

    def _raise_pinned(self, y: State) -> None:
        largest = max(float(c.abs().max()) for c in y)
        raise RuntimeError(
            f"rampde_fx: the solution overflows at t={self._user_time(self._t):.17g} (max "
            f"|y| = {largest:.6g}): steps that change the state make the {self._stats.dtype} "
            "velocity or the state non-finite, and smaller ones no longer change the state. It "
            "may blow up here; otherwise solve with a wider dtype (torch.bfloat16 has float32's "
            "range), or rescale the state")

    def _warn_tolerance(self, floor: RoundingFloor) -> None:
        stats = self._stats
        key = (stats.method, stats.dtype, self.rtol, self.atol)
        if key in runtime.WARNED_TOLERANCES:
            return
        runtime.WARNED_TOLERANCES.add(key)
        rtol, atol = self.rtol[0], self.atol[0]
        warnings.warn(
            f"rampde_fx: rtol={rtol:g}, atol={atol:g} ask for more than a {stats.dtype} "
            f"velocity resolves: on {floor.limited} of {stats.steps} steps of this "
            f"{stats.method} solve the measured rounding noise of the error estimate exceeded "
            f"the tolerance (by up to {floor.worst:.3g}x), and those steps were controlled to "
            f"the noise. Tolerances of about rtol={rtol * floor.worst:.2g}, "
            f"atol={atol * floor.worst:.2g} are attainable; loosen them, or solve with a wider "
            "dtype (torch.float32). This warning is shown once per method, dtype and "
            "tolerances.", ToleranceWarning, stacklevel=6)


@dataclasses.dataclass
class _Judgement:
    """An attempt's error over its tolerance (accept at most 1), the factor by which the
    tolerance was relaxed to the rounding floor (1: not at all), and whether the step changed
    the state."""

    ratio: float
    relaxation: float
    moved: bool


def adaptive_controller(tableau: ButcherTableau, options: dict[str, Any], rtol: Any, atol: Any,
                        state: State, is_tuple: bool, dtype: torch.dtype, reverse: bool,
                        callbacks: StepCallbacks) -> AdaptiveController:
    """Validate an adaptive solve's tolerances and options (in internal, increasing time).
    An option given as None takes its default."""
    def number(name: str, default: float, **bounds: Any) -> float:
        value = options.get(name)
        return real_number(f"options[{name!r}]", default if value is None else value, **bounds)

    def landmarks(name: str) -> list[float]:
        """``step_t`` or ``jump_t``: a 1-D tensor (or a 0-dim one) or a sequence of times."""
        values, label = options.get(name), f"options[{name!r}]"
        if values is None:
            return []
        if isinstance(values, torch.Tensor) and values.dim() <= 1:
            require_data(label, values)
            values = values.detach().reshape(-1).tolist()
        if not isinstance(values, (list, tuple)):
            raise TypeError(f"{label} must be a 1-D tensor or a sequence of times, got "
                            f"{describe(values)}")
        values = [real_number(f"{label}[{i}]", v, sign="any") for i, v in enumerate(values)]
        return sorted(-v if reverse else v for v in values)

    time_dtype = options.get("dtype", torch.float64)
    if time_dtype != torch.float64:
        warnings.warn(f"options['dtype']={time_dtype}: rampde_fx keeps the times of adaptive "
                      "solves in float64 on the host; the option has no effect", stacklevel=4)
    step_t, jump_t = landmarks("step_t"), landmarks("jump_t")
    if set(step_t) & set(jump_t):
        raise ValueError("options step_t and jump_t must not share times")
    min_step = number("min_step", 0.0)
    max_step = number("max_step", math.inf, sign="positive", finite=False)
    if min_step > max_step:
        raise ValueError(f"options['min_step']={min_step} exceeds options['max_step']={max_step}")
    first_step = options.get("first_step")
    state_unit = max(torch.finfo(c.dtype).eps for c in state) / 2
    low_unit = torch.finfo(dtype).eps / 2
    return AdaptiveController(
        tableau=tableau,
        rtol=per_component("rtol", rtol, is_tuple, len(state)),
        atol=per_component("atol", atol, is_tuple, len(state)),
        norm=_checked_norm(options.get("norm"), state, is_tuple),
        is_tuple=is_tuple,
        first_step=None if first_step is None else number("first_step", 0.0, sign="positive"),
        safety=number("safety", 0.9, sign="positive"),
        ifactor=number("ifactor", 10.0, sign="positive"),
        dfactor=number("dfactor", 0.2, sign="positive"), min_step=min_step, max_step=max_step,
        max_num_steps=int(number("max_num_steps", 2**31 - 1, sign="positive", whole=True)),
        step_t=step_t, jump_t=jump_t,
        unit_roundoff=low_unit if low_unit > state_unit else None,
        callbacks=callbacks,
    )


def _checked_norm(norm: Any, state: State, is_tuple: bool) -> Callable[[Any], Any]:
    """The ``norm`` option, or the default norm. A given norm is evaluated once, on ones: it
    must give a finite number, or every step would be rejected until the step size underflows."""
    if norm is None:
        return max_rms_norm if is_tuple else rms_norm
    if not callable(norm):
        raise TypeError(f"options['norm'] must be callable as norm(y), got {describe(norm)}")
    ones = [torch.ones_like(c, dtype=torch.promote_types(c.dtype, torch.float32)) for c in state]
    real_number("options['norm'] of a state of ones", norm(tuple(ones) if is_tuple else ones[0]),
                sign="any")
    return norm
