"""dtype=float32 reproduces torchdiffeq (outputs and every gradient); float64 mode matches
independent float64 references to roundoff."""
from __future__ import annotations

import pytest
import torch
import torchdiffeq

import rampde_fx
from models import Hamiltonian, TimeMLP, rel_err

TORCHDIFFEQ_METHODS = ["euler", "midpoint", "heun2", "heun3", "rk4"]
# float32 roundoff accumulated over ~10 steps and the different summation order of the adjoint.
FP32_TOL = 2e-6


def grads(out, inputs, cotangent):
    # Both solves may share a closure tensor's graph: keep it for the second one.
    outs = out if isinstance(out, tuple) else (out,)
    return torch.autograd.grad(outs, inputs, cotangent, retain_graph=True)


def assert_same_solve(func, y0, t, params, rtol=FP32_TOL, **kwargs):
    ref = torchdiffeq.odeint(func, y0, t, **kwargs)
    out = rampde_fx.odeint(func, y0, t, dtype=torch.float32, **kwargs)
    refs = ref if isinstance(ref, tuple) else (ref,)
    outs = out if isinstance(out, tuple) else (out,)
    inputs = [*(y0 if isinstance(y0, tuple) else (y0,)), t, *params]
    cotangent = [torch.randn_like(r) for r in refs]
    for got, want in zip((*outs, *grads(out, inputs, cotangent)),
                         (*refs, *grads(ref, inputs, cotangent))):
        assert got.dtype == want.dtype
        assert rel_err(got, want) < rtol


@pytest.mark.parametrize("interp", ["linear", "cubic"])
@pytest.mark.parametrize("method", TORCHDIFFEQ_METHODS)
def test_matches_torchdiffeq_with_outputs_between_grid_points(method, interp):
    torch.manual_seed(0)
    func = TimeMLP()
    y0 = torch.randn(5, 3, requires_grad=True)
    t = torch.tensor([0.0, 0.35, 0.8, 1.0], requires_grad=True)
    assert_same_solve(func, y0, t, list(func.parameters()), method=method,
                      options={"step_size": 0.1, "interp": interp})


@pytest.mark.parametrize("method", ["midpoint", "rk4"])
def test_tuple_state_backwards_in_time(method):
    torch.manual_seed(1)
    func = Hamiltonian()
    q = torch.randn(4, 2, requires_grad=True)
    p = torch.randn(4, 2, requires_grad=True)
    t = torch.tensor([1.0, 0.6, 0.0], requires_grad=True)
    assert_same_solve(func, (q, p), t, list(func.parameters()), method=method,
                      options={"step_size": 0.15})


def test_grid_is_t_with_perturb():
    torch.manual_seed(2)
    func = TimeMLP()
    y0 = torch.randn(3, 3, requires_grad=True)
    t = torch.linspace(0.0, 1.0, 9).requires_grad_()
    assert_same_solve(func, y0, t, list(func.parameters()), method="rk4",
                      options={"perturb": True})


def test_grid_constructor_and_decreasing_t():
    torch.manual_seed(3)
    func = TimeMLP()
    y0 = torch.randn(3, 3, requires_grad=True)
    t = torch.tensor([0.5, 0.2, -0.4], requires_grad=True)

    def grid(f, y, tt):
        inner = tt[0] + (tt[-1] - tt[0]) * torch.linspace(0.05, 0.85, 6, dtype=tt.dtype)
        return torch.cat([tt[:1], inner, tt[-1:]])

    assert_same_solve(func, y0, t, list(func.parameters()), method="heun3",
                      options={"grid_constructor": grid})


def test_closure_tensor_gets_its_gradient():
    torch.manual_seed(4)
    weight = torch.randn(3, 3, requires_grad=True)
    scale = weight.detach().abs().mean().requires_grad_()
    derived = scale * 2.0  # a non-leaf closure tensor: its gradient must flow to `scale`
    y0 = torch.randn(4, 3, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], requires_grad=True)
    # `scale`'s gradient is one scalar summed over every element of every stage: 5e-6.
    assert_same_solve(lambda tt, y: torch.tanh(y @ weight) * derived, y0, t, [weight, scale],
                      rtol=5e-6, method="rk4", options={"step_size": 0.125})


def _classic_rk4_step(f, t, y, h):
    k1 = f(t, y)
    k2 = f(t + h / 2, y + h / 2 * k1)
    k3 = f(t + h / 2, y + h / 2 * k2)
    k4 = f(t + h, y + h * k3)
    return y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def _ralston_step(f, t, y, h):
    k1 = f(t, y)
    k2 = f(t + 2 * h / 3, y + 2 * h / 3 * k1)
    return y + h * (k1 / 4 + 3 * k2 / 4)


@pytest.mark.parametrize("method, step", [("rk4_classic", _classic_rk4_step),
                                          ("ralston", _ralston_step)])
def test_methods_beyond_torchdiffeq_in_float64(method, step):
    torch.manual_seed(5)
    func = TimeMLP().double()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    h, y = 0.125, y0
    for n in range(8):
        y = step(func, torch.tensor(n * h, dtype=torch.float64), y, h)
    out = rampde_fx.odeint(func, y0, t, method=method, options={"step_size": h},
                           dtype=torch.float64)[-1]
    params = [y0, *func.parameters()]
    cotangent = torch.randn_like(y)
    assert rel_err(out, y) < 1e-13
    for got, want in zip(torch.autograd.grad(out, params, cotangent),
                         torch.autograd.grad(y, params, cotangent)):
        assert rel_err(got, want) < 1e-12


def test_time_gradient_of_batched_state_matches_central_differences():
    torch.manual_seed(6)
    func = TimeMLP().double()
    y0 = torch.randn(6, 3, dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 6, 3, dtype=torch.float64)
    opts = {"step_size": 0.1, "interp": "cubic"}

    def loss(times):
        out = rampde_fx.odeint(func, y0, times, method="rk4", options=opts, dtype=torch.float64)
        return (out * weights).sum()

    (grad,) = torch.autograd.grad(loss(t), t)
    eps = 1e-6
    for k in range(4):
        bump = torch.zeros(4, dtype=torch.float64)
        bump[k] = eps
        with torch.no_grad():
            central = (loss(t + bump) - loss(t - bump)) / (2 * eps)
        assert abs(grad[k].item() - central.item()) < 1e-6 * max(1.0, abs(central.item()))
    assert grad.abs().min() > 1e-3  # every time point matters: the test is not vacuous


def test_single_time_point_returns_y0():
    y0 = torch.randn(2, 3, requires_grad=True)
    out = rampde_fx.odeint(TimeMLP(), y0, torch.tensor([0.5]), method="rk4")
    assert out.shape == (1, 2, 3)
    assert torch.equal(out[0], y0)
    (g,) = torch.autograd.grad(out.sum(), y0)
    assert torch.equal(g, torch.ones_like(y0))
