"""The compiled step kernels of solves under torch.compile and of eager solves with
compile_steps: the backward step (recomputation, vector-Jacobian product, fp16 scaling and
gradient accumulation in one traced graph) against float64 autograd, the steps that fall back
to autograd beside them, explain's account of them, and the small products traced as fused
arithmetic."""
from __future__ import annotations

import copy
import gc
import pathlib
import sys
import weakref

import pytest
import torch
import torchdiffeq
from hypothesis import given, settings
from hypothesis import strategies as st

import rampde_fx
from models import rel_err
from rampde_fx import runtime
from rampde_fx.adjoint import sweep
from rampde_fx.passes.cpu import cpu_addmm, cpu_mm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from ode_models import STL10ODENet  # noqa: E402


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class Tiny(torch.nn.Module):
    """A launch-bound velocity: 2-16-2 tanh MLP with a time-dependent input scale."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(),
                                       torch.nn.Linear(16, 2))

    def forward(self, t, y):
        return self.net(y * (1 + 0.5 * t))


def solve_and_grads(solve, func, y0, t, time_grads=True):
    """The solution, and the gradients of a weighted sum of it for y0, t (unless not
    ``time_grads``: then the times want none) and the parameters."""
    y0, t = y0.clone().requires_grad_(), t.clone().requires_grad_(time_grads)
    out = solve(func, y0, t)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    inputs = [y0, t] if time_grads else [y0]
    return [out, *torch.autograd.grad((out * weights).sum(), [*inputs, *func.parameters()])]


def reference(func, y0, t, method, options, time_grads=True):
    func64 = Tiny().double()
    func64.load_state_dict(func.state_dict())
    return solve_and_grads(lambda f, y, tt: torchdiffeq.odeint(f, y, tt, method=method,
                                                               options=options),
                           func64, y0.double(), t.double(), time_grads)


def compiled_solve(dtype, method, options):
    return torch.compile(lambda f, y, tt: rampde_fx.odeint(f, y, tt, method=method,
                                                           options=options, dtype=dtype),
                         fullgraph=True, backend="aot_eager")


def eager_solve(dtype, method, options, **settings):
    settings = {"compile_steps": True, **settings}
    return lambda f, y, tt: rampde_fx.odeint(f, y, tt, method=method, options=options,
                                             dtype=dtype, **settings)


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 2e-6), (torch.bfloat16, 4 * 2.0 ** -8),
                                          (torch.float16, 4 * 2.0 ** -11)])
@pytest.mark.parametrize("interp", ["linear", "cubic"])
def test_kernel_steps_against_float64(dtype, bound, interp):
    """Outputs between grid points (their steps recompute under autograd) and at grid points
    (their steps run the backward kernel), gradients for y0, every output time and the
    parameters: within a few unit roundoffs of float64 (float32 mode: of the exact discrete
    gradient). Cubic interpolation reads the step's first stage, which the forward kernel
    then returns; linear interpolation reads none."""
    torch.manual_seed(0)
    func = Tiny()
    y0 = torch.randn(16, 2)
    t = torch.tensor([0.0, 0.35, 0.5, 1.0])
    options = {"step_size": 0.1, "interp": interp}
    got = solve_and_grads(compiled_solve(dtype, "rk4", options), func, y0, t)
    want = reference(func, y0, t, "rk4", options)
    for g, w in zip(got, want):
        assert rel_err(g, w) < bound


@pytest.mark.usefixtures("cheap_steps")
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 2e-6), (torch.bfloat16, 4 * 2.0 ** -8),
                                          (torch.float16, 4 * 2.0 ** -11)])
@pytest.mark.parametrize("under_compile", [False, True])
def test_outputs_inside_steps_run_the_backward_kernel(monkeypatch, dtype, bound, under_compile):
    """Outputs between grid points, linearly interpolated, whose times want no gradient: their
    cotangents reach the steps' backward kernels (no step is recomputed under autograd), and
    the outputs and gradients are within a few unit roundoffs of float64."""
    torch.manual_seed(0)
    func = Tiny()
    y0, t = torch.randn(16, 2), torch.tensor([0.0, 0.35, 0.5, 0.77, 1.0])
    options = {"step_size": 0.1}
    solve = compiled_solve(dtype, "rk4", options) if under_compile else \
        eager_solve(dtype, "rk4", options)
    monkeypatch.setattr(sweep, "_recomputed_step", None)  # a call would fail
    got = solve_and_grads(solve, func, y0, t, time_grads=False)
    want = reference(func, y0, t, "rk4", options, time_grads=False)
    for g, w in zip(got, want):
        assert rel_err(g, w) < bound


@pytest.mark.usefixtures("cheap_steps")
def test_cubic_outputs_inside_steps_recompute_them_under_autograd():
    """Cubic interpolation evaluates the velocity at the step's end, so it is not linear in the
    step's values: steps with such outputs inside them recompute under autograd, and the
    gradients (the times want none) are within float32 roundoff of float64 torchdiffeq's."""
    torch.manual_seed(0)
    func = Tiny()
    y0, t = torch.randn(16, 2), torch.tensor([0.0, 0.35, 0.5, 0.77, 1.0])
    options = {"step_size": 0.1, "interp": "cubic"}
    got = solve_and_grads(eager_solve(torch.float32, "rk4", options), func, y0, t,
                          time_grads=False)
    want = reference(func, y0, t, "rk4", options, time_grads=False)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 2e-6


@pytest.mark.usefixtures("cheap_steps")
@pytest.mark.parametrize("method, checkpoint", [("dopri5", "steps"), ("bosh3", "steps"),
                                                ("tsit5", "steps"),
                                                ("dopri5", rampde_fx.Budget(2))])
