"""The Adams methods (explicit_adams, implicit_adams, fixed_adams): torchdiffeq's semantics
(rk4 start, order growing with the history, the corrector's convergence test and the dropped
history of a step that does not converge), the exact discrete adjoint in float64, float32 parity
with torchdiffeq, low precision against float64, converted models, checkpoint budgets,
refusals."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchdiffeq
from torch import nn
from torchdiffeq._impl import fixed_adams

import rampde_fx
from models import rel_err
from rampde_fx.engine.adams import bashforth, moulton
from rampde_fx.engine.schedule import fewest_recomputed_steps, fixed_grid_segments
from rampde_fx.tools.memory import saved_tensor_bytes

U_BF16, U_FP16 = 2.0 ** -8, 2.0 ** -11
T = torch.tensor([0.0, 0.3, 1.0])
# Option sets: the defaults (orders up to 11), cubic interpolation with perturbed grid points,
# a low max_order, and a corrector cut short at rtol 1e-7, so that steps do not converge and
# drop the oldest derivative (the order stays at 3).
OPTIONS = {
    "default": ({"step_size": 0.05}, 1e-3),
    "cubic-perturb": ({"step_size": 0.05, "interp": "cubic", "perturb": True}, 1e-3),
    "max_order=5": ({"step_size": 0.03, "max_order": 5}, 1e-3),
    "not-converging": ({"step_size": 0.07, "max_iters": 2}, 1e-7),
}
METHODS = ["explicit_adams", "implicit_adams"]


class Field(nn.Module):
    """A small time-dependent MLP velocity."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.inner = nn.Linear(3, width)
        self.outer = nn.Linear(width, 3)

    def forward(self, t, y):
        return self.outer(torch.tanh(self.inner(y))) * torch.cos(t)


def solve_and_grad(odeint, func, y0, t, method, options, rtol, **kwargs):
    """The solution and the gradients of a weighted loss with respect to y0, t and the
    velocity's parameters."""
    y0 = y0.detach().requires_grad_()
    t = t.detach().requires_grad_()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Functional iteration did not converge")
        out = odeint(func, y0, t, method=method, options=options, rtol=rtol, atol=rtol,
                     **kwargs)
    weights = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)
    loss = (out * weights).sum() + out.pow(2).sum()
    return [out, *torch.autograd.grad(loss, [y0, t, *func.parameters()])]


@pytest.mark.parametrize("order", range(1, 13))
def test_coefficients_are_torchdiffeqs(order):
    """Computed from the integrated Lagrange basis, equal to torchdiffeq's tables (whose
    first-order Moulton entry, 1/11, no step reads: correctors are of order 4 and up)."""
    pairs = [(bashforth(order), fixed_adams._BASHFORTH_DIVISOR[order])]
    pairs += [(moulton(order), fixed_adams._MOULTON_DIVISOR[order])] if order > 1 else []
    for ours, theirs in pairs:
        assert torch.allclose(torch.tensor(ours, dtype=torch.float64), theirs, rtol=1e-14,
                              atol=0)
    assert sum(bashforth(order)) == pytest.approx(1.0) == sum(moulton(order))


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reverse", [False, True])
def test_float64_mode_is_torchdiffeq(method, name, reverse):
    """With no low precision the solve is torchdiffeq's, operation for operation, and the
    discrete adjoint is the exact gradient of those steps: outputs, and gradients for y0, t and
    parameters, to float64 roundoff (explicit_adams's order-11 weights, up to 133, amplify it)."""
    torch.manual_seed(0)
    func = Field().double()
    y0 = torch.randn(5, 3, dtype=torch.float64)
    t = -T.double() if reverse else T.double()
    options, rtol = OPTIONS[name]
    ours = solve_and_grad(rampde_fx.odeint, func, y0, t, method, options, rtol,
                          dtype=torch.float64)
    theirs = solve_and_grad(torchdiffeq.odeint, func, y0, t, method, options, rtol)
    assert rel_err(ours[0], theirs[0]) < 1e-14
    for got, want in zip(ours[1:], theirs[1:]):
        assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize("method", METHODS)
