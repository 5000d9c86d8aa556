"""torch.compile of converted models: one graph, inductor low-precision kernels, no per-step
synchronisation, bounded recompilation. Compile tests are few and small: inductor takes seconds
per graph on two cores."""
from __future__ import annotations

import copy
import re

import pytest
import torch
import torchdiffeq
from torch._dynamo.testing import CompileCounterWithBackend
from torch._inductor.compile_fx import compile_fx, compile_fx_inner
from torch.utils._python_dispatch import TorchDispatchMode

import rampde_fx
from field_models import HamiltonianModel, MLPFunc, MLPODE, ODEBlock
from models import rel_err
from rampde_fx import runtime
from rampde_fx.passes.cpu import tanh_for_cpu_kernels
from rampde_fx.tools import debug


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def outputs_and_grads(model, *inputs):
    inputs = [x.clone().requires_grad_() for x in inputs]
    out = model(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o * torch.linspace(-1, 1, o.numel(), device=o.device).view_as(o)).sum()
               for o in outs)
    return [*outs, *torch.autograd.grad(loss, [*inputs, *model.parameters()])]


class MethodODE(torch.nn.Module):
    def __init__(self, method: str) -> None:
        super().__init__()
        self.block = ODEBlock(MLPFunc())
        self.method = method

    def forward(self, x):
        t = self.block.integration_time
        return rampde_fx.odeint(self.block.odefunc, x, t, method=self.method,
                                options={"step_size": 0.2, "interp": "cubic"})[-1]


@pytest.mark.parametrize("method", [*rampde_fx.FIXED_GRID_TABLEAUS, "explicit_adams",
                                    "implicit_adams"])
def test_every_method_compiles_as_one_graph(method, cheap_steps):
    torch.manual_seed(0)
    model = MethodODE(method)
    x = torch.randn(3, 4)
    explanation = torch._dynamo.explain(model)(x)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)
    compiled_model = torch.compile(model, fullgraph=True, backend="aot_eager")
    for got, want in zip(outputs_and_grads(compiled_model, x), outputs_and_grads(model, x)):
        assert rel_err(got, want) < 2.0 ** -8  # the same bf16 solve: within bf16 rounding


class StepSizeODE(torch.nn.Module):
    """A solve whose step size is an attribute, set per instance."""

    def __init__(self, step_size: float) -> None:
        super().__init__()
        self.func = MLPFunc()
        self.options = {"step_size": step_size}

    def forward(self, x):
        return torchdiffeq.odeint(self.func, x, torch.tensor([0.0, 1.0]), method="rk4",
                                  options=self.options)[-1]


def test_instances_with_other_step_sizes_compile_as_one_graph_each(cheap_steps):
    """dynamo traces a number that changed between compilations as a tensor: the solve takes
    each call's numbers as its input (and explain shows them), with no graph break."""
    x = torch.randn(3, 4)
    for step_size, steps in ((0.25, 4), (0.125, 8), (0.5, 2)):
        torch.manual_seed(0)
        model = rampde_fx.convert(StepSizeODE(step_size))
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        for got, want in zip(outputs_and_grads(compiled, x), outputs_and_grads(model, x)):
            assert rel_err(got, want) < 2.0 ** -8
        assert f"options={{'step_size': {step_size}}}" in rampde_fx.explain(compiled)
        assert f"last solve: rk4, {steps} steps" in rampde_fx.explain(compiled)


def test_tuple_state_backwards_in_time_compiles(cheap_steps):
    torch.manual_seed(0)
    model = rampde_fx.convert(HamiltonianModel())
    q, p = torch.randn(5, 2), torch.randn(5, 2)
    compiled_model = torch.compile(model, fullgraph=True, backend="aot_eager")
    for got, want in zip(outputs_and_grads(compiled_model, q, p), outputs_and_grads(model, q, p)):
        assert rel_err(got, want) < 2.0 ** -8


class StepRecorder:
    """An inductor backend that keeps the graphs inductor lowers (forward and backward)."""

    def __init__(self) -> None:
        self.graphs: list[tuple[bool, torch.fx.GraphModule]] = []

    def __call__(self, gm, example_inputs):
        def inner(graph, inputs, **kwargs):
            self.graphs.append((bool(kwargs.get("is_backward")), graph))
            return compile_fx_inner(graph, inputs, **kwargs)
        return compile_fx(gm, example_inputs, inner_compile=inner)


