"""bf16 and fp16 solves against float64 references; dynamic adjoint scaling."""
from __future__ import annotations

import copy

import pytest
import torch
import torchdiffeq
from torch import nn

import rampde_fx
from models import rel_err

U_BF16 = 2.0 ** -8   # unit roundoff
U_FP16 = 2.0 ** -11


class MLP(nn.Module):
    def __init__(self, dim: int = 8, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, width),
                                 nn.Tanh(), nn.Linear(width, dim))

    def forward(self, t, y):
        return self.net(y)


def _solve_and_grads(odeint, model, y0, dtype=None):
    y0 = y0.clone().requires_grad_()
    t = torch.linspace(0, 1, 3, dtype=y0.dtype, device=y0.device)
    kwargs = {} if dtype is None else {"dtype": dtype}
    out = odeint(model, y0, t, method="rk4", options={"step_size": 0.05}, **kwargs)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    return [out, *torch.autograd.grad((out * weights).sum(), [y0, *model.parameters()])]


@pytest.mark.parametrize("dtype, unit_roundoff", [(torch.bfloat16, U_BF16),
                                                  (torch.float16, U_FP16)])
def test_outputs_and_gradients_against_float64(dtype, unit_roundoff):
    """Each velocity evaluation carries a relative error of about one unit roundoff of
    ``dtype`` (rounded inputs, weights and layer outputs; matmuls accumulate in float32), and the
    float32 accumulator keeps these from compounding over the 20 steps: outputs and every
    gradient stay within 2 unit roundoffs of float64. The float32 mode, measured alongside, is
    at least 10x closer, which shows that the low precision really ran."""
    torch.manual_seed(0)
    model = MLP()
    y0 = torch.randn(64, 8)
    reference = _solve_and_grads(torchdiffeq.odeint, copy.deepcopy(model).double(), y0.double())
    low = _solve_and_grads(rampde_fx.odeint, model, y0, dtype)
    exact = _solve_and_grads(rampde_fx.odeint, model, y0, torch.float32)
    for got, fp32, want in zip(low, exact, reference):
        assert got.dtype == torch.float32  # the solution and gradients are float32
        assert rel_err(got, want) < 2 * unit_roundoff
        assert rel_err(fp32, want) < rel_err(got, want) / 10


