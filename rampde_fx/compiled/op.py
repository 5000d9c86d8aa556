"""torch.compile integration: a solve is one opaque custom op.

Under ``torch.compile`` a solve is ``rampde_fx::solve``, and its backward
``rampde_fx::solve_backward``: dynamo and AOTAutograd see a single node per solve whatever the
number of steps, so the model compiles as one graph with no breaks, in a time that does not grow
with the steps, and the data-dependent parts of a solve (the grid from ``step_size``, the fp16
scaler's retries) stay out of the graph. Inside the ops the step loop is the engine's, around two
compiled kernels per step (``kernels``): the forward step, and the backward step with its
recomputation, vector-Jacobian product and gradient accumulation. Compilation is per velocity
and method, cached, and independent of the steps.

This was chosen over a loop operator (``torch._higher_order_ops.scan``) inside the graph: the
ops are public API, let the forward keep its low-precision checkpoints outside the graph (their
number depends on the values of ``t``), and share the eager engine.

The op names its solve by the key of a registered spec (``registry``). The forward op returns
the solution and a *ticket*, a 0-dim int64 tensor naming what the solve saved for its backward
(``runtime.SAVED_SOLVES``); the backward op takes the ticket. The saved entry lives as long as
the ticket tensor, which autograd keeps until the backward pass is done with it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import types
import warnings
import weakref
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from .. import runtime
from ..adjoint.sweep import Wants, backward_with_retries
from ..adjoint.vjp import vector_jacobian_product
from ..capture import describe, velocity_owner
from ..config import SolveConfig
from ..engine.grid import internal_time
from ..engine.integrate import integrate
from ..engine.plan import SolvePlan, prepare_solve
from ..errors import CaptureWarning
from .kernels import step_kernels
from .registry import (DYNAMO_PASSES_OBJECTS, CompiledSolveSpec, lift_budget, lift_numbers,
                       lower_numbers, register, tensor_at, tensor_names)


# Why a solve runs between two compiled graphs (the graph break's reason, shown by dynamo, and
# under fullgraph=True its error).
_BETWEEN_GRAPHS = (
    "rampde_fx: this solve's velocity (or event function) is made inside the compiled code (a "
    "lambda, closure or module built per call), which dynamo cannot hand to the compiled solve "
    "op, so the solve runs eagerly between two compiled graphs. For one graph "
    "(fullgraph=True), make it a module built once (in __init__) or a method of one "
    "(event_fn=self.hits_ground), and set what changes per call as attributes before the "
    "solve.")

# What solve_in_graph returns for a velocity that the op cannot take: the caller runs the
# solve with run_between_graphs.
NOT_IN_GRAPH = object()


def is_plain_function(func: Any) -> bool:
    """Whether ``func`` is no module nor method of one: under ``torch.compile``, most often a
    lambda or closure made in the compiled code, which the op cannot take."""
    return not isinstance(func, (torch.nn.Module, types.MethodType))


@torch.compiler.disable(reason=_BETWEEN_GRAPHS)
def run_between_graphs(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, eagerly: under ``torch.compile`` a graph break, at which dynamo
    rebuilds the velocity or event function made in the compiled code as a real object."""
    return fn(*args, **kwargs)


