"""One compiled region per step and direction, for solves inside ``rampde_fx::solve``.

The forward kernel is the RK step: ``(t0, t1, *y, [*first], *indices, *lifted) -> (*y1,
*stages)``. The backward kernel is a whole step of the discrete adjoint: it rebuilds the step's
start from its low-precision checkpoint, recomputes the step, takes the vector-Jacobian product
with the adjoint (times the fp16 scale, where there is one) and accumulates the parameter
gradients in float32 into buffers it is given:

    (t0, t1, offset, *checkpoint, *cotangent, [*stage cotangents], [scale], *indices,
     *lifted, *accumulators) -> (*adjoint, [grad t0, grad t1], [largest scaled result])

(``offset``: the first stage's nudge, an input so that one kernel serves every nudge;
``stage cotangents``: those that outputs interpolated inside the step give its stages, zeros
for a step without such outputs once a kernel with them exists, so that one kernel serves both;
``indices``: the bank indices of a velocity with graphs per time, see below.)

Both are traced to aten graphs with ``make_fx`` (through ``torch.autograd.grad``, so the
backward kernel holds the derivative ops themselves: no autograd graph is built and no autograd
engine runs per step) and compiled by the dynamo backend ``runtime.settings.kernel_backend``
(inductor) called on the graph directly: no dynamo frame runs per call, and dynamo's
recompilation limit never counts kernels. Each kernel is compiled per input signature (see
:class:`_Kernel`) and cached per captured velocity in ``runtime.STEP_KERNELS``, which drops
them with the velocity (and the capture cache drops the velocity with its class); each solve
runs them on its own tensors.

Runge-Kutta steps of velocities whose graphs are plain ops get kernels, random draws included:
the kernels are given the numbers, drawn eagerly before each call as the step's ops would draw
them (see :mod:`.draws`), so that the backward kernel, under the forward step's generator state,
recomputes the step with the forward's numbers. A velocity with a graph per time value (weights
picked by ``int(t.item() * n)``) gets them on fixed grids: a step's kernels run the graphs of
its evaluation times, and steps whose graphs are equal (the same code and constants) share them;
a literal index into a tensor the graph is given (``bank[k]``) is a kernel input, not code.
An eager fallback, graphs per time in adaptive solves (each step meets new times), graphs picked
by the value of a buffer that evaluations change (which graph runs depends on the evaluations
before it), random ops whose draws depend on values the step computes, and the Adams methods'
steps (which read earlier steps' derivatives) run as they are.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Sequence

import torch
from torch._dynamo.backends.registry import lookup_backend
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.fx.experimental.proxy_tensor import make_fx

from .. import runtime
from ..adjoint.scaling import largest_magnitude
from ..adjoint.vjp import vector_jacobian_product
from ..capture import GraphVelocity, State, hidden_evaluations, transformed_graph
from ..engine.step import Nudge, Stepper, nudge_offset, promoted_time_dtype
from ..passes.precision import fetch_attr
from ..passes.cpu import CPU_PRODUCTS, cpu_kernel_transform
from ..passes.recompute import recompute_casts_of_lifted
from .draws import DrawPlan, draw_plan, reading_draws, undrawable_op


class _Kernel:
    """A step function traced and compiled per input signature: the shapes, strides, dtypes
    and devices of its tensors, and, where autograd records the call, which of them require
    grad (the things dynamo would guard on, checked here without dynamo's per-call cost). The
    last ``n_lifted`` inputs of a kernel that autograd records are the velocity's tensors.
    Where the step ``draws`` random numbers, they are drawn before each call and given to the
    compiled function ahead of the inputs (see :mod:`.draws`)."""

    def __init__(self, function: Callable[..., Any], n_lifted: int = 0,
                 draws: bool = False) -> None:
        self.function = function
        self.n_lifted = n_lifted
        self.draws = draws
        self.compiled: dict[Any, tuple[Callable[..., Any], DrawPlan]] = {}

    def __call__(self, *inputs: torch.Tensor) -> Any:
        recording = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
        key = (recording, *[(x.shape, x.stride(), x.dtype, x.device,
                             recording and x.requires_grad) for x in inputs])
        entry = self.compiled.get(key)
        if entry is None:
            plan = draw_plan(self.function, inputs) if self.draws else DrawPlan()
            examples = [*plan.examples(), *inputs]
            with hidden_evaluations():  # tracing, not evaluating
                graph = make_fx(reading_draws(self.function, len(plan.results)),
                                decomposition_table=CPU_PRODUCTS, tracing_mode="fake",
                                _allow_non_fake_inputs=True)(*examples)
            if recording:
                recompute_casts_of_lifted(graph.graph, self.n_lifted)
            entry = self.compiled[key] = (_compile(graph, examples), plan)
        compiled, plan = entry
        return compiled(*plan.draw(), *inputs)


def _compile(graph: torch.fx.GraphModule, inputs: Sequence[torch.Tensor]) -> Callable[..., Any]:
    """``graph`` compiled by the kernel backend for inputs like ``inputs``.

    It runs as dynamo would call the backend: in a tracing context whose fake mode has a shape
    environment, given fake inputs of static shapes. Inductor's FX graph cache needs that shape
    environment to look a kernel up on disk; without it every new process compiles each kernel
    again (seconds per kernel)."""
    backend = runtime.settings.kernel_backend
    compile_graph = lookup_backend(backend) if isinstance(backend, str) else backend
    fake_mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    with torch._guards.tracing(torch._guards.TracingContext(fake_mode)):
        return compile_graph(graph, [fake_mode.from_tensor(x, static_shapes=True)
                                     for x in inputs])


@dataclasses.dataclass
class StepKernels:
    """The compiled forward and backward steps of one velocity and stepper, made per variant
    (a known first stage, the first stage's nudge, which gradients, fp16 scaling) when first
    needed: the engine's ``StepExecutor`` for compiled solves."""

    stepper: Stepper  # whose velocity is the GraphVelocity (possibly transformed) to run
    # The solve's tensors (GraphVelocity.live_tensors of its bound velocity).
    lifted: Callable[..., list[torch.Tensor]] = list
    # The solve's velocity, where it has graphs per time: it captures those of new times.
    solve_velocity: GraphVelocity | None = None
    # A velocity with graphs per time: what changes its graphs for these kernels (see
    # passes.cpu), applied to each graph a step runs.
    transform: Callable[[torch.fx.Graph], None] | None = None
    _forward: dict[Any, _Kernel] = dataclasses.field(default_factory=dict)
    _backward: dict[Any, _Kernel] = dataclasses.field(default_factory=dict)
    # Per graph of a velocity with graphs per time, by id: the graph (kept, so that the id
    # stays its own), its transformed copy with its bank indices lifted, what makes it equal
    # to another graph, and its bank indices (see _with_lifted_indices).
    _graph_records: dict[int, tuple[torch.fx.GraphModule, torch.fx.GraphModule, Any,
                                    list[int]]] = dataclasses.field(default_factory=dict)
    # The bank indices of a step's graphs as tensors on the solve's device, by graph ids.
    _index_tensors: dict[Any, list[torch.Tensor]] = dataclasses.field(default_factory=dict)
    # Per backward kernel given stage cotangents, their shapes, strides, dtypes and devices:
    # the steps without interpolated outputs run that kernel too, given zeros (backward_step).
    _stage_layouts: dict[Any, list[tuple[Any, ...]]] = dataclasses.field(default_factory=dict)

    def _graphs_of_step(self, t0: torch.Tensor, t1: torch.Tensor, y: State, known: int,
                        start_nudge: Nudge | None, dtypes: Sequence[torch.dtype] | None = None
                        ) -> tuple[tuple[torch.fx.GraphModule, ...], Any, list[torch.Tensor]]:
        """For a velocity with graphs per time: the graphs that the step's evaluations run, in
        order, what identifies them among all steps (their code and constants, but for the
        indices into weight banks: steps whose graphs are equal share kernels), and those
        indices, the kernels' inputs; ``((), None, [])`` for one graph for all times.
        ``y``: the step's start, or its checkpoint, whose state dtypes are then ``dtypes``
        (the times' dtype and a new graph's example state follow the state's)."""
        if self.solve_velocity is None:
            return (), None, []
        if dtypes is not None:
            y = tuple(c.to(d) for c, d in zip(y, dtypes))
        found = self.solve_velocity.graphs_at(
            self.stepper.evaluation_times(t0, t1, y, known, start_nudge), y)
        if self.solve_velocity.reads_buffer_values:  # a graph of a new time reads one
            raise RuntimeError(f"rampde_fx: {self.solve_velocity.name()}: {_READS_BUFFER_VALUES} "
                               "(a graph captured during this solve reads it), so its steps "
                               "cannot run as the compiled kernels of this solve; solve it "
                               "with compile_steps=False, outside torch.compile")
        graphs, signature, indices = [], [], []
        for graph in found:
            record = self._graph_records.get(id(graph))
            if record is None:
                lifted, values = _with_lifted_indices(
                    graph if self.transform is None else transformed_graph(graph, self.transform))
                record = self._graph_records[id(graph)] = (graph, lifted,
                                                           _graph_signature(lifted), values)
            graphs.append(record[1])
            signature.append(record[2])
            indices += record[3]
        key = (tuple(id(graph) for graph in found), y[0].device)
        if key not in self._index_tensors:
            self._index_tensors[key] = [torch.tensor([i], device=y[0].device) for i in indices]
        return tuple(graphs), tuple(signature), self._index_tensors[key]

    def step(self, t0: torch.Tensor, t1: torch.Tensor, y: State, first: State | None,
             start_nudge: Nudge | None, stages_read: bool) -> tuple[State, list[State]]:
        """:meth:`Stepper.step`, compiled; without the stages (``[]``) where they are not
        read, so that the kernel does not store them."""
        n = len(y)
        lifted = self.lifted()
        known = 0 if first is None else len(first)
        graphs, signature, indices = self._graphs_of_step(t0, t1, y, known, start_nudge)
        key = (known, start_nudge, stages_read, signature)
        if key not in self._forward:
            stepper = self.stepper  # not self: the kernel must not keep this solve's tensors
            m = len(indices)

            def forward(t0, t1, *flat):  # type: ignore[no-untyped-def]
                state, given = flat[:n], flat[n:n + known]
                bank_indices, tensors = flat[n + known:n + known + m], flat[n + known + m:]
                y1, stages = _stepper_reading(stepper, tensors, graphs, bank_indices).step(
                    t0, t1, tuple(state), tuple(given) if known else None, start_nudge)
                return [*y1, *((c for k in stages for c in k) if stages_read else ())]
            self._forward[key] = _Kernel(forward, len(lifted), stepper.velocity.draws_random)
        out = self._forward[key](t0, t1, *y, *(first or ()), *indices, *lifted)
        stages = [tuple(out[i:i + n]) for i in range(n, len(out), n)]
        return tuple(out[:n]), stages

    def backward_step(self, t0: torch.Tensor, t1: torch.Tensor, checkpoint: Sequence[torch.Tensor],
                      state_dtypes: Sequence[torch.dtype], cotangent: Sequence[torch.Tensor],
                      stage_cotangents: Sequence[torch.Tensor] | None,
                      scale: torch.Tensor | None, start_nudge: Nudge | None, wanted: list[int],
                      accumulators: list[torch.Tensor] | None, times: bool
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """One step of the discrete adjoint.

        ``cotangent``: the step's end's; ``stage_cotangents``: those of its stages (every
        component of each stage in turn), or None for none.
        ``wanted``: positions, among the lifted tensors, of those whose gradients are wanted;
        ``accumulators`` (float32, one per wanted tensor) receive them in place, or, where None,
        the gradients are returned. ``times``: also the gradients for ``t0`` and ``t1``.

        Returns the adjoint at the step's start, the tensors' gradients (where not accumulated)
        and ``[grad t0, grad t1]`` (where ``times``), all divided by ``scale``; with a scale,
        the last returned list ends with the largest scaled result (for overflow checks).
        """
        n = len(checkpoint)
        lifted = self.lifted(replaying=True)
        accumulate = accumulators is not None
        graphs, signature, indices = self._graphs_of_step(t0, t1, tuple(checkpoint), 0,
                                                          start_nudge, state_dtypes)
        # The first stage's nudge as an input: the steps after a first-same-as-last step
        # (nudged) and the first one (not) share the kernel.
        offset = nudge_offset(t0.detach().to(promoted_time_dtype(state_dtypes)),
                              self.stepper.start_nudge if start_nudge is None else start_nudge)
        staged = stage_cotangents is not None
        variant = (tuple(wanted), accumulate, times, scale is not None, tuple(state_dtypes),
                   signature)
        key, with_stages = (staged, *variant), (True, *variant)
        if staged:
            self._stage_layouts.setdefault(key, [(c.shape, c.stride(), c.dtype, c.device)
                                                 for c in stage_cotangents])
        elif key not in self._backward and with_stages in self._stage_layouts:
            # A step without outputs inside runs the kernel of the steps with them, given zero
            # stage cotangents: a few more additions per step instead of another compilation
            # (seconds to a minute each).
            key, stage_cotangents = with_stages, _zeros(self._stage_layouts[with_stages])
            staged = True
        if key not in self._backward:
            self._backward[key] = _Kernel(_backward_function(
                self.stepper, n, len(lifted), state_dtypes, wanted, accumulate, times,
                staged, scale is not None, graphs, len(indices)),
                draws=self.stepper.velocity.draws_random)
        with torch.no_grad():
            out = self._backward[key](t0, t1, offset, *checkpoint, *cotangent,
                                      *(stage_cotangents or []),
                                      *([] if scale is None else [scale]), *indices, *lifted,
                                      *(accumulators or []))
        adjoint, rest = list(out[:n]), list(out[n:])
        grads = [] if accumulate else rest[:len(wanted)]
        return adjoint, grads, rest[len(grads):]


def _zeros(layouts: Sequence[tuple[Any, ...]]) -> list[torch.Tensor]:
    """Zero tensors of the given shapes, strides, dtypes and devices; one per distinct layout,
    repeated."""
    made: dict[tuple[Any, ...], torch.Tensor] = {}
    for layout in layouts:
        if layout not in made:
            shape, stride, dtype, device = layout
            made[layout] = torch.empty_strided(shape, stride, dtype=dtype, device=device).zero_()
    return [made[layout] for layout in layouts]


def _stepper_reading(stepper: Stepper, tensors: Sequence[torch.Tensor],
                     graphs: Sequence[torch.fx.GraphModule],
                     bank_indices: Sequence[torch.Tensor] = ()) -> Stepper:
    """``stepper`` with a velocity that reads ``tensors`` instead of the live ones, and runs
    ``graphs`` in turn where given (see ``GraphVelocity.running``), reading ``bank_indices``
    in turn as their lifted indices (see :func:`_with_lifted_indices`)."""
    velocity: GraphVelocity = stepper.velocity
    if graphs:
        velocity = velocity.running(_reading_indices(graphs, bank_indices))
    return dataclasses.replace(stepper, velocity=velocity.reading(tensors), evaluations=0,
                               executor=None)


def _backward_function(stepper: Stepper, n: int, n_lifted: int,
                       state_dtypes: Sequence[torch.dtype], wanted: list[int], accumulate: bool,
                       times: bool, staged: bool, scaled: bool,
                       graphs: Sequence[torch.fx.GraphModule],
                       n_indices: int) -> Callable[..., Any]:
    """The backward kernel's function (see :meth:`StepKernels.backward_step`), of
    ``stepper``'s twin only: a kernel must not keep the tensors of the solve that made it.
    ``offset``: the first stage's nudge (see ``engine.step.nudge_offset``); ``staged``: the
    stages' cotangents follow the end's."""
    n_stages = n * stepper.tableau.stages if staged else 0

    def backward(t0, t1, offset, *flat):  # type: ignore[no-untyped-def]
        checkpoint, cotangent, rest = flat[:n], list(flat[n:2 * n]), list(flat[2 * n:])
        cotangent += rest[:n_stages]
        rest = rest[n_stages:]
        scale = rest.pop(0) if scaled else None
        bank_indices, rest = rest[:n_indices], rest[n_indices:]
        tensors, accumulators = rest[:n_lifted], rest[n_lifted:]
        with torch.enable_grad():
            y = tuple(c.to(d).detach().requires_grad_() for c, d in zip(checkpoint,
                                                                       state_dtypes))
            leaves = list(tensors)
            for i in wanted:
                leaves[i] = tensors[i].detach().requires_grad_()
            ends = [t.detach().requires_grad_(times) for t in (t0, t1)]
            y1, stages = _stepper_reading(stepper, leaves, graphs, bank_indices).step(
                *ends, y, None, offset)
            produced = [*y1, *((c for k in stages for c in k) if staged else ())]
            inputs = [*y, *(leaves[i] for i in wanted), *(ends if times else [])]
            found = vector_jacobian_product(produced, inputs, cotangent, scale)
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(found, inputs)]
        largest = []
        if scale is not None:
            largest = [largest_magnitude(grads, scale.device)]
            grads = [g / scale for g in grads]
        adjoint, tensor_grads, time_grads = grads[:n], grads[n:n + len(wanted)], \
            grads[n + len(wanted):]
        if accumulate:
            for accumulator, g in zip(accumulators, tensor_grads):
                accumulator.add_(g)
            tensor_grads = []
        return [*adjoint, *tensor_grads, *time_grads, *largest]
    return backward


def step_kernels(dtype: torch.dtype, keeps_activations: bool
                 ) -> Callable[[Stepper, torch.device], StepKernels | str]:
    """The ``executor_for`` of a solve whose steps run as compiled kernels (see
    ``engine.plan.prepare_solve``): a ``dtype`` velocity, whose stage activations autograd
    keeps where ``keeps_activations``."""
    return lambda stepper, device: kernels_for(stepper, dtype, device, keeps_activations)


def kernels_for(stepper: Stepper, dtype: torch.dtype, device: torch.device,
                keeps_activations: bool) -> StepKernels | str:
    """The stepper's kernels, made once per velocity, method, perturb, direction and device
    (kept in ``runtime.STEP_KERNELS``, with the velocity); for a velocity that is not one
    graph of plain ops, why it has none (see the module docstring)."""
    velocity = stepper.velocity
    refusal = _without_kernels(stepper)
    if refusal is not None:
        return refusal
    per_velocity = runtime.STEP_KERNELS.setdefault(velocity.base, {})
    key = (stepper.tableau, stepper.start_nudge, stepper.end_nudge, stepper.time_sign,
           device.type, keeps_activations, runtime.settings.kernel_backend, dtype)
    if key not in per_velocity:
        # A twin that shares the velocity's graphs: the kernels must not refer to the
        # velocity, whose entry they are. It is traced with the tensors as inputs.
        # Graphs per time are captured as the solves meet new times, into the graphs that
        # the twin shares: each is transformed when a step first runs it.
        base = velocity.base
        transform = cpu_kernel_transform(dtype, device, keeps_activations)
        per_time = velocity.time_indexed
        own = copy.copy(base) if transform is None or per_time else base.transformed(transform)
        per_velocity[key] = StepKernels(Stepper(own, stepper.tableau, stepper.start_nudge,
                                                stepper.end_nudge, stepper.time_sign,
                                                stepper.interp),
                                        transform=transform if per_time else None)
    # The compiled kernels, reading this solve's tensors.
    return dataclasses.replace(per_velocity[key], lifted=velocity.live_tensors,
                               solve_velocity=velocity if velocity.time_indexed else None)


_READS_BUFFER_VALUES = ("the velocity's Python reads the value of a buffer, which its "
                        "evaluations may change")


def _without_kernels(stepper: Stepper) -> str | None:
    """Why the stepper's steps have no kernels; None where they have."""
    velocity = stepper.velocity
    if not isinstance(velocity, GraphVelocity):
        return "the velocity runs eagerly"
    if velocity.reads_buffer_values:
        return _READS_BUFFER_VALUES
    if velocity.time_indexed and stepper.tableau.adaptive:
        return ("the velocity has a graph per time value, and an adaptive solve's steps meet "
                "new times")
    for graph in velocity.graph_modules() if velocity.draws_random else ():
        op = undrawable_op(graph)
        if op is not None:
            return f"the velocity's random op {op} draws numbers that depend on its values"
    if stepper.multistep:
        return "an Adams step reads earlier steps' derivatives"
    return None


_BANK_INDEX = "_bank_index_"


class _SelectAt(torch.autograd.Function):
    """``x.select(dim, index)`` at a one-element tensor ``index``. Its backward is a masked
    broadcast, not a scatter: inductor fuses the gradients of a step's selections of the same
    bank into one pass over it (an ``index_add`` per selection would zero and add a whole bank
    each)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.dim, ctx.size = dim, x.shape[dim]
        return x.index_select(dim, index).squeeze(dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (index,) = ctx.saved_tensors
        shape = [1] * (grad.dim() + 1)
        shape[ctx.dim] = ctx.size
        positions = torch.arange(ctx.size, device=grad.device).view(shape)
        return torch.where(positions == index.view([1] * len(shape)), grad.unsqueeze(ctx.dim),
                           0), None, None


def _select_at(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """See :class:`_SelectAt`."""
    return _SelectAt.apply(x, dim, index)


def _with_lifted_indices(graph: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, list[int]]:
    """``graph`` whose selections at a literal index of a tensor it is given (``bank[k]``: a
    weight bank indexed by the time's interval) read the index from a buffer of their own
    instead, and those indices: the graphs of two intervals then have the same code, and a
    kernel, given the indices as inputs, serves both."""
    indices: list[int] = []
    new = copy.deepcopy(graph.graph)
    for node in list(new.find_nodes(op="call_function", target=torch.ops.aten.select.int)):
        source, dim, index = node.args
        if source.op != "placeholder" or not isinstance(index, int) or index < 0:
            continue
        name = f"{_BANK_INDEX}{len(indices)}"
        indices.append(index)
        with new.inserting_before(node):
            replacement = new.call_function(_select_at, (source, dim, new.get_attr(name)))
        node.replace_all_uses_with(replacement)
        new.erase_node(node)
    if not indices:
        return graph, []
    root = copy.copy(graph)
    root._buffers = {**graph._buffers, **{f"{_BANK_INDEX}{i}": torch.tensor([index])
                                          for i, index in enumerate(indices)}}
    return torch.fx.GraphModule(root, new, class_name=type(graph).__name__), indices


def _reading_indices(graphs: Sequence[torch.fx.GraphModule],
                     indices: Sequence[torch.Tensor]) -> list[torch.fx.GraphModule]:
    """Copies of ``graphs`` that read ``indices``, in turn, as their lifted bank indices."""
    found, remaining = [], list(indices)
    for graph in graphs:
        count = sum(name.startswith(_BANK_INDEX) for name in graph._buffers)
        if count:
            graph = copy.copy(graph)
            graph._buffers = {**graph._buffers,
                              **{f"{_BANK_INDEX}{i}": remaining.pop(0) for i in range(count)}}
        found.append(graph)
    return found


def _graph_signature(graph: torch.fx.GraphModule) -> Any:
    """What makes two graphs the same function of their inputs: their code, and the values of
    the constants they read (a velocity's graphs for two times differ in constants such as the
    time's value where Python read it), but for their lifted bank indices, which kernels take
    as inputs (see :func:`_with_lifted_indices`)."""
    constants = []
    for node in graph.graph.find_nodes(op="get_attr"):
        if node.target.startswith(_BANK_INDEX):
            continue
        value = fetch_attr(graph, node.target)
        constants.append((node.target, tuple(value.shape), str(value.dtype),
                          value.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
                         if isinstance(value, torch.Tensor) else (node.target, repr(value)))
    return graph.code, tuple(constants)
