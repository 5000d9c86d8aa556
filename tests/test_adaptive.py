"""Adaptive methods: torchdiffeq's controller in float32, low-precision accuracy against
float64, the exact gradient of the accepted steps, the measured rounding floor, solves that
cannot go on, torchdiffeq's semantics (1-tuple states, callbacks, capture without side
effects), convert and compile."""
from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
import torchdiffeq
from torch import nn

import rampde_fx
from rampde_fx.tools import debug
from models import Hamiltonian, ODENetFunc, TimeMLP, rel_err

U_BF16, U_FP16 = 2.0**-8, 2.0**-11
FSAL_METHODS = ["dopri5", "bosh3"]
T = torch.tensor([0.0, 0.3, 1.0, 1.7])


def weighted_loss(out):
    """A loss whose cotangent differs at every output entry."""
    outs = out if isinstance(out, tuple) else (out,)
    return sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum()
               for o in outs)


def solve_and_grad(solve, func, y0, t):
    """Outputs and the gradients of ``weighted_loss`` for y0, t and the parameters."""
    y0 = y0.clone().requires_grad_()
    t = t.clone().requires_grad_()
    out = solve(func, y0, t)
    return [out, *torch.autograd.grad(weighted_loss(out), [y0, t, *func.parameters()])]


def float64_reference(func, y0, t):
    """A float64 torchdiffeq solve far tighter than any tolerance tested."""
    return solve_and_grad(lambda f, y, tt: torchdiffeq.odeint(f, y, tt, rtol=1e-12, atol=1e-12,
                                                              method="dopri8"),
                          copy.deepcopy(func).double(), y0.double(), t.double())


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "fehlberg2", "adaptive_heun"])
def test_float32_mode_matches_torchdiffeq(method):
    torch.manual_seed(0)
    func, y0 = TimeMLP(), torch.randn(8, 3)
    options = dict(rtol=1e-5, atol=1e-6, method=method)
    ours = solve_and_grad(lambda f, y, t: rampde_fx.odeint(f, y, t, dtype=torch.float32,
                                                           **options), func, y0, T)
    theirs = solve_and_grad(lambda f, y, t: torchdiffeq.odeint(f, y, t, **options), func, y0, T)
    # dopri5 and bosh3 take torchdiffeq's steps; fehlberg2 and adaptive_heun evaluate their
    # first stage at the step's start (torchdiffeq reuses a last stage that is not there), and
    # torchdiffeq's gradients also differentiate its controller: both differ at the tolerance.
    same_steps = method in FSAL_METHODS
    assert rel_err(ours[0], theirs[0]) < (2e-6 if same_steps else 3e-5)
    out, y0_grad, t_grad, *param_grads = ours
    _, y0_grad_ref, t_grad_ref, *param_grads_ref = theirs
    for got, want in zip([y0_grad, *param_grads], [y0_grad_ref, *param_grads_ref]):
        assert rel_err(got, want) < 1e-4
    # The time gradient is the dense output's derivative, itself only accurate to about 5e-2
    # here (against float64) for bosh3, in either solver.
    assert rel_err(t_grad, t_grad_ref) < 2e-3


def test_dopri8_matches_torchdiffeq_in_float64():
    """dopri8's error weights cancel heavily: on a short first step its error estimate is
    rounding, and the two solvers' step choices part. From a first step where the estimate is
    resolved, in float64, they take the same steps."""
    torch.manual_seed(0)
    func, y0 = TimeMLP().double(), torch.randn(8, 3, dtype=torch.float64)
    options = dict(rtol=1e-10, atol=1e-10, method="dopri8", options={"first_step": 0.3})
    with rampde_fx.collect_stats() as solves:
        ours = rampde_fx.odeint(func, y0, T.double(), dtype=torch.float64, **options)
    theirs = torchdiffeq.odeint(func, y0, T.double(), **options)
    assert rel_err(ours, theirs) < 1e-11
    assert solves[0].steps == 5


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "fehlberg2"])
def test_gradient_is_exact_for_the_accepted_steps(method):
    """In float64, the discrete adjoint (recomputing each step from its checkpoint) equals
    autograd through the very same forward steps (checkpoint='stages'), for every input."""
    torch.manual_seed(1)
    func, y0 = TimeMLP().double(), torch.randn(6, 3, dtype=torch.float64)
    t = torch.tensor([0.2, 0.9, 1.5], dtype=torch.float64)

    def solve(checkpoint):
        return lambda f, y, tt: rampde_fx.odeint(f, y, tt, rtol=1e-6, atol=1e-7, method=method,
                                                 dtype=torch.float64, checkpoint=checkpoint)

    adjoint, autograd = solve_and_grad(solve("steps"), func, y0, t), \
        solve_and_grad(solve("stages"), func, y0, t)
    for got, want in zip(adjoint, autograd):
        assert rel_err(got, want) < 1e-12
    assert adjoint[2].abs().min() > 0  # every output time, and the start, has a gradient


