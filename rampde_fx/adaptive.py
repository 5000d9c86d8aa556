"""Adaptive step-size control for the embedded Runge-Kutta pairs, in the high precision.

The stages run in the low precision like any step; the solution, the error estimate, its norm
and the step-size arithmetic stay in the state's dtype (at least float32) and in float64 on the
host, so a float16 velocity can never overflow the controller (torchdiffeq in float16 dies with
"underflow in dt" when its norm overflows). The controller is torchdiffeq 0.2.5's: the same
initial step, error ratio, step-size update and options, so the float32 mode takes the same steps.

A low-precision velocity has a rounding floor: each stage carries an error of about
``u * |k|`` (``u`` the dtype's unit roundoff), and the error estimate ``h * sum_i e_i k_i``
inherits ``h * u * sum_i |e_i| |k_i|`` of it, which no step size removes relative to the step.
Where that floor exceeds the requested tolerance, the step is controlled against the floor
instead (the tolerance the dtype can deliver), counted, and reported once with the attainable
tolerance. Should the floor be underestimated (the controller keeps rejecting steps while the
error estimate does not fall with the step size), it is doubled and the step retried, up to
``MAX_FLOOR_GAIN``.

The step sizes are decided once, in the forward solve, and are constants of the backward pass:
the gradient is that of the discrete solve through the accepted steps (the controller itself is
not differentiated; torchdiffeq's autograd mode differentiates it, through the error ratio, which
changes gradients by terms of the order of the tolerance).

Each attempted step costs one host synchronisation (its accept-or-reject decision).
"""
from __future__ import annotations

import bisect
import dataclasses
import math
import warnings
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from .solver import Nudge, State, Stepper, weighted_sum
from .tableaus import ButcherTableau

if TYPE_CHECKING:
    from .adjoint import SolvePlan

ADAPTIVE_OPTIONS = ("first_step", "safety", "ifactor", "dfactor", "max_num_steps", "dtype",
                    "step_t", "jump_t", "min_step", "max_step", "norm")
# The error of a low-precision stage derivative, in units of the dtype's unit roundoff times
# its magnitude, assumed by the rounding floor of the error estimate: a bound with a margin, so
# that steps controlled to the floor are accepted and grow until their truncation error shows.
FLOOR_ROUNDOFFS = 8.0
# Consecutive rejections after which an error ratio that has not halved is taken for rounding,
# and the largest factor by which the floor is raised for it.
STAGNANT_REJECTIONS = 3
MAX_FLOOR_GAIN = 64.0


class ToleranceWarning(UserWarning):
    """rtol/atol ask for more accuracy than the velocity's low precision can deliver."""


_warned_tolerances: set[tuple[Any, ...]] = set()


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return x.abs().pow(2).mean().sqrt()


