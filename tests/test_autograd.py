"""A converted solve among the rest of autograd: tensor and module hooks, double backward,
torch.autograd.functional, torch.func transforms, adjoint_params, and gradients after an fp16
overflow; each against torchdiffeq or float64."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchdiffeq
from torch import nn

import rampde_fx
from models import rel_err

U_BF16 = 2.0 ** -8
STEPS = {"method": "rk4", "options": {"step_size": 0.125}}


class Field(nn.Module):
    def __init__(self, dim: int = 3, width: int = 8) -> None:
        super().__init__()
        self.inner = nn.Linear(dim, width)
        self.outer = nn.Linear(width, dim)

    def forward(self, t, y):
        return self.outer(torch.tanh(self.inner(y) * (1 + t)))


class Flow(nn.Module):
    """A model that solves in its forward, as torchdiffeq users write one."""

    def __init__(self, adjoint_params: str | None = None) -> None:
        super().__init__()
        self.field = Field()
        self.adjoint_params = adjoint_params

    def forward(self, y0, t):
        if self.adjoint_params is None:
            return torchdiffeq.odeint(self.field, y0, t, **STEPS)[-1]
        chosen = {"none": (), "outer": tuple(self.field.outer.parameters())}
        return torchdiffeq.odeint_adjoint(self.field, y0, t, **STEPS,
                                          adjoint_params=chosen[self.adjoint_params])[-1]


def _inputs(dtype=torch.float32):
    torch.manual_seed(0)
    field = Field().to(dtype)
    y0 = torch.randn(4, 3, dtype=dtype)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=dtype)
    return field, y0, t


def _solvers():
    return [("torchdiffeq", torchdiffeq.odeint, {}),
            ("rampde_fx", rampde_fx.odeint, {"dtype": torch.float32})]


def test_tensor_hooks_fire_once_with_the_total_gradient():
    """A hook on a parameter, on y0 and on t is called once per backward pass, on the total
    gradient, as with torchdiffeq: a hook that doubles gives twice the plain gradient."""
    results = {}
    for name, odeint, kwargs in _solvers():
        field, y0, t = _inputs()
        y0.requires_grad_()
        t.requires_grad_()
        calls = []
        for x in (field.inner.weight, y0, t):
            x.register_hook(lambda g, x=x: calls.append(x) or 2 * g)
        odeint(field, y0, t, **STEPS, **kwargs).square().sum().backward()
        assert len(calls) == 3, name
        results[name] = [field.inner.weight.grad, y0.grad, t.grad]
    for got, want in zip(results["rampde_fx"], results["torchdiffeq"]):
        assert rel_err(got, want) < 1e-5


def test_hooks_on_a_converted_model_fire_once():
    """Module hooks (full backward, forward) and parameter hooks on a converted model behave
    as on the original."""
    seen = {}
    for name, convert in (("original", lambda m: m),
                          ("converted", lambda m: rampde_fx.convert(m, dtype=torch.float32))):
        torch.manual_seed(0)
        model = Flow()
        calls = []
        model.field.outer.bias.register_hook(lambda g: calls.append("bias") or g * 3)
        converted = convert(model)
        converted.register_full_backward_hook(
            lambda module, grad_in, grad_out: calls.append(("module", grad_in[0].clone())))
        y0 = torch.randn(4, 3, requires_grad=True)
        converted(y0, torch.tensor([0.0, 1.0])).square().sum().backward()
        assert sorted(c if isinstance(c, str) else c[0] for c in calls) == ["bias", "module"]
        module_grad = next(c[1] for c in calls if not isinstance(c, str))
        seen[name] = (module_grad, model.field.outer.bias.grad, y0.grad)
    for got, want in zip(seen["converted"], seen["original"]):
        assert rel_err(got, want) < 1e-5


def _second_derivatives(odeint, field, y0, t, **kwargs):
    """d/dp of |dL/dy0|^2 for L = sum(y(t)^2), and of the Hessian-vector product of L."""
    y0 = y0.clone().requires_grad_()
    out = odeint(field, y0, t, **kwargs)
    grad, = torch.autograd.grad(out.square().sum(), y0, create_graph=True)
    return [grad, *torch.autograd.grad(grad.square().sum(), [y0, *field.parameters()])]


def test_double_backward_matches_torchdiffeq_in_float32():
    """create_graph=True gives torchdiffeq's second derivatives (gradient penalties), for y0
    and every parameter, where the plain backward pass would give none."""
    field, y0, t = _inputs()
    want = _second_derivatives(torchdiffeq.odeint, field, y0, t, **STEPS)
    got = _second_derivatives(rampde_fx.odeint, field, y0, t, **STEPS, dtype=torch.float32)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def test_double_backward_against_float64_finite_differences():
    """In float64 (no low precision anywhere) the second derivative d/dy0 <v, dL/dy0> equals
    central differences of the first derivative, which the discrete adjoint gives."""
    field, y0, t = _inputs(torch.float64)
    v = torch.randn_like(y0)

    def first(y):
        y = y.clone().requires_grad_()
        out = rampde_fx.odeint(field, y, t, **STEPS, dtype=torch.float64)
        return torch.autograd.grad(out.square().sum(), y)[0]

    y = y0.clone().requires_grad_()
    out = rampde_fx.odeint(field, y, t, **STEPS, dtype=torch.float64)
    grad, = torch.autograd.grad(out.square().sum(), y, create_graph=True)
    hvp, = torch.autograd.grad((grad * v).sum(), y)
    eps = 1e-5
    finite = (first(y0 + eps * v) - first(y0 - eps * v)) / (2 * eps)
    assert rel_err(hvp, finite) < 1e-7


def test_double_backward_in_bfloat16_is_within_the_bound():
    """bf16 second derivatives stay within a few unit roundoffs of float64's: the replay is
    the forward solve, whose stages carry one rounding each."""
    field, y0, t = _inputs()
    want = _second_derivatives(torchdiffeq.odeint, copy.deepcopy(field).double(), y0.double(),
                               t.double(), **STEPS)
    got = _second_derivatives(rampde_fx.odeint, field, y0, t, **STEPS, dtype=torch.bfloat16)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 4 * U_BF16


def test_recorded_first_derivatives_equal_the_adjoint_sweep():
    """For an adaptive solve too, the recorded gradient (create_graph=True) is the discrete
    adjoint's: both differentiate the steps the forward pass accepted."""
    field, y0, t = _inputs()
    params = list(field.parameters())
    grads = []
    for create_graph in (False, True):
        y = y0.clone().requires_grad_()
        out = rampde_fx.odeint(field, y, t, method="dopri5", rtol=1e-5, atol=1e-6,
                               dtype=torch.float32)
        grads.append(torch.autograd.grad(out.square().sum(), [y, *params],
                                         create_graph=create_graph))
    for plain, recorded in zip(*grads):
        assert recorded.requires_grad
        assert rel_err(recorded, plain) < 1e-5