def _matmuls(graph: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [node for node in graph.graph.nodes
            if node.op == "call_function" and "mm" in str(node.target)]


def _matmul_dtypes(graph: torch.fx.GraphModule) -> set[torch.dtype]:
    return {node.meta["val"].dtype for node in _matmuls(graph)}


def _matmul_count(graph: torch.fx.GraphModule) -> int:
    return len(_matmuls(graph))


@pytest.mark.slow
def test_inductor_compiles_velocity_and_its_vjp_in_bfloat16():
    """The whole path with inductor: the converted model under torch.compile matches the eager
    one, and inductor lowered the step's forward and backward with bf16 matmuls only."""
    torch.manual_seed(0)
    recorder = StepRecorder()
    model = rampde_fx.convert(MLPODE())
    x = torch.randn(6, 3)
    # Caches would hand back kernels compiled by an earlier run without lowering anything.
    # small_matmul=0, widened_matmul=0: every product a library call in its own dtype.
    with runtime.patch(kernel_backend=recorder, small_matmul=0, widened_matmul=0), \
            torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        got = outputs_and_grads(torch.compile(model, fullgraph=True), x)
    # Inductor keeps fused pointwise intermediates in float32 where eager rounds each to bf16:
    # two solves with their own rounding, each within about one bf16 unit roundoff of float64,
    # so within 2 of each other (measured: 0.5 to 0.6).
    for g, w in zip(got, outputs_and_grads(model, x)):
        assert rel_err(g, w) < 2 * 2.0 ** -8
    # Two inference graphs: the forward step, and the backward step (recomputation and VJP in
    # one graph, with the VJP's matmuls: no autograd graph is compiled for the engine).
    assert [is_backward for is_backward, _ in recorder.graphs] == [False, False]
    assert _matmul_count(recorder.graphs[1][1]) > _matmul_count(recorder.graphs[0][1])
    assert all(_matmul_dtypes(g) == {torch.bfloat16} for _, g in recorder.graphs)


class SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_host_synchronisations_do_not_grow_with_steps(dtype):
    func = MLPFunc()
    counts = []
    for steps in (8, 64):
        y0 = torch.randn(4, 4, requires_grad=True)
        with SyncCounter() as counter:
            out = rampde_fx.odeint(func, y0, torch.tensor([0.0, 1.0]), method="rk4",
                                   options={"step_size": 1 / steps}, dtype=dtype)
            out[-1].sum().backward()
        counts.append(counter.count)
    assert counts[0] == counts[1]


def test_compiled_graph_count_does_not_grow_with_steps(cheap_steps):
    """The step loop is not unrolled: 8 and 128 steps trace the same graphs."""
    counts = []
    for steps in (8, 128):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        model = MLPODE()
        model.block.odefunc = MLPFunc()
        converted = rampde_fx.convert(model)
        inner = torch._dynamo.utils.counters
        inner.clear()
        compiled_model = torch.compile(converted, fullgraph=True, backend=counter)
        x = torch.randn(3, 3)
        model.block.integration_time = torch.tensor([0.0, steps * 0.25])
        compiled_model(x).sum().backward()
        counts.append((counter.frame_count, counter.op_count,
                       inner["stats"]["unique_graphs"]))
    assert counts[0] == counts[1]


def test_new_batch_size_recompiles_at_most_once(cheap_steps):
    counter = CompileCounterWithBackend("aot_eager")
    compiled_model = torch.compile(rampde_fx.convert(MLPODE()), fullgraph=True, backend=counter)
    for batch in (2, 3, 5, 9):
        compiled_model(torch.randn(batch, 3)).sum().backward()
    assert counter.frame_count <= 2


def test_inference_stores_no_checkpoints_and_modes_switch(cheap_steps):
    model = rampde_fx.convert(MLPODE())
    compiled_model = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3)
    with torch.no_grad():
        compiled_model(x)
    assert not debug.saved_compiled_solves()
    compiled_model.eval()
    with torch.no_grad():
        evaluated = compiled_model(x)
    compiled_model.train()
    trained = compiled_model(x)
    trained.sum().backward()
    assert torch.allclose(evaluated, trained.detach())
    del trained
    assert not debug.saved_compiled_solves()  # the ticket went with the autograd graph