def max_rms_norm(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """torchdiffeq's default norm of a tuple state: the largest RMS norm of its components."""
    return torch.stack([rms_norm(x) for x in xs]).amax()


@dataclasses.dataclass
class Controller:
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
        floor_gain: factor on the modelled rounding floor, raised when it proves too low.
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
    floor_gain: float = 1.0

    def apply_norm(self, components: list[torch.Tensor]) -> torch.Tensor:
        """The norm of ratios to the tolerance, in at least float32 (a float16 state's squares
        would overflow)."""
        components = [c.to(torch.promote_types(c.dtype, torch.float32)) for c in components]
        value = self.norm(tuple(components) if self.is_tuple else components[0])
        return torch.as_tensor(value, dtype=components[0].dtype, device=components[0].device)

    def scale(self, y: State) -> list[torch.Tensor]:
        return [a + r * c.abs() for c, r, a in zip(y, self.rtol, self.atol)]

    def initial_step(self, stepper: Stepper, t0: torch.Tensor, y0: State, f0: State) -> float:
        """Hairer, Norsett and Wanner's starting step (Solving ODEs I, II.4), as torchdiffeq
        chooses it: one more velocity evaluation."""
        scale = self.scale(y0)
        d0, d1 = torch.stack([self.apply_norm([c / s for c, s in zip(y0, scale)]),
                              self.apply_norm([f / s for f, s in zip(f0, scale)])]).tolist()
        h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        y1 = tuple(c + h0 * f for c, f in zip(y0, f0))
        f1 = stepper.derivative(t0 + h0, y1)
        stepper.evaluations += 1
        d2 = float(self.apply_norm([(b - a) / s for a, b, s in zip(f0, f1, scale)])) / h0
        if d1 <= 1e-15 and d2 <= 1e-15:
            h1 = max(1e-6, h0 * 1e-3)
        else:
            h1 = (0.01 / max(d1, d2)) ** (1.0 / self.tableau.order)
        return min(100 * h0, h1)

    def error_ratio(self, dt: float, stages: list[State], y0: State,
                    y1: State) -> tuple[torch.Tensor, torch.Tensor]:
        """The norm of the error estimate over the tolerance (accept at most 1), and the norm
        of the rounding floor over the requested tolerance (zero without a floor)."""
        ratios, floors = [], []
        weights = self.tableau.error
        for c, (a, b, r, tol_abs) in enumerate(zip(y0, y1, self.rtol, self.atol)):
            error = dt * weighted_sum(weights, [k[c] for k in stages])
            tolerance = tol_abs + r * torch.maximum(a.abs(), b.abs())
            if self.unit_roundoff is not None:
                floor = (FLOOR_ROUNDOFFS * self.floor_gain * self.unit_roundoff * abs(dt)) * \
                    weighted_sum([abs(w) for w in weights], [k[c].abs() for k in stages])
                floors.append(floor / tolerance)
                tolerance = torch.maximum(tolerance, floor)
            ratios.append(error / tolerance)
        ratio = self.apply_norm(ratios)
        return ratio, self.apply_norm(floors) if floors else torch.zeros_like(ratio)

    def next_step(self, dt: float, ratio: float) -> float:
        """torchdiffeq's step-size update, clamped to [min_step, max_step]."""
        if ratio == 0:
            factor = self.ifactor
        else:
            shrink = 1.0 if ratio < 1 else self.dfactor
            factor = min(self.ifactor, max(self.safety / ratio ** (1.0 / self.tableau.order),
                                           shrink))
        return min(max(dt * factor, self.min_step), self.max_step)


def make_controller(tableau: ButcherTableau, options: dict[str, Any], rtol: Any, atol: Any,
                    state: State, is_tuple: bool, dtype: torch.dtype,
                    reverse: bool) -> Controller:
    """Validate an adaptive solve's tolerances and options (in internal, increasing time)."""
    def number(name: str, default: float, low: float = 0.0) -> float:
        value = options.get(name, default)
        value = float(value.item() if isinstance(value, torch.Tensor) else value)
        if math.isnan(value) or value < low:
            raise ValueError(f"options[{name!r}] must be a number >= {low}, got {value}")
        return value

    def landmarks(name: str) -> list[float]:
        values = options.get(name)
        if values is None:
            return []
        values = torch.as_tensor(values).detach().reshape(-1).tolist()
        return sorted(-v if reverse else v for v in values)

    time_dtype = options.get("dtype", torch.float64)
    if time_dtype != torch.float64:
        warnings.warn(f"options['dtype']={time_dtype}: rampde_fx keeps the times of adaptive "
                      "solves in float64 on the host; the option has no effect", stacklevel=4)
    step_t, jump_t = landmarks("step_t"), landmarks("jump_t")
    if set(step_t) & set(jump_t):
        raise ValueError("options step_t and jump_t must not share times")
    min_step, max_step = number("min_step", 0.0), number("max_step", math.inf)
    if min_step > max_step:
        raise ValueError(f"options['min_step']={min_step} exceeds options['max_step']={max_step}")
    first_step = options.get("first_step")
    state_unit = max(torch.finfo(c.dtype).eps for c in state) / 2
    low_unit = torch.finfo(dtype).eps / 2
    return Controller(
        tableau=tableau,
        rtol=_per_component("rtol", rtol, len(state)),
        atol=_per_component("atol", atol, len(state)),
        norm=options.get("norm", max_rms_norm if is_tuple else rms_norm),
        is_tuple=is_tuple,
        first_step=None if first_step is None else number("first_step", 0.0, low=1e-300),
        safety=number("safety", 0.9), ifactor=number("ifactor", 10.0),
        dfactor=number("dfactor", 0.2), min_step=min_step, max_step=max_step,
        max_num_steps=int(number("max_num_steps", 2**31 - 1, low=1)),
        step_t=step_t, jump_t=jump_t,
        unit_roundoff=low_unit if low_unit > state_unit else None,
    )


def _per_component(name: str, value: Any, components: int) -> tuple[float, ...]:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * components
    if len(values) != components:
        raise ValueError(f"{name} has {len(values)} entries for a state of {components} "
                         "components")
    values = tuple(float(v.item() if isinstance(v, torch.Tensor) else v) for v in values)
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"{name} must be finite and non-negative, got {value}")
    return values