def test_dense_outputs_inside_adaptive_steps_run_the_backward_kernel(monkeypatch, method,
                                                                     checkpoint):
    """Adaptive steps with outputs inside them (the dense output reads every stage): the
    outputs' cotangents reach the backward kernels as the stages' cotangents, and the steps
    without outputs run the same kernel given zeros (one kernel); in float32 the gradients
    equal the op-by-op discrete adjoint's to roundoff, where the forward takes the same steps
    (under a budget too, which recomputes steps from the states it keeps); in float64 they equal
    autograd's through the very same steps (checkpoint='stages')."""
    torch.manual_seed(0)
    func = Tiny()
    y0, t = torch.randn(16, 2), torch.tensor([0.0, 0.3, 0.35, 0.9, 1.5])
    found = {}
    for compile_steps in (False, True):
        if compile_steps:
            monkeypatch.setattr(sweep, "_recomputed_step", None)  # a call would fail
            runtime.STEP_KERNELS.clear()  # only this solve's kernels below
        with rampde_fx.collect_stats() as solves:
            found[compile_steps] = solve_and_grads(lambda f, y, tt: rampde_fx.odeint(
                f, y, tt, method=method, rtol=1e-6, atol=1e-7, dtype=torch.float32,
                compile_steps=compile_steps, checkpoint=checkpoint), func, y0, t,
                time_grads=False)
        found[compile_steps, "steps"] = (solves[0].steps, solves[0].rejected_steps)
    assert found[True, "steps"] == found[False, "steps"]
    # More steps than outputs inside them: some steps have none.
    assert found[True, "steps"][0] > len(t) - 1
    (kernels,) = [k for per_velocity in runtime.STEP_KERNELS.values()
                  for k in per_velocity.values()]
    assert len(kernels._backward) == 1
    runtime.STEP_KERNELS.clear()
    for g, w in zip(found[True], found[False]):
        assert rel_err(g, w) < 1e-5
    # In float64 the kernel solve equals autograd through the very same steps.
    func64, y64, t64 = copy.deepcopy(func).double(), y0.double(), t.double()
    got64, want64 = (solve_and_grads(lambda f, y, tt: rampde_fx.odeint(
        f, y, tt, method=method, rtol=1e-6, atol=1e-7, dtype=torch.float64, **settings),
        func64, y64, t64, time_grads=False)
        for settings in ({"compile_steps": True, "checkpoint": checkpoint},
                         {"checkpoint": "stages"}))
    (kernels,) = [k for per_velocity in runtime.STEP_KERNELS.values()
                  for k in per_velocity.values()]
    assert len(kernels._backward) == 1
    runtime.STEP_KERNELS.clear()
    for g, w in zip(got64, want64):
        assert rel_err(g, w) < 1e-12