def solve_in_graph(func: Any, y0: Any, t: Tensor, config: SolveConfig | None,
                   settings: dict[str, Any], *, rtol: Any = 1e-7, atol: Any = 1e-9,
                   method: str | None = None, options: dict[str, Any] | None = None,
                   report_to_key: int | None = None,
                   adjoint_params: Sequence[Tensor] | None = None,
                   event_fn: Any = None) -> Any:
    """:func:`rampde_fx.odeint` while dynamo traces: one call of the opaque solve op.

    ``config``, or the settings keywords ``settings`` of :func:`rampde_fx.odeint`, give the
    precision settings: the registration makes the :class:`SolveConfig` (dynamo does not build
    a frozen dataclass faithfully). ``report_to_key`` names (see ``runtime.key_of``) a live
    object (a site of ``rampde_fx.convert``) whose ``last_stats`` receives each run's
    ``SolveStats``. Tensors of the velocity that are not among ``adjoint_params`` (where
    given) get no gradient.

    Returns :data:`NOT_IN_GRAPH` for a velocity that the op cannot take, one made inside the
    compiled code: a plain function (dynamo cannot pass a closure made there), or a module
    made there (dynamo passes it without its attributes); likewise for an event solve's
    ``event_fn``. An event solve returns ``(event_t, solution)``, as :func:`rampde_fx.odeint`."""
    if not DYNAMO_PASSES_OBJECTS:
        raise NotImplementedError(
            f"rampde_fx under torch.compile needs torch 2.13 or later (this is "
            f"{torch.__version__}): its dynamo passes the velocity module to the solve's "
            "registration. Run the converted model without torch.compile, or upgrade torch.")
    if is_plain_function(func) or (event_fn is not None and is_plain_function(event_fn)):
        return NOT_IN_GRAPH
    is_tuple = isinstance(y0, tuple)
    state = list(y0) if is_tuple else [y0]
    owner, method_name = velocity_owner(func)
    numbers: list[Any] = []
    rtol, atol, options = lift_numbers((rtol, atol, options), numbers)
    event_owner, event_method_name = (None, None) if event_fn is None else \
        velocity_owner(event_fn)
    spec_key = register(owner, method_name, config, lift_budget(settings), report_to_key, rtol,
                        atol, method, options, is_tuple, event_owner, event_method_name)
    if not spec_key:
        return NOT_IN_GRAPH
    tensors = [tensor_at(owner, name) for name in tensor_names(spec_key)]
    recording = torch.is_grad_enabled()
    needs = [recording and x.requires_grad for x in [*state, t]] + [
        recording and x.requires_grad
        and (adjoint_params is None or any(x is p for p in adjoint_params)) for x in tensors]
    outputs = torch.ops.rampde_fx.solve(
        spec_key, torch.tensor(numbers, dtype=torch.float64), state, t, tensors, needs)
    solution = tuple(outputs[:len(state)]) if is_tuple else outputs[0]
    return solution if event_fn is None else (outputs[-1], solution)


def _plain_python_keys() -> tuple[Any, Any]:
    """The dispatcher's thread-local key sets of code called from plain Python: autocast off
    (excluded), in-place and view tracking on (included)."""
    keys = torch._C.DispatchKey
    autocast = [getattr(keys, name) for name in keys.__members__ if name.startswith("Autocast")]
    exclude = torch._C.DispatchKeySet(autocast[0])
    for key in autocast[1:]:
        exclude = exclude.add(key)
    include = torch._C.DispatchKeySet(keys.BackendSelect).add(keys.ADInplaceOrView)
    return include, exclude


_PLAIN_INCLUDE, _PLAIN_EXCLUDE = _plain_python_keys()


@contextlib.contextmanager
def _as_from_python() -> Iterator[None]:
    """Run as if called from plain Python. Inside a custom op the dispatcher excludes
    autograd, autocast, and below a compiled graph every other key; the solve needs autograd
    (the backward recomputes steps, checkpoint='stages' records them) and an eager velocity
    needs autocast. Uses a private guard of torch 2.13."""
    with torch._C._ForceDispatchKeyGuard(_PLAIN_INCLUDE, _PLAIN_EXCLUDE):
        yield


@dataclasses.dataclass
class _Saved:
    """checkpoint='steps': what the backward sweep starts from."""

    spec: CompiledSolveSpec
    options: dict[str, Any]  # with this call's numbers
    plan: SolvePlan
    grid: Tensor
    times: Tensor
    checkpoints: list[Tensor]
    velocity_tensors: list[Tensor]  # the leaves the velocity read, one per tensor input


@dataclasses.dataclass
class _SavedGraph:
    """checkpoint='stages': the autograd graph of the solve, from its outputs to its inputs
    (``[*state, t, *velocity tensors]``, leaves aligned with the op's inputs)."""

    outputs: list[Tensor]
    inputs: list[Tensor]


def held_checkpoints() -> list[Tensor]:
    """The checkpoints that compiled solves hold for their backward passes, right now."""
    return [c for saved in runtime.SAVED_SOLVES.values() if isinstance(saved, _Saved)
            for c in saved.checkpoints]


