"""The step controllers on their own: a fixed grid never rejects; the adaptive controller's
initial step, step-size update, error ratio, landmarks and refusals are torchdiffeq's."""
from __future__ import annotations

import math

import pytest
import torch
from torchdiffeq._impl.misc import _optimal_step_size, _rms_norm, _select_initial_step

from rampde_fx.capture import capture_velocity
from rampde_fx.config import SolveConfig
from rampde_fx.engine.callbacks import StepCallbacks
from rampde_fx.engine.controllers.adaptive import adaptive_controller
from rampde_fx.engine.controllers.fixed_grid import FixedGridController
from rampde_fx.engine.plan import prepare_solve
from rampde_fx.engine.step import Nudge, Stepper
from rampde_fx.engine.tableaus import ADAPTIVE_TABLEAUS, FIXED_GRID_TABLEAUS
from rampde_fx.stats import SolveStats, VelocityKind

DOPRI5 = ADAPTIVE_TABLEAUS["dopri5"]


def decay(t, y):
    return -y * (1 + t)


def stepper_for(func, tableau, y0, dtype=torch.float32):
    velocity = capture_velocity(func, torch.tensor(0.0), (y0,), False, dtype,
                                SolveConfig(dtype=dtype).policy)
    return Stepper(velocity, tableau, Nudge.NONE, Nudge.PREV if tableau.adaptive else Nudge.NONE,
                   1.0, "dense" if tableau.adaptive else "linear")


def stats() -> SolveStats:
    return SolveStats(method="dopri5", dtype=torch.float32, velocity=VelocityKind.GRAPH,
                      fallback_reason=None, scaling=False)


def controller(options=None, rtol=1e-6, atol=1e-8, y0=None, dtype=torch.float32, reverse=False,
               callbacks=None):
    y0 = torch.ones(3) if y0 is None else y0
    return adaptive_controller(DOPRI5, options or {}, rtol, atol, (y0,), False, dtype, reverse,
                               callbacks or StepCallbacks())


class Recorder:
    """Step callbacks that record what they receive."""

    def __init__(self):
        self.calls = []

    def callback_step(self, t0, y0, dt):
        self.calls.append(("step", float(t0), float(dt)))

    def callback_accept_step(self, t0, y0, dt):
        self.calls.append(("accept", float(t0), float(dt)))

    def callback_reject_step(self, t0, y0, dt):
        self.calls.append(("reject", float(t0), float(dt)))


def test_fixed_grid_attempts_are_the_grid_steps_and_all_are_accepted():
    """Every attempt is the next grid step; judge always accepts; each step names the outputs
    it reaches; callback_step gets (t0, y, dt) before each step."""
    recorder = Recorder()
    grid_values = [0.0, 0.25, 0.5, 1.0]
    fixed = FixedGridController(grid_values, [[], [1], [2, 3]],
                                StepCallbacks({"callback_step": recorder.callback_step}))
    y0 = torch.ones(2)
    grid = torch.tensor(grid_values)
    fixed.start(stepper_for(decay, FIXED_GRID_TABLEAUS["rk4"], y0), stats(), (y0,), grid,
                torch.tensor([0.0, 0.5, 0.75, 1.0]), [0.0, 0.5, 0.75, 1.0])
    taken = []
    while (attempt := fixed.attempt((y0,))) is not None:
        assert fixed.judge(attempt, (y0,), (y0,), [])
        taken.append((attempt.t0_value, attempt.t1_value, fixed.accept(attempt, (y0,), [])))
    assert taken == [(0.0, 0.25, []), (0.25, 0.5, [1]), (0.5, 1.0, [2, 3])]
    assert recorder.calls == [("step", 0.0, 0.25), ("step", 0.25, 0.25), ("step", 0.5, 0.5)]
    assert fixed.known_steps == 3 and fixed.grid_of(grid_values) is grid


@pytest.mark.parametrize("ratio", [0.0, 1e-3, 0.3, 0.99, 1.0, 3.0, 1e6])
def test_step_update_is_torchdiffeqs(ratio):
    """next_step is torchdiffeq's _optimal_step_size for every ratio, clamped to
    [min_step, max_step]; a non-finite ratio shrinks by dfactor."""
    control = controller()
    as_tensors = [torch.tensor(v, dtype=torch.float64) for v in (0.1, ratio, 0.9, 10.0, 0.2)]
    want = float(_optimal_step_size(*as_tensors, 5))
    assert math.isclose(control.next_step(0.1, ratio), want, rel_tol=1e-12)
    assert math.isclose(control.next_step(0.1, math.inf), 0.1 * 0.2, rel_tol=1e-15)
    clamped = controller({"min_step": 0.05, "max_step": 0.5})
    assert 0.05 <= clamped.next_step(0.1, ratio) <= 0.5