@pytest.mark.usefixtures("cheap_steps")
@settings(max_examples=10, deadline=None)
@given(inside=st.lists(st.integers(1, 99), min_size=1, max_size=4, unique=True),
       method=st.sampled_from(["euler", "midpoint", "rk4", "dopri5", "bosh3"]),
       steps=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_outputs_anywhere_inside_steps_through_kernels(inside, method, steps, seed):
    """Generated output times between 0 and 1 (hundredths, on grids of 1 to 7 steps, or
    inside adaptive steps), whose steps run the backward kernel (none is recomputed under
    autograd): in float32, outputs and gradients equal float64 torchdiffeq's on fixed grids;
    on adaptive steps, the gradients equal those of the same kernel solve whose output times
    want gradients too, which recomputes such steps under autograd (the same forward, so
    the same steps)."""
    torch.manual_seed(seed)
    func = Tiny()
    y0 = torch.randn(4, 2)
    t = torch.tensor([0.0, *sorted(k / 100 for k in inside), 1.0])
    adaptive = method in ("dopri5", "bosh3")
    settings_ = {"rtol": 1e-6, "atol": 1e-7} if adaptive else {"options": {"step_size": 1 / steps}}

    def solve(f, y, tt):
        return rampde_fx.odeint(f, y, tt, method=method, **settings_, dtype=torch.float32,
                                compile_steps=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sweep, "_recomputed_step", None)  # a call would fail
        got = solve_and_grads(solve, func, y0, t, time_grads=False)
    if adaptive:
        out, y0_grad, _, *parameter_grads = solve_and_grads(solve, func, y0, t)
        want, bound = [out, y0_grad, *parameter_grads], 1e-5
    else:
        want = reference(func, y0, t, method, settings_["options"], time_grads=False)
        bound = 5e-6
    for g, w in zip(got, want):
        assert rel_err(g, w) < bound


@pytest.mark.parametrize("under_compile", [True, False])
def test_backward_runs_no_autograd_engine_per_step(monkeypatch, under_compile):
    """After the first call has traced its kernels, a training step on a fixed grid, compiled
    or eager with compile_steps, never calls torch.autograd.grad inside the solve's backward."""
    torch.manual_seed(0)
    func = Tiny()
    options = {"step_size": 0.05}
    solve = compiled_solve(torch.bfloat16, "rk4", options) if under_compile else \
        eager_solve(torch.bfloat16, "rk4", options)
    y0, t = torch.randn(16, 2), torch.tensor([0.0, 1.0])
    with runtime.patch(kernel_backend="aot_eager"):
        solve(func, y0, t)[-1].sum().backward()
        calls = []
        real_grad = torch.autograd.grad
        monkeypatch.setattr(torch.autograd, "grad",
                            lambda *a, **k: calls.append(1) or real_grad(*a, **k))
        solve(func, y0, t)[-1].sum().backward()
    assert calls == []


@pytest.mark.slow
def test_inductor_kernels_of_a_launch_bound_velocity_against_float64():
    """The inductor-compiled kernels, with the small products traced as fused arithmetic, in
    bf16 against float64 (adaptive too: its steps with outputs inside recompute)."""
    torch.manual_seed(0)
    func = Tiny()
    y0, t = torch.randn(16, 2), torch.tensor([0.0, 0.5, 1.0])
    for method, options in [("rk4", {"step_size": 0.05}), ("dopri5", None)]:
        solve = torch.compile(lambda f, y, tt: rampde_fx.odeint(
            f, y, tt, method=method, options=options, rtol=1e-4, atol=1e-4), fullgraph=True)
        got = solve_and_grads(solve, func, y0, t)
        want = reference(func, y0, t, method, options)
        for g, w in zip(got, want):
            assert rel_err(g, w) < 4 * 2.0 ** -8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_small_products_round_once(dtype):
    """A small product traced as fused arithmetic sums in float32 and rounds once, as a
    library matmul does: no further from float64 than torch.mm, and exact in float32 up to
    summation order."""
    torch.manual_seed(0)
    a, b, bias = torch.randn(16, 16), torch.randn(16, 2), torch.randn(2)
    exact = torch.addmm(bias.double(), a.double(), b.double())
    low = [x.to(dtype) for x in (bias, a, b)]
    inlined = cpu_addmm(*low)
    library = torch.addmm(*low)
    assert inlined.dtype == dtype
    assert rel_err(inlined, exact) <= rel_err(library, exact) * 1.25 + 1e-7
    assert rel_err(cpu_mm(low[1], low[2]), exact - bias.double()) < (
        2 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_larger_16bit_products_add_their_bias_in_float32(dtype):
    """Above the small and widened thresholds a 16-bit addmm is a library mm with the bias
    added in float32 by its reader: the product is rounded once more than addmm rounds it, so
    within 1.5x of addmm's error against float64."""
    torch.manual_seed(0)
    a, b, bias = torch.randn(64, 128), torch.randn(128, 128), 10 * torch.randn(128)
    exact = torch.addmm(bias.double(), a.double(), b.double())
    low = [x.to(dtype) for x in (bias, a, b)]
    split = cpu_addmm(*low)
    assert split.dtype == dtype
    assert rel_err(split, exact) <= 1.5 * rel_err(torch.addmm(*low), exact)



@pytest.mark.parametrize("dtype, bound", [(torch.bfloat16, 4 * 2.0 ** -8),
                                          (torch.float16, 4 * 2.0 ** -11)])
def test_widened_products_in_the_kernels_against_float64(dtype, bound):
    """A 32-64-64-32 tanh MLP at batch 128: every product of its kernel steps, forward and
    backward, is small enough to run as a float32 product of widened 16-bit operands; the
    outputs and the gradients for y0, the output times and the parameters are within a few
    unit roundoffs of float64."""
    torch.manual_seed(0)
    func = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                               torch.nn.Tanh(), torch.nn.Linear(64, 32))
    velocity = lambda t, y: func(y)  # noqa: E731
    y0, t = torch.randn(128, 32), torch.tensor([0.0, 0.5, 1.0])
    graphs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def recording(graph, inputs):
        graphs.append(graph)
        return aot_eager(graph, inputs)

    with runtime.patch(kernel_backend=recording), rampde_fx.collect_stats() as solves:
        got = solve_and_grads(lambda f, y, tt: rampde_fx.odeint(
            velocity, y, tt, method="rk4", options={"step_size": 0.25}, dtype=dtype,
            compile_steps=True), func, y0, t)
    assert solves[0].step_kernels == "compiled" and graphs
    products = [node for graph in graphs for node in graph.graph.nodes
                if node.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)]
    assert len(products) > 6 and {node.meta["val"].dtype for node in products} == {torch.float32}
    func64 = copy.deepcopy(func).double()
    want = solve_and_grads(lambda f, y, tt: torchdiffeq.odeint(
        lambda tt_, y_: func64(y_), y, tt, method="rk4", options={"step_size": 0.25}),
        func64, y0.double(), t.double())
    for g, w in zip(got, want):
        assert rel_err(g, w) < bound


@pytest.mark.usefixtures("cheap_steps")
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 2e-6), (torch.bfloat16, 4 * 2.0 ** -8),
                                          (torch.float16, 4 * 2.0 ** -11)])
@pytest.mark.parametrize("checkpoint", ["steps", "stages"])
def test_compile_steps_outside_torch_compile_against_float64(dtype, bound, checkpoint):
    """compile_steps=True without torch.compile: the steps run as kernels (the stats say so);
    outputs between and at grid points, and the gradients for y0, the output times and the
    parameters, within a few unit roundoffs of float64, with the kernels' adjoint steps or
    (checkpoint='stages') autograd through the kernels."""
    if checkpoint == "stages" and dtype == torch.float16:
        pytest.skip("checkpoint='stages' has no adjoint scaling, which float16 needs")
    torch.manual_seed(0)
    func = Tiny()
    y0 = torch.randn(16, 2)
    t = torch.tensor([0.0, 0.35, 0.5, 1.0])
    options = {"step_size": 0.1}
    with rampde_fx.collect_stats() as solves:
        got = solve_and_grads(eager_solve(dtype, "rk4", options, checkpoint=checkpoint), func,
                              y0, t)
    assert solves[0].step_kernels == "compiled"
    for g, w in zip(got, reference(func, y0, t, "rk4", options)):
        assert rel_err(g, w) < bound