def test_tuple_state_backwards_in_time_matches_torchdiffeq():
    torch.manual_seed(0)
    func = Hamiltonian()
    q, p = torch.randn(5, 2), torch.randn(5, 2)
    t = torch.tensor([1.0, 0.4, -0.5])
    options = dict(rtol=1e-6, atol=1e-7, method="dopri5")
    ours = rampde_fx.odeint(func, (q, p), t, dtype=torch.float32, **options)
    theirs = torchdiffeq.odeint(func, (q, p), t, **options)
    for got, want in zip(ours, theirs):
        assert rel_err(got, want) < 2e-6
    # Per-component tolerances and torchdiffeq's default tuple norm.
    ours = rampde_fx.odeint(func, (q, p), t, dtype=torch.float32, method="bosh3",
                            rtol=(1e-5, 1e-3), atol=(1e-6, 1e-4))
    theirs = torchdiffeq.odeint(func, (q, p), t, method="bosh3", rtol=(1e-5, 1e-3),
                                atol=(1e-6, 1e-4))
    for got, want in zip(ours, theirs):
        assert rel_err(got, want) < 2e-6


class Switch(nn.Module):
    """A velocity that jumps at t = 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, t, y):
        return self.net(y) * torch.where(t < 0.5, 1.0, -2.0)


def test_jump_and_step_times_match_torchdiffeq():
    torch.manual_seed(0)
    func, y0 = Switch(), torch.randn(4, 3)
    t = torch.tensor([0.0, 1.0])
    options = dict(rtol=1e-6, atol=1e-7, method="dopri5",
                   options={"jump_t": torch.tensor([0.5]), "step_t": torch.tensor([0.25])})
    with rampde_fx.collect_stats() as solves:
        ours = rampde_fx.odeint(func, y0, t, dtype=torch.float32, **options)
    theirs = torchdiffeq.odeint(func, y0, t, **options)
    assert rel_err(ours, theirs) < 2e-6
    without_jump = torchdiffeq.odeint(func, y0, t, rtol=1e-6, atol=1e-7, method="dopri5")
    assert rel_err(without_jump, theirs) > 1e-6  # the jump is resolved differently without
    # A jump costs one more evaluation, just after it.
    stats = solves[0]
    assert stats.nfe_forward == 2 + 6 * (stats.steps + stats.rejected_steps) + 1


def errors_against_float64(func, y0, t, dtype, **options):
    """Relative errors of the outputs and the gradients (y0, t, parameters) of a solve in
    ``dtype``, and of the same solve in the float32 mode (which carries the method's own
    error at the tolerance), against a float64 solve far tighter than any tolerance tested.
    A solve that warns of its tolerance fails."""
    reference = float64_reference(func, y0, t)

    def errors(velocity_dtype):
        got = solve_and_grad(lambda f, y, tt: rampde_fx.odeint(f, y, tt, dtype=velocity_dtype,
                                                               **options), func, y0, t)
        return [rel_err(value, want) for value, want in zip(got, reference)]

    with warnings.catch_warnings():
        warnings.simplefilter("error", rampde_fx.ToleranceWarning)
        return errors(dtype), errors(torch.float32)


@pytest.mark.parametrize("dtype, unit_roundoff, rtol", [(torch.bfloat16, U_BF16, 1e-3),
                                                        (torch.float16, U_FP16, 1e-4)])
def test_low_precision_against_float64(dtype, unit_roundoff, rtol):
    """The low-precision solve is as accurate as the float32 mode at the same tolerance, up to a
    fraction of the dtype's unit roundoff for outputs and about one for gradients."""
    torch.manual_seed(0)
    low, high = errors_against_float64(TimeMLP(dim=4, width=32), torch.randn(16, 4), T, dtype,
                                       rtol=rtol, atol=rtol)
    assert low[0] < high[0] + unit_roundoff / 4
    for got, floor in zip(low[1:], high[1:]):
        assert got < floor + 2 * unit_roundoff


