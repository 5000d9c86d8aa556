"""Ops without a low-precision kernel (linear algebra, FFTs) inside bfloat16 and float16
velocities: they run in float32, found by running the ops, recorded on the rewritten graph, and
shown by explain() and check(); a policy that forces one to low precision is refused."""
from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch
import torchdiffeq
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import rampde_fx
from field_models import ODEBlock
from models import rel_err
from rampde_fx.errors import ConversionError
from rampde_fx.passes.kernel_support import runs_in_low_dtype

aten = torch.ops.aten
DIM = 6
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


class _Matrix(nn.Module):
    """A parameter ``M`` (small: ``I + M M^T`` has eigenvalues in [1, 2] or so)."""

    def __init__(self) -> None:
        super().__init__()
        self.M = nn.Parameter(torch.randn(DIM, DIM) / (2 * DIM ** 0.5))
        self.register_buffer("eye", torch.eye(DIM))

    def spd(self) -> torch.Tensor:
        """``I + M M^T``, made by a matmul-class op: in the low dtype."""
        return self.eye + self.M @ self.M.mT


class Inverse(_Matrix):
    """A mass matrix's inverse: ``y' = -y (I + M M^T)^-1``."""

    def forward(self, t, y):
        return -y @ torch.linalg.inv(self.spd())


class Solve(_Matrix):
    def forward(self, t, y):
        return -torch.linalg.solve(self.eye + self.M, y.mT).mT


class Cholesky(_Matrix):
    def forward(self, t, y):
        return -y @ torch.linalg.cholesky(self.spd())


class Determinants(_Matrix):
    """Determinants of 3x3 matrices made from each sample's state, ``A = I + Z Z^T`` with
    ``Z = (y M)`` as 3x2 (each sample's rounding differs, as the state's does), in a decay
    rate ``1 / det A + log det A``: about 1 (``det A >= 1``)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("eye3", torch.eye(3))

    def forward(self, t, y):
        z = (y @ self.M).view(-1, 3, 2)
        a = self.eye3 + z @ z.mT
        return -y * (1 / torch.linalg.det(a) + torch.linalg.slogdet(a).logabsdet)[:, None]


class Eigh(_Matrix):
    """``y' = -y exp(-A)`` through ``eigh``, ``A = D + M M^T`` with eigenvalues near those of
    ``D``, 1, ..., DIM (gaps of about 1: eigenvector gradients divide by the gaps)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("spread", torch.arange(1.0, DIM + 1).diag())

    def forward(self, t, y):
        w, v = torch.linalg.eigh(self.spread + self.M @ self.M.mT)
        return -(y @ v) * torch.exp(-w) @ v.mT