@pytest.mark.usefixtures("cheap_steps")
def test_compile_steps_adaptive_in_float32_takes_the_op_by_op_steps():
    """dopri5 with compile_steps in float32 mode: as many steps as the op-by-op solve, and its
    outputs (dense output between steps) and gradients within a tenth of rtol of it (the
    kernels sum small products in another order: the error estimates, and so the step sizes,
    differ in float32 roundoff)."""
    torch.manual_seed(0)
    func = Tiny()
    y0, t = torch.randn(16, 2), torch.tensor([0.0, 0.3, 1.0])
    found = {}
    for compile_steps in (False, True):
        with rampde_fx.collect_stats() as solves:
            found[compile_steps] = solve_and_grads(lambda f, y, tt: rampde_fx.odeint(
                f, y, tt, rtol=1e-6, atol=1e-7, dtype=torch.float32,
                compile_steps=compile_steps), func, y0, t)
        found[compile_steps, "steps"] = (solves[0].steps, solves[0].rejected_steps)
    assert found[True, "steps"] == found[False, "steps"]
    for g, w in zip(found[True], found[False]):
        assert rel_err(g, w) < 1e-5


@pytest.mark.usefixtures("cheap_steps")
def test_compile_steps_inference_keeps_nothing():
    """Under no_grad, an eager solve with compile_steps runs its forward kernels and returns a
    tensor that keeps no graph."""
    torch.manual_seed(0)
    func = Tiny()
    with torch.no_grad(), rampde_fx.collect_stats() as solves:
        out = eager_solve(torch.bfloat16, "rk4", {"step_size": 0.05})(
            func, torch.randn(16, 2), torch.tensor([0.0, 1.0]))
    assert out.grad_fn is None and solves[0].step_kernels == "compiled"