class Decay(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, t, y):
        return self.net(y) - 0.5 * y


def test_float16_solves_where_torchdiffeq_underflows():
    """A state of magnitude 10 with rtol=1e-3: torchdiffeq's float16 norm overflows."""
    torch.manual_seed(0)
    func, y0 = Decay(), 10 + torch.randn(16, 4)
    t = torch.tensor([0.0, 0.5, 1.0])
    with pytest.raises(AssertionError, match="underflow in dt"):
        torchdiffeq.odeint(copy.deepcopy(func).half(), y0.half(), t, rtol=1e-3, atol=1e-3)
    low, high = errors_against_float64(func, y0, t, torch.float16, rtol=1e-3, atol=1e-3)
    assert low[0] < high[0] + U_FP16 / 4
    # The state of magnitude 10 is rounded to float16 at every evaluation, and the first
    # layer's gradients sum its products over the batch: 0.9 to 1.4 unit roundoffs above the
    # float32 mode's as the rounding varies, hence 3.
    for got, floor in zip(low[1:], high[1:]):
        assert got < floor + 3 * U_FP16
    # Even a float16 state, as torchdiffeq was given, keeps its controller in float32; it has no
    # float32 accumulator, so its own rounding accumulates over the steps.
    half = rampde_fx.odeint(copy.deepcopy(func).half(), y0.half(), t, rtol=1e-3, atol=1e-3,
                            dtype=torch.float16)
    assert rel_err(half, float64_reference(func, y0, t)[0]) < 2.0**-6


@pytest.mark.parametrize("method", ["dopri5", "tsit5"])
def test_too_tight_tolerance_warns_once_and_finishes(method):
    torch.manual_seed(0)
    func, y0 = TimeMLP(dim=4, width=32), torch.randn(16, 4)
    reference = float64_reference(func, y0, T)
    debug.forget_tolerance_warnings()
    with pytest.warns(rampde_fx.ToleranceWarning, match=r"rtol=1e-10, atol=1e-10 ask for more "
                      r"than a torch.bfloat16 velocity resolves.*measured rounding noise"
                      r".*attainable") as caught:
        with rampde_fx.collect_stats() as solves:
            got = rampde_fx.odeint(func, y0, T, rtol=1e-10, atol=1e-10, method=method)
    stats = solves[0]
    assert 0 < stats.tolerance_limited_steps <= stats.steps < 200
    assert rel_err(got, reference[0]) < U_BF16 / 4
    # The attainable tolerance is the measured noise: about bfloat16's resolution of this
    # velocity's stages, not the unit roundoff times a safety factor.
    attainable = float(re.search(r"Tolerances of about rtol=([0-9.e+-]+)",
                                 str(caught[0].message)).group(1))
    assert 1e-10 < attainable < U_BF16 / 16
    with rampde_fx.collect_stats() as solves:  # float32 meets the tolerance itself
        rampde_fx.odeint(func, y0, T, rtol=1e-10, atol=1e-10, method=method,
                         dtype=torch.float32)
    # The floor, not the tolerance, sets the bfloat16 steps: about as many as float32 takes to
    # meet the tolerance (0.7 to 1.2 times, as the rounding varies); steps that chased it
    # through bfloat16's rounding would be orders of magnitude more. (tsit5's error weights,
    # sum |e_i| = 1.2 against dopri5's 0.11, put float32's own rounding above 1e-10: its
    # float32 solve takes 275 steps where float64 takes 23, and bfloat16 at the floor 23.)
    assert stats.steps < 2 * solves[0].steps and solves[0].tolerance_limited_steps == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per method, dtype and tolerances
        rampde_fx.odeint(func, y0, T, rtol=1e-10, atol=1e-10, method=method)


