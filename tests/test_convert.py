"""rampde_fx.convert on whole models: float32 exactness, bf16 accuracy, sharing, messages."""
from __future__ import annotations

import copy

import pytest
import torch
import torchdiffeq
from torch import nn

import rampde_fx
from field_models import (AdjointODE, CNFModel, DiscreteTwin, HamiltonianModel, MLPODE,
                          ODEBlock, ODENetClassifier, MLPFunc)
from models import rel_err

U_BF16 = 2.0 ** -8


def outputs_and_grads(model, inputs):
    inputs = [x.clone().requires_grad_() for x in inputs]
    out = model(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outs)
    return [*outs, *torch.autograd.grad(loss, [*inputs, *model.parameters()])]


FAMILIES = {
    "odenet_classifier": (ODENetClassifier, lambda: [torch.randn(4, 1, 8, 8)]),
    "hamiltonian_qp": (HamiltonianModel, lambda: [torch.randn(5, 2), torch.randn(5, 2)]),
    "cnf_exact_trace": (CNFModel, lambda: [torch.randn(6, 2)]),
    "mlp_odeint_adjoint": (AdjointODE, lambda: [torch.randn(5, 4)]),
}
# The CNF's velocity differentiates itself with torch.autograd.grad: it runs eagerly, warned.
EAGER_VELOCITY = {"cnf_exact_trace"}


def run_converted(name, converted, inputs):
    if name in EAGER_VELOCITY:
        with pytest.warns(rampde_fx.CaptureWarning,
                          match=r"could not capture velocity module ExactTraceCNF"):
            return outputs_and_grads(converted, inputs)
    return outputs_and_grads(converted, inputs)


def family(name):
    """A model of the family, its inputs, and a copy whose gradient is the discrete one
    (odeint_adjoint's continuous adjoint is replaced by its torchdiffeq.odeint twin)."""
    torch.manual_seed(0)
    make, inputs = FAMILIES[name]
    model = make()
    reference = DiscreteTwin() if name == "mlp_odeint_adjoint" else copy.deepcopy(model)
    reference.load_state_dict(model.state_dict())
    return model, inputs(), reference


@pytest.mark.parametrize("name", FAMILIES)
def test_float32_conversion_reproduces_the_model(name):
    model, x, reference = family(name)
    got = run_converted(name, rampde_fx.convert(model, dtype=torch.float32), x)
    for g, w in zip(got, outputs_and_grads(reference, x)):
        assert rel_err(g, w) < 2e-6


@pytest.mark.parametrize("name", FAMILIES)
def test_bfloat16_conversion_against_float64(name):
    """Bound 4 unit roundoffs of bf16: the solve alone stays within 2 (test_low_precision); the
    rest of the model (a head after the solve, the CNF's divergence through autocast) adds its
    own amplification of the solve's error. Measured: at most 2.2 unit roundoffs."""
    model, x, reference = family(name)
    want = outputs_and_grads(reference.double(), [v.double() for v in x])
    converted = rampde_fx.convert(model)
    got = run_converted(name, converted, x)
    errors = [rel_err(g, w) for g, w in zip(got, want)]
    assert max(errors) < 4 * U_BF16
    assert max(errors) > 1e-5  # bf16 error, not float32's: the low precision ran


class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = ODEBlock(MLPFunc())
        self.second = ODEBlock(MLPFunc())

    def forward(self, x):
        return self.second(self.first(x))