def test_tuple_state_and_evaluation_counts(method):
    """A tuple state in float64 mode equals torchdiffeq's; the forward evaluates the velocity
    4 times in each of the two rk4 steps, then once per Adams step (and once per corrector
    iteration), and the backward pass as often."""
    torch.manual_seed(1)
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)

    def func(t, state):
        q, p = state
        return p, -torch.tanh(q @ w)

    q0, p0 = (torch.randn(4, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    options = {"step_size": 0.1}
    with rampde_fx.collect_stats() as stats:
        ours = rampde_fx.odeint(func, (q0, p0), T.double(), method=method, options=options,
                                rtol=1e-4, atol=1e-6, dtype=torch.float64)
    theirs = torchdiffeq.odeint(func, (q0, p0), T.double(), method=method, options=options,
                                rtol=1e-4, atol=1e-6)
    grads = [torch.autograd.grad(sum(s.sum() for s in solution), [q0, p0, w])
             for solution in (ours, theirs)]
    for got, want in zip([*ours, *grads[0]], [*theirs, *grads[1]]):
        assert rel_err(got, want) < 1e-12
    (solve,) = stats
    assert solve.steps == 10
    if method == "implicit_adams":  # 1 to max_iters (4) corrector evaluations per Adams step
        assert 8 + 8 + 8 <= solve.nfe_forward <= 8 + 8 + 4 * 8
    else:
        assert solve.nfe_forward == 8 + 8
    assert solve.nfe_backward == solve.nfe_forward


@pytest.mark.parametrize("method", METHODS)
def test_float32_mode_matches_torchdiffeq(method):
    """float32 mode sums each step as torchdiffeq does: the same outputs, to float32
    roundoff. Its gradients (the discrete adjoint) round differently from torchdiffeq's
    autograd; both are as close to float64 (explicit_adams's order-11 weights amplify float32
    rounding to about 2e-6)."""
    torch.manual_seed(2)
    func = Field()
    y0 = torch.randn(5, 3)
    options, rtol = OPTIONS["default"]
    ours = solve_and_grad(rampde_fx.odeint, func, y0, T, method, options, rtol,
                          dtype=torch.float32)
    theirs = solve_and_grad(torchdiffeq.odeint, func, y0, T, method, options, rtol)
    exact = solve_and_grad(torchdiffeq.odeint, copy.deepcopy(func).double(), y0.double(),
                           T.double(), method, options, rtol)
    assert rel_err(ours[0], theirs[0]) < 1e-6
    for got, want, reference in zip(ours[1:], theirs[1:], exact[1:]):
        assert rel_err(got, reference) < 2 * rel_err(want, reference) + 1e-6


@pytest.mark.parametrize("max_order", [4, 8])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype, unit_roundoff", [(torch.bfloat16, U_BF16),
                                                  (torch.float16, U_FP16)])
def test_low_precision_against_float64(method, max_order, dtype, unit_roundoff):
    """50 steps with a rounded velocity. Each step's increment is off by up to u times the sum
    of its weights' magnitudes S (3.7 for order 3, 43 for order 7) times h |f|, and the float32
    accumulator keeps the state from compounding it: outputs measured at most 0.15u over six
    seeds in bf16, bound u/2. The adjoint passes the derivatives' cotangents back through the
    same weights, and a step's vector-Jacobian product rounds them: gradients measured up to
    0.15 u S (order 7), bound u S. (explicit_adams at its default max_order=12 steps with order
    11, S = 591: bf16 outputs measured 7 to 23 times and gradients 30 times less accurate than
    with max_order=8.)"""
    torch.manual_seed(3)
    func = Field(32)
    y0 = torch.randn(16, 3)
    options = {"step_size": 0.02, "max_order": max_order}
    low = solve_and_grad(rampde_fx.odeint, func, y0, T, method, options, 1e-3, dtype=dtype)
    exact = solve_and_grad(torchdiffeq.odeint, copy.deepcopy(func).double(), y0.double(),
                           T.double(), method, options, 1e-3)
    assert low[0].dtype == torch.float32
    assert rel_err(low[0], exact[0]) < unit_roundoff / 2
    weights = sum(map(abs, bashforth(max_order - 1)))
    for got, want in zip(low[1:], exact[1:]):
        assert rel_err(got, want) < unit_roundoff * weights


def test_second_derivatives_in_float64_mode_are_torchdiffeqs():
    """create_graph=True replays the solve under autograd from its first step, history
    included: a gradient penalty's gradient equals torchdiffeq's."""
    torch.manual_seed(4)
    func = Field().double()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    results = []
    for odeint, kwargs in ((rampde_fx.odeint, {"dtype": torch.float64}), (torchdiffeq.odeint, {})):
        out = odeint(func, y0, T.double(), method="implicit_adams",
                     options={"step_size": 0.1}, rtol=1e-4, atol=1e-6, **kwargs)
        (grad,) = torch.autograd.grad(out.pow(2).sum(), y0, create_graph=True)
        results.append(torch.autograd.grad(grad.pow(2).sum(), [y0, *func.parameters()]))
    for got, want in zip(*results):
        assert rel_err(got, want) < 1e-12