def test_stage_checkpoints_compile(cheap_steps):
    torch.manual_seed(0)
    model = rampde_fx.convert(MLPODE(), checkpoint="stages")
    x = torch.randn(4, 3)
    compiled_model = torch.compile(model, fullgraph=True, backend="aot_eager")
    for got, want in zip(outputs_and_grads(compiled_model, x), outputs_and_grads(model, x)):
        assert rel_err(got, want) < 2.0 ** -8
    assert not debug.saved_compiled_solves()


def test_compiled_checkpoints_are_counted_as_saved(cheap_steps):
    from rampde_fx.tools.memory import saved_tensor_bytes

    func = MLPFunc()
    y0 = torch.randn(16, 4, requires_grad=True)
    solve = torch.compile(lambda y: rampde_fx.odeint(func, y, torch.tensor([0.0, 1.0]),
                                                     method="rk4", options={"step_size": 0.125}),
                          fullgraph=True, backend="aot_eager")
    solve(y0)
    assert saved_tensor_bytes(lambda: solve(y0)) >= 8 * y0.numel() * 2  # 8 bf16 states


def test_compiled_stages_keep_no_more_than_autocast(cheap_steps):
    """checkpoint='stages' keeps the 16-bit activations autocast keeps: a time that wants no
    gradient keeps no float32 stage, and the parameters' casts are redone in the backward
    instead of being kept once per step."""
    from rampde_fx.tools.memory import saved_tensor_bytes

    torch.manual_seed(0)
    velocity = MLPFunc(8, 32)
    y0, t = torch.randn(64, 8), torch.tensor([0.0, 1.0])
    options = {"method": "rk4", "options": {"step_size": 0.125}}
    solve = torch.compile(lambda y: rampde_fx.odeint(velocity, y, t, checkpoint="stages",
                                                     **options),
                          fullgraph=True, backend="aot_eager")
    solve(y0)
    ours = saved_tensor_bytes(lambda: solve(y0))

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torchdiffeq.odeint(velocity, y0, t, **options)

    # Each of the 8 steps' 4 stages: the first layer's 16-bit input and the tanh output.
    activations = 8 * 4 * 64 * (8 + 32) * 2
    assert activations <= ours <= saved_tensor_bytes(autocast)


def test_cpu_tanh_lowering_against_float64():
    """The compiled CPU steps' tanh: within 2e-6 of float64 tanh in float32 (also far into
    the tails and near 0), bitwise the rounded tanh in bfloat16 on a sample, and tanh's
    derivative in its backward."""
    x = torch.cat([torch.randn(4096) * 3, torch.logspace(-30, 1.5, 200),
                   -torch.logspace(-30, 1.5, 200), torch.tensor([0.0, 0.0625, -0.0625])])
    exact = torch.tanh(x.double())
    y = tanh_for_cpu_kernels(x)
    assert ((y.double() - exact).abs() <= 2e-6 * exact.abs()).all()
    x_bf16 = x.to(torch.bfloat16)
    assert torch.equal(tanh_for_cpu_kernels(x_bf16),
                       torch.tanh(x_bf16.double()).to(torch.bfloat16))
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(tanh_for_cpu_kernels(leaf).sum(), leaf)
    assert torch.allclose(grad.double(), 1 - exact**2, rtol=0, atol=1e-6)


def test_compiled_host_synchronisations_do_not_grow_with_steps(cheap_steps):
    func = MLPFunc()
    solve = torch.compile(
        lambda y, t: rampde_fx.odeint(func, y, t, method="rk4", options={"step_size": 0.125}),
        fullgraph=True, backend="aot_eager")
    counts = []
    for steps in (8, 64):
        y0 = torch.randn(4, 4, requires_grad=True)
        t = torch.tensor([0.0, steps * 0.125])
        solve(y0, t)[-1].sum().backward()  # compile outside the count
        with torch.profiler.profile() as profile:
            solve(y0, t)[-1].sum().backward()
        counts.append(sum(e.name == "aten::_local_scalar_dense" for e in profile.events()))
    assert counts[0] == counts[1] > 0


def test_explain_reports_compiled_solves(cheap_steps):
    compiled_model = torch.compile(rampde_fx.convert(MLPODE()), fullgraph=True,
                                   backend="aot_eager")
    compiled_model(torch.randn(2, 3)).sum().backward()
    text = rampde_fx.explain(compiled_model)
    assert "last solve: rk4, 4 steps, 16 evaluations forward, 16 backward" in text
    assert re.search(r"\n    \w+ +bfloat16  '\w+', a matmul-class op", text)


