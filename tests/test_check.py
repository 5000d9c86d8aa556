"""rampde_fx.check: its advice measured again against float64, its report (golden: accept new
text with EXPECTTEST_ACCEPT=1), and its command line."""
from __future__ import annotations

import copy
import dataclasses
import functools
import os
import re
import subprocess
import sys

import pytest
import torch
import torchdiffeq
from expecttest import TestCase
from torch import nn

import rampde_fx
from field_models import MLPFunc, MLPODE, ODEBlock
from models import rel_err
from test_convert import outputs_and_grads

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


class OffsetVelocity(nn.Module):
    """Ill-conditioned: the activations carry a large common offset that the next op takes
    away again. Near 32, bfloat16's 8 significant bits keep them to within 0.125."""

    def __init__(self, dim: int = 4, width: int = 16, offset: float = 32.0) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, width)
        self.out = nn.Linear(width, dim)
        self.register_buffer("offset", torch.tensor(offset))

    def forward(self, t, y):
        shifted = self.inp(y) + self.offset
        return self.out(torch.tanh(shifted - self.offset))


class OffsetODE(MLPODE):
    def __init__(self) -> None:
        super().__init__()
        self.block = ODEBlock(OffsetVelocity())


def well_conditioned():
    """A tanh MLP ODE and its inputs (a factory for the command line too)."""
    torch.manual_seed(0)
    return MLPODE(), torch.randn(8, 3)


def ill_conditioned():
    torch.manual_seed(0)
    return OffsetODE(), torch.randn(8, 3)


@functools.cache
def report_of(factory):
    return rampde_fx.check(*factory())


def gradients(model, x):
    """The parameter gradients of outputs_and_grads (one output, one input), as one vector."""
    return torch.cat([g.reshape(-1) for g in outputs_and_grads(model, [x])[2:]])


def test_suggested_policy_cuts_the_ill_conditioned_gradient_error():
    report = report_of(ill_conditioned)
    assert report.suggested_dtype == torch.bfloat16
    assert report.suggested_policy == rampde_fx.DEFAULT_POLICY.with_full_ops({"add"})
    model, x = ill_conditioned()
    reference = gradients(copy.deepcopy(model).double(), x.double())
    default = rel_err(gradients(rampde_fx.convert(model), x), reference)
    suggested = rel_err(gradients(rampde_fx.convert(model, policy=report.suggested_policy), x),
                        reference)
    assert suggested <= report.target < default
    assert suggested * 3 <= default
    assert report.scopes[0].measurement("bfloat16").gradient_error == pytest.approx(default,
                                                                                   rel=1e-3)
    assert report.suggested_error == pytest.approx(suggested, rel=1e-3)


def test_well_conditioned_model_keeps_the_default_policy():
    report = report_of(well_conditioned)
    assert report.suggested_dtype == torch.bfloat16
    assert report.suggested_policy == rampde_fx.DEFAULT_POLICY
    (search,) = report.searches  # bfloat16 met the target: float16 is not searched
    assert search.found == frozenset() and {op for op, _ in search.alone} == {"addmm", "tanh"}
    model, x = well_conditioned()
    reference = gradients(copy.deepcopy(model).double(), x.double())
    error = rel_err(gradients(rampde_fx.convert(model), x), reference)
    assert error <= report.target
    assert report.suggested_error == pytest.approx(error, rel=1e-3)


def test_bytes_and_times():
    scope = report_of(well_conditioned).scopes[0]
    assert all(m.saved_bytes > 0 and m.seconds > 0 for m in scope.measurements)
    # One bfloat16 state per step, against torchdiffeq's stage activations.
    assert scope.measurement("bfloat16").saved_bytes < scope.measurement("as written").saved_bytes
    text = str(report_of(well_conditioned))
    assert "kept for backward  per call" in text and text.splitlines()[-1].startswith("checked in")


# A printed error: the digits of every measured number depend on the CPU's float32 and
# low-precision kernels.
NUMBER = re.compile(r"\d\.\de[+-]\d\d")


def masked(report):
    """The report's text with its measured numbers masked, and the worst parameters' names
    (the largest of parts that can be close: 3.9e-2 and 2.9e-2 in bfloat16 here)."""
    names = "|".join(re.escape(m.worst_parameter) for scope in report.scopes
                     for m in scope.measurements)
    text = re.sub(rf"(?:{names}) (?={NUMBER.pattern})", "<parameter> ",
                  report.format(timings=False))
    return NUMBER.sub("x.xe-xx", text)