class AdamsModel(nn.Module):
    def __init__(self, method: str) -> None:
        super().__init__()
        self.func = Field()
        self.method = method

    def forward(self, y0):
        return torchdiffeq.odeint(self.func, y0, T, method=self.method, rtol=1e-3, atol=1e-4,
                                  options={"step_size": 0.05})[-1]


@pytest.mark.parametrize("method", [*METHODS, "fixed_adams"])
def test_converted_model_in_float32_is_the_original(method):
    torch.manual_seed(5)
    model = AdamsModel(method)
    y0 = torch.randn(6, 3)
    converted = rampde_fx.convert(model, dtype=torch.float32)
    results = []
    for candidate in (converted, model):
        out = candidate(y0)
        results.append([out, *torch.autograd.grad(out.pow(2).sum(), list(model.parameters()))])
    assert rel_err(results[0][0], results[1][0]) < 1e-6
    for got, want in zip(results[0][1:], results[1][1:]):
        assert rel_err(got, want) < 1e-5  # float32 rounding of the order-11 sums (see above)
    assert f"last solve: {method}, 20 steps" in rampde_fx.explain(converted)


@pytest.mark.parametrize("states", [1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", ["default", "not-converging"])
@pytest.mark.parametrize("method", METHODS)
def test_budget_gradients_equal_checkpoint_per_step(method, name, dtype, states):
    """A budget keeps each state with the earlier derivatives that the next steps read, and a
    re-run step repeats the forward's (its history, its corrector evaluations): the gradients
    are those of checkpoint='steps', bit for bit. Each re-run step costs its evaluations (one
    per Adams step and corrector iteration, four per rk4 step)."""
    torch.manual_seed(6)
    func = Field()
    y0 = torch.randn(5, 3)
    options, rtol = OPTIONS[name]
    results = []
    for checkpoint in ("steps", rampde_fx.Budget(states)):
        with rampde_fx.collect_stats() as stats:
            results.append(solve_and_grad(rampde_fx.odeint, func, y0, T, method, options, rtol,
                                          dtype=dtype, checkpoint=checkpoint))
        results[-1].append(stats[0])
    (*every, every_stats), (*budget, budget_stats) = results
    for got, want in zip(budget, every):
        assert torch.equal(got, want)
    extra = budget_stats.nfe_backward - every_stats.nfe_backward
    fewest = fewest_recomputed_steps(budget_stats.steps, states)
    most = 1 + options.get("max_iters", 4) if method == "implicit_adams" else 1
    assert fewest <= extra <= max(4, most) * fewest


@pytest.mark.parametrize("max_order", [4, 12])
def test_budget_bytes_kept(max_order):
    """A budget of n keeps at most n resume points of max_order - 1 states each (the state
    and the earlier derivatives the next steps read), in the state's dtype, and the grid."""
    func = Field()
    y0 = torch.randn(64, 3, requires_grad=True)
    steps, states = 200, 8
    kept = saved_tensor_bytes(lambda: rampde_fx.odeint(
        func, y0, T, method="explicit_adams", options={"step_size": 1 / steps,
                                                       "max_order": max_order},
        checkpoint=rampde_fx.Budget(states)))
    grid_and_times = (steps + 1 + len(T)) * 4
    assert kept - grid_and_times == len(fixed_grid_segments(steps, states)) * (
        max_order - 1) * y0.numel() * 4


def test_refusals_and_warnings():
    func, y0 = Field(), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"max_order'\] must be from 2 to 12"):
        rampde_fx.odeint(func, y0, T, method="implicit_adams", options={"max_order": 13})
    with pytest.raises(ValueError, match="Adams methods take .*'max_iters'"):
        rampde_fx.odeint(func, y0, T, method="fixed_adams", options={"dtype": 1})
    with pytest.warns(UserWarning, match="reduces to `rk4`"):
        rampde_fx.odeint(func, y0, T, method="explicit_adams", options={"max_order": 3})
    with pytest.warns(UserWarning, match="Functional iteration did not converge"):
        rampde_fx.odeint(func, y0, T, method="implicit_adams",
                         options={"step_size": 0.1, "max_iters": 1})