class Noisy(Tiny):
    """A velocity that draws random numbers: dropout (``bernoulli_`` in place) and
    ``randn_like`` noise."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = torch.nn.Dropout(0.25)

    def forward(self, t, y):
        return self.drop(super().forward(t, y)) + 0.1 * torch.randn_like(y)


class DrawsFromValues(Tiny):
    """A velocity whose draws depend on values it computes: ``bernoulli`` of probabilities."""

    def forward(self, t, y):
        out = super().forward(t, y)
        return out * torch.bernoulli(torch.sigmoid(out))


def seeded(solve):
    """``solve`` after seeding the generators, as before each run of a training step."""
    def run(*args):
        torch.manual_seed(7)
        return solve(*args)
    return run


@pytest.mark.usefixtures("cheap_steps")
@pytest.mark.parametrize("under_compile", [False, True])
@pytest.mark.parametrize("checkpoint", ["steps", rampde_fx.Budget(2)])
def test_random_draws_run_as_kernels_with_the_original_numbers(under_compile, checkpoint):
    """Dropout and noise in the velocity: its steps run as kernels, which are given the
    numbers the original draws (drawn eagerly before each kernel), and the backward kernels,
    under each step's generator state, the same numbers again. float32 mode therefore equals
    torchdiffeq run from the same seed (outputs and the gradients for y0, every output time
    and the parameters); bf16 is within a few unit roundoffs of it. New draws in the backward
    pass would leave the gradients O(1) wrong."""
    torch.manual_seed(0)
    func = Noisy()
    y0, t = torch.randn(16, 2), torch.tensor([0.0, 0.5, 1.0])
    options = {"step_size": 0.1}
    want = solve_and_grads(seeded(lambda f, y, tt: torchdiffeq.odeint(
        f, y, tt, method="rk4", options=options)), func, y0, t)
    for dtype, bound in ((torch.float32, 1e-6), (torch.bfloat16, 4 * 2.0 ** -8)):
        solve = eager_solve(dtype, "rk4", options, checkpoint=checkpoint)
        if under_compile:
            solve = torch.compile(solve, fullgraph=True, backend="aot_eager")
        with rampde_fx.collect_stats() as solves:
            got = solve_and_grads(seeded(solve), func, y0, t)
        assert solves[0].step_kernels == "compiled"
        for g, w in zip(got, want):
            assert rel_err(g, w) < bound, dtype


class RandomVelocity(torch.nn.Module):
    """An MLP with the random ops users put in velocities, in a generated arrangement."""

    def __init__(self, width: int, p: float, noise: str) -> None:
        super().__init__()
        self.lin1, self.lin2 = torch.nn.Linear(2, width), torch.nn.Linear(width, 2)
        self.drop, self.noise = torch.nn.Dropout(p), noise

    def forward(self, t, y):
        h = self.drop(torch.tanh(self.lin1(y) * (1 + t)))
        noise = {"none": 0, "normal": 0.1 * torch.randn_like(y),
                 "uniform": torch.rand_like(y) - 0.5,
                 "normal_": torch.empty_like(y).normal_(0.0, 0.1)}[self.noise]
        return self.lin2(h) + noise


@pytest.mark.usefixtures("cheap_steps")
@settings(max_examples=10, deadline=None)
@given(width=st.integers(2, 8), p=st.sampled_from([0.0, 0.1, 0.5]),
       noise=st.sampled_from(["none", "normal", "uniform", "normal_"]),
       method=st.sampled_from(["euler", "midpoint", "rk4"]), steps=st.integers(1, 6),
       budget=st.sampled_from([None, 1, 2]), seed=st.integers(0, 2**16))
def test_random_velocities_in_kernels_equal_torchdiffeq(width, p, noise, method, steps, budget,
                                                         seed):
    """Generated noisy velocities, grids and checkpoints: float32 kernels (compile_steps)
    equal torchdiffeq run from the same seed, outputs and gradients."""
    torch.manual_seed(seed)
    func = RandomVelocity(width, p, noise)
    y0, t = torch.randn(4, 2), torch.tensor([0.0, 0.3, 1.0])
    options = {"step_size": 1.0 / steps}
    checkpoint = "steps" if budget is None else rampde_fx.Budget(budget)
    got = solve_and_grads(seeded(eager_solve(torch.float32, method, options,
                                             checkpoint=checkpoint)), func, y0, t)
    want = solve_and_grads(seeded(lambda f, y, tt: torchdiffeq.odeint(
        f, y, tt, method=method, options=options)), func, y0, t)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-6)


class NamedGeneratorNoise(Tiny):
    """Noise drawn from a generator of the model's own (``generator=``), not PyTorch's."""

    def __init__(self) -> None:
        super().__init__()
        self.generator = torch.Generator()

    def forward(self, t, y):
        noise = torch.randn(y.shape, generator=self.generator)
        return super().forward(t, y) * (1 + 0.1 * noise)


class EagerNamedGeneratorNoise(NamedGeneratorNoise):
    """The same, with Python control flow on a computed value: it runs eagerly."""

    def forward(self, t, y):
        out = super().forward(t, y)
        return out if bool(out.sum() > -1e9) else -out


@pytest.mark.usefixtures("cheap_steps")
@pytest.mark.filterwarnings("ignore::rampde_fx.CaptureWarning")
@pytest.mark.parametrize("make", [NamedGeneratorNoise, EagerNamedGeneratorNoise])
@pytest.mark.parametrize("compile_steps", [False, True])
@pytest.mark.parametrize("checkpoint", ["steps", rampde_fx.Budget(2)])
def test_draws_from_a_named_generator_are_replayed(make, compile_steps, checkpoint):
    """The backward pass recomputes each step with the draws of the velocity's own generator
    as the forward made them, and leaves that generator where the original leaves it: float32
    mode equals torchdiffeq (outputs, gradients, and the generator's next number). Before,
    the recomputation drew new numbers from it (gradients 1e-3 off) and advanced it twice."""
    torch.manual_seed(0)
    func = make()
    y0, t = torch.randn(8, 2), torch.tensor([0.0, 0.5, 1.0])
    options = {"step_size": 0.125}
    found = []
    for solve in (lambda f, y, tt: torchdiffeq.odeint(f, y, tt, method="rk4", options=options),
                  eager_solve(torch.float32, "rk4", options, checkpoint=checkpoint,
                              compile_steps=compile_steps)):
        func.generator.manual_seed(3)
        results = solve_and_grads(solve, func, y0, t)
        found.append([*results, torch.randn(1, generator=func.generator)])
    for g, w in zip(*found):
        assert rel_err(g, w) < 1e-6


class HutchinsonCNF(torch.nn.Module):
    """An FFJORD-style CNF whose divergence is estimated with noise drawn at every evaluation
    (Hutchinson's estimator), by ``torch.autograd.grad`` inside the velocity."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(),
                                       torch.nn.Linear(16, 2))

    def forward(self, t, state):
        z, _ = state
        with torch.enable_grad():
            z = z.requires_grad_(True)
            dz = self.net(torch.cat([z, t.expand(z.shape[0], 1)], 1))
            noise = torch.randn_like(z)
            (vjp,) = torch.autograd.grad(dz, z, noise, create_graph=True)
        return dz, -(vjp * noise).sum(1, keepdim=True)


@pytest.mark.usefixtures("cheap_steps")
def test_per_evaluation_hutchinson_noise_runs_as_kernels():
    """The noise of each evaluation is given to the kernels (the backward kernel's derivative
    of the estimator reads the forward's noise): float32 equals torchdiffeq run from the same
    seed (the samples, the log-density change and the gradients for z0 and the parameters),
    bf16 is within a few unit roundoffs of it."""
    torch.manual_seed(0)
    func = HutchinsonCNF()
    state = (torch.randn(32, 2), torch.zeros(32, 1))
    options = {"step_size": 0.125}

    def results(solve):
        torch.manual_seed(5)
        z0 = state[0].clone().requires_grad_()
        z, logp = solve(func, (z0, state[1]), torch.tensor([0.0, 1.0]))
        loss = z[-1].square().sum() + logp[-1].sum()
        return [z[-1], logp[-1], *torch.autograd.grad(loss, [z0, *func.parameters()])]

    want = results(lambda f, y, tt: torchdiffeq.odeint(f, y, tt, method="rk4",
                                                       options=options))
    for dtype, bound in ((torch.float32, 1e-6), (torch.bfloat16, 4 * 2.0 ** -8)):
        with rampde_fx.collect_stats() as solves:
            got = results(eager_solve(dtype, "rk4", options))
        assert solves[0].step_kernels == "compiled"
        for g, w in zip(got, want):
            assert rel_err(g, w) < bound, dtype


@pytest.mark.usefixtures("cheap_steps")
def test_random_draws_in_adaptive_kernels_are_the_op_by_op_ones():
    """dopri5 with a first stage known from the step before: its kernels draw what the
    op-by-op steps draw (the same ops in the same order), so sampling a noisy velocity gives
    the same result, step for step."""
    torch.manual_seed(0)
    func = Noisy()
    y0, t = torch.randn(16, 2), torch.tensor([0.0, 1.0])
    found = {}
    for compile_steps in (False, True):
        with torch.no_grad(), rampde_fx.collect_stats() as solves:
            found[compile_steps] = seeded(lambda f, y, tt: rampde_fx.odeint(
                f, y, tt, method="dopri5", rtol=1e-3, atol=1e-4, dtype=torch.float32,
                compile_steps=compile_steps))(func, y0, t)
        found[compile_steps, "stats"] = solves[0]
    assert found[True, "stats"].step_kernels == "compiled"
    assert found[True, "stats"].steps == found[False, "stats"].steps
    assert rel_err(found[True], found[False]) < 1e-6


@pytest.mark.usefixtures("cheap_steps")
def test_convert_with_compile_steps_explains_which_solves_run_as_kernels():
    """A converted model with compile_steps: explain says that the plain and noisy
    velocities' steps ran as compiled kernels, and why the one whose draws depend on its
    values ran op by op; its result is the same as without compile_steps (same draws, same
    ops)."""

    class ThreeSolves(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.plain, self.noisy, self.drawing = Tiny(), Noisy(), DrawsFromValues()

        def forward(self, y):
            t = torch.tensor([0.0, 1.0])
            options = {"step_size": 0.25}
            return [y := torchdiffeq.odeint(f, y, t, method="rk4", options=options)[-1]
                    for f in (self.plain, self.noisy, self.drawing)]

    torch.manual_seed(0)
    model = ThreeSolves()
    y = torch.randn(8, 2)
    outputs = {}
    for compile_steps in (False, True):
        converted = rampde_fx.convert(model, compile_steps=compile_steps)
        torch.manual_seed(1)
        outputs[compile_steps] = converted(y)
    text = rampde_fx.explain(converted)
    assert text.count("steps: compiled kernels, one per step and one per step of the "
                      "backward pass") == 2
    assert ("steps: op by op, without compiled kernels: the velocity's random op "
            "aten::bernoulli draws numbers that depend on its values") in text
    for got, want in zip(outputs[True], outputs[False]):
        assert rel_err(got, want) < 2.0 ** -7


class WeightBank(torch.nn.Module):
    """Weights picked from a bank by the interval of t's value (as in the rampde paper's
    STL-10 model): a graph per time value."""

    def __init__(self, intervals: int = 4) -> None:
        super().__init__()
        self.bank = torch.nn.Parameter(torch.randn(intervals, 2, 16) * 0.5)
        self.out = torch.nn.Linear(16, 2)
        self.intervals = intervals

    def forward(self, t, y):
        k = min(int(t.item() * self.intervals), self.intervals - 1)
        return self.out(torch.tanh(y @ self.bank[k])) * (1 + t)


class ScaledWeightBank(WeightBank):
    """Graphs per time that differ in more than the bank index: a gain read as a number."""

    def forward(self, t, y):
        k = min(int(t.item() * self.intervals), self.intervals - 1)
        return self.out(torch.tanh(y @ self.bank[k])) * (k + 1.5)


@pytest.mark.usefixtures("cheap_steps")
def test_graphs_differing_in_more_than_the_bank_index_keep_their_kernels():
    """Only the bank index becomes a kernel input: graphs whose code differs otherwise (a
    number read in Python) keep a kernel per interval, and the results equal the op-by-op
    solve's (float32: outputs, gradients for y0, the times and the parameters)."""
    torch.manual_seed(0)
    func = ScaledWeightBank()
    y0, t = torch.randn(16, 2), torch.tensor([0.0, 0.33, 1.0])
    options = {"step_size": 0.125}
    runtime.STEP_KERNELS.clear()  # only this velocity's kernels below
    got = solve_and_grads(eager_solve(torch.float32, "rk4", options), func, y0, t)
    (kernels,) = [k for per_velocity in runtime.STEP_KERNELS.values()
                  for k in per_velocity.values() if k.stepper.velocity.time_indexed]
    assert len(kernels._backward) > 1
    runtime.STEP_KERNELS.clear()  # the class keeps its captures, and with them these kernels
    want = solve_and_grads(eager_solve(torch.float32, "rk4", options, compile_steps=False),
                           func, y0, t)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


@pytest.mark.usefixtures("cheap_steps")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("under_compile", [False, True])
def test_graphs_per_time_run_as_kernels_on_fixed_grids(dtype, under_compile):
    """A velocity with a graph per time value gets kernels on a fixed grid: each step runs the
    graphs of its times, and since its graphs differ only in the bank index, which the kernels
    take as an input, all 20 steps share one forward and one backward kernel; the outputs (also
    between grid points) and gradients equal the op-by-op solve's: in float32 to roundoff (1e-5:
    the kernels sum small products in another order, and the times' gradients sum terms that
    cancel), in bf16 within a few unit roundoffs."""
    torch.manual_seed(0)
    func = WeightBank()
    y0, t = torch.randn(16, 2), torch.tensor([0.0, 0.33, 1.0])
    options = {"step_size": 0.05}

    def solve(f, y, tt, compile_steps=True):
        return rampde_fx.odeint(f, y, tt, method="rk4", options=options, dtype=dtype,
                                compile_steps=compile_steps)

    kernel_solve = torch.compile(solve, fullgraph=True, backend="aot_eager") if under_compile \
        else solve
    with rampde_fx.collect_stats() as solves:
        got = solve_and_grads(kernel_solve, func, y0, t)
    assert solves[0].step_kernels == "compiled"
    (kernels,) = [k for per_velocity in runtime.STEP_KERNELS.values()
                  for key, k in per_velocity.items()
                  if k.stepper.velocity.time_indexed and key[-1] == dtype]
    assert len(kernels._forward) == 1 and len(kernels._backward) == 1
    want = solve_and_grads(lambda f, y, tt: solve(f, y, tt, compile_steps=False), func, y0, t)
    for g, w in zip(got, want):
        assert rel_err(g, w) < (1e-5 if dtype == torch.float32 else 4 * 2.0 ** -8)


@pytest.mark.usefixtures("cheap_steps")
def test_graphs_per_time_in_adaptive_solves_run_op_by_op():
    """An adaptive solve meets new times at every step: its steps run op by op, and explain
    says why."""

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.velocity = WeightBank()

        def forward(self, y):
            return torchdiffeq.odeint(self.velocity, y, torch.tensor([0.0, 1.0]), rtol=1e-3,
                                      atol=1e-3)[-1]

    converted = rampde_fx.convert(Model(), compile_steps=True)
    converted(torch.randn(4, 2))
    assert ("steps: op by op, without compiled kernels: the velocity has a graph per time "
            "value, and an adaptive solve's steps meet new times") in rampde_fx.explain(converted)


@pytest.mark.usefixtures("cheap_steps")
def test_stl10_net_with_weights_per_time_runs_as_kernels():
    """The rampde paper's STL-10 architecture in small (two widths, 8x8): every block's steps
    run as kernels, in float32 mode within 1e-5 of torchdiffeq, in bf16 as close to float64
    as the op-by-op conversion within 2x (its gradients are ill-conditioned: InstanceNorm over
    4x4 images)."""
    torch.manual_seed(0)
    model = STL10ODENet(widths=(4, 8))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.0, 1.0])

    def outputs_and_grads(m, *inputs):
        out = m(*inputs)
        return [out, *torch.autograd.grad(out.square().mean(), list(m.parameters()))]

    model64 = copy.deepcopy(model).double()
    exact = outputs_and_grads(model64, x.double(), t.double())
    for dtype in (torch.float32, torch.bfloat16):
        with rampde_fx.collect_stats() as solves:
            got = outputs_and_grads(rampde_fx.convert(model, dtype=dtype, compile_steps=True),
                                    x, t)
        assert [s.step_kernels for s in solves] == ["compiled", "compiled"]
        op_by_op = outputs_and_grads(rampde_fx.convert(model, dtype=dtype), x, t)
        for g, w, o in zip(got, exact, op_by_op):
            assert rel_err(g, w) < (1e-5 if dtype == torch.float32 else
                                    2 * max(rel_err(o, w), 2.0 ** -8))