class Reordered(torch.nn.Module):
    """Parameters registered in another order than the velocity uses them, one unused, and a
    closure-like tensor attribute: gradients must still reach each tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.second = torch.nn.Linear(8, 4)
        self.unused = torch.nn.Linear(4, 4)
        self.first = torch.nn.Linear(4, 8)
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, t, y):
        return self.second(torch.tanh(self.first(y))) * self.scale


@pytest.mark.parametrize("checkpoint", ["steps", "stages"])
@pytest.mark.parametrize("y0_wants_grad", [True, False])
def test_compiled_gradients_reach_the_right_parameters(cheap_steps, checkpoint, y0_wants_grad):
    """Also where only the parameters want gradients (the usual training step): under
    checkpoint='stages' the first step's state then does not require grad and later ones do,
    and each step kernel is compiled for what its inputs require."""
    torch.manual_seed(0)
    func = Reordered()

    def solve(y):
        return rampde_fx.odeint(func, y, torch.tensor([0.0, 0.5, 1.0]), method="rk4",
                                options={"step_size": 0.25}, checkpoint=checkpoint)

    y0 = torch.randn(3, 4)
    names = [name for name, _ in func.named_parameters()]

    def grads(solver):
        y = y0.clone().requires_grad_(y0_wants_grad)
        out = solver(y)
        found = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                    [y, *func.parameters()] if y0_wants_grad
                                    else list(func.parameters()), allow_unused=True)
        return [torch.zeros(()) if g is None else g for g in found]

    eager = grads(solve)
    compiled_solve = torch.compile(solve, fullgraph=True, backend="aot_eager")
    for name, got, want in zip(["y0", *names] if y0_wants_grad else names,
                               grads(compiled_solve), eager):
        assert torch.allclose(got, want, rtol=2.0 ** -8, atol=1e-7), name


class GatedCell(torch.nn.Module):
    """A velocity written as a method of the model, on a state ``(h, c)`` whose second part is
    carried along unchanged (its derivative is zero): the constant part's output has no
    gradient path."""

    def __init__(self, frozen: bool) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 4).requires_grad_(not frozen)
        self.unread = torch.nn.Parameter(torch.ones(1))  # trainable, never read by the velocity
        self.head = torch.nn.Linear(8, 1)

    def velocity(self, t, state):
        h, c = state
        return torch.tanh(self.lin(torch.cat([h, c], -1))), torch.zeros_like(c)

    def forward(self, x, c, checkpoint):
        h, carried = rampde_fx.odeint(self.velocity, (x, c), torch.tensor([0.0, 1.0]),
                                      method="rk4", options={"step_size": 0.25},
                                      checkpoint=checkpoint)
        return self.head(torch.cat([h[-1], carried[-1]], -1))


@pytest.mark.parametrize("checkpoint", ["steps", "stages"])
@pytest.mark.parametrize("frozen", [False, True])
def test_compiled_method_velocity_with_a_constant_state_part(cheap_steps, checkpoint, frozen):
    """The method's module parameters get their gradients under torch.compile as in eager, and
    a backward runs where some outputs, or all of the velocity, want no gradient."""
    torch.manual_seed(0)
    model = GatedCell(frozen)
    x, c = torch.randn(3, 4), torch.randn(3, 4)
    trained = [p for p in model.parameters() if p.requires_grad]

    def grads(run):
        found = torch.autograd.grad(run(x, c, checkpoint).sum(), trained, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(found, trained)]

    compiled_model = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = grads(compiled_model)
    for g, want in zip(got, grads(model)):
        assert torch.allclose(g, want, rtol=2.0 ** -8, atol=1e-6)

    # Against float64 torchdiffeq on the same grid: within a few bfloat16 unit roundoffs.
    model64 = copy.deepcopy(model).double()

    def reference(x, c, checkpoint):
        h, carried = torchdiffeq.odeint(model64.velocity, (x.double(), c.double()),
                                        torch.tensor([0.0, 1.0], dtype=torch.float64),
                                        method="rk4", options={"step_size": 0.25})
        return model64.head(torch.cat([h[-1], carried[-1]], -1))

    trained64 = [p for p in model64.parameters() if p.requires_grad]
    exact = torch.autograd.grad(reference(x, c, checkpoint).sum(), trained64, allow_unused=True)
    exact = [torch.zeros_like(p) if e is None else e for e, p in zip(exact, trained64)]
    # All parameters as one vector: the unread one's gradient is zero in both.
    assert rel_err(torch.cat([g.flatten() for g in got]),
                   torch.cat([e.flatten() for e in exact])) < 4 * 2.0 ** -8


class ConvVelocity(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, t, x):
        return self.conv(x)


@pytest.mark.slow
def test_gradients_keep_the_layout_inductor_expects():
    """A convolution's weight gradient comes back in another memory layout than the weight's;
    inductor checks the strides the backward op declares."""
    torch.manual_seed(0)
    func, x = ConvVelocity(), torch.randn(2, 4, 6, 6)

    def solve(y):
        return rampde_fx.odeint(func, y, torch.tensor([0.0, 1.0]), method="rk4",
                                options={"step_size": 0.5}, dtype=torch.float32)[-1]

    def grads(solver):
        out = solver(x)
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
        return torch.autograd.grad(loss, list(func.parameters()))

    for got, want in zip(grads(torch.compile(solve, fullgraph=True)), grads(solve)):
        assert rel_err(got, want) < 2.0**-8


def test_compiled_closures_solve_between_graphs(cheap_steps):
    """rampde_fx.odeint on a lambda made in compiled code: the solve runs between two graphs
    (default mode), with the closure tensor's gradient; fullgraph=True gets the reason."""
    weight = torch.randn(4, 4, requires_grad=True)

    def solve(y):
        return rampde_fx.odeint(lambda t, x: torch.tanh(x @ weight), y, torch.tensor([0.0, 1.0]),
                                method="euler", dtype=torch.float32)

    y0 = torch.randn(2, 4)
    got = torch.compile(solve, backend="aot_eager")(y0)
    want = torchdiffeq.odeint(lambda t, x: torch.tanh(x @ weight), y0, torch.tensor([0.0, 1.0]),
                              method="euler")
    assert rel_err(got, want) < 1e-6
    (grad,) = torch.autograd.grad(got.square().sum(), weight)
    (want_grad,) = torch.autograd.grad(want.square().sum(), weight)
    assert rel_err(grad, want_grad) < 1e-6
    torch._dynamo.reset()
    with pytest.raises(Exception, match="runs eagerly between two compiled graphs"):
        torch.compile(solve, fullgraph=True, backend="aot_eager")(y0)