class Forced(nn.Module):
    """A velocity the default policy keeps in float32: a weight buffer modulated by the time,
    the state unread."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight", torch.linspace(0.5, 2.0, 8))

    def forward(self, t, y):
        return self.weight * torch.cos(3 * t)


def test_a_velocity_without_rounding_has_no_floor():
    """The floor is the rounding the low-precision velocity actually adds, measured: none here,
    so the tolerance is not relaxed and the bfloat16 solve is the float32 one (a floor modelled
    as the unit roundoff times |f| would relax it and lose accuracy)."""
    y0, t = torch.zeros(8), torch.linspace(0.0, 2.0, 5)
    with rampde_fx.collect_stats() as solves, warnings.catch_warnings():
        warnings.simplefilter("error", rampde_fx.ToleranceWarning)
        low = rampde_fx.odeint(Forced(), y0, t, rtol=1e-9, atol=1e-9)
        high = rampde_fx.odeint(Forced(), y0, t, rtol=1e-9, atol=1e-9, dtype=torch.float32)
    assert solves[0].tolerance_limited_steps == 0 and solves[0].steps == solves[1].steps
    exact = torch.linspace(0.5, 2.0, 8) * torch.sin(3 * t)[:, None] / 3
    assert rel_err(low, high) < 1e-6 and rel_err(low, exact) < 2e-6


class Linear(nn.Module):
    """torchdiffeq's LinearODE: y' = A y with A = U - U^T (a rotation), on a batch."""

    def __init__(self, dim: int = 10) -> None:
        super().__init__()
        u = 0.1 * torch.randn(dim, dim, generator=torch.Generator().manual_seed(0))
        self.A = nn.Parameter(u - u.T)

    def forward(self, t, y):
        return y @ self.A.T


class Sine(nn.Module):
    """torchdiffeq's SineODE, whose solutions are ``exact(t) + c t**2``."""

    def forward(self, t, y):
        return 2 * y / t + t**4 * torch.sin(2 * t) - t**2 + 4 * t**3

    @staticmethod
    def exact(t):
        return (-0.5 * t**4 * torch.cos(2 * t) + 0.5 * t**3 * torch.sin(2 * t)
                + 0.25 * t**2 * torch.cos(2 * t) - t**3 + 2 * t**4 + (math.pi - 0.25) * t**2)


class Cubic(nn.Module):
    """torchdiffeq's spiral: y' = y**3 A."""

    def __init__(self) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[-0.1, 2.0], [-2.0, -0.1]]))

    def forward(self, t, y):
        return y**3 @ self.A


def batch_problem(name):
    """A batch of 64 trajectories of a test problem: velocity, y0, t and the float64 solution."""
    generator = torch.Generator().manual_seed(1)
    if name == "linear":
        func, t = Linear(), torch.linspace(1.0, 8.0, 10, dtype=torch.float64)
        y0 = 1 + 0.5 * torch.randn(64, 10, generator=generator, dtype=torch.float64)
        exact = torch.stack([y0 @ torch.linalg.matrix_exp(func.A.detach().double() * (s - 1)).T
                             for s in t])
    elif name == "sine":
        func, t = Sine(), torch.linspace(1.0, 8.0, 10, dtype=torch.float64)
        c = 0.5 * torch.randn(64, generator=generator, dtype=torch.float64)
        y0, exact = Sine.exact(t[0]) + c, Sine.exact(t)[:, None] + c * t[:, None] ** 2
    else:
        func, t = Cubic(), torch.linspace(0.0, 5.0, 11, dtype=torch.float64)
        y0 = torch.tensor([1.0, 0.0], dtype=torch.float64) + 0.3 * torch.randn(
            64, 2, generator=generator, dtype=torch.float64)
        exact = torchdiffeq.odeint(copy.deepcopy(func).double(), y0, t, rtol=1e-12, atol=1e-12,
                                   method="dopri8")
    return func, y0.float(), t.float(), exact