class CountingVelocity(torch.nn.Module):
    """Divides by the number of its calls, a buffer its forward increments and reads."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, t, y):
        self.calls.add_(1)
        return torch.tanh(self.lin(y)) / float(self.calls)


class CumulativeBatchNormVelocity(torch.nn.Module):
    """BatchNorm with momentum=None in train mode: a cumulative average, whose Python reads
    num_batches_tracked after incrementing it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.norm = torch.nn.BatchNorm1d(2, momentum=None)

    def forward(self, t, y):
        return self.norm(torch.tanh(self.lin(y)))


@pytest.mark.usefixtures("cheap_steps")
@pytest.mark.parametrize("make", [CountingVelocity, CumulativeBatchNormVelocity])
@pytest.mark.parametrize("under_compile", [False, True])
def test_velocities_reading_buffers_they_change_run_op_by_op(make, under_compile):
    """Which graph such a velocity runs depends on the evaluations before it: its steps get no
    kernels (the stats say why), and outputs, gradients and buffers equal the op-by-op
    solve's."""
    found = {}
    for compile_steps in (False, True):
        torch.manual_seed(0)
        func = make()

        def solve(f, y, tt):
            return rampde_fx.odeint(f, y, tt, method="rk4", options={"step_size": 0.25},
                                    dtype=torch.float32, compile_steps=compile_steps)

        if under_compile and compile_steps:
            solve = torch.compile(solve, fullgraph=True, backend="aot_eager")
        with rampde_fx.collect_stats() as solves:
            results = solve_and_grads(solve, func, torch.randn(8, 2), torch.tensor([0.0, 1.0]))
        found[compile_steps] = [*results, *func.buffers()], solves[0].step_kernels
    (plain, _), (kernels, reason) = found[False], found[True]
    assert reason == ("the velocity's Python reads the value of a buffer, which its "
                      "evaluations may change")
    for g, w in zip(kernels, plain):
        assert torch.allclose(g, w, rtol=1e-6, atol=1e-7)