def _warn_about_unbound(read: list[Tensor], bound: list[Tensor], func: Any) -> None:
    """Warn about tensors that the velocity reads and that require grad but are no tensors of
    its owner (closure or global tensors, constants of its graph): they get no gradient."""
    missed = [x for x in read if not any(x is b for b in bound)]
    if missed:
        warnings.warn(
            f"rampde_fx: under torch.compile, {len(missed)} tensor(s) that {describe(func)} "
            "reads and that require grad are not parameters, buffers or tensor attributes of "
            "its module (closure tensors?) and get no gradient; make them attributes of the "
            "module.", CaptureWarning, stacklevel=2)


@torch.library.custom_op("rampde_fx::solve", mutates_args=())
def _solve(spec_key: int, numbers: Tensor, state: list[Tensor], t: Tensor, tensors: list[Tensor],
           needs: list[bool]) -> list[Tensor]:
    """The whole forward solve; returns the solution components, a ticket and, for an event
    solve, the event time (a constant for autograd, as :func:`rampde_fx.odeint` returns it).
    ``needs``: which of ``[*state, t, *tensors]`` want gradients (the solve keeps what its
    backward needs for those only)."""
    spec: CompiledSolveSpec | None = runtime.object_of(spec_key)
    if spec is None:
        raise RuntimeError("rampde_fx: the model of this compiled solve was deleted; compile "
                           "the model that is called")
    rtol, atol, options = lower_numbers((spec.rtol, spec.atol, spec.options), numbers.tolist())
    config = spec.config
    keep = any(needs)
    keep_stages = keep and config.keeps_stages
    n = len(state)
    with _as_from_python(), torch.set_grad_enabled(keep_stages):
        # Only the inputs that want gradients are recorded: a time that requires grad would
        # keep every stage in float32 for its gradient.
        leaves = [x.detach().requires_grad_(keep_stages and need)
                  for x, need in zip((*state, t), needs)]
        # The velocity reads the op's tensor inputs (the values its tensors had when the
        # traced code reached the solve), as leaves of the backward's recomputation.
        tensor_leaves = [x.detach().requires_grad_(need)
                         for x, need in zip(tensors, needs[n + 1:])]
        y0 = tuple(leaves[:-1]) if spec.is_tuple else leaves[0]
        prepared = prepare_solve(
            spec.func, y0, leaves[-1], config, rtol=rtol, atol=atol, method=spec.method,
            options=options, event_fn=spec.event_fn,
            bindings=dict(zip(spec.tensor_names, tensor_leaves)),
            executor_for=step_kernels(config.dtype, keep_stages))
        report_to = None if spec.report_to is None else spec.report_to()
        if report_to is not None:  # a site: this call's statistics and numbers
            report_to.last_stats = prepared.plan.stats
            given = report_to.call_arguments
            for name, value in (("rtol", rtol), ("atol", atol), ("options", options)):
                if name in given:
                    given[name] = value
        with torch.autocast(t.device.type, enabled=False):
            solution, checkpoints, grid = integrate(
                prepared.plan, prepared.state, prepared.grid, prepared.times,
                keep_checkpoints=keep and not keep_stages)
    ticket = torch.tensor(-1)
    if keep:
        number = next(runtime.TICKETS)
        ticket = torch.tensor(number)
        _warn_about_unbound(prepared.tensors, tensor_leaves, spec.func)
        runtime.SAVED_SOLVES[number] = (
            _SavedGraph(list(solution), [*leaves, *tensor_leaves]) if keep_stages else
            _Saved(spec, options, prepared.plan, grid.detach(), prepared.times.detach(),
                   checkpoints, tensor_leaves))
        weakref.finalize(ticket, runtime.SAVED_SOLVES.pop, number, None)
    event = [] if spec.event_owner is None else [prepared.event_time()]
    return [c.detach() for c in solution] + [ticket] + event


@_solve.register_fake
def _(spec_key, numbers, state, t, tensors, needs):
    event = [] if runtime.object_of(spec_key).event_owner is None else [t.new_empty(())]
    return [*(c.new_empty((t.shape[0], *c.shape)) for c in state),
            torch.empty((), dtype=torch.int64), *event]


