"""The compiled step kernels of solves under torch.compile: the backward step (recomputation,
vector-Jacobian product, fp16 scaling and gradient accumulation in one traced graph) against
float64 autograd, the steps that fall back to autograd beside them, and the small products
traced as fused arithmetic."""
from __future__ import annotations

import pytest
import torch
import torchdiffeq

import rampde_fx
from models import rel_err
from rampde_fx.passes.cpu import cpu_addmm, cpu_mm


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class Tiny(torch.nn.Module):
    """A launch-bound velocity: 2-16-2 tanh MLP with a time-dependent input scale."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(),
                                       torch.nn.Linear(16, 2))

    def forward(self, t, y):
        return self.net(y * (1 + 0.5 * t))


def solve_and_grads(solve, func, y0, t):
    """The solution, and the gradients of a weighted sum of it for y0, t and the parameters."""
    y0, t = y0.clone().requires_grad_(), t.clone().requires_grad_()
    out = solve(func, y0, t)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return [out, *torch.autograd.grad((out * weights).sum(), [y0, t, *func.parameters()])]


def reference(func, y0, t, method, options):
    func64 = Tiny().double()
    func64.load_state_dict(func.state_dict())
    return solve_and_grads(lambda f, y, tt: torchdiffeq.odeint(f, y, tt, method=method,
                                                               options=options),
                           func64, y0.double(), t.double())


def compiled_solve(dtype, method, options):
    return torch.compile(lambda f, y, tt: rampde_fx.odeint(f, y, tt, method=method,
                                                           options=options, dtype=dtype),
                         fullgraph=True, backend="aot_eager")


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 2e-6), (torch.bfloat16, 4 * 2.0 ** -8),
                                          (torch.float16, 4 * 2.0 ** -11)])
@pytest.mark.parametrize("interp", ["linear", "cubic"])
def test_kernel_steps_against_float64(dtype, bound, interp):
    """Outputs between grid points (their steps recompute under autograd) and at grid points
    (their steps run the backward kernel), gradients for y0, every output time and the
    parameters: within a few unit roundoffs of float64 (float32 mode: of the exact discrete
    gradient). Cubic interpolation reads the step's first stage, which the forward kernel
    then returns; linear interpolation reads none."""
    torch.manual_seed(0)
    func = Tiny()
    y0 = torch.randn(16, 2)
    t = torch.tensor([0.0, 0.35, 0.5, 1.0])
    options = {"step_size": 0.1, "interp": interp}
    got = solve_and_grads(compiled_solve(dtype, "rk4", options), func, y0, t)
    want = reference(func, y0, t, "rk4", options)
    for g, w in zip(got, want):
        assert rel_err(g, w) < bound


def test_backward_runs_no_autograd_engine_per_step(monkeypatch):
    """After the first call has traced its kernels, a compiled training step on a fixed grid
    never calls torch.autograd.grad inside the solve's backward."""
    torch.manual_seed(0)
    func = Tiny()
    solve = compiled_solve(torch.bfloat16, "rk4", {"step_size": 0.05})
    y0, t = torch.randn(16, 2), torch.tensor([0.0, 1.0])
    solve(func, y0, t)[-1].sum().backward()
    calls = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real_grad(*a, **k))
    solve(func, y0, t)[-1].sum().backward()
    assert calls == []


@pytest.mark.slow
def test_inductor_kernels_of_a_launch_bound_velocity_against_float64():
    """The inductor-compiled kernels, with the small products traced as fused arithmetic, in
    bf16 against float64 (adaptive too: its steps with outputs inside recompute)."""
    torch.manual_seed(0)
    func = Tiny()
    y0, t = torch.randn(16, 2), torch.tensor([0.0, 0.5, 1.0])
    for method, options in [("rk4", {"step_size": 0.05}), ("dopri5", None)]:
        solve = torch.compile(lambda f, y, tt: rampde_fx.odeint(
            f, y, tt, method=method, options=options, rtol=1e-4, atol=1e-4), fullgraph=True)
        got = solve_and_grads(solve, func, y0, t)
        want = reference(func, y0, t, method, options)
        for g, w in zip(got, want):
            assert rel_err(g, w) < 4 * 2.0 ** -8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_small_products_round_once(dtype):
    """A small product traced as fused arithmetic sums in float32 and rounds once, as a
    library matmul does: no further from float64 than torch.mm, and exact in float32 up to
    summation order."""
    torch.manual_seed(0)
    a, b, bias = torch.randn(16, 16), torch.randn(16, 2), torch.randn(2)
    exact = torch.addmm(bias.double(), a.double(), b.double())
    low = [x.to(dtype) for x in (bias, a, b)]
    inlined = cpu_addmm(*low)
    library = torch.addmm(*low)
    assert inlined.dtype == dtype
    assert rel_err(inlined, exact) <= rel_err(library, exact) * 1.25 + 1e-7
    assert rel_err(cpu_mm(low[1], low[2]), exact - bias.double()) < (
        2 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_larger_16bit_products_add_their_bias_in_float32(dtype):
    """Above SMALL_MATMUL a 16-bit addmm is a library mm with the bias added in float32 by its
    reader: the product is rounded once more than addmm rounds it, so within 1.5x of addmm's
    error against float64."""
    torch.manual_seed(0)
    a, b, bias = torch.randn(64, 128), torch.randn(128, 64), 10 * torch.randn(64)
    exact = torch.addmm(bias.double(), a.double(), b.double())
    low = [x.to(dtype) for x in (bias, a, b)]
    split = cpu_addmm(*low)
    assert split.dtype == dtype
    assert rel_err(split, exact) <= 1.5 * rel_err(torch.addmm(*low), exact)