def solve_quietly(func, y0, t, **options):
    with warnings.catch_warnings(), rampde_fx.collect_stats() as solves:
        warnings.simplefilter("ignore", rampde_fx.ToleranceWarning)
        return rampde_fx.odeint(func, y0, t, **options), solves[0]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "adaptive_heun"])
def test_bfloat16_error_does_not_grow_as_rtol_tightens(method):
    """Below bfloat16's measured floor a tighter rtol costs no accuracy: on each problem, the
    error at every rtol <= 1e-4 is within 5x of the best error at any looser rtol (a floor
    modelled as if the whole velocity were rounded gave adaptive_heun 30 times its best error
    at 1e-7), and the steps stay bounded."""
    for name in ("linear", "sine", "cubic"):
        func, y0, t, exact = batch_problem(name)
        errors, steps = [], []
        for rtol in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7):
            got, stats = solve_quietly(func, y0, t, rtol=rtol, atol=rtol, method=method)
            errors.append(rel_err(got, exact))
            steps.append(stats.steps)
        # At the floor the error is rounding, whose realisation the CPU's kernels and the
        # steps decide: from one rtol to the next it varies by up to 3x (bosh3 on the sine
        # problem), hence 5x.
        for i in range(2, len(errors)):
            assert errors[i] < 5 * min(errors[:i]), (name, errors)
        assert steps[-1] < 3 * steps[3], (name, steps)


class AcceptedSteps(nn.Module):
    """A velocity that records where its solve's accepted steps end."""

    def __init__(self, func: nn.Module) -> None:
        super().__init__()
        self.func = func
        self.ends: list[float] = []

    def forward(self, t, y):
        return self.func(t, y)

    def callback_accept_step(self, t0, y0, dt):
        self.ends.append(float(t0 + dt))


@pytest.mark.slow
def test_bfloat16_dopri5_at_default_tolerances_matches_rk4_for_its_evaluations():
    """At the default (unattainable) tolerances, dopri5 at the floor is about as accurate as
    bfloat16 rk4 given the same number of velocity evaluations, its measurements included:
    the truncation error of its steps (the float32 mode's error on the same steps) is far
    below the rounding, and its rounding is rk4's up to dopri5's weights and the spread of
    rounding realisations."""
    for name in ("linear", "sine", "cubic"):
        func, y0, t, exact = batch_problem(name)
        recorder = AcceptedSteps(func)
        got, stats = solve_quietly(recorder, y0, t)
        steps = round(stats.nfe_forward / 4)
        fixed = rampde_fx.odeint(func, y0, t, method="rk4",
                                 options={"step_size": float(t[-1] - t[0]) / steps})
        # Tolerances that no step misses, a first step and growth that reach past every step:
        # the steps land on the recorded ends.
        same, same_stats = solve_quietly(
            func, y0, t, dtype=torch.float32, rtol=1e30, atol=1e30,
            options={"step_t": torch.tensor(recorder.ends, dtype=torch.float64),
                     "first_step": float(t[-1] - t[0]), "ifactor": 1e6})
        assert (same_stats.steps, same_stats.rejected_steps) == (stats.steps, 0), name
        truncation, rounding = rel_err(same, exact), rel_err(fixed, exact)
        # Steps at the floor are capped where their noise-free error estimate is a fraction
        # of the measured rounding noise: their truncation stays well below the rounding
        # (measured: 1/2500 to 1/40 of rk4's error).
        assert truncation < rounding / 4, (name, truncation, rounding)
        # dopri5's weights round about twice as much as rk4 on the same evaluations (sum
        # |b_i| = 1.65 on 2/3 as many steps), and the realisations of both vary with the CPU's
        # kernels and the steps (measured: 1.0 to 4.7 times rk4's error), hence 8x.
        assert rel_err(got, exact) < truncation + 8 * rounding, (name, rel_err(got, exact),
                                                                 rounding)


def test_dopri8_with_a_float32_velocity_on_a_float64_state():
    """torchdiffeq's sine problem backwards in time at rtol=1e-12: the float32 velocity's floor
    is measured (the policy rounds only the state) and dopri8's steps at it are capped by the
    noise-free estimate, whose rounding dopri8's error weights amplify: within 10x of
    torchdiffeq in float64."""
    t = torch.linspace(8.0, 1.0, 10, dtype=torch.float64)
    exact = Sine.exact(t)
    options = dict(rtol=1e-12, atol=1e-12, method="dopri8")
    theirs = torchdiffeq.odeint(Sine(), exact[0], t, **options)
    ours, stats = solve_quietly(Sine(), exact[0], t, dtype=torch.float32, **options)
    assert stats.tolerance_limited_steps > 0
    assert rel_err(ours, exact) < 10 * rel_err(theirs, exact)