@torch.library.custom_op("rampde_fx::solve_backward", mutates_args=())
def _solve_backward(ticket: Tensor, solution_grads: list[Tensor], state: list[Tensor],
                    t: Tensor, tensors: list[Tensor], needs: list[bool]) -> list[Tensor]:
    """Gradients of the solve for ``[*state, t, *tensors]`` (zeros where not needed)."""
    saved = runtime.SAVED_SOLVES.get(int(ticket))
    if saved is None:
        raise RuntimeError("rampde_fx: the checkpoints of this solve are gone; was backward "
                           "run twice without retain_graph, or on a solve made without grad?")
    if isinstance(saved, _SavedGraph):
        wanted = list(needs)
        with _as_from_python():
            found = iter(vector_jacobian_product(
                saved.outputs, [x for x, want in zip(saved.inputs, wanted) if want],
                solution_grads, None))
        grads = [next(found) if want else None for want in wanted]
        return [_laid_out_like(g, x) for g, x in zip(grads, [*state, t, *tensors])]
    plan = saved.plan
    n = plan.n_components
    # An event solve's output times are its start and the event time, held fixed.
    event = saved.spec.event_owner is not None
    wants = Wants(state=any(needs[:n]), grid=needs[n], times=needs[n] and not event,
                  tensors=[i for i, need in enumerate(needs[n + 1:]) if need])
    with _as_from_python(), torch.autocast(t.device.type, enabled=False):
        grads = backward_with_retries(plan, saved.grid, saved.times, saved.checkpoints,
                                      saved.velocity_tensors, solution_grads, wants)
        state_grads, (grid_grad, times_grad) = grads[:n], grads[n:n + 2]
        tensor_grads = grads[n + 2:]
        t_grad = torch.zeros_like(t)
        if needs[n]:
            with torch.enable_grad():
                leaf = t.detach().requires_grad_()
                spec = saved.spec
                y0 = tuple(state) if spec.is_tuple else state[0]
                internal, grid, _ = internal_time(leaf, saved.options, spec.func, y0,
                                                  saved.plan.controller.known_steps is None)
                pairs = [(x, g) for x, g in ((grid, grid_grad), (internal, times_grad))
                         if g is not None]
                outputs, grads_of_outputs = zip(*pairs)
                t_grad = torch.autograd.grad(list(outputs), leaf, list(grads_of_outputs),
                                             allow_unused=True)[0]
    return [_laid_out_like(g, x)
            for g, x in zip([*state_grads, t_grad, *tensor_grads], [*state, t, *tensors])]


def _laid_out_like(grad: Tensor | None, x: Tensor) -> Tensor:
    """The gradient of ``x`` with ``x``'s strides, as the fake kernel below declares (a
    convolution's weight gradient, for one, comes back in another layout); zeros for None."""
    if grad is None:
        return torch.zeros_like(x)
    return grad if grad.stride() == x.stride() else torch.empty_like(x).copy_(grad)


@_solve_backward.register_fake
def _(ticket, solution_grads, state, t, tensors, needs):
    return [*(torch.empty_like(c) for c in state), torch.empty_like(t),
            *(torch.empty_like(x) for x in tensors)]


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: list[Tensor]) -> None:
    _spec_key, _numbers, state, t, tensors, needs = inputs
    ctx.n_components = len(state)
    ctx.needs = list(needs)
    ctx.save_for_backward(output[len(state)], t, *state, *tensors)


def _backward(ctx: Any, grads: list[Tensor | None]) -> tuple[Any, ...]:
    ticket, t, *rest = ctx.saved_tensors
    n = ctx.n_components
    state, tensors = rest[:n], rest[n:]
    solution_grads = [torch.zeros((t.shape[0], *c.shape), dtype=c.dtype, device=c.device)
                      if g is None else g for g, c in zip(grads[:n], state)]
    result = torch.ops.rampde_fx.solve_backward(ticket, solution_grads, list(state), t,
                                                list(tensors), ctx.needs)
    result = [g if need else None for g, need in zip(result, ctx.needs)]
    return None, None, result[:n], result[n], result[n + 1:], None


_solve.register_autograd(_backward, setup_context=_setup_context)