@pytest.mark.parametrize("name", ["hvp", "hessian", "jacobian", "jvp"])
def test_autograd_functional_matches_torchdiffeq(name):
    field, y0, t = _inputs()
    y0 = y0[:1]
    v = torch.ones_like(y0)
    ops = {"hvp": lambda f: torch.autograd.functional.hvp(f, y0, v)[1],
           "hessian": lambda f: torch.autograd.functional.hessian(f, y0),
           "jacobian": lambda f: torch.autograd.functional.jacobian(f, y0),
           "jvp": lambda f: torch.autograd.functional.jvp(f, y0, v)[1]}
    scalar = name in ("hvp", "hessian")
    results = []
    for _, odeint, kwargs in _solvers():
        def solve(y, odeint=odeint, kwargs=kwargs):
            out = odeint(field, y, t, **STEPS, **kwargs)[-1]
            return out.square().sum() if scalar else out.flatten()
        results.append(ops[name](solve))
    assert rel_err(results[1], results[0]) < 1e-5


_TRANSFORMS = {
    "grad": (lambda f, y: torch.func.grad(f)(y), "torch.func.grad"),
    "vjp": (lambda f, y: torch.func.vjp(f, y)[1](torch.tensor(1.0)), "torch.func.grad, vjp"),
    "jacrev": (lambda f, y: torch.func.jacrev(f)(y), "torch.func.grad, vjp, jacrev"),
    "jacfwd": (lambda f, y: torch.func.jacfwd(f)(y), "torch.func.jvp or jacfwd"),
    "vmap": (lambda f, y: torch.func.vmap(f)(y), "torch.func.vmap"),
}