@pytest.mark.usefixtures("cheap_steps")
@pytest.mark.parametrize("make", [CountingVelocity, CumulativeBatchNormVelocity])
@pytest.mark.parametrize("checkpoint", ["steps", rampde_fx.Budget(2)])
def test_buffer_values_read_in_python_are_the_replayed_ones(make, checkpoint):
    """The backward pass re-runs each step with the buffer values the forward step found, and
    picks each evaluation's graph by those values, not by the values the solve left: float32
    mode equals torchdiffeq (outputs, gradients, buffers)."""
    found = []
    for solve in (torchdiffeq.odeint, lambda *a, **k: rampde_fx.odeint(
            *a, **k, dtype=torch.float32, checkpoint=checkpoint)):
        torch.manual_seed(0)
        func = make()
        results = solve_and_grads(lambda f, y, tt: solve(f, y, tt, method="rk4",
                                                         options={"step_size": 0.25}),
                                  func, torch.randn(8, 2), torch.tensor([0.0, 1.0]))
        found.append([*results, *(b.double() for b in func.buffers())])
    for g, w in zip(*found):
        assert rel_err(g, w) < 1e-5 if w.norm() > 0 else g.norm() == 0


class LateCountingVelocity(CountingVelocity):
    """Reads its call counter only after t = 0.5: its first graph reads no buffer."""

    def forward(self, t, y):
        self.calls.add_(1)
        out = torch.tanh(self.lin(y))
        return out / float(self.calls) if t.item() > 0.5 else out


