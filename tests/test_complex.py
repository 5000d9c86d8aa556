"""Complex states, as torchdiffeq solves them: the solver's arithmetic in the state's complex
dtype, real times given to the velocity, real-valued ops of the velocity in low precision and
complex ones in their own dtype, checkpoints as low-precision pairs of parts; gradients for
complex y0 and complex parameters."""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torchdiffeq
from torch import nn

import rampde_fx
from models import rel_err
from rampde_fx.tools.memory import saved_tensor_bytes

U_BF16 = 2.0 ** -8
T = torch.tensor([0.0, 0.4, 1.0])
SOLVES = {
    "rk4": {"method": "rk4", "options": {"step_size": 0.05}},
    "explicit_adams": {"method": "explicit_adams", "options": {"step_size": 0.05,
                                                               "max_order": 6}},
    "dopri5": {"rtol": 1e-5, "atol": 1e-6},
}


class ComplexField(nn.Module):
    """A real MLP on the state's real and imaginary parts, plus a complex linear map."""

    def __init__(self, dim: int = 3, width: int = 32) -> None:
        super().__init__()
        self.inner = nn.Linear(2 * dim, width)
        self.outer = nn.Linear(width, 2 * dim)
        self.coupling = nn.Parameter(0.3 * torch.randn(dim, dim, dtype=torch.complex64))

    def forward(self, t, y):
        assert not t.is_complex()  # the velocity gets real times, as torchdiffeq gives them
        parts = torch.view_as_real(y).flatten(-2)
        mixed = self.outer(torch.tanh(self.inner(parts))).unflatten(-1, (-1, 2))
        return torch.view_as_complex(mixed.contiguous()) * torch.cos(t) + y @ self.coupling


def widened(model: nn.Module) -> nn.Module:
    """``model`` in float64 and complex128."""
    model = copy.deepcopy(model).double()
    for p in model.parameters():
        if p.is_complex():
            p.data = p.data.to(torch.complex128)
    return model


def solve_and_grad(odeint, func, y0, **kwargs):
    """The solution, and the gradients of a real loss of it for y0 and the parameters."""
    y0 = y0.detach().requires_grad_()
    out = odeint(func, y0, T.to(y0.real.dtype), **kwargs)
    weights = torch.linspace(-1, 2, out.numel(), dtype=out.real.dtype).view_as(out)
    loss = (out.real * weights).sum() + (out.imag * weights.flip(0)).sum() \
        + out.abs().square().sum()
    return [out, *torch.autograd.grad(loss, [y0, *func.parameters()])]


@pytest.mark.parametrize("solve", list(SOLVES))
def test_float32_mode_matches_torchdiffeq(solve):
    """Fixed grids: torchdiffeq's solution and gradients to float32 roundoff. dopri5: to its
    tolerance (torchdiffeq's gradients also differentiate its step-size controller)."""
    torch.manual_seed(0)
    func = ComplexField()
    y0 = torch.randn(4, 3, dtype=torch.complex64)
    ours = solve_and_grad(rampde_fx.odeint, func, y0, dtype=torch.float32, **SOLVES[solve])
    theirs = solve_and_grad(torchdiffeq.odeint, func, y0, **SOLVES[solve])
    outputs, gradients = (1e-5, 1e-4) if solve == "dopri5" else (1e-6, 1e-6)
    assert ours[0].dtype == torch.complex64
    assert rel_err(ours[0], theirs[0]) < outputs
    for got, want in zip(ours[1:], theirs[1:]):
        assert got.dtype == want.dtype
        assert rel_err(got, want) < gradients


@pytest.mark.parametrize("solve", ["rk4", "explicit_adams"])
def test_complex128_mode_is_torchdiffeq(solve):
    torch.manual_seed(1)
    func = widened(ComplexField())
    y0 = torch.randn(4, 3, dtype=torch.complex128)
    ours = solve_and_grad(rampde_fx.odeint, func, y0, dtype=torch.float64, **SOLVES[solve])
    theirs = solve_and_grad(torchdiffeq.odeint, func, y0, **SOLVES[solve])
    for got, want in zip(ours, theirs):
        assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize("solve", ["rk4", "dopri5"])
def test_bfloat16_against_complex128(solve):
    """The MLP runs in bf16 (its inputs, the state's parts, rounded to it); the complex map
    and the state stay complex64. Measured: outputs 0.2u, gradients 0.8u; bounds u/2 and 4u."""
    torch.manual_seed(2)
    func = ComplexField()
    y0 = torch.randn(16, 3, dtype=torch.complex64)
    kwargs = SOLVES[solve] if solve == "rk4" else {"rtol": 1e-3, "atol": 1e-4}
    low = solve_and_grad(rampde_fx.odeint, func, y0, dtype=torch.bfloat16, **kwargs)
    exact = solve_and_grad(torchdiffeq.odeint, widened(func), y0.to(torch.complex128),
                           **({"rtol": 1e-10, "atol": 1e-10} if solve == "dopri5" else kwargs))
    assert rel_err(low[0], exact[0]) < U_BF16 / 2
    for got, want in zip(low[1:], exact[1:]):
        assert rel_err(got, want) < 4 * U_BF16