class Golden(TestCase):
    def test_report_text(self):
        """The report's text, its measured numbers masked: they are checked below, as the
        report's values and against bounds that hold on any CPU."""
        report = report_of(ill_conditioned)
        self.assertExpectedInline(masked(report), """\
rampde_fx.check of OffsetODE: 1 ODE solve(s); relative errors against a float64 copy of the model
  output: all floating and complex outputs as one vector
  gradient: of the default loss (a fixed weighted sum of the outputs), all 8 parameters as one vector
  worst parameter: the one with the largest gradient error, and its part of that error

solves at 'block' converted
  torchdiffeq.odeint in ODEBlock at 'block', velocity block.odefunc (graph), rk4, 4 steps
  mode        output   gradient  worst parameter
  as written  x.xe-xx  x.xe-xx   <parameter> x.xe-xx
  float32     x.xe-xx  x.xe-xx   <parameter> x.xe-xx
  bfloat16    x.xe-xx  x.xe-xx   <parameter> x.xe-xx
  float16     x.xe-xx  x.xe-xx   <parameter> x.xe-xx

bfloat16: gradient error x.xe-xx with the default policy; with one op in float32:
  addmm x.xe-xx, add x.xe-xx, sub x.xe-xx, tanh x.xe-xx
  greedy search (matmul-class ops only if the others fall short): +add x.xe-xx
  within the target x.xe-xx with 'add' in float32: x.xe-xx

suggested: bfloat16 with 'add' in float32: gradient error x.xe-xx against x.xe-xx with the default
  policy (target x.xe-xx)
  mp = rampde_fx.convert(model, dtype=torch.bfloat16, policy=rampde_fx.DEFAULT_POLICY.with_full_ops({'add'}))""")
        # The masked fields print the report's values, in the order of the text.
        (scope,), (search,) = report.scopes, report.searches
        text = report.format(timings=False)
        shown = [value for m in scope.measurements
                 for value in (m.output_error, m.gradient_error, m.worst_parameter_error)]
        shown += [search.default_error, *(e for _, e in search.alone),
                  *(e for _, e in search.path), report.target, search.found_error,
                  report.suggested_error, search.default_error, report.target]
        self.assertEqual(NUMBER.findall(text), [f"{value:.1e}" for value in shown])
        names = [name for name, _ in ill_conditioned()[0].named_parameters()]
        for m in scope.measurements:
            row = next(line for line in text.splitlines() if line.startswith(f"  {m.mode}  "))
            self.assertTrue(row.endswith(f" {m.worst_parameter} {m.worst_parameter_error:.1e}"))
            # Its part of the gradient error is the largest of 8 parts whose squares sum to
            # the square of the whole.
            self.assertIn(m.worst_parameter, names)
            self.assertTrue(m.gradient_error / len(names) ** 0.5 <= m.worst_parameter_error
                            <= m.gradient_error * (1 + 1e-9))
        rows = {m.mode: m for m in scope.measurements}
        for mode in ("as written", "float32"):
            # float32's rounding, which the offset of 32 amplifies about 32 times in the
            # activations: measured 1e-7 in the outputs and 4e-7 in the gradients.
            self.assertLess(rows[mode].output_error, 1e-6)
            self.assertLess(rows[mode].gradient_error, 2e-6)
        # Near 32, bfloat16 keeps the activations to within 0.125: a gradient error above the
        # target (measured 5e-2); float16 keeps them to within 1/64 (measured 3e-3).
        self.assertGreater(rows["bfloat16"].gradient_error, report.target)
        self.assertLess(rows["float16"].gradient_error, rows["bfloat16"].gradient_error / 4)
        # addmm or add in float32 keeps the offset sum in float32 (measured 2e-4 and 7e-4);
        # sub and tanh come after its rounding (measured 5e-2).
        alone = dict(search.alone)
        self.assertLess(max(alone["addmm"], alone["add"]), report.target / 4)
        self.assertGreater(min(alone["sub"], alone["tanh"]), report.target)
        self.assertLessEqual(search.found_error, report.target)