def solve_adaptive(plan: SolvePlan, y0: State, start: torch.Tensor, times: torch.Tensor,
                   solution: tuple[torch.Tensor, ...],
                   keep_checkpoints: bool) -> list[torch.Tensor]:
    """March from the first output time past the last, writing ``solution[j]`` at each output
    time from the dense output of the step that reaches it; record the accepted steps in
    ``plan`` (grid, outputs per step, first-stage nudges) and return their checkpoints.

    Step times are float64 offsets of ``start`` (the internal first time, a 0-dim tensor), so
    gradients with respect to it reach every step.
    """
    stepper, controller, stats = plan.stepper, plan.controller, plan.stats
    time_values = plan.time_values
    origin = start.to(torch.float64)

    def at(value: float) -> torch.Tensor:
        return origin + (value - time_values[0])

    t_value = time_values[0]
    f = stepper.derivative(at(t_value), y0)
    stepper.evaluations += 1
    with torch.no_grad():
        dt = (controller.first_step if controller.first_step is not None
              else controller.initial_step(stepper, at(t_value), y0, f))
    plan.grid_values, plan.outputs_per_step, plan.start_nudges = [t_value], [], []
    checkpoints: list[list[torch.Tensor]] = [[] for _ in y0]
    nudge = Nudge.NONE
    y = y0
    target = 1
    attempts = rejections = limited = 0
    worst_floor = 0.0
    first_rejected_ratio = 0.0
    while target < len(time_values):
        if attempts >= controller.max_num_steps:
            raise RuntimeError(
                f"rampde_fx: max_num_steps={controller.max_num_steps} exceeded between the "
                f"output times {time_values[target - 1]} and {time_values[target]} (internal "
                "time); loosen rtol/atol or raise options['max_num_steps']")
        attempts += 1
        dt = min(max(dt if math.isfinite(dt) else controller.min_step, controller.min_step),
                 controller.max_step)
        t1 = t_value + dt
        if not t1 > t_value:
            raise RuntimeError(f"rampde_fx: the step size underflowed ({dt}) at internal time "
                               f"{t_value}; the tolerances cannot be met: loosen rtol/atol")
        t1, landmark = _land(controller, t_value, t1)
        dt = t1 - t_value
        y1, stages = stepper.take_step(at(t_value), at(t1), y, first=f)
        with torch.no_grad():
            ratio, floor = torch.stack(controller.error_ratio(dt, stages, y, y1)).tolist()
        accept = ratio <= 1 or dt <= controller.min_step
        if accept or controller.unit_roundoff is None or floor < 0.5:
            rejections = 0
        else:  # rejected where rounding may matter: is the error falling with the step?
            rejections += 1
            first_rejected_ratio = ratio if rejections == 1 else first_rejected_ratio
            if (rejections >= STAGNANT_REJECTIONS and ratio > 0.5 * first_rejected_ratio
                    and controller.floor_gain < MAX_FLOOR_GAIN):
                # It is not: the error is rounding, which the modelled floor underestimates.
                # Raise the floor and retry the same step.
                controller.floor_gain *= 2
                stats.rejected_steps += 1
                rejections = 0
                continue
        if not accept:
            stats.rejected_steps += 1
            dt = controller.next_step(dt, ratio)
            continue
        if floor > 1:
            limited += 1
            worst_floor = max(worst_floor, floor)
        if keep_checkpoints:
            for store, c, d in zip(checkpoints, y, plan.checkpoint_dtypes):
                store.append(c.detach().to(d))
        plan.start_nudges.append(nudge)
        indices = []
        while target < len(time_values) and time_values[target] <= t1:
            indices.append(target)
            target += 1
        plan.outputs_per_step.append(indices)
        outputs = stepper.interpolate(at(t_value), at(t1), y, y1, stages,
                                      [(times[j], time_values[j]) for j in indices], t_value, t1)
        for j, value in zip(indices, outputs):
            for out, c in zip(solution, value):
                out[j] = c
        attempts = 0 if indices else attempts
        plan.grid_values.append(t1)
        if landmark in controller.jump_t:  # the velocity jumps here: evaluate just after it
            nudge = Nudge.NEXT
        elif stepper.tableau.fsal:  # the last stage, evaluated just before t1, is the next first
            nudge = stepper.end_nudge
        else:
            nudge = stepper.start_nudge
        if nudge is Nudge.NEXT or not stepper.tableau.fsal:
            f = stepper.derivative(at(t1), y1, nudge)
            stepper.evaluations += 1
        else:
            f = stages[-1]
        y, t_value = y1, t1
        dt = controller.next_step(dt, ratio)
    stats.tolerance_limited_steps = limited
    if limited:
        _warn_tolerance(controller, stats, limited, plan.steps, worst_floor)
    return [torch.stack(store) if store else torch.empty((0, *c.shape), dtype=d, device=c.device)
            for store, c, d in zip(checkpoints, y0, plan.checkpoint_dtypes)] \
        if keep_checkpoints else []