class Square(nn.Module):
    def forward(self, t, y):
        return y * y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_blow_up_raises_instead_of_stepping_forever(dtype):
    """y' = y**2, y(0) = 1 blows up at t = 1. torchdiffeq raises "underflow in dt"; so does
    rampde_fx in every dtype, where steps rounded to the time's resolution once kept it
    stepping one float64 ulp at a time, and float16 pinned at its largest value."""
    with pytest.raises(RuntimeError, match="underflow in dt|the solution overflows at t=0.99"):
        rampde_fx.odeint(Square(), torch.ones(4), torch.tensor([0.0, 2.0]), dtype=dtype)
    with pytest.raises(AssertionError, match="underflow in dt"):
        torchdiffeq.odeint(Square(), torch.ones(4), torch.tensor([0.0, 2.0]))


def test_a_float16_state_pinned_at_its_range_raises():
    """float16 tops out at 65504, far below where y' = y**2 from 300 blows up: the solution
    reaches the edge of the range, where longer steps overflow and shorter ones no longer
    change the state."""
    with pytest.raises(RuntimeError, match=r"the solution overflows at t=0\.0033.*max \|y\| = "
                                           r"655\d\d.*torch.float16"):
        rampde_fx.odeint(lambda t, y: y**2, torch.full((4,), 300.0), torch.tensor([0.0, 1.0]),
                         dtype=torch.float16)


def test_an_overflow_at_the_first_evaluation_names_the_velocity():
    with pytest.raises(FloatingPointError, match=r"velocity module Square is not finite at the "
                                                 r"start of the solve \(t=0\) in torch.float16"):
        rampde_fx.odeint(Square(), torch.full((4,), 300.0), torch.tensor([0.0, 1.0]),
                         dtype=torch.float16)


def test_stats_count_accepted_rejected_and_evaluations():
    torch.manual_seed(0)
    func, y0 = TimeMLP(), torch.randn(8, 3)
    with rampde_fx.collect_stats() as solves:
        out = rampde_fx.odeint(func, y0.requires_grad_(), T, rtol=1e-7, atol=1e-8,
                               options={"first_step": 1.5}, dtype=torch.float32)
        out.sum().backward()
    stats = solves[0]
    assert stats.method == "dopri5" and stats.rejected_steps > 0
    # f(t0, y0), then six new stages per attempt (first same as last); the backward pass
    # recomputes each accepted step, seven stages from its checkpoint.
    assert stats.nfe_forward == 1 + 6 * (stats.steps + stats.rejected_steps)
    assert stats.nfe_backward == 7 * stats.steps


def test_one_tuple_state_matches_torchdiffeq():
    torch.manual_seed(0)
    func = TimeMLP()

    def velocity(t, state):
        return (func(t, state[0]),)

    y0 = (torch.randn(8, 3),)
    for method, options in (("dopri5", None), ("rk4", {"step_size": 0.1})):
        ours = rampde_fx.odeint(velocity, y0, T, method=method, options=options,
                                dtype=torch.float32)
        theirs = torchdiffeq.odeint(velocity, y0, T, method=method, options=options)
        assert isinstance(ours, tuple) and len(ours) == 1
        assert rel_err(ours[0], theirs[0]) < 2e-6
    start = y0[0].clone().requires_grad_()
    rampde_fx.odeint(velocity, (start,), T)[0].square().sum().backward()
    assert torch.isfinite(start.grad).all() and start.grad.abs().sum() > 0