@pytest.mark.usefixtures("cheap_steps")
def test_a_buffer_value_read_first_during_the_solve_is_an_error():
    """A graph captured during a solve with kernels that reads a buffer's value: a clear error
    that says what to do, not steps that run the wrong graphs."""
    with pytest.raises(RuntimeError, match="compile_steps=False"):
        rampde_fx.odeint(LateCountingVelocity(), torch.randn(8, 2), torch.tensor([0.0, 1.0]),
                         method="rk4", options={"step_size": 0.25}, compile_steps=True)


@pytest.mark.usefixtures("cheap_steps")
@pytest.mark.parametrize("under_compile", [False, True])
def test_kernels_keep_no_tensor_of_the_solve_that_made_them(under_compile):
    """A tensor attribute set before each solve (a conditioning input) is freed after its
    solve and backward pass: the cached kernels hold the velocity's graphs, not the tensors of
    the first solve that compiled them."""

    class Conditioned(Tiny):
        cond: torch.Tensor

        def forward(self, t, y):
            return super().forward(t, y) + self.cond

    func = Conditioned()
    solve = eager_solve(torch.bfloat16, "rk4", {"step_size": 0.25})
    if under_compile:
        solve = torch.compile(solve, fullgraph=True, backend="aot_eager")
    alive = []
    for _ in range(2):
        cond = torch.randn(8, 2)
        alive.append(weakref.ref(cond))
        func.cond = cond
        solve(func, torch.randn(8, 2), torch.tensor([0.0, 1.0])).sum().backward()
        del cond
    func.cond = torch.zeros(8, 2)
    gc.collect()
    assert [ref() for ref in alive] == [None, None]


def test_compile_steps_must_be_a_bool():
    with pytest.raises(TypeError, match="compile_steps must be True or False"):
        rampde_fx.convert(Tiny(), compile_steps="yes")
    with pytest.raises(ValueError, match="pass either config or"):
        rampde_fx.odeint(Tiny(), torch.zeros(1, 2), torch.tensor([0.0, 1.0]),
                         config=rampde_fx.SolveConfig(), compile_steps=True)


@pytest.mark.slow
def test_inductor_compile_steps_of_a_launch_bound_velocity_against_float64():
    """compile_steps with inductor's kernels, outside torch.compile, in bf16 against
    float64."""
    torch.manual_seed(0)
    func = Tiny()
    y0, t = torch.randn(16, 2), torch.tensor([0.0, 0.5, 1.0])
    options = {"step_size": 0.05}
    got = solve_and_grads(eager_solve(torch.bfloat16, "rk4", options), func, y0, t)
    for g, w in zip(got, reference(func, y0, t, "rk4", options)):
        assert rel_err(g, w) < 4 * 2.0 ** -8


@pytest.mark.slow
def test_inductor_kernels_are_given_the_original_draws():
    """Inductor's kernels of a noisy velocity draw nothing themselves (inductor would draw
    from its own generator): float32 mode equals torchdiffeq run from the same seed."""
    torch.manual_seed(0)
    func = Noisy()
    y0, t = torch.randn(16, 2), torch.tensor([0.0, 0.5, 1.0])
    options = {"step_size": 0.1}
    got = solve_and_grads(seeded(eager_solve(torch.float32, "rk4", options)), func, y0, t)
    want = solve_and_grads(seeded(lambda f, y, tt: torchdiffeq.odeint(
        f, y, tt, method="rk4", options=options)), func, y0, t)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-6


class JumpAtHalf(Tiny):
    """A velocity with a jump just after t = 0.5, read as a tensor (one graph for all times):
    only a stage nudged past 0.5 sees the right side at 0.5."""

    def forward(self, t, y):
        return torch.where(t > 0.5, 1.0, -1.0) * super().forward(t, y)


@pytest.mark.usefixtures("cheap_steps")
@pytest.mark.parametrize("under_compile", [False, True])
def test_nudged_first_stages_share_one_backward_kernel(under_compile):
    """The first stage's nudge is an input of the backward kernel. With ``perturb`` on a grid
    through a jump, the stage at a step's start sees the right side of it and the stage at its
    end the left (a wrong nudge in the recomputation would flip a stage's sign): float32
    equals the op-by-op solve and torchdiffeq. dopri5's steps, whose first stages are nudged
    except the first step's, share one backward kernel and equal the op-by-op solve (outputs,
    gradients for y0, the times and the parameters; torchdiffeq also differentiates its step
    size control, so it is no reference there)."""
    torch.manual_seed(0)
    y0, t = torch.randn(8, 2), torch.tensor([0.0, 1.0])
    for func, method, options, settings in (
            (JumpAtHalf(), "rk4", {"step_size": 0.125, "perturb": True}, {}),
            (Tiny(), "dopri5", None, {"rtol": 1e-6, "atol": 1e-6})):
        runtime.STEP_KERNELS.clear()
        solve = eager_solve(torch.float32, method, options, **settings)
        if under_compile:
            solve = torch.compile(solve, fullgraph=True, backend="aot_eager")
        with rampde_fx.collect_stats() as solves:
            got = solve_and_grads(solve, func, y0, t)
        assert solves[0].step_kernels == "compiled"
        (kernels,) = [k for per_velocity in runtime.STEP_KERNELS.values()
                      for k in per_velocity.values()]
        assert len(kernels._backward) == 1, method
        plain = solve_and_grads(eager_solve(torch.float32, method, options,
                                            compile_steps=False, **settings), func, y0, t)
        for g, w in zip(got, plain):
            assert rel_err(g, w) < 1e-5, method
        if method == "rk4":
            want = solve_and_grads(lambda f, y, tt: torchdiffeq.odeint(
                f, y, tt, method=method, options=options), func, y0, t)
            for g, w in zip(got, want):
                assert rel_err(g, w) < 1e-4