@pytest.mark.parametrize("transform", list(_TRANSFORMS))
def test_torch_func_transforms_are_refused_and_leave_no_trace(transform):
    """Each transform gets one error naming it, before anything is captured: the next plain
    solve of the same velocity and shapes is right (its first capture happened under the
    transform)."""
    apply, named = _TRANSFORMS[transform]
    field, y0, t = _inputs()
    model = rampde_fx.convert(Flow(), dtype=torch.float32)
    params = dict(model.named_parameters())

    def loss(y):
        return torch.func.functional_call(model, params, (y, t)).square().sum()

    with pytest.raises(NotImplementedError, match=named.replace(".", r"\.")):
        apply(loss, y0)
    with pytest.raises(NotImplementedError, match=named.split(",")[0].replace(".", r"\.")):
        apply(lambda y: rampde_fx.odeint(field, y, t, **STEPS).sum(), y0)
    original = Flow()
    original.load_state_dict(model.state_dict())
    assert rel_err(model(y0, t), original(y0, t)) < 1e-6
    assert rel_err(rampde_fx.odeint(field, y0, t, **STEPS, dtype=torch.float32),
                   torchdiffeq.odeint(field, y0, t, **STEPS)) < 1e-6


@pytest.mark.parametrize("chosen", ["none", "outer"])
def test_adjoint_params_choose_which_tensors_get_gradients(chosen):
    """odeint_adjoint's adjoint_params in a converted model: only those tensors get
    gradients, as with torchdiffeq; y0 gets its gradient either way."""
    grads = {}
    for name in ("original", "converted"):
        torch.manual_seed(0)
        model = Flow(adjoint_params=chosen)
        solve = model if name == "original" else rampde_fx.convert(model, dtype=torch.float32)
        y0 = torch.randn(4, 3, requires_grad=True)
        solve(y0, torch.tensor([0.0, 1.0])).square().sum().backward()
        grads[name] = [y0.grad] + [p.grad for p in model.parameters()]
    for got, want in zip(grads["converted"], grads["original"]):
        assert (got is None) == (want is None)
        if want is not None:  # the continuous adjoint against the discrete one
            assert rel_err(got, want) < 1e-4


def test_adjoint_solve_settings_are_warned_once():
    """adjoint_rtol and adjoint_options configure an adjoint ODE solve that the discrete
    adjoint does not make: one warning per site says so."""

    class Model(Flow):
        def forward(self, y0, t):
            return torchdiffeq.odeint_adjoint(self.field, y0, t, **STEPS, adjoint_rtol=1e-3,
                                              adjoint_options={"norm": "seminorm"})

    converted = rampde_fx.convert(Model(), dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="adjoint_rtol, adjoint_options, which has no effect"):
        converted(torch.randn(2, 3), torch.tensor([0.0, 1.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted(torch.randn(2, 3), torch.tensor([0.0, 1.0]))


class Stiff(nn.Module):
    """y' = w y with w = -1000: rk4 with h = 0.01 amplifies by 291 per step, which overflows
    float16 within two steps."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[-1000.0]]))

    def forward(self, t, y):
        return y @ self.w


def test_gradients_after_an_fp16_overflow_are_nan_and_warned():
    """No finite, wrong gradient after an overflow: every gradient of the solve is nan, and a
    warning says why."""
    field = Stiff()
    y0 = torch.ones(1, 1, requires_grad=True)
    out = rampde_fx.odeint(field, y0, torch.tensor([0.0, 0.05]), method="rk4",
                           options={"step_size": 0.01}, dtype=torch.float16)
    with pytest.warns(RuntimeWarning, match="every gradient of this solve is nan"):
        out.sum().backward()
    assert torch.isnan(y0.grad).all() and torch.isnan(field.w.grad).all()


@pytest.mark.slow
def test_compiled_hooks_adjoint_params_and_double_backward(cheap_steps):
    """Under torch.compile: a parameter hook fires once, adjoint_params are honoured, and a
    double backward pass raises torch's own error instead of returning zeros."""
    grads = {}
    for name in ("original", "compiled"):
        torch.manual_seed(0)
        model = Flow(adjoint_params="outer")
        calls = []
        model.field.outer.weight.register_hook(lambda g: calls.append(1))
        solve = model if name == "original" else torch.compile(
            rampde_fx.convert(model, dtype=torch.float32), backend="aot_eager", fullgraph=True)
        y0 = torch.randn(4, 3, requires_grad=True)
        solve(y0, torch.tensor([0.0, 1.0])).square().sum().backward()
        if name == "compiled":  # torchdiffeq's continuous adjoint calls it once per step
            assert len(calls) == 1
        grads[name] = [y0.grad] + [p.grad for p in model.parameters()]
    for got, want in zip(grads["compiled"], grads["original"]):
        assert (got is None) == (want is None)
        if want is not None:
            assert rel_err(got, want) < 1e-4
    compiled = torch.compile(rampde_fx.convert(Flow(), dtype=torch.float32), backend="aot_eager")
    y0 = torch.randn(4, 3, requires_grad=True)
    grad, = torch.autograd.grad(compiled(y0, torch.tensor([0.0, 1.0])).square().sum(), y0,
                                create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()
