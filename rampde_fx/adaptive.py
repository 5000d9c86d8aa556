"""Adaptive step-size control for the embedded Runge-Kutta pairs, in the high precision.

The stages run in the low precision like any step; the solution, the error estimate, its norm
and the step-size arithmetic stay in the state's dtype (at least float32) and in float64 on the
host, so a float16 velocity can never overflow the controller (torchdiffeq in float16 dies with
"underflow in dt" when its norm overflows). The controller is torchdiffeq 0.2.5's: the same
initial step, error ratio, step-size update, options and step callbacks, so the float32 mode
takes the same steps.

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
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from .solver import (Nudge, State, Stepper, all_finite, replayed_rng, rng_state,
                     weighted_sum)
from .tableaus import ButcherTableau

if TYPE_CHECKING:
    from .adjoint import SolvePlan
    from .capture import Velocity

ADAPTIVE_OPTIONS = ("first_step", "safety", "ifactor", "dfactor", "max_num_steps", "dtype",
                    "step_t", "jump_t", "min_step", "max_step", "norm")
# The rough estimate of a stage's rounding that decides whether to measure it: the velocity's
# input and its output rounded once each, in units of the low dtype's unit roundoff times |k|.
ROUGH_ROUNDOFFS = 2.0
# A change of the stages' weighted magnitude, since the last measurement, that calls for a new
# one.
REMEASURE_FACTOR = 2.0


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

    def apply_norm(self, components: Sequence[torch.Tensor]) -> torch.Tensor:
        """The norm of ratios to the tolerance, in at least float32 (a float16 state's squares
        would overflow)."""
        components = [c.to(torch.promote_types(c.dtype, torch.float32)) for c in components]
        value = self.norm(tuple(components) if self.is_tuple else components[0])
        return torch.as_tensor(value, dtype=components[0].dtype, device=components[0].device)

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
        d0, d1 = torch.stack([self.apply_norm([c / s for c, s in zip(y0, scale)]),
                              self.apply_norm([f / s for f, s in zip(f0, scale)])]).tolist()
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
        errors = [dt * weighted_sum(weights, [k[c] for k in stages]) for c in range(len(y0))]
        values = [self.apply_norm([e / s for e, s in zip(errors, tolerance)])]
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

    def measure(self, controller: Controller, stepper: Stepper, t0: torch.Tensor,
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
                replayed_rng(rng_state(t0.device), t0.device):
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
    callbacks = plan.callbacks
    time_values = plan.time_values
    origin = start.to(torch.float64)

    def at(value: float) -> torch.Tensor:
        return origin + (value - time_values[0])

    t_value = time_values[0]
    f = stepper.derivative(at(t_value), y0)
    stepper.evaluations += 1
    with torch.no_grad():
        _check_finite_start(plan, f, t_value)
        dt = (controller.first_step if controller.first_step is not None
              else controller.initial_step(stepper, at(t_value), y0, f))
    floor = None if controller.unit_roundoff is None else \
        RoundingFloor(stepper.velocity.as_written())
    plan.grid_values, plan.outputs_per_step, plan.start_nudges = [t_value], [], []
    checkpoints: list[list[torch.Tensor]] = [[] for _ in y0]
    nudge = Nudge.NONE
    y = y0
    target = 1
    attempts = 0
    ratio = 0.0
    pinned = False  # the last accepted step left the state as it was
    while target < len(time_values):
        if attempts >= controller.max_num_steps:
            raise RuntimeError(
                f"rampde_fx: max_num_steps={controller.max_num_steps} exceeded between the "
                f"output times {time_values[target - 1]} and {time_values[target]} (internal "
                "time); loosen rtol/atol or raise options['max_num_steps']")
        attempts += 1
        dt = min(max(dt if math.isfinite(dt) else controller.min_step, controller.min_step),
                 controller.max_step)
        callbacks("callback_step", at(t_value), y, dt)
        t1 = t_value + dt
        if not t1 > t_value:
            _raise_underflow(plan, dt, t_value, ratio)
        t1, landmark = _land(controller, t_value, t1)
        if landmark is not None:
            dt = t1 - t_value
        y1, stages = stepper.take_step(at(t_value), at(t1), y, first=f)
        with torch.no_grad():
            judged = _judge(controller, floor, stepper, at(t_value), at(t1), t1 - t_value, y,
                            y1, stages, nudge)
        ratio = judged.ratio
        if pinned and not math.isfinite(ratio):
            _raise_pinned(plan, t_value, y)
        if not (ratio <= 1 or dt <= controller.min_step):
            callbacks("callback_reject_step", at(t_value), y, dt)
            stats.rejected_steps += 1
            dt = _next_step(controller, floor, judged, dt)
            continue
        callbacks("callback_accept_step", at(t_value), y, dt)
        pinned = not judged.moved
        if judged.relaxation > 1:
            floor.limited += 1
            floor.worst = max(floor.worst, judged.relaxation)
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
        dt = _next_step(controller, floor, judged, dt)
    if floor is not None:
        stats.tolerance_limited_steps = floor.limited
        if floor.limited:
            _warn_tolerance(controller, stats, floor, plan.steps)
    return [torch.stack(store) if store else torch.empty((0, *c.shape), dtype=d, device=c.device)
            for store, c, d in zip(checkpoints, y0, plan.checkpoint_dtypes)] \
        if keep_checkpoints else []


@dataclasses.dataclass
class _Judgement:
    """An attempt's error over its tolerance (accept at most 1), the factor by which the
    tolerance was relaxed to the rounding floor (1: not at all), and whether the step changed
    the state."""

    ratio: float
    relaxation: float
    moved: bool


def _judge(controller: Controller, floor: RoundingFloor | None, stepper: Stepper,
           t0: torch.Tensor, t1: torch.Tensor, dt: float, y: State, y1: State,
           stages: list[State], nudge: Nudge) -> _Judgement:
    """Judge an attempt of step ``dt`` against its tolerance, relaxed to the measured rounding
    floor where the tolerance is below it, measuring the floor where it is due."""
    values = controller.error_ratios(dt, stages, y, y1, None if floor is None else floor.noise)
    ratio, moved, noise, *rough = values.tolist()
    noise = noise if math.isfinite(noise) else 0.0
    if floor is not None and rough[0] >= 1 and floor.due(
            rough[1], rejected=ratio > max(1.0, noise), relaxed=noise > 1, step=abs(dt)):
        noise = floor.measure(controller, stepper, t0, t1, dt, y, y1, stages, nudge, rough[1])
    relaxation = max(1.0, noise)
    return _Judgement(ratio / relaxation, relaxation, moved > 0)


def _next_step(controller: Controller, floor: RoundingFloor | None, judged: _Judgement,
               dt: float) -> float:
    """The step after one of size ``dt``: torchdiffeq's update, at the floor no larger than its
    cap."""
    proposed = controller.next_step(dt, judged.ratio)
    if judged.relaxation == 1:
        return proposed
    return max(min(proposed, floor.cap), controller.min_step)


def _check_finite_start(plan: SolvePlan, f: State, t_value: float) -> None:
    if not all_finite(f):
        raise FloatingPointError(
            f"rampde_fx: {plan.stepper.velocity.name()} is not finite at the start of the solve "
            f"(t={plan.stepper.time_sign * t_value:g}) in {plan.stats.dtype}: it overflows there "
            "(float16 holds magnitudes up to 65504) or is undefined; solve with a wider dtype "
            "(torch.bfloat16 has float32's range), or rescale the state")


def _raise_underflow(plan: SolvePlan, dt: float, t_value: float, ratio: float) -> None:
    why = ("the last attempted step's error estimate was not finite (the state or the velocity "
           "overflows)" if not math.isfinite(ratio) else
           f"the last attempted step's error was {ratio:.3g} times the tolerance")
    raise RuntimeError(
        f"rampde_fx: underflow in dt: the step size fell to {dt:.3g} at t="
        f"{plan.stepper.time_sign * t_value:.17g}, below the resolution of the (float64) time; "
        f"{why}. The solution may blow up near this time; otherwise loosen rtol/atol")


def _raise_pinned(plan: SolvePlan, t_value: float, y: State) -> None:
    largest = max(float(c.abs().max()) for c in y)
    raise RuntimeError(
        f"rampde_fx: the solution overflows at t={plan.stepper.time_sign * t_value:.17g} (max "
        f"|y| = {largest:.6g}): steps that change the state make the {plan.stats.dtype} "
        "velocity or the state non-finite, and smaller ones no longer change the state. It may "
        "blow up here; otherwise solve with a wider dtype (torch.bfloat16 has float32's range), "
        "or rescale the state")


def _land(controller: Controller, t0: float, t1: float) -> tuple[float, float | None]:
    """Shorten a step to end on the first ``step_t`` or ``jump_t`` strictly inside it."""
    landmark = None
    for marks in (controller.step_t, controller.jump_t):  # a jump takes precedence
        i = bisect.bisect_right(marks, t0)
        if i < len(marks) and marks[i] < t1:
            landmark = t1 = marks[i]
    return t1, landmark


def _warn_tolerance(controller: Controller, stats: Any, floor: RoundingFloor,
                    steps: int) -> None:
    key = (stats.method, stats.dtype, controller.rtol, controller.atol)
    if key in _warned_tolerances:
        return
    _warned_tolerances.add(key)
    rtol, atol = controller.rtol[0], controller.atol[0]
    warnings.warn(
        f"rampde_fx: rtol={rtol:g}, atol={atol:g} ask for more than a {stats.dtype} velocity "
        f"resolves: on {floor.limited} of {steps} steps of this {stats.method} solve the "
        f"measured rounding noise of the error estimate exceeded the tolerance (by up to "
        f"{floor.worst:.3g}x), and those steps were controlled to the noise. Tolerances of about "
        f"rtol={rtol * floor.worst:.2g}, atol={atol * floor.worst:.2g} are attainable; loosen "
        "them, or solve with a wider dtype (torch.float32). This warning is shown once per "
        "method, dtype and tolerances.", ToleranceWarning, stacklevel=5)