def test_tuple_state_of_complex_and_real_components():
    """Each component keeps its dtype (torchdiffeq makes the real one complex, with a zero
    imaginary part: its flattened state has one dtype)."""
    torch.manual_seed(3)
    w = torch.randn(3, 3, requires_grad=True)

    def func(t, state):
        z, x = state
        return 1j * z + torch.tanh(x.real @ w), (z.abs() - x.real) * 0.5

    z0, x0 = torch.randn(2, 3, dtype=torch.complex64), torch.randn(2, 3)
    results = []
    for odeint, kwargs in ((rampde_fx.odeint, {"dtype": torch.float32}), (torchdiffeq.odeint, {})):
        leaves = [z0.clone().requires_grad_(), x0.clone().requires_grad_()]
        z, x = odeint(func, tuple(leaves), T, method="rk4", options={"step_size": 0.1}, **kwargs)
        loss = z.abs().square().sum() + x.real.sum()
        results.append([z, x.real, *torch.autograd.grad(loss, [*leaves, w])])
    assert results[0][1].dtype == torch.float32
    for got, want in zip(*results):
        assert rel_err(got, want) < 1e-6


class ComplexModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.func = ComplexField()

    def forward(self, y0):
        return torchdiffeq.odeint(self.func, y0, T, method="rk4", options={"step_size": 0.1})[-1]


def test_explain_and_compile(cheap_steps):
    """explain says which nodes keep their complex dtype; a compiled converted model gives the
    eager result (bf16: within its rounding)."""
    torch.manual_seed(4)
    model = rampde_fx.convert(ComplexModel())
    y0 = torch.randn(4, 3, dtype=torch.complex64)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    eager_out, compiled_out = model(y0), compiled(y0)
    assert rel_err(compiled_out, eager_out) < U_BF16
    explanation = rampde_fx.explain(model)
    assert re.search(r"\n +addmm +bfloat16 ", explanation)
    assert "complex values keep their dtype" in explanation


def test_check_compares_complex_outputs():
    torch.manual_seed(5)
    report = rampde_fx.check(ComplexModel(), torch.randn(4, 3, dtype=torch.complex64),
                             repeats=1, verbose=False)
    measurements = {m.mode: m for m in report.scopes[0].measurements}
    assert measurements["float32"].output_error < 1e-6
    assert 1e-5 < measurements["bfloat16"].output_error < U_BF16


def test_checkpoints_keep_complex_states_as_low_precision_pairs():
    """In bf16 each step keeps the complex state's real and imaginary parts in bf16 (4 bytes
    per element, against complex64's 8; float32 mode keeps complex64), and a budget, which
    rounds its re-run states as they, gives the same gradients, bit for bit."""
    torch.manual_seed(6)
    func = ComplexField()
    y0 = torch.randn(8, 3, dtype=torch.complex64, requires_grad=True)
    steps = 20  # rk4 at step size 0.05 over T
    grid_and_times = (steps + 1 + len(T)) * 4
    for dtype, per_element in ((torch.bfloat16, 4), (torch.float32, 8)):
        kept = saved_tensor_bytes(lambda: rampde_fx.odeint(func, y0, T, dtype=dtype,
                                                           **SOLVES["rk4"]))
        assert kept - grid_and_times == steps * y0.numel() * per_element
    every, budget = (solve_and_grad(rampde_fx.odeint, func, y0, checkpoint=checkpoint,
                                    **SOLVES["rk4"])
                     for checkpoint in ("steps", rampde_fx.Budget(3)))
    for got, want in zip(budget, every):
        assert torch.equal(got, want)


class Spiral(nn.Module):
    def forward(self, t, y):
        return (1 + 1j) * y


def event_time_exact(y0: complex) -> float:
    """When Re(y0 exp((1 + i) t)) first reaches 1: found on a grid of 0.01, then bisected in
    float64."""
    def excess(t: float) -> float:
        return (y0 * complex(math.cos(t), math.sin(t))).real * math.exp(t) - 1
    high = 0.0
    while excess(high) < 0:
        high += 0.01
    low = high - 0.01
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if excess(middle) < 0 else (low, middle)
    return (low + high) / 2


@pytest.mark.parametrize("solve, time_error, gradient_error", [
    ({"method": "rk4", "options": {"step_size": 0.002}}, 1e-5, 1e-4),
    ({"rtol": 1e-10}, 1e-8, 1e-6)], ids=["rk4", "dopri5"])
def test_event_solve_of_a_complex_state(solve, time_error, gradient_error):
    """An event function of a complex state (its real part reaching 1): the event time and its
    gradient for y0 (autograd's convention: d/dRe + i d/dIm) against the exact ones, the
    gradient by central differences of the exact event time. (rk4's event time is bisected on
    its linear interpolant, second order in the step.)"""
    y0 = torch.tensor(0.3 + 0.1j, dtype=torch.complex128, requires_grad=True)
    event_t, _ = rampde_fx.odeint_event(Spiral(), y0, torch.tensor(0.0, dtype=torch.float64),
                                        event_fn=lambda t, y: y.real - 1, atol=1e-12,
                                        dtype=torch.float64, **solve)
    (grad,) = torch.autograd.grad(event_t, y0)
    h = 1e-6
    exact = complex((event_time_exact(0.3 + h + 0.1j) - event_time_exact(0.3 - h + 0.1j)) / (2 * h),
                    (event_time_exact(0.3 + 0.1j + h * 1j) - event_time_exact(0.3 + 0.1j - h * 1j))
                    / (2 * h))
    assert abs(event_t.item() - event_time_exact(0.3 + 0.1j)) < time_error
    assert abs(grad.item() - exact) < gradient_error * abs(exact)