def _land(controller: Controller, t0: float, t1: float) -> tuple[float, float | None]:
    """Shorten a step to end on the first ``step_t`` or ``jump_t`` strictly inside it."""
    landmark = None
    for marks in (controller.step_t, controller.jump_t):  # a jump takes precedence
        i = bisect.bisect_right(marks, t0)
        if i < len(marks) and marks[i] < t1:
            landmark = t1 = marks[i]
    return t1, landmark


def _warn_tolerance(controller: Controller, stats: Any, limited: int, steps: int,
                    worst: float) -> None:
    key = (stats.method, stats.dtype, controller.rtol, controller.atol)
    if key in _warned_tolerances:
        return
    _warned_tolerances.add(key)
    rtol, atol = controller.rtol[0], controller.atol[0]
    warnings.warn(
        f"rampde_fx: rtol={rtol:g}, atol={atol:g} ask for more than a {stats.dtype} velocity "
        f"resolves: on {limited} of {steps} steps of this {stats.method} solve the rounding "
        f"floor of the error estimate exceeded the tolerance (by up to {worst:.3g}x), and those "
        f"steps were controlled to the floor. Tolerances of about rtol={rtol * worst:.2g}, "
        f"atol={atol * worst:.2g} are attainable; loosen them, or solve with a wider dtype "
        "(torch.float32). This warning is shown once per method, dtype and tolerances.",
        ToleranceWarning, stacklevel=5)