class Spectral(nn.Module):
    """A learned low-pass filter: ``y' = -irfft(rfft(y) d)``."""

    def __init__(self) -> None:
        super().__init__()
        self.decay = nn.Parameter(torch.rand(DIM // 2 + 1) + 0.5)

    def forward(self, t, y):
        return -torch.fft.irfft(torch.fft.rfft(y) * self.decay, n=y.shape[-1])


# Each velocity and the ops of its graph that have no bfloat16/float16 kernel on CPU. (irfft's
# _fft_c2r reads rfft's complex64 output: it runs in float32 as it is.)
CASES = [(Inverse, {"linalg_inv_ex"}), (Solve, {"linalg_solve_ex"}),
         (Cholesky, {"linalg_cholesky_ex"}), (Determinants, {"linalg_det", "linalg_slogdet"}),
         (Eigh, {"linalg_eigh"}), (Spectral, {"fft_r2c"})]
IDS = [case.__name__ for case, _ in CASES]


def solve_and_grads(odeint, model, y0, **kwargs):
    """The solution at t = 0, 0.5, 1 (rk4, 8 steps) and the gradients of a weighted sum of it
    for ``y0`` and every parameter."""
    y0 = y0.clone().requires_grad_()
    t = torch.linspace(0, 1, 3, dtype=y0.dtype)
    out = odeint(model, y0, t, method="rk4", options={"step_size": 0.125}, **kwargs)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return [out, *torch.autograd.grad((out * weights).sum(), [y0, *model.parameters()])]


def without_low_kernel(graph: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    """The nodes that run in float32 for want of a low-precision kernel, by op name."""
    return {rampde_fx.policy.op_name(node): node
            for node in graph.graph.nodes
            if node.op == "call_function" and node.meta["rampde_precision"].no_low_kernel}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case, ops", CASES, ids=IDS)
def test_ops_without_low_kernels_run_in_float32(case, ops, dtype):
    """The ops without a kernel run on float32 copies of their low-precision inputs, and say
    why. Each evaluation rounds the state and what the matmul-class ops make (about a unit
    roundoff each), which the float32 ops pass on times their condition (well-conditioned
    matrices here), over a solve whose decay rates are about 1: outputs and the state's
    gradient stay within 2 unit roundoffs of a float64 solve; the parameters' gradients, sums
    over the batch and the steps in which some terms cancel, within 4."""
    torch.manual_seed(0)
    model, y0 = case(), torch.randn(4, DIM)
    reference = solve_and_grads(torchdiffeq.odeint, copy.deepcopy(model).double(), y0.double())
    with rampde_fx.collect_stats() as stats:
        low = solve_and_grads(rampde_fx.odeint, model, y0, dtype=dtype)
    found = without_low_kernel(stats[0].graph)
    assert set(found) == ops
    name = str(dtype).removeprefix("torch.")
    for op, node in found.items():
        values = torch.utils._pytree.tree_leaves(node.meta["val"])
        inputs = [n.meta["val"] for n in node.all_input_nodes]
        assert {v.dtype for v in values + inputs if v.is_floating_point()} == {torch.float32}
        assert node.meta["rampde_precision"].reason == f"'{op}', which has no {name} kernel on cpu"
    for i, (got, want) in enumerate(zip(low, reference)):
        assert rel_err(got, want) < (2 if i < 2 else 4) * UNIT_ROUNDOFF[dtype]


@pytest.mark.parametrize("case, ops", CASES, ids=IDS)
def test_float32_mode_matches_torchdiffeq(case, ops):
    """With dtype=float32 nothing is cast and nothing needs a kernel: torchdiffeq's float32
    solve to float32 roundoff."""
    torch.manual_seed(0)
    model, y0 = case(), torch.randn(4, DIM)
    reference = solve_and_grads(torchdiffeq.odeint, model, y0)
    with rampde_fx.collect_stats() as stats:
        got = solve_and_grads(rampde_fx.odeint, model, y0, dtype=torch.float32)
    assert without_low_kernel(stats[0].graph) == {}
    for got_one, want in zip(got, reference):
        assert rel_err(got_one, want) < 1e-6


class InverseODE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = ODEBlock(Inverse())

    def forward(self, x):
        return self.block(x)


def test_explain_and_check_show_the_float32_reason():
    torch.manual_seed(0)
    model, x = InverseODE(), torch.randn(4, DIM)
    converted = rampde_fx.convert(model)
    converted(x).sum().backward()
    explained = rampde_fx.explain(converted)
    why = "'linalg_inv_ex', which has no bfloat16 kernel on cpu"
    assert re.search(rf"\n    linalg_inv_ex +\(float32, int32\) +{why}\n", explained), explained
    assert re.search(rf"\n    add_fp32 +float32 +input of {why}\n", explained), explained
    report = rampde_fx.check(model, x, dtypes=(torch.bfloat16,), repeats=1, verbose=False)
    assert f"in the bfloat16 solves, {why}, runs in float32" in report.notes
    assert f"note: in the bfloat16 solves, {why}, runs in float32" in str(report)


def test_a_policy_forcing_low_precision_on_such_an_op_is_refused():
    """The user's policy stays authoritative: asked to run inv in bfloat16, the conversion
    fails naming the op instead of running something else."""
    y0, t = torch.randn(4, DIM), torch.linspace(0, 1, 3)
    default = rampde_fx.DEFAULT_POLICY
    for policy in (dataclasses.replace(default, low_ops=default.low_ops | {"linalg_inv_ex"}),
                   dataclasses.replace(default, override=lambda name, node: (
                       rampde_fx.Precision.LOW if name == "linalg_inv_ex" else None))):
        with pytest.raises(ConversionError, match="runs 'linalg_inv_ex' in bfloat16, but the "
                                                  "op has no bfloat16 kernel on cpu"):
            rampde_fx.odeint(Inverse(), y0, t, method="rk4", policy=policy)


def test_the_kernels_are_asked():
    """Fake tensors pass cholesky in bfloat16 (its meta function checks no dtype) and i1's
    forward has a bfloat16 kernel, but their kernels (i1's backward) reject it; an op that
    gets no further in float32 (heaviside has no derivative) is taken to run; an op that draws
    random numbers is not run, and the generator does not move. The probes run their backward
    in inference mode too."""
    low, full = torch.bfloat16, torch.float32
    with FakeTensorMode():
        matrix, vector = torch.empty(3, 3, dtype=low), torch.empty(5, dtype=low)
    assert not runs_in_low_dtype(aten.linalg_cholesky_ex.default, (matrix,), {}, low, full)
    with torch.inference_mode():
        assert not runs_in_low_dtype(aten.special_i1.default, (matrix,), {}, low, full)
    assert not runs_in_low_dtype(aten.special_i1.default, (vector,), {}, low, full)
    assert runs_in_low_dtype(aten.add.Tensor, (vector, vector), {}, low, full)
    assert runs_in_low_dtype(aten.heaviside.default, (vector, vector), {}, low, full)
    state = torch.random.get_rng_state()
    assert runs_in_low_dtype(aten.native_dropout.default, (vector, 0.5, True), {}, low, full)
    assert torch.equal(torch.random.get_rng_state(), state)