class Recording(nn.Module):
    """A velocity with torchdiffeq's step callbacks, which record what they receive."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TimeMLP()
        self.calls: list[tuple[str, float, float, torch.Tensor]] = []

    def forward(self, t, state):
        return self.net(t, state[0]), 0.5 * self.net(t, state[1])

    def record(self, kind, t0, y0, dt):
        assert isinstance(y0, tuple) and t0.dtype == dt.dtype
        self.calls.append((kind, t0.item(), dt.item(), y0[0].clone()))

    def callback_step(self, t0, y0, dt):
        self.record("step", t0, y0, dt)

    def callback_accept_step(self, t0, y0, dt):
        self.record("accept", t0, y0, dt)

    def callback_reject_step(self, t0, y0, dt):
        self.record("reject", t0, y0, dt)


@pytest.mark.parametrize("method, t", [("dopri5", T), ("dopri5", -T), ("rk4", T)])
def test_step_callbacks_are_called_as_torchdiffeq_calls_them(method, t):
    """Before every attempt and after every decision (a fixed grid: before every step, with
    torchdiffeq's warning for the others), with the user's time, the state in its structure
    and the step's size."""
    torch.manual_seed(0)
    func, y0 = Recording(), (torch.randn(8, 3), torch.randn(8, 3))
    options = {"first_step": 1.5} if method == "dopri5" else {"step_size": 0.4}
    runs = []
    for solve in (lambda **kw: rampde_fx.odeint(dtype=torch.float32, **kw), torchdiffeq.odeint):
        func.calls.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            solve(func=func, y0=y0, t=t, rtol=1e-6, atol=1e-7, method=method, options=options)
        assert [str(w.message) for w in caught
                if "does not support callbacks" in str(w.message)] != [] or method != "rk4"
        runs.append(list(func.calls))
    ours, theirs = runs
    assert [c[0] for c in ours] == [c[0] for c in theirs]
    assert "reject" in [c[0] for c in ours] or method == "rk4"
    # Their step sizes part by float32 rounding in the error ratios, which the controller
    # amplifies near ratio 1.
    for (_, t0, dt, y), (_, t0_ref, dt_ref, y_ref) in zip(ours, theirs):
        assert t0 == pytest.approx(t0_ref, rel=1e-3, abs=1e-9)
        assert dt == pytest.approx(dt_ref, rel=1e-3) and dt > 0
        assert rel_err(y, y_ref) < 1e-4


class AdjointCallbacks(TimeMLP):
    def callback_step_adjoint(self, t0, y0, dt):
        raise AssertionError("not called")


def test_adjoint_callbacks_are_not_called_and_say_so():
    func, y0 = AdjointCallbacks(), torch.randn(8, 3, requires_grad=True)
    with pytest.warns(UserWarning, match=r"does not call \['callback_step_adjoint'\]"):
        rampde_fx.odeint(func, y0, T).sum().backward()


class Logging(nn.Module):
    """Python side effects in forward: a module list and a closure list, and a read of the
    time's value (a graph per time value, each captured by running this code)."""

    def __init__(self, times: list[float]) -> None:
        super().__init__()
        self.net = nn.Linear(3, 3)
        self.history: list[torch.Tensor] = []
        self.log_time = times.append

    def forward(self, t, y):
        self.history.append(y)
        self.log_time(t.item())
        return self.net(y)


def test_capture_leaves_no_trace_in_user_state():
    """Capture runs the velocity's code on fake tensors: what it appends is undone (a graph
    does not repeat it), with a warning that names it."""
    times: list[float] = []
    func = Logging(times)
    with pytest.warns(rampde_fx.CaptureWarning, match=r"changes the contents of \['history'\]"):
        rampde_fx.odeint(func, torch.randn(4, 3), T, method="rk4", options={"step_size": 0.5})
    assert func.history == []
    # A bound method of the closure's list is not reached by name: it keeps the real times
    # that capture read, one per graph, and nothing fake.
    assert times and all(type(value) is float for value in times)


class Branching(nn.Module):
    """A velocity that cannot be a graph, recording its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3, 3)
        self.inputs: list[torch.Tensor] = []

    def forward(self, t, y):
        self.inputs.append(y)
        return self.net(y) if y.sum() > 0 else -self.net(y)


def test_a_failed_capture_leaves_no_trace_in_user_state():
    func = Branching()
    with pytest.warns(rampde_fx.CaptureWarning, match="could not capture"), \
            rampde_fx.collect_stats() as solves, torch.no_grad():
        rampde_fx.odeint(func, torch.ones(4, 3), T, method="rk4", options={"step_size": 0.5})
    # Only the solver's evaluations, on real tensors: nothing from the traced attempt, nor
    # from the evaluation that records what the eager fallback reads.
    assert len(func.inputs) == solves[0].nfe_forward
    assert all(type(x) is torch.Tensor for x in func.inputs)


class Undefined(nn.Module):
    """A velocity that reads the time's value and is undefined on the grid's times, which
    torchdiffeq's ``perturb`` keeps it from being evaluated at."""

    def forward(self, t, y):
        if t.item() in (0.0, 0.5, 1.0):
            raise ValueError(f"evaluated at t={t.item()}")
        return -y * (1.0 if t.item() < 0.5 else 2.0)


@pytest.mark.parametrize("t", [torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])])
def test_capture_evaluates_the_velocity_where_the_solver_does(t):
    """With perturb=True the solver's first evaluation is just after t0, and so is capture's
    (a capture at t0 itself would fail, and fall back with a CaptureWarning)."""
    y0 = torch.randn(4, 3)
    options = dict(method="rk4", options={"step_size": 0.5, "perturb": True})
    ours = rampde_fx.odeint(Undefined(), y0, t, dtype=torch.float32, **options)
    assert rel_err(ours, torchdiffeq.odeint(Undefined(), y0, t, **options)) < 1e-6


