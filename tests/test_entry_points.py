"""Every solve a model makes: methods other than forward on a converted module, and the
``rampde_fx.mixed_precision`` scope for code the user owns no module of (library samplers,
top-level helpers)."""
from __future__ import annotations

import copy
import threading

import pytest
import torch
import torchdiffeq
from torch import nn

import rampde_fx
from models import rel_err

U_BF16 = 2.0 ** -8
T = torch.tensor([0.0, 0.5, 1.0])
STEPS = {"method": "midpoint", "options": {"step_size": 0.125}}


class Velocity(nn.Module):
    def __init__(self, dim: int = 2, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, width), nn.Tanh(), nn.Linear(width, dim))

    def forward(self, t, x):
        return self.net(torch.cat([x, t.expand(x.shape[0], 1)], dim=1))


class FlowModel(nn.Module):
    """A generative ODE model whose solves are in its entry points, not in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.velocity = Velocity()

    def forward(self, x):
        return self.velocity(torch.zeros(()), x)

    def sample(self, noise):
        return torchdiffeq.odeint(lambda t, x: self.velocity(t, x), noise, T, **STEPS)[-1]

    def compute_all_losses(self, data):
        return self._transport(data).square().mean()

    def _transport(self, data):
        return torchdiffeq.odeint_adjoint(self.velocity, data, T, **STEPS,
                                          adjoint_params=tuple(self.parameters()))[-1]


def library_sampler(model, noise, steps=8):
    """A sampler a library ships: it calls odeint on a closure over the user's network."""
    def field(t, x):
        return model(t, x)
    return torchdiffeq.odeint(field, noise, torch.linspace(0, 1, 2), method="euler",
                              options={"step_size": 1.0 / steps})[-1]


def _model_and_noise():
    torch.manual_seed(0)
    return FlowModel(), torch.randn(64, 2)


@pytest.mark.parametrize("entry", ["sample", "compute_all_losses"])
def test_methods_other_than_forward_convert(entry):
    """sample() and a training entry point convert with the same sites and explain() as
    forward: float32 mode reproduces the original, bf16 really runs and stays within the
    bound of float64, and the gradients follow."""
    model, noise = _model_and_noise()
    reference = copy.deepcopy(model).double()
    results = {}
    for name, solve in (("original", model), ("float64", reference),
                        ("float32", rampde_fx.convert(model, dtype=torch.float32)),
                        ("bfloat16", rampde_fx.convert(model))):
        x = noise.double() if name == "float64" else noise
        out = getattr(solve, entry)(x)
        grads = torch.autograd.grad(out.sum(), list(solve.parameters()))
        results[name] = [out, *grads]
        if name in ("float32", "bfloat16"):
            assert "1 ODE solve(s)" in rampde_fx.explain(solve)
    # odeint_adjoint's gradient is the continuous adjoint's in the original, the discrete
    # adjoint's when converted: they differ by the discretisation error.
    gradient_bound = 1e-3 if entry == "compute_all_losses" else 1e-5
    out, *grads = results["float32"]
    assert rel_err(out, results["original"][0]) < 1e-5
    for got, want in zip(grads, results["original"][1:]):
        assert rel_err(got, want) < gradient_bound
    for low, exact, want in zip(results["bfloat16"], results["float32"], results["float64"]):
        assert rel_err(low, want) < 4 * U_BF16
        assert rel_err(exact, want) < rel_err(low, want)  # the low precision ran


def test_mixed_precision_scope_converts_a_library_sampler():
    """Inside the scope the library's odeint on a closure runs in mixed precision; the
    network's parameters, reached through the closure, get their gradients; outside it,
    plain torchdiffeq runs."""
    model, noise = _model_and_noise()
    velocity = model.velocity
    want = library_sampler(copy.deepcopy(velocity).double(), noise.double())
    outside = library_sampler(velocity, noise)
    with rampde_fx.mixed_precision(dtype=torch.float32) as exact:
        same = library_sampler(velocity, noise)
    with rampde_fx.mixed_precision() as mp:
        low = library_sampler(velocity, noise)
    grads = torch.autograd.grad(low.square().sum(), list(velocity.parameters()))
    assert rel_err(same, outside) < 1e-6
    assert rel_err(low, want) < 4 * U_BF16 and rel_err(same, want) < rel_err(low, want)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert "1 ODE solve(s) in bfloat16" in mp.explain()
    assert "scope" in mp.explain() and "1 ODE solve(s) in float32" in exact.explain()
    assert torch.equal(library_sampler(velocity, noise), outside)  # the scope is left


def test_scope_gradients_match_float64():
    """Gradients through a scoped solve, for the parameters of a module in a closure and for
    the initial state, against float64 torchdiffeq."""
    model, noise = _model_and_noise()
    noise = noise.requires_grad_()
    reference = copy.deepcopy(model.velocity).double()
    x64 = noise.detach().double().requires_grad_()
    want = library_sampler(reference, x64).square().sum()
    want_grads = torch.autograd.grad(want, [x64, *reference.parameters()])
    with rampde_fx.mixed_precision():
        got = library_sampler(model.velocity, noise).square().sum()
    got_grads = torch.autograd.grad(got, [noise, *model.velocity.parameters()])
    for g, w in zip(got_grads, want_grads):
        assert rel_err(g, w) < 4 * U_BF16


def test_scope_as_decorator_and_with_rampde_odeint():
    """As a decorator, the scope converts every call and explain() accumulates its sites; a
    rampde_fx.odeint call inside takes the scope's precision."""
    model, noise = _model_and_noise()
    scope = rampde_fx.mixed_precision(dtype=torch.float32)

    @scope
    def sample_twice(x):
        first = library_sampler(model.velocity, x)
        return rampde_fx.odeint(model.velocity, first, T, **STEPS, dtype=torch.bfloat16)[-1]

    got = sample_twice(noise)
    sample_twice(noise)
    want = torchdiffeq.odeint(model.velocity, library_sampler(model.velocity, noise), T,
                              **STEPS)[-1]
    assert rel_err(got, want) < 1e-6  # float32, the scope's, not the call's bfloat16
    assert "2 ODE solve(s) in float32" in scope.explain()
    assert sample_twice.__name__ == "sample_twice"


def test_scope_filter_fn_and_threads():
    """filter_fn sees the velocity's module and name; a solve it leaves runs as written and
    explain() notes it. Another thread is not in the scope."""
    model, noise = _model_and_noise()
    asked = []

    def keep_none(module, name):
        asked.append((type(module).__name__ if module is not None else None, name))
        return False

    outside = library_sampler(model.velocity, noise)
    with rampde_fx.mixed_precision(filter_fn=keep_none) as mp:
        got = library_sampler(model.velocity, noise)
        in_thread = []
        worker = threading.Thread(target=lambda: in_thread.append(
            library_sampler(model.velocity, noise)))
        worker.start()
        worker.join()
    assert torch.equal(got, outside) and torch.equal(in_thread[0], outside)
    assert asked == [(None, "library_sampler.<locals>.field")]
    assert "filter_fn left it as it is" in mp.explain()


def test_scopes_must_be_left_in_order():
    outer, inner = rampde_fx.mixed_precision(), rampde_fx.mixed_precision()
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(RuntimeError, match="left in the order"):
        outer.__exit__(None, None, None)
    inner.__exit__(None, None, None)
    outer.__exit__(None, None, None)