def test_each_module_is_measured_alone(capsys):
    torch.manual_seed(0)
    model, x = nn.Sequential(ODEBlock(MLPFunc()), ODEBlock(MLPFunc())), torch.randn(5, 4)
    report = rampde_fx.check(model, x, dtypes=(torch.bfloat16,), repeats=1, verbose=True)
    assert [scope.title for scope in report.scopes] == [
        "all 2 solves converted", "only the solves at '0' converted",
        "only the solves at '1' converted"]
    reference = gradients(copy.deepcopy(model).double(), x.double())
    for name, scope in zip(["0", "1"], report.scopes[1:]):
        alone = rampde_fx.convert(model, filter_fn=lambda module, qualname: qualname == name)
        error = rel_err(gradients(alone, x), reference)
        assert scope.measurement("bfloat16").gradient_error == pytest.approx(error, rel=1e-3)
    assert "rampde_fx.check [" in capsys.readouterr().err


class CoarseAdjoint(nn.Module):
    """odeint_adjoint on a coarse grid, where torchdiffeq's continuous adjoint is far from the
    gradient of the discrete solve."""

    def __init__(self) -> None:
        super().__init__()
        self.func = MLPFunc()

    def forward(self, x):
        return torchdiffeq.odeint_adjoint(self.func, x, torch.tensor([0.0, 1.0]),
                                          method="euler", options={"step_size": 0.5})[-1]


def test_odeint_adjoint_is_compared_with_the_discrete_gradient():
    torch.manual_seed(0)
    report = rampde_fx.check(CoarseAdjoint(), torch.randn(5, 4), dtypes=(torch.bfloat16,),
                             repeats=1)
    scope = report.scopes[0]
    assert scope.measurement("float32").gradient_error < 1e-5
    assert scope.measurement("as written").gradient_error > 1e-3  # the continuous adjoint


class Branching(MLPFunc):
    def forward(self, t, y):
        return super().forward(t, y) if y.sum() > -1e9 else -y


def test_eager_velocity_gets_errors_only():
    model = MLPODE()
    model.block.odefunc = Branching()
    with pytest.warns(rampde_fx.CaptureWarning, match="could not capture"):
        report = rampde_fx.check(model, torch.randn(5, 3), dtypes=(torch.bfloat16,),
                                 repeats=1)
    (search,) = report.searches
    assert search.alone == ()
    assert report.scopes[0].measurement("bfloat16").gradient_error < report.target
    assert any("runs eagerly under autocast" in note for note in report.notes)


def test_with_full_ops_moves_ops_to_float32():
    policy = rampde_fx.DEFAULT_POLICY.with_full_ops({"addmm", "tanh"})
    assert policy == dataclasses.replace(
        rampde_fx.DEFAULT_POLICY, low_ops=rampde_fx.DEFAULT_POLICY.low_ops - {"addmm"},
        full_ops=rampde_fx.DEFAULT_POLICY.full_ops | {"addmm", "tanh"})


@pytest.mark.parametrize("kwargs, match", [
    ({"dtypes": (torch.float32,)}, r"dtypes must be some of"),
    ({"target": 0.0}, r"target must be positive"),
    ({"repeats": 0}, r"repeats must be at least 1"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rampde_fx.check(*well_conditioned(), **kwargs)


def test_model_without_solves():
    with pytest.raises(ValueError, match=r"Linear made no ODE solve on the example inputs"):
        rampde_fx.check(nn.Linear(2, 2), torch.randn(3, 2), dtypes=(torch.bfloat16,))


def test_command_line():
    done = subprocess.run(
        [sys.executable, "-m", "rampde_fx.check", "test_check:well_conditioned",
         "--dtypes", "bfloat16", "--repeats", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": TESTS})
    assert done.returncode == 0, done.stderr
    assert "suggested: bfloat16 with the default policy" in done.stdout
    assert "kept for backward" in done.stdout
    assert "Warning" not in done.stderr


class GeneratorNoiseFunc(MLPFunc):
    """A velocity with noise from a generator of its own (``generator=``)."""

    def __init__(self) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(11)

    def forward(self, t, y):
        return super().forward(t, y) * (1 + 0.1 * torch.randn(y.shape, generator=self.generator))


def test_models_drawing_from_their_own_generators_are_compared_on_the_same_draws():
    """Each of check's runs starts the model's own generators where the model's were: the
    float32 conversion then differs from the float64 reference by roundoff only (new draws
    per run would differ by the noise), and the model's generator is left as it was."""
    torch.manual_seed(0)
    model = MLPODE()
    model.block.odefunc = GeneratorNoiseFunc()
    before = model.block.odefunc.generator.get_state()
    report = rampde_fx.check(model, torch.randn(8, 3), dtypes=[torch.bfloat16])
    float32 = report.scopes[0].measurement("float32")
    assert float32.output_error < 1e-6 and float32.gradient_error < 1e-6
    assert torch.equal(model.block.odefunc.generator.get_state(), before)