def test_parameters_are_shared_and_state_dicts_interchange():
    model = MLPODE()
    converted = rampde_fx.convert(model)
    assert [id(p) for p in converted.parameters()] == [id(p) for p in model.parameters()]
    assert list(converted.state_dict()) == list(model.state_dict())
    before = model.head.weight.detach().clone()
    optimizer = torch.optim.SGD(converted.parameters(), lr=0.1)
    converted(torch.randn(5, 3)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(model.head.weight, before)  # training one trains both
    fresh = MLPODE()
    fresh.load_state_dict(converted.state_dict())
    rampde_fx.convert(fresh).load_state_dict(model.state_dict())


def test_original_model_is_untouched():
    model = MLPODE()
    snapshot = dict(vars(model.block))
    x = torch.randn(5, 3)
    expected = model(x)
    converted = rampde_fx.convert(model)
    converted(x)
    assert type(model.block.integration_time) is torch.Tensor  # no proxy left behind
    assert dict(vars(model.block)).keys() == snapshot.keys()
    assert not any(name.startswith("rampde_solve") for name, _ in model.named_modules())
    assert torch.equal(model(x), expected)


def test_filter_fn_chooses_the_solves():
    model = TwoBlocks()
    seen = []

    def only_second(module, name):
        seen.append((type(module).__name__, name))
        return name == "second"

    converted = rampde_fx.convert(model, filter_fn=only_second)
    assert seen == [("ODEBlock", "first"), ("ODEBlock", "second")]
    sites = converted._rampde_conversion.sites
    assert [site.qualname for site in sites] == ["second"]
    assert "torchdiffeq__impl_odeint_odeint(first_odefunc" in converted.code or \
        "odeint(first_odefunc" in converted.code


class Untraceable(nn.Module):
    """Python control flow on a tensor value around an ODE block."""

    def __init__(self) -> None:
        super().__init__()
        self.block = ODEBlock(MLPFunc())

    def forward(self, x):
        if x.sum() > 0:
            return self.block(x)
        return self.block(-x)


def test_untraceable_model_converts_its_ode_submodules():
    torch.manual_seed(0)
    model = Untraceable()
    with pytest.warns(rampde_fx.CaptureWarning,
                      match=r"Untraceable at '<root>' could not be traced \(TraceError"):
        converted = rampde_fx.convert(model, dtype=torch.float32)
    assert type(converted) is Untraceable and converted.block is not model.block
    x = torch.randn(5, 4)
    for got, want in zip(outputs_and_grads(converted, [x]), outputs_and_grads(model, [x])):
        assert rel_err(got, want) < 2e-6


class UntraceableSolve(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.func = MLPFunc()

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return torchdiffeq.odeint(self.func, x, torch.tensor([0.0, 1.0]), method="rk4")[-1]


@pytest.mark.parametrize("model, match", [
    (UntraceableSolve(), r"UntraceableSolve at '<root>' calls an ODE solver in its forward, "
                         r"which torch.fx cannot trace \(TraceError"),
])
def test_unconvertible_models_are_named(model, match):
    with pytest.raises(rampde_fx.ConversionError, match=match):
        rampde_fx.convert(model)


class DefaultMethod(nn.Module):
    def __init__(self, **solve_kwargs) -> None:
        super().__init__()
        self.func = MLPFunc()
        self.solve_kwargs = solve_kwargs

    def forward(self, x):
        return torchdiffeq.odeint(self.func, x, torch.tensor([0.0, 1.0]), **self.solve_kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "implicit_adams"},
     r"torchdiffeq.odeint in DefaultMethod at '<root>' uses method='implicit_adams'"),
    ({"method": "rk4", "event_fn": lambda t, y: y.sum()}, r"uses event_fn"),
])
def test_unsupported_solves_fail_at_convert(kwargs, match):
    with pytest.raises(rampde_fx.ConversionError, match=match):
        rampde_fx.convert(DefaultMethod(**kwargs))


def test_converting_twice_is_refused():
    converted = rampde_fx.convert(MLPODE())
    with pytest.raises(rampde_fx.ConversionError, match=r"was already converted"):
        rampde_fx.convert(converted)


def test_model_without_solves_is_returned_with_a_warning():
    model = nn.Linear(2, 2)
    with pytest.warns(rampde_fx.CaptureWarning, match=r"found no call of .*in Linear"):
        assert rampde_fx.convert(model) is model


class Counting(MLPFunc):
    def __init__(self) -> None:
        super().__init__()
        self.nfe = 0

    def forward(self, t, y):
        self.nfe += 1
        return super().forward(t, y)


def test_nfe_counter_is_warned_once():
    model = MLPODE()
    model.block.odefunc = Counting()
    converted = rampde_fx.convert(model)
    with pytest.warns(rampde_fx.CaptureWarning, match=r"Counting assigns \['nfe'\]"):
        converted(torch.randn(2, 3))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted(torch.randn(2, 3))  # cached: no second warning
    assert model.block.odefunc.nfe == 0


class AlreadyMixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.func = MLPFunc()

    def forward(self, x):
        return rampde_fx.odeint(self.func, x, torch.tensor([0.0, 1.0]), method="rk4",
                                dtype=torch.float16)[-1]


def test_rampde_odeint_calls_take_the_conversion_dtype():
    model = AlreadyMixed()
    converted = rampde_fx.convert(model, dtype=torch.float32)
    (site,) = converted._rampde_conversion.sites
    assert site.source == "rampde_fx.odeint" and site.dropped == ("dtype",)
    x = torch.randn(3, 4)
    exact = torchdiffeq.odeint(model.func, x, torch.tensor([0.0, 1.0]), method="rk4")[-1]
    assert rel_err(converted(x), exact) < 1e-6


class MethodVelocity(nn.Module):
    """The velocity is a bound method of the model, integrated over t given as an input."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def dynamics(self, t, y):
        return torch.tanh(self.lin(y)) * t

    def forward(self, x, t):
        return torchdiffeq.odeint(self.dynamics, x, t, method="heun3",
                                  options={"step_size": 0.2})


def test_bound_method_velocity_and_time_input():
    torch.manual_seed(0)
    model = MethodVelocity()
    converted = rampde_fx.convert(model, dtype=torch.float32)
    (site,) = converted._rampde_conversion.sites
    assert site.velocity == "MethodVelocity.dynamics"
    x, t = torch.randn(3, 4), torch.tensor([0.0, 0.3, 1.0])
    for got, want in zip(outputs_and_grads(converted, [x, t]), outputs_and_grads(model, [x, t])):
        assert rel_err(got, want) < 2e-6
