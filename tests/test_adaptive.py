"""Adaptive methods: torchdiffeq's controller in float32, low-precision accuracy against
float64, the exact gradient of the accepted steps, the rounding floor, convert and compile."""
from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torchdiffeq
from torch import nn

import rampde_fx
from rampde_fx import adaptive, compiled
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


@pytest.mark.parametrize("method", ["dopri5", "fehlberg2"])
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
    for got, floor in zip(low[1:], high[1:]):
        assert got < floor + 2 * U_FP16
    # Even a float16 state, as torchdiffeq was given, keeps its controller in float32; it has no
    # float32 accumulator, so its own rounding accumulates over the steps.
    half = rampde_fx.odeint(copy.deepcopy(func).half(), y0.half(), t, rtol=1e-3, atol=1e-3,
                            dtype=torch.float16)
    assert rel_err(half, float64_reference(func, y0, t)[0]) < 2.0**-6


def test_too_tight_tolerance_warns_once_and_finishes():
    torch.manual_seed(0)
    func, y0 = TimeMLP(dim=4, width=32), torch.randn(16, 4)
    reference = float64_reference(func, y0, T)
    adaptive._warned_tolerances.clear()
    with pytest.warns(rampde_fx.ToleranceWarning, match=r"rtol=1e-10, atol=1e-10 ask for more "
                      r"than a torch.bfloat16 velocity resolves.*attainable"):
        with rampde_fx.collect_stats() as solves:
            got = rampde_fx.odeint(func, y0, T, rtol=1e-10, atol=1e-10)
    stats = solves[0]
    assert 0 < stats.tolerance_limited_steps <= stats.steps < 200
    assert rel_err(got, reference[0]) < U_BF16 / 4
    with rampde_fx.collect_stats() as solves:  # float32 needs more steps for this
        rampde_fx.odeint(func, y0, T, rtol=1e-10, atol=1e-10, dtype=torch.float32)
    assert solves[0].steps > stats.steps and solves[0].tolerance_limited_steps == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per method, dtype and tolerances
        rampde_fx.odeint(func, y0, T, rtol=1e-10, atol=1e-10)


def test_underestimated_rounding_floor_is_raised(monkeypatch):
    """With a modelled floor far too low, rejected steps whose error does not fall with the
    step size show it: the controller raises the floor instead of shrinking the steps to
    nothing (which is what happens when it may not)."""
    monkeypatch.setattr(adaptive, "FLOOR_ROUNDOFFS", 0.25)
    torch.manual_seed(0)
    func, y0 = TimeMLP(dim=4, width=32), torch.randn(16, 4)
    reference = float64_reference(func, y0, T)

    def solve():
        with rampde_fx.collect_stats() as solves:
            got = rampde_fx.odeint(func, y0, T, rtol=1e-12, atol=1e-12, method="bosh3",
                                   options={"max_num_steps": 2000})
        return got, solves[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rampde_fx.ToleranceWarning)
        got, stats = solve()
        monkeypatch.setattr(adaptive, "MAX_FLOOR_GAIN", 1.0)
        with pytest.raises(RuntimeError, match="max_num_steps=2000 exceeded"):
            solve()
    assert stats.steps + stats.rejected_steps < 200
    assert rel_err(got, reference[0]) < U_BF16


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


def test_adaptive_solve_compiles_as_one_graph(monkeypatch):
    monkeypatch.setattr(compiled, "step_backend", "aot_eager")
    torch._dynamo.reset()
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
    torch._dynamo.reset()
