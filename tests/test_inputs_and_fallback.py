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
    ({"method": "implicit_adams"}, NotImplementedError,
     r"'implicit_adams' is not supported.*'dopri5'.*'rk4'"),
    ({"method": "rk45"}, ValueError, r"unknown method 'rk45'"),
    ({"method": "rk4", "event_fn": lambda t, y: y}, NotImplementedError, r"event_fn"),
    ({"method": "rk4", "options": {"atol": 1.0}}, ValueError,
     r"does not take options \['atol'\]; fixed-grid methods take"),
    ({"method": "dopri5", "options": {"step_size": 0.1}}, ValueError,
     r"'dopri5' does not take options \['step_size'\]; adaptive methods take"),
    ({"method": "dopri5", "rtol": -1.0}, ValueError, r"rtol must be finite and non-negative"),
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
