"""The same claims on a CUDA device: bf16 and fp16 solves against float64, Triton kernels in
the low dtype for the compiled step and its vector-Jacobian product, and host
synchronisations that do not grow with the steps. Skipped where no GPU is present (CI)."""
from __future__ import annotations

import copy

import pytest
import torch
import torchdiffeq
from torch._inductor.utils import run_and_get_code

import rampde_fx
from field_models import MLPODE
from models import rel_err
from rampde_fx import runtime
from test_compiled import (StepRecorder, SyncCounter, _matmul_count, _matmul_dtypes,
                           outputs_and_grads)
from test_low_precision import MLP, U_BF16, U_FP16, _solve_and_grads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LOW_PRECISION = [(torch.bfloat16, U_BF16), (torch.float16, U_FP16)]


@pytest.mark.parametrize("dtype, unit_roundoff", LOW_PRECISION)
def test_outputs_and_gradients_against_float64_on_cuda(dtype, unit_roundoff):
    """As on CPU: within 2 unit roundoffs of float64, the float32 mode 10x closer."""
    torch.manual_seed(0)
    model = MLP().cuda()
    y0 = torch.randn(64, 8, device="cuda")
    reference = _solve_and_grads(torchdiffeq.odeint, copy.deepcopy(model).double(), y0.double())
    low = _solve_and_grads(rampde_fx.odeint, model, y0, dtype)
    exact = _solve_and_grads(rampde_fx.odeint, model, y0, torch.float32)
    for got, fp32, want in zip(low, exact, reference):
        assert got.dtype == torch.float32 and got.is_cuda
        assert rel_err(got, want) < 2 * unit_roundoff
        assert rel_err(fp32, want) < rel_err(got, want) / 10


@pytest.mark.parametrize("dtype, unit_roundoff", LOW_PRECISION)
def test_compiled_step_is_triton_in_the_low_dtype(dtype, unit_roundoff):
    """A converted model under torch.compile on CUDA: inductor lowers the step's forward and
    backward with matmuls in ``dtype`` only, emits Triton kernels, and the result matches the
    eager converted model within two unit roundoffs: Triton keeps fused intermediates in
    float32 where eager rounds each to ``dtype``, two solves each within about one unit
    roundoff of float64."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    recorder = StepRecorder()
    model = rampde_fx.convert(MLPODE(), dtype=dtype).cuda()
    x = torch.randn(6, 3, device="cuda")
    with runtime.patch(kernel_backend=recorder), \
            torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        got, sources = run_and_get_code(outputs_and_grads, torch.compile(model, fullgraph=True),
                                        x)
    for g, w in zip(got, outputs_and_grads(model, x)):
        assert rel_err(g, w) < 2 * unit_roundoff
    assert [is_backward for is_backward, _ in recorder.graphs] == [False, False]
    assert _matmul_count(recorder.graphs[1][1]) > _matmul_count(recorder.graphs[0][1])
    assert all(_matmul_dtypes(g) == {dtype} for _, g in recorder.graphs)
    assert any("@triton.jit" in source for source in sources)
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_host_synchronisations_do_not_grow_with_steps_on_cuda(dtype):
    """fp16's adjoint scale lives on the device: the count of host synchronisations is the
    same at 8 and at 64 steps."""
    func = MLP().cuda()
    counts = []
    for steps in (8, 64):
        y0 = torch.randn(4, 8, device="cuda", requires_grad=True)
        with SyncCounter() as counter:
            out = rampde_fx.odeint(func, y0, torch.tensor([0.0, 1.0], device="cuda"),
                                   method="rk4", options={"step_size": 1 / steps}, dtype=dtype)
            out[-1].sum().backward()
        counts.append(counter.count)
    assert counts[0] == counts[1]