class StiffDecay(nn.Module):
    """y' = w y with w = -14 (exact in fp16), as a 1x1 linear layer so it runs in fp16."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.lin.weight.fill_(-14.0)

    def forward(self, t, y):
        return self.lin(y)


def _stiff_case(scaling, output_index):
    """rk4 with h = 1/14 on y' = -14 y from y0 ~ 1e3: the adjoint spans six orders of magnitude
    (the step's amplification is R(-1) = 0.375, R the rk4 stability polynomial). Returns the
    gradients of y(t_k) for y0 and w, with their float64 closed forms of the *discrete* solve
    y(t_k) = R(hw)^k y0."""
    model = StiffDecay()
    y0 = torch.tensor([[2048.0], [1024.0], [1536.0], [512.0]], requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0])
    steps_to_output = (0, 7, 14)[output_index]
    with rampde_fx.collect_stats() as stats:
        out = rampde_fx.odeint(model, y0, t, method="rk4", options={"step_size": 1 / 14},
                               dtype=torch.float16, scaling=scaling)
        grad_y0, grad_w = torch.autograd.grad(out[output_index].sum(), [y0, model.lin.weight])
    z = torch.tensor(-1.0, dtype=torch.float64)
    amplification = 1 + z + z**2 / 2 + z**3 / 6 + z**4 / 24
    slope = 1 + z + z**2 / 2 + z**3 / 6
    k = steps_to_output
    want_y0 = torch.full((4, 1), amplification.item() ** k, dtype=torch.float64)
    want_w = y0.detach().double().sum() * k * amplification ** (k - 1) * slope / 14
    return (grad_y0, want_y0), (grad_w.view(()), want_w), stats[0]


def test_fp16_dynamic_scaling_on_stiff_decay():
    (gy, want_y), (gw, want_w), stats = _stiff_case("auto", output_index=2)
    assert stats.scaling
    assert rel_err(gy, want_y) < 2 * U_FP16
    assert rel_err(gw, want_w) < 2 * U_FP16
    # The scale followed the adjoint: large where it is small (early steps), and back down.
    exponents = stats.scale_log2
    assert exponents.shape == (14,)
    assert exponents[0] - exponents[-1] >= 10


def test_fp16_without_scaling_underflows_on_stiff_decay():
    """The same problem without scaling: the cotangents of the early steps (~1e-8) underflow in
    fp16, which shows that the scaled test above is not passing by construction."""
    (gy, want_y), _, stats = _stiff_case("none", output_index=2)
    assert not stats.scaling
    assert rel_err(gy, want_y) > 100 * U_FP16


def test_fp16_loss_that_ignores_the_final_state():
    """A loss on y(0.5) only: the last seven steps see a zero cotangent."""
    (gy, want_y), (gw, want_w), stats = _stiff_case("dynamic", output_index=1)
    assert rel_err(gy, want_y) < 2 * U_FP16
    assert rel_err(gw, want_w) < 2 * U_FP16
    assert torch.all(stats.scale_log2[7:] == 0)  # zero cotangent: scale 1, no crash


def test_zero_cotangent_gives_zero_gradients():
    model = MLP(dim=2, width=8)
    y0 = torch.randn(3, 2, requires_grad=True)
    out = rampde_fx.odeint(model, y0, torch.linspace(0, 1, 4), method="rk4",
                           dtype=torch.float16)
    grads = torch.autograd.grad((out * 0).sum(), [y0, *model.parameters()])
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_overflow_is_retried_with_a_smaller_scale():
    """A large batch makes the weight's gradient (a sum over the batch) overflow fp16 at the
    first step's default scale; the step is recomputed with smaller scales and the gradient
    still matches float64."""
    torch.manual_seed(1)
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(-0.5)
    velocity = lambda t, y: model(y)  # noqa: E731
    y0 = (torch.rand(4096, 1) * 64 + 64).requires_grad_()
    t = torch.tensor([0.0, 1.0])
    with rampde_fx.collect_stats() as stats:
        out = rampde_fx.odeint(velocity, y0, t, method="euler", options={"step_size": 0.25},
                               dtype=torch.float16)
        grads = torch.autograd.grad(out[-1].sum(), [y0, model.weight])
    assert stats[0].scale_retries > 0
    weight64 = model.weight.detach().double().requires_grad_()
    y64 = y0.detach().double().requires_grad_()
    ref = torchdiffeq.odeint(lambda t, y: y @ weight64.T, y64, t.double(), method="euler",
                             options={"step_size": 0.25})
    want = torch.autograd.grad(ref[-1].sum(), [y64, weight64])
    for got, expected in zip(grads, want):
        assert torch.isfinite(got).all()
        assert rel_err(got, expected) < 2 * U_FP16


def test_parameters_stay_float32_masters():
    model = MLP(dim=2, width=8)
    before = {name: p for name, p in model.named_parameters()}
    y0 = torch.randn(3, 2, requires_grad=True)
    out = rampde_fx.odeint(model, y0, torch.linspace(0, 1, 3), method="rk4",
                           dtype=torch.float16)
    out.sum().backward()
    for name, p in model.named_parameters():
        assert p is before[name]
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32


def test_growth_beyond_the_headroom_reruns_the_sweep():
    """The velocity's gain jumps 1024x at t = 0.5, more than the scale's headroom: that step
    overflows, and the sweep is re-run with a lower target. The bound is 10 unit roundoffs: the
    single scale must fit the batch-summed weight gradient, ~1e6 times the state's cotangent,
    into fp16, which leaves the state's cotangent near fp16's subnormal range."""
    torch.manual_seed(2)
    w = torch.full((1, 1), -1 / 4096, requires_grad=True)
    y0 = (torch.rand(256, 1) * 32 + 32).requires_grad_()
    t = torch.tensor([0.0, 1.0])

    def velocity(w):
        return lambda t, y: (y @ w.T) * torch.where(t < 0.5, 1024.0, 1.0)

    with rampde_fx.collect_stats() as stats:
        out = rampde_fx.odeint(velocity(w), y0, t, method="euler", options={"step_size": 0.125},
                               dtype=torch.float16)
        grads = torch.autograd.grad(out[-1].sum(), [y0, w])
    assert stats[0].backward_sweeps > 1
    w64 = w.detach().double().requires_grad_()
    y64 = y0.detach().double().requires_grad_()
    ref = torchdiffeq.odeint(velocity(w64), y64, t.double(), method="euler",
                             options={"step_size": 0.125})
    for got, want in zip(grads, torch.autograd.grad(ref[-1].sum(), [y64, w64])):
        assert rel_err(got, want) < 10 * U_FP16


def test_stage_checkpoints_trade_memory_for_recomputation():
    """checkpoint='stages' differentiates the bf16 forward itself: float32 mode still matches
    torchdiffeq, bf16 stays as close to float64 as the default, no step is recomputed, and
    the saved bytes lie between the default's and torchdiffeq's float32 activations."""
    from rampde_fx.tools.memory import saved_tensor_bytes

    torch.manual_seed(0)
    model = MLP()
    y0 = torch.randn(64, 8)
    reference = _solve_and_grads(torchdiffeq.odeint, copy.deepcopy(model).double(), y0.double())

    def stages(m, y, t, **kwargs):
        return rampde_fx.odeint(m, y, t, checkpoint="stages", **kwargs)

    exact = _solve_and_grads(stages, model, y0, torch.float32)
    fp32 = _solve_and_grads(torchdiffeq.odeint, model, y0)
    with rampde_fx.collect_stats() as stats:
        low = _solve_and_grads(stages, model, y0, torch.bfloat16)
    assert stats[0].nfe_backward == 0
    for got, want, fp32_got, fp32_want in zip(low, reference, exact, fp32):
        assert rel_err(got, want) < 2 * U_BF16
        assert rel_err(fp32_got, fp32_want) < 2e-6

    y = y0.clone().requires_grad_()
    t = torch.linspace(0, 1, 3)
    options = {"step_size": 0.05}
    by_mode = {mode: saved_tensor_bytes(lambda: rampde_fx.odeint(
        model, y, t, method="rk4", options=options, checkpoint=mode))
        for mode in ("steps", "stages")}
    full = saved_tensor_bytes(lambda: torchdiffeq.odeint(model, y, t, method="rk4",
                                                         options=options))
    assert by_mode["steps"] < by_mode["stages"] < full


def test_stage_checkpoints_refuse_dynamic_scaling():
    with pytest.raises(ValueError, match=r"checkpoint='stages' has no per-step adjoint scaling"):
        rampde_fx.odeint(MLP(), torch.randn(2, 8), torch.linspace(0, 1, 3), method="rk4",
                         dtype=torch.float16, checkpoint="stages")