def test_initial_step_is_torchdiffeqs():
    """Hairer-Norsett-Wanner's starting step, one more evaluation, as torchdiffeq chooses it."""
    y0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    stepper = stepper_for(decay, DOPRI5, y0, dtype=torch.float64)
    t0 = torch.tensor(0.0, dtype=torch.float64)
    f0 = stepper.derivative(t0, (y0,))
    got = controller(rtol=1e-5, atol=1e-7, y0=y0).initial_step(stepper, t0, (y0,), f0)
    want = _select_initial_step(decay, t0, y0, 4, 1e-5, 1e-7, _rms_norm, f0[0])
    assert math.isclose(got, float(want), rel_tol=1e-12)
    assert stepper.evaluations == 1  # one more than f0


def test_error_ratio_is_the_rms_norm_over_the_tolerance():
    """The first error ratio is the RMS norm of h * sum_i e_i k_i over atol + rtol *
    max(|y0|, |y1|); the second says whether the step moved the state."""
    control = controller(rtol=1e-3, atol=1e-4)
    torch.manual_seed(0)
    stages = [(torch.randn(5, dtype=torch.float64),) for _ in range(DOPRI5.stages)]
    y0, y1 = (torch.randn(5, dtype=torch.float64),), (torch.randn(5, dtype=torch.float64),)
    ratio, moved, noise = control.error_ratios(0.1, stages, y0, y1, None).tolist()
    error = 0.1 * sum(w * k[0] for w, k in zip(DOPRI5.error, stages))
    tolerance = 1e-4 + 1e-3 * torch.maximum(y0[0].abs(), y1[0].abs())
    assert math.isclose(ratio, float((error / tolerance).pow(2).mean().sqrt()), rel_tol=1e-12)
    assert (moved, noise) == (1.0, 0.0)
    assert control.error_ratios(0.1, stages, y0, y0, None)[1] == 0.0


def test_steps_land_on_step_t_and_jump_t():
    """A step that would cross a step_t or jump_t time ends on it (a jump first); the first
    stage after a jump is evaluated just after it."""
    y0 = torch.ones(3, dtype=torch.float64)
    plan_of = prepare_solve(decay, y0, torch.tensor([0.0, 1.0], dtype=torch.float64),
                            SolveConfig(dtype=torch.float64), rtol=1e-4, atol=1e-6,
                            method="dopri5",
                            options={"step_t": torch.tensor([0.3], dtype=torch.float64),
                                     "jump_t": torch.tensor([0.61], dtype=torch.float64)},
                            event_fn=None)
    plan = plan_of.plan
    control = plan.controller
    control.start(plan.stepper, plan.stats, (y0,), plan_of.grid, plan_of.times, plan.time_values)
    ends, nudges, y = [], [], (y0,)
    while (attempt := control.attempt(y)) is not None:
        y1, stages = plan.stepper.take_step(attempt.t0, attempt.t1, y, attempt.first)
        if control.judge(attempt, y, y1, stages):
            nudges.append(attempt.start_nudge)
            control.accept(attempt, y1, stages)
            ends.append(attempt.t1_value)
            y = y1
    assert 0.3 in ends and 0.61 in ends and ends[-1] >= 1.0
    assert nudges[ends.index(0.61) + 1] is Nudge.NEXT


def test_refusals_name_their_cause():
    """max_num_steps between two outputs raises; so does a step that underflows in float64
    time (a solution that blows up)."""
    y0 = torch.ones(3)
    with pytest.raises(RuntimeError, match="max_num_steps=2 exceeded"):
        prepared = prepare_solve(decay, y0, torch.tensor([0.0, 10.0]), SolveConfig(torch.float32),
                                 rtol=1e-9, atol=1e-12, method="dopri5",
                                 options={"max_num_steps": 2}, event_fn=None)
        _run(prepared)
    with pytest.raises(RuntimeError, match="underflow in dt"):  # y' = y**2 blows up at t = 1
        prepared = prepare_solve(lambda t, y: y * y, torch.ones(1, dtype=torch.float64),
                                 torch.tensor([0.0, 2.0], dtype=torch.float64),
                                 SolveConfig(torch.float64), rtol=1e-6, atol=1e-6,
                                 method="dopri5", options=None, event_fn=None)
        _run(prepared)


def _run(prepared):
    from rampde_fx.engine.integrate import integrate

    with torch.no_grad():
        return integrate(prepared.plan, prepared.state, prepared.grid, prepared.times, False)


def test_controller_options_are_validated():
    """Negative or nan numbers, min_step above max_step, shared step_t/jump_t and tolerances
    per component of the wrong length are refused."""
    with pytest.raises(ValueError, match="safety"):
        controller({"safety": -1.0})
    with pytest.raises(ValueError, match="min_step"):
        controller({"min_step": 1.0, "max_step": 0.5})
    with pytest.raises(ValueError, match="must not share"):
        controller({"step_t": [0.5], "jump_t": [0.5]})
    with pytest.raises(ValueError, match="rtol has 2 entries"):
        controller(rtol=(1e-3, 1e-3))