class AdaptiveBlock(nn.Module):
    """The ODE-Net block as written for torchdiffeq's default solver."""

    def __init__(self, channels: int = 4, tol: float = 1e-3) -> None:
        super().__init__()
        self.tol = tol
        self.downsample = nn.Conv2d(1, channels, 3, stride=2, padding=1)
        self.odefunc = ODENetFunc(channels)
        self.integration_time = torch.tensor([0.0, 1.0])
        self.head = nn.Linear(channels, 3)

    def forward(self, x):
        self.integration_time = self.integration_time.type_as(x)
        out = torchdiffeq.odeint(self.odefunc, self.downsample(x), self.integration_time,
                                 rtol=self.tol, atol=self.tol)
        return self.head(out[1].mean(dim=(2, 3)))


def test_convert_odenet_with_default_method():
    torch.manual_seed(0)
    model, x = AdaptiveBlock(), torch.randn(2, 1, 8, 8)

    def outputs_and_grads(m, inputs):
        out = m(inputs)
        return [out, *torch.autograd.grad(weighted_loss(out), list(m.parameters()))]

    original = outputs_and_grads(model, x)
    single = outputs_and_grads(rampde_fx.convert(model, dtype=torch.float32), x)
    for got, want in zip(single, original):
        assert rel_err(got, want) < 2e-4  # torchdiffeq also differentiates its controller
    converted = rampde_fx.convert(model)
    low = outputs_and_grads(converted, x)
    # Against a tight float64 solve, bfloat16 is as accurate as the float32 mode (which
    # carries the method's error at rtol=1e-3) up to about its unit roundoff.
    exact = copy.deepcopy(model).double()
    exact.tol = 1e-10
    reference = outputs_and_grads(exact, x.double())
    for got, floor, want in zip(low, single, reference):
        assert rel_err(got, want) < rel_err(floor, want) + 2 * U_BF16
    assert re.search(r"last solve: dopri5, \d+ steps accepted, 0 rejected, 0 at the bfloat16 "
                     r"rounding floor", rampde_fx.explain(converted))


def test_adaptive_solve_compiles_as_one_graph(cheap_steps):
    torch.manual_seed(0)
    model, x = AdaptiveBlock(), torch.randn(2, 1, 8, 8)
    converted = rampde_fx.convert(model)
    explanation = torch._dynamo.explain(converted)(x)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)
    compiled_model = torch.compile(converted, fullgraph=True, backend="aot_eager")

    def outputs_and_grads(m):
        out = m(x)
        return [out, *torch.autograd.grad(weighted_loss(out), list(m.parameters()))]

    for got, want in zip(outputs_and_grads(compiled_model), outputs_and_grads(converted)):
        assert rel_err(got, want) < 2.0**-8
