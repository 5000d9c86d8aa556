"""Clear errors for bad input; the warned eager fallback; capture side effects."""
from __future__ import annotations

import copy

import pytest
import torch
import torchdiffeq
from torch import nn

import rampde_fx
from models import TimeMLP, rel_err

Y0 = torch.randn(2, 3)
T = torch.linspace(0, 1, 3)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"method": "scipy_solver"}, NotImplementedError,
     r"'scipy_solver' is not supported.*'dopri5'.*'rk4'"),
    ({"method": "rk45"}, ValueError, r"unknown method 'rk45'"),
    ({"method": "rk4", "event_fn": lambda t, y: y}, ValueError,
     r"with event_fn, t must hold two times"),
    ({"method": "rk4", "options": {"atol": 1.0}}, ValueError,
     r"does not take options \['atol'\]; fixed-grid methods take"),
    ({"method": "dopri5", "options": {"step_size": 0.1}}, ValueError,
     r"'dopri5' does not take options \['step_size'\]; adaptive methods take"),
    ({"method": "dopri5", "rtol": -1.0}, ValueError,
     r"rtol must be a non-negative finite number, got -1"),
    ({"method": "dopri5", "atol": (1e-3, 1e-3)}, ValueError, r"atol has 2 entries for a state "
                                                               r"of 1 components"),
    ({"method": "dopri5", "options": {"min_step": 0.5, "max_step": 0.1}}, ValueError,
     r"exceeds options\['max_step'\]"),
    ({"method": "dopri5", "options": {"max_num_steps": 2}}, RuntimeError,
     r"max_num_steps=2 exceeded"),
    ({"method": "rk4", "options": {"step_size": 0.1, "grid_constructor": lambda f, y, t: t}},
     ValueError, r"mutually exclusive"),
    ({"method": "rk4", "options": {"step_size": -0.1}}, ValueError, r"positive finite"),
    ({"method": "rk4", "options": {"interp": "quadratic"}}, ValueError, r"'linear' or 'cubic'"),
    ({"method": "rk4", "options": {"grid_constructor": lambda f, y, t: t[:-1]}}, ValueError,
     r"must start at t\[0\] and end at t\[-1\]"),
    ({"method": "rk4", "dtype": torch.int8}, ValueError, r"dtype must be one of"),
    ({"method": "rk4", "scaling": "static"}, ValueError, r"scaling must be one of"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        rampde_fx.odeint(TimeMLP(), Y0, T, **kwargs)


@pytest.mark.parametrize("y0, t, error, match", [
    (torch.ones(2, 3, dtype=torch.int64), T, ValueError, r"y0 must be a floating point .*int64"),
    (torch.tensor([1.0, float("nan")]), T, ValueError, r"y0 contains inf or nan"),
    ((torch.ones(2), torch.tensor([float("inf")])), T, ValueError, r"y0\[1\] contains inf"),
    (torch.ones(64, 3).index_fill_(0, torch.tensor([40]), float("nan")), T, ValueError,
     r"y0 contains inf or nan"),
    (torch.tensor([1.0, -float("inf")], dtype=torch.bfloat16), T, ValueError,
     r"y0 contains inf or nan"),
    ([torch.ones(2)], T, TypeError, r"y0 must be a tensor or a non-empty tuple"),
    (Y0, torch.tensor([]), ValueError, r"t is empty"),
    (Y0, torch.tensor([0.0, 0.5, 0.2]), ValueError, r"strictly increasing or strictly decreasing"),
    (Y0, torch.tensor([0.0, 0.0]), ValueError, r"strictly increasing"),
    (Y0, torch.tensor([[0.0, 1.0]]), ValueError, r"t must be a 1-D tensor"),
    (Y0, torch.tensor([0, 1]), ValueError, r"t must be a floating point tensor"),
    (Y0, torch.tensor([0.0, float("inf")]), ValueError, r"t contains inf or nan"),
])
def test_bad_state_or_times(y0, t, error, match):
    with pytest.raises(error, match=match):
        rampde_fx.odeint(lambda t, y: y, y0, t, method="euler")


NAN = float("nan")


@pytest.mark.parametrize("options", [[("step_size", 0.1)], "step_size=0.1", ("step_size", 0.1)])
def test_options_must_be_a_dict(options):
    with pytest.raises(TypeError, match=r"options must be a dict .* got .*; pass a dict"):
        rampde_fx.odeint(TimeMLP(), Y0, T, method="rk4", options=options)


@pytest.mark.parametrize("method, options, error, match", [
    ("rk4", {"step_size": "0.1"}, TypeError,
     r"options\['step_size'\] must be a real number, got '0.1' \(str\)"),
    ("rk4", {"step_size": True}, TypeError, r"options\['step_size'\] .* got True \(bool\)"),
    ("rk4", {"step_size": torch.tensor([0.1, 0.2])}, TypeError,
     r"options\['step_size'\] .* got a tensor of shape \(2,\)"),
    ("rk4", {"step_size": NAN}, ValueError, r"options\['step_size'\] must be a positive finite"),
    ("rk4", {"grid_constructor": 0.1}, TypeError,
     r"options\['grid_constructor'\] must be callable"),
    ("dopri5", {"max_num_steps": "10"}, TypeError,
     r"options\['max_num_steps'\] must be a real number, got '10' \(str\)"),
    ("dopri5", {"max_num_steps": True}, TypeError, r"options\['max_num_steps'\] .* \(bool\)"),
    ("dopri5", {"max_num_steps": 10.5}, ValueError,
     r"options\['max_num_steps'\] must be a positive whole number, got 10.5"),
    ("dopri5", {"max_num_steps": 0}, ValueError, r"options\['max_num_steps'\] must be a positive"),
    ("dopri5", {"first_step": -0.1}, ValueError, r"options\['first_step'\] must be a positive"),
    ("dopri5", {"safety": 0.0}, ValueError, r"options\['safety'\] must be a positive finite"),
    ("dopri5", {"ifactor": "10"}, TypeError, r"options\['ifactor'\] must be a real number"),
    ("dopri5", {"dfactor": NAN}, ValueError, r"options\['dfactor'\] must be a positive finite"),
    ("dopri5", {"min_step": -1e-3}, ValueError,
     r"options\['min_step'\] must be a non-negative finite number, got -0.001"),
    ("dopri5", {"max_step": 0.0}, ValueError, r"options\['max_step'\] must be a positive number"),
])
def test_numeric_options_must_be_numbers_in_range(method, options, error, match):
    with pytest.raises(error, match=match):
        rampde_fx.odeint(TimeMLP(), Y0, T, method=method, options=options)


@pytest.mark.parametrize("y0, kwargs, error, match", [
    (Y0, {"rtol": "1e-3"}, TypeError, r"rtol must be a real number, got '1e-3' \(str\)"),
    (Y0, {"atol": True}, TypeError, r"atol must be a real number, got True \(bool\)"),
    (Y0, {"atol": NAN}, ValueError, r"atol must be a non-negative finite number"),
    ((Y0, Y0), {"rtol": (1e-3, "1e-3")}, TypeError, r"rtol\[1\] must be a real number"),
    ((Y0, Y0), {"atol": torch.tensor([1e-6, -1e-6])}, ValueError,
     r"atol\[1\] must be a non-negative finite number"),
    (Y0, {"rtol": torch.full_like(Y0, 1e-3)}, NotImplementedError,
     r"rtol has a tensor of several elements: .* one tolerance per state component"),
])
def test_tolerances_must_be_numbers(y0, kwargs, error, match):
    with pytest.raises(error, match=match):
        rampde_fx.odeint(lambda t, y: y, y0, T, **kwargs)


@pytest.mark.parametrize("times, error, match", [
    ("0.5", TypeError, r"options\['step_t'\] must be a 1-D tensor or a sequence of times, got "
                       r"'0.5' \(str\)"),
    ([0.5, "0.7"], TypeError, r"options\['step_t'\]\[1\] must be a real number"),
    ([0.5, NAN], ValueError, r"options\['step_t'\]\[1\] must be a finite number, got nan"),
    (torch.tensor([[0.5]]), TypeError,
     r"options\['step_t'\] must be a 1-D tensor .* shape \(1, 1\)"),
    (torch.tensor([True]), TypeError, r"options\['step_t'\]\[0\] must be a real number"),
])
def test_step_times_must_be_finite_numbers(times, error, match):
    with pytest.raises(error, match=match):
        rampde_fx.odeint(TimeMLP(), Y0, T, options={"step_t": times})


@pytest.mark.parametrize("norm, error, match", [
    ("rms", TypeError, r"options\['norm'\] must be callable"),
    (lambda y: torch.tensor(NAN), ValueError,
     r"options\['norm'\] of a state of ones must be a finite number, got nan"),
    (lambda y: torch.tensor(float("inf")), ValueError,
     r"options\['norm'\] of a state of ones must be a finite number, got inf"),
    (lambda y: y.abs(), TypeError,
     r"options\['norm'\] of a state of ones must be a real number, got a tensor of shape"),
])
def test_norm_must_give_a_finite_number(norm, error, match):
    with pytest.raises(error, match=match):
        rampde_fx.odeint(TimeMLP(), Y0, T, options={"norm": norm})


@pytest.mark.parametrize("first_step", [None, 0.1])  # the initial step's norms, or a step's
def test_norm_giving_nan_for_a_finite_state_is_named(first_step):
    """Not the 'underflow in dt' that rejecting every step would end in."""
    def norm(y):  # finite on ones only
        return torch.where((y == 1).all(), 1.0, NAN)

    with pytest.raises(ValueError, match=r"options\['norm'\] returned nan for finite error "
                                         r"ratios"):
        rampde_fx.odeint(TimeMLP(), Y0, T, dtype=torch.float32,
                         options={"norm": norm, "first_step": first_step})


def test_numbers_as_torchdiffeq_takes_them():
    """One-element tensors for numbers, whole floats for max_num_steps, per-component
    tolerances of a tuple state as a sequence or a 1-D tensor, norms of Python floats."""
    func, state = TimeMLP(), (Y0, 2 * Y0)

    def pair(t, y):
        return func(t, y[0]), func(t, y[1])

    def solve(fn, y0, **kwargs):
        return rampde_fx.odeint(fn, y0, T, dtype=torch.float32, **kwargs)

    fixed = solve(func, Y0, method="rk4", options={"step_size": 0.25})
    assert torch.equal(solve(func, Y0, method="rk4", options={"step_size": torch.tensor(0.25)}),
                       fixed)
    plain = solve(pair, state, rtol=(1e-4, 1e-6), atol=1e-6,
                  options={"max_num_steps": 100, "step_t": [0.25]})
    for got in (solve(pair, state, rtol=torch.tensor([1e-4, 1e-6]), atol=torch.tensor(1e-6),
                      options={"max_num_steps": 100.0, "step_t": torch.tensor(0.25)}),
                solve(pair, state, rtol=[1e-4, 1e-6], atol=1e-6,
                      options={"norm": lambda y: float(max(c.pow(2).mean().sqrt() for c in y)),
                               "max_num_steps": 1e2, "step_t": (0.25,)})):
        assert all(torch.equal(a, b) for a, b in zip(got, plain))
    want = torchdiffeq.odeint(pair, state, T, rtol=(1e-4, 1e-6), atol=1e-6)
    assert all(rel_err(a, b) < 1e-4 for a, b in zip(plain, want))


@pytest.mark.parametrize("on_meta", ["y0", "t", "both"])
def test_meta_tensors_are_refused_clearly(on_meta):
    y0 = Y0.to("meta") if on_meta in ("y0", "both") else Y0
    t = T.to("meta") if on_meta in ("t", "both") else T
    name = "t" if on_meta == "t" else "y0"
    with pytest.raises(ValueError, match=rf"^{name} is on the meta device, which holds no data; "
                                         r".* Pass real tensors"):
        rampde_fx.odeint(TimeMLP(), y0, t, method="rk4")


def test_velocity_returning_the_wrong_structure():
    with pytest.raises(TypeError, match=r"returned tuple of length 1 for a state of 2 tensor"):
        rampde_fx.odeint(lambda t, y: (y[0],), (Y0, Y0), T, method="euler")


class DataDependent(nn.Module):
    """Python control flow on a tensor value: cannot be traced."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, t, y):
        if y.sum() > 0:
            return torch.tanh(self.lin(y))
        return -torch.tanh(self.lin(y))


def test_untraceable_velocity_falls_back_with_a_warning_and_stays_exact():
    torch.manual_seed(0)
    func = DataDependent()
    y0 = torch.randn(4, 3, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], requires_grad=True)
    options = {"step_size": 0.1}
    with pytest.warns(rampde_fx.CaptureWarning,
                      match=r"could not capture velocity module DataDependent as a graph "
                            r"\(Python control flow on the value of a tensor computed from the "
                            r"state or from tensors that require grad, at "
                            r"test_inputs_and_fallback.py:\d+ in forward: "
                            r"if y.sum\(\) > 0:\)"):
        with rampde_fx.collect_stats() as stats:
            out = rampde_fx.odeint(func, y0, t, method="rk4", options=options,
                                   dtype=torch.float32)
    assert stats[0].velocity is rampde_fx.VelocityKind.EAGER
    assert stats[0].fallback_reason.startswith("Python control flow")
    ref = torchdiffeq.odeint(func, y0, t, method="rk4", options=options)
    inputs = [y0, t, *func.parameters()]
    for got, want in zip((out, *torch.autograd.grad(out.sum(), inputs)),
                         (ref, *torch.autograd.grad(ref.sum(), inputs))):
        assert rel_err(got, want) < 2e-6


def test_fallback_runs_in_low_precision_under_autocast():
    torch.manual_seed(0)
    func = DataDependent()
    y0 = torch.randn(4, 3)
    t = torch.tensor([0.0, 1.0])
    ref = torchdiffeq.odeint(copy.deepcopy(func).double(), y0.double(), t.double(),
                             method="rk4", options={"step_size": 0.1})
    with pytest.warns(rampde_fx.CaptureWarning):
        out = rampde_fx.odeint(func, y0, t, method="rk4", options={"step_size": 0.1})
    assert out.dtype == torch.float32
    assert 1e-5 < rel_err(out, ref) < 2 * 2.0 ** -8  # bf16 error, not fp32's


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.nfe = 0

    def forward(self, t, y):
        self.nfe += 1
        return self.lin(y)


def test_counter_advances_by_the_solves_evaluations():
    """Capture undoes what tracing changed; the solve then advances the counter by its
    evaluations, as torchdiffeq's evaluations do."""
    func, original = Counting(), Counting()
    rampde_fx.odeint(func, Y0, T, method="euler")
    torchdiffeq.odeint(original, Y0, T, method="euler")
    assert func.nfe == original.nfe > 0


class Remembering(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.last_time = None

    def forward(self, t, y):
        self.last_time = float(t)
        return self.lin(y)


def test_attribute_assigned_in_forward_is_restored_and_warned():
    func = Remembering()
    with pytest.warns(rampde_fx.CaptureWarning,
                      match=r"Remembering assigns \['last_time'\] in forward"):
        rampde_fx.odeint(func, Y0, T, method="euler")
    assert func.last_time is None  # tracing left no trace on the user's module


def test_reassigned_attribute_is_read_live():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.tensor(1.0)

        def forward(self, t, y):
            return y * self.scale

    func = Scaled()
    y0 = torch.ones(3)
    first = rampde_fx.odeint(func, y0, T, method="euler", dtype=torch.float32)
    func.scale = torch.tensor(0.0)  # a new tensor object, not an in-place change
    second = rampde_fx.odeint(func, y0, T, method="euler", dtype=torch.float32)
    assert first[-1, 0] > 1.5
    assert torch.equal(second, torch.ones(3, 3))


def test_ambient_autocast_does_not_reach_the_solve():
    func = TimeMLP()
    y0 = torch.randn(4, 3)
    plain = rampde_fx.odeint(func, y0, T, method="rk4", dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = rampde_fx.odeint(func, y0, T, method="rk4", dtype=torch.float32)
    assert torch.equal(plain, under_autocast)


def test_policy_rejects_an_op_in_both_classes():
    with pytest.raises(ValueError, match=r"\['tanh'\] are in both"):
        rampde_fx.PrecisionPolicy(low_ops=frozenset({"tanh"}), full_ops=frozenset({"tanh"}))


def test_nested_stat_collectors_each_see_the_solve():
    with rampde_fx.collect_stats() as outer:
        with rampde_fx.collect_stats() as inner:
            rampde_fx.odeint(lambda t, y: -y, Y0, T, method="euler")
    assert len(outer) == len(inner) == 1 and outer[0] is inner[0]


def test_a_velocity_module_made_for_one_solve_lives_until_its_backward_pass():
    """Captured velocities hold modules weakly; the solve itself keeps its velocity alive."""
    import gc

    y0 = Y0.clone().requires_grad_()
    out = rampde_fx.odeint(TimeMLP(), y0, T, method="rk4", dtype=torch.float32)
    gc.collect()
    out.sum().backward()
    assert torch.isfinite(y0.grad).all() and y0.grad.abs().sum() > 0