class ReadsAPlainTensor(torch.nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight  # a plain attribute: neither parameter nor buffer

    def forward(self, t, x):
        return torch.tanh(x @ self.weight)


def test_compiled_tensor_attributes_get_their_gradients(cheap_steps):
    """A plain tensor attribute of the velocity (neither parameter nor buffer) is an input of
    the compiled solve and gets its gradient."""
    func = ReadsAPlainTensor(torch.randn(4, 4, requires_grad=True))
    y, t = torch.randn(2, 4), torch.tensor([0.0, 1.0])
    solve = torch.compile(
        lambda y: rampde_fx.odeint(func, y, t, method="euler", dtype=torch.float32),
        fullgraph=True, backend="aot_eager")
    (got,) = torch.autograd.grad(solve(y).sum(), func.weight)
    (want,) = torch.autograd.grad(torchdiffeq.odeint(func, y, t, method="euler").sum(),
                                  func.weight)
    assert rel_err(got, want) < 1e-6


GLOBAL_WEIGHT = torch.randn(4, 4, requires_grad=True)


class ReadsAGlobalTensor(torch.nn.Module):
    def forward(self, t, x):
        return torch.tanh(x @ GLOBAL_WEIGHT)


def test_compiled_tensors_outside_the_module_are_warned_about(cheap_steps):
    solve = torch.compile(
        lambda y: rampde_fx.odeint(ReadsAGlobalTensor(), y, torch.tensor([0.0, 1.0]),
                                   method="euler"),
        fullgraph=True, backend="aot_eager")
    with pytest.warns(rampde_fx.CaptureWarning, match=r"1 tensor\(s\) .* get no gradient"):
        solve(torch.randn(2, 4, requires_grad=True)).sum().backward()


def _distinct_model(i: int) -> torch.nn.Module:
    """A model of a class of its own, as a sweep or a notebook makes them."""
    block = type(f"Block{i}", (ODEBlock,), {})
    root = type(f"Model{i}", (torch.nn.Module,), {
        "__init__": lambda self: (torch.nn.Module.__init__(self),
                                  setattr(self, "block", block(MLPFunc())))[0],
        "forward": lambda self, x: self.block(x) * (1.0 + i),
    })
    return root()


@pytest.mark.slow
def test_twenty_distinct_models_compile_in_one_process(cheap_steps):
    """Each converted class has a code object of its own and the step kernels are compiled
    without dynamo, so dynamo's recompile limit (8 per code object) is never reached by a
    sweep of models."""
    for i in range(20):
        torch.manual_seed(i)
        converted = rampde_fx.convert(_distinct_model(i))
        compiled_model = torch.compile(converted, fullgraph=True, backend="aot_eager")
        x = torch.randn(3, 4)
        torch.testing.assert_close(compiled_model(x), converted(x))


class TooFewSteps(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.func = MLPFunc()

    def forward(self, x):
        return rampde_fx.odeint(self.func, x, torch.tensor([0.0, 1.0]), rtol=1e-9, atol=1e-9,
                                options={"max_num_steps": 2})[-1]


def test_an_error_inside_a_compiled_solve_keeps_its_type_and_message(cheap_steps):
    compiled_model = torch.compile(TooFewSteps(), fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match=r"max_num_steps=2 exceeded"):
        compiled_model(10 * torch.randn(3, 4))


class WithOptions(torch.nn.Module):
    def __init__(self, options) -> None:
        super().__init__()
        self.func = MLPFunc()
        self.options = options

    def forward(self, x):
        return rampde_fx.odeint(self.func, x, torch.tensor([0.0, 1.0]), rtol=1e-3, atol=1e-3,
                                options=self.options)[-1]


@pytest.mark.parametrize("options, match", [
    ({"max_num_steps": "10"}, r"options\['max_num_steps'\] must be a real number, got '10'"),
    ([("max_num_steps", 10)], r"options must be a dict .* \(list\); pass a dict"),
])
def test_compiled_solves_check_their_options_as_eager_ones_do(cheap_steps, options, match):
    """Numbers among the options are lifted into an input of the op; what is no number, or
    options that are no dict, reach the solve's checks as they are."""
    compiled_model = torch.compile(WithOptions(options), fullgraph=True, backend="aot_eager")
    with pytest.raises(TypeError, match=match):
        compiled_model(torch.randn(3, 4))


def test_deleting_a_compiled_model_frees_its_velocity(cheap_steps):
    import gc
    import weakref

    converted = rampde_fx.convert(MLPODE())
    velocity = weakref.ref(converted.block.odefunc)
    compiled_model = torch.compile(converted, fullgraph=True, backend="aot_eager")
    compiled_model(torch.randn(2, 3)).sum().backward()
    converted(torch.randn(2, 3)).sum().backward()  # and an eager solve: both caches
    sites = debug.named_objects()
    del converted, compiled_model
    gc.collect()
    assert velocity() is None
    assert debug.named_objects() < sites  # its registered sites went with it


class StepSizeArgument(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.func = MLPFunc()

    def forward(self, x, step_size, rtol):
        t = torch.tensor([0.0, 1.0])
        fixed = rampde_fx.odeint(self.func, x, t, method="rk4", options={"step_size": step_size},
                                 dtype=torch.float32)
        adaptive = rampde_fx.odeint(self.func, x, t, rtol=rtol, atol=rtol, dtype=torch.float32)
        return fixed[-1], adaptive[-1]


def test_numbers_that_change_between_calls_run_without_new_sites(cheap_steps):
    """A step size or a tolerance is an input of the compiled solve: each new value solves
    with that value (dynamo recompiles once, when the number first changes), and no call
    registers a new site."""
    model = StepSizeArgument()
    compiled_model = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    adaptive_steps = set()
    for step_size, rtol in [(0.5, 1e-3), (0.25, 1e-5), (0.1, 1e-7), (0.5, 1e-3)]:
        with rampde_fx.collect_stats() as solves:
            got = compiled_model(x, step_size, rtol)
            want = model(x, step_size, rtol)
        # float32 mode, the same steps: rounding differences only (the compiled kernels sum
        # small products in another order)
        for a, b in zip(got, want):
            assert rel_err(a, b) < 1e-5
        fixed, adaptive, fixed_eager, adaptive_eager = solves
        assert fixed.steps == fixed_eager.steps == round(1 / step_size)
        assert adaptive.steps == adaptive_eager.steps
        adaptive_steps.add(adaptive.steps)
        assert debug.compiled_specs_of(model.func) == 2  # the fixed and the adaptive solve
    assert len(adaptive_steps) > 1
