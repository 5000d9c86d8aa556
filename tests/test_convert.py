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
        with pytest.warns(rampde_fx.CaptureWarning, match=r"could not capture velocity module ExactTraceCNF"):
            return outputs_and_grads(converted, inputs)
    return outputs_and_grads(converted, inputs)


@pytest.mark.parametrize("name", FAMILIES)
def test_float32_conversion_reproduces_the_model(name):
    torch.manual_seed(0)
    make, inputs = FAMILIES[name]
    model = make()
    x = inputs()
    converted = rampde_fx.convert(model, dtype=torch.float32)
    got = run_converted(name, converted, x)
    # odeint_adjoint's gradient is the continuous adjoint: compare with the discrete twin.
    reference = DiscreteTwin() if name == "mlp_odeint_adjoint" else model
    if reference is not model:
        reference.load_state_dict(model.state_dict())
    want = outputs_and_grads(reference, x)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 2e-6


@pytest.mark.parametrize("name", FAMILIES)
def test_bfloat16_conversion_against_float64(name):
    torch.manual_seed(0)
    make, inputs = FAMILIES[name]
    model = make()
    x = inputs()
    reference_model = DiscreteTwin() if name == "mlp_odeint_adjoint" else copy.deepcopy(model)
    reference_model.load_state_dict(model.state_dict())
    want = outputs_and_grads(reference_model.double(), [v.double() for v in x])
    converted = rampde_fx.convert(model)
    got = run_converted(name, converted, x)
    errors = [rel_err(g, w) for g, w in zip(got, want)]
    assert max(errors) < 4 * U_BF16
    assert max(errors) > 1e-5  # bf16 error, not float32's: the low precision ran
