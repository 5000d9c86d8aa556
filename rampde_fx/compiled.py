"""torch.compile integration.

Under ``torch.compile`` a solve is one opaque custom op, ``rampde_fx::solve``, and its backward
another, ``rampde_fx::solve_backward``: dynamo and AOTAutograd see a single node per solve
whatever the number of steps, so the model compiles as one graph with no breaks, in a time that
does not grow with the steps, and the data-dependent parts of a solve (the grid from
``step_size``, the fp16 scaler's retries) stay out of the graph. Inside the ops the step loop is
plain Python around one RK step compiled by ``torch.compile``: inductor generates the velocity's
low-precision kernels, and AOTAutograd those of its vector-Jacobian product for the backward
recomputation. Compilation is per velocity and method, cached, and independent of the steps.

This was chosen over a loop operator (``torch._higher_order_ops.scan``) inside the graph: the
ops are public API, let the forward keep its low-precision checkpoints outside the graph (their
number depends on the values of ``t``), and share the eager engine unchanged.

The non-tensor arguments of a solve (the velocity, method, options, dtype, scaling, policy) are
registered once while dynamo traces, so they must be constants of the compiled code: options
computed from changing Python numbers cannot be registered. Modules reach the registration as
their ``id``, and so does the policy (dynamo guards ids by identity): dynamo before torch 2.13
cannot pass such objects to a constant-result function at all.

The forward op returns the solution and a *ticket*, a 0-dim int64 tensor naming the solve's
saved plan and checkpoints; the backward op takes the ticket. The saved entry lives as long as
the ticket tensor, which autograd keeps until the backward pass is done with it.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import itertools
import types
import warnings
import weakref
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from .adjoint import SolvePlan, _backward_with_retries, _Wants, solve_forward
from .odeint import internal_time, prepare_solve
from .policy import PrecisionPolicy
from .capture import CaptureWarning, GraphVelocity, describe
from .solver import Stepper


@dataclasses.dataclass(frozen=True)
class _Site:
    """The non-tensor arguments of a solve, registered once per compiled call site. The
    velocity's module and the reporting object are held weakly: a compiled graph must not keep
    a deleted model alive."""

    owner: "weakref.ref[Any]"
    method_name: str | None
    rtol: Any
    atol: Any
    method: str | None
    options: dict[str, Any]
    dtype: torch.dtype
    scaling: str
    policy: PrecisionPolicy | None
    checkpoint: str
    is_tuple: bool
    report_to: "weakref.ref[Any] | None"  # whose ``last_stats`` each run sets (a convert site)

    @property
    def func(self) -> Callable[..., Any]:
        owner = self.owner()
        if owner is None:
            raise RuntimeError("rampde_fx: the velocity of this compiled solve was deleted")
        return owner if self.method_name is None else getattr(owner, self.method_name)


_SITES: list[_Site] = []


def _id_or_none(x: Any) -> int | None:
    return None if x is None else id(x)


def object_with_id(address: int | None) -> Any:
    """The object whose ``id()`` is ``address`` (None for None); only for objects known to be
    alive."""
    return None if address is None else ctypes.cast(address, ctypes.py_object).value


@torch.compiler.assume_constant_result
def _register(owner_id: int, method_name: Any, policy_id: Any, report_to_id: Any, rtol: Any,
              atol: Any, method: Any, options: Any, dtype: Any, scaling: Any, checkpoint: Any,
              is_tuple: Any) -> int:
    """Runs once, while dynamo traces a solve: the site's index is a constant of the graph.
    The velocity is ``owner`` itself or its method ``method_name``; ``owner``, the policy and
    the reporting object come as ids (or None) of objects that the traced frame holds, alive
    until this returns."""
    report_to = object_with_id(report_to_id)
    _SITES.append(_Site(weakref.ref(object_with_id(owner_id)), method_name, rtol, atol, method,
                        dict(options or {}), dtype, scaling, object_with_id(policy_id),
                        checkpoint, is_tuple,
                        None if report_to is None else weakref.ref(report_to)))
    return len(_SITES) - 1


def _grad_tensors(func: Any) -> list[Tensor]:
    """Tensors the velocity may read that require grad: the parameters and buffers of the
    module it is, or whose method it is. (Closure tensors of plain functions cannot be found
    while tracing; capture them as module attributes.)"""
    owner = func if isinstance(func, torch.nn.Module) else getattr(func, "__self__", None)
    if not isinstance(owner, torch.nn.Module):
        return []
    return [x for x in itertools.chain(owner.parameters(), owner.buffers()) if x.requires_grad]


def solve_in_graph(func: Any, y0: Any, t: Tensor, *, rtol: Any = 1e-7, atol: Any = 1e-9,
                   method: str | None = None, options: dict[str, Any] | None = None,
                   dtype: torch.dtype, scaling: str, policy: PrecisionPolicy | None,
                   checkpoint: str, event_fn: Any = None,
                   report_to_id: int | None = None) -> Any:
    """:func:`rampde_fx.odeint` while dynamo traces: one call of the opaque solve op.

    ``report_to_id`` is the ``id`` of a live object (a site of ``rampde_fx.convert``) whose
    ``last_stats`` receives each run's :class:`SolveStats`: an id, because the registration
    takes only constants."""
    if event_fn is not None:
        raise NotImplementedError("rampde_fx.odeint does not support event_fn yet")
    if not isinstance(func, (torch.nn.Module, types.MethodType)):
        raise NotImplementedError(
            "rampde_fx.odeint under torch.compile: func must be an nn.Module or a method of "
            "one (a function cannot be registered as a constant of the graph); keep the "
            "tensors it reads as attributes of the module")
    is_tuple = isinstance(y0, tuple)
    state = list(y0) if is_tuple else [y0]
    owner, method_name = ((func.__self__, func.__func__.__name__)
                          if isinstance(func, types.MethodType) else (func, None))
    site = _register(id(owner), method_name, _id_or_none(policy), report_to_id, rtol, atol,
                     method, options, dtype, scaling, checkpoint, is_tuple)
    tensors = _grad_tensors(func)
    keep = torch.is_grad_enabled() and any(x.requires_grad for x in [*state, t, *tensors])
    *solution, _ticket = torch.ops.rampde_fx.solve(site, state, t, tensors, keep)
    return tuple(solution) if is_tuple else solution[0]


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
    site: int
    plan: SolvePlan
    grid: Tensor
    times: Tensor
    checkpoints: list[Tensor]
    velocity_tensors: list[Tensor | None]  # aligned with the op's tensor inputs


# The backend that compiles the RK step inside the ops: "inductor" for real use; tests may set
# "aot_eager" to check structure without paying for code generation.
step_backend: str | Callable[..., Any] = "inductor"

@dataclasses.dataclass
class _SavedGraph:
    """checkpoint='stages': the autograd graph of the solve, from its outputs to its inputs
    (``[*state, t, *velocity tensors]``, aligned with the op's inputs; None where unread)."""

    outputs: list[Tensor]
    inputs: list[Tensor | None]


_SAVED: dict[int, _Saved | _SavedGraph] = {}
_TICKETS = itertools.count()


class _TanhForCPUKernels(torch.autograd.Function):
    """``tanh`` from ``exp``, which inductor vectorises on CPU (its own ``tanh`` runs at scalar
    speed there, 2x slower), computed in float32: the odd Taylor polynomial below 1/16, where
    the exponential form would cancel, ``2 / (1 + exp(-2x)) - 1`` above; relative error below
    2e-6, invisible after rounding to a 16-bit dtype. The backward is ``tanh``'s own,
    ``(1 - y**2) g`` from the rounded output, as in eager."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        x32 = x.float()
        square = x32 * x32
        near_zero = x32 * (1 + square * (-1 / 3 + square * (2 / 15)))
        far = 2 / (1 + torch.exp(-2 * x32)) - 1
        y = torch.where(x32.abs() < 0.0625, near_zero, far).to(x.dtype)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        y32 = y.float()
        return (grad.float() * (1 - y32 * y32)).to(grad.dtype)


def tanh_for_cpu_kernels(x: Tensor) -> Tensor:
    """See :class:`_TanhForCPUKernels`."""
    return _TanhForCPUKernels.apply(x)


def _use_cpu_tanh(graph: torch.fx.Graph) -> None:
    for node in graph.find_nodes(op="call_function", target=torch.ops.aten.tanh.default):
        node.target = tanh_for_cpu_kernels


def _compiled_step(stepper: Stepper, dtype: torch.dtype, device: torch.device,
                   keeps_activations: bool) -> Callable[..., Any] | None:
    """The stepper's RK step compiled once per velocity, method, perturb and direction; None
    (the step runs as it is) for a velocity that is not one graph of plain ops: an eager
    fallback, graphs per time value, or random draws, which the backward pass replays from the
    generator states of eager kernels.

    On CPU a 16-bit velocity gets :func:`tanh_for_cpu_kernels`, unless the solve keeps its
    stage activations (checkpoint='stages'): its float32 internals would be kept too.
    """
    velocity = stepper.velocity
    if not isinstance(velocity, GraphVelocity) or velocity.time_indexed or velocity.draws_random:
        return None
    # Kept on the velocity, which the capture cache drops with the velocity's module.
    per_velocity = velocity.compiled_steps
    key = (stepper.tableau, stepper.start_nudge, stepper.end_nudge, stepper.time_sign,
           device.type, keeps_activations, step_backend)
    if key not in per_velocity:
        if device.type == "cpu" and dtype.itemsize == 2 and not keeps_activations:
            velocity = velocity.transformed(_use_cpu_tanh)
        twin = Stepper(velocity, stepper.tableau, stepper.start_nudge, stepper.end_nudge,
                       stepper.time_sign, stepper.interp)
        # dynamo caches compiled code, and counts recompilations against its limit, per code
        # object: each velocity's step gets a code object of its own.
        step = types.FunctionType(Stepper.step.__code__.replace(), Stepper.step.__globals__,
                                  Stepper.step.__name__, Stepper.step.__defaults__)
        per_velocity[key] = torch.compile(types.MethodType(step, twin), fullgraph=True,
                                          backend=step_backend)
    return per_velocity[key]


def held_checkpoints() -> list[Tensor]:
    """The checkpoints that compiled solves hold for their backward passes, right now."""
    return [c for saved in _SAVED.values() if isinstance(saved, _Saved) for c in saved.checkpoints]


def _same_memory(a: Tensor, b: Tensor) -> bool:
    return a is b or (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                      and a.storage_offset() == b.storage_offset()
                      and a.shape == b.shape and a.stride() == b.stride())


def _align(inputs: list[Tensor], read: list[Tensor], func: Any) -> list[Tensor | None]:
    """For each tensor input of the op, the tensor the velocity reads in its place (the live
    object, for autograd), or None if it reads none; warns about read tensors that are not
    inputs: they get no gradient."""
    aligned = [next((r for r in read if _same_memory(x, r)), None) for x in inputs]
    missed = [r for r in read if not any(a is r for a in aligned)]
    if missed:
        warnings.warn(
            f"rampde_fx: under torch.compile, {len(missed)} tensor(s) that {describe(func)} "
            "reads and that require grad are not parameters or buffers of its module "
            "(closure tensors?) and get no gradient; make them attributes of the module.",
            CaptureWarning, stacklevel=2)
    return aligned


@torch.library.custom_op("rampde_fx::solve", mutates_args=())
def _solve(site: int, state: list[Tensor], t: Tensor, tensors: list[Tensor],
           keep: bool) -> list[Tensor]:
    """The whole forward solve; returns the solution components and a ticket."""
    spec = _SITES[site]
    keep_stages = keep and spec.checkpoint == "stages"
    with _as_from_python(), torch.set_grad_enabled(keep_stages):
        leaves = [x.detach().requires_grad_(keep_stages) for x in (*state, t)]
        y0 = tuple(leaves[:-1]) if spec.is_tuple else leaves[0]
        prepared = prepare_solve(spec.func, y0, leaves[-1], rtol=spec.rtol, atol=spec.atol,
                                 method=spec.method,
                                 options=spec.options, dtype=spec.dtype, scaling=spec.scaling,
                                 policy=spec.policy, checkpoint=spec.checkpoint, event_fn=None)
        report_to = None if spec.report_to is None else spec.report_to()
        if report_to is not None:
            report_to.last_stats = prepared.plan.stats
        prepared.plan.stepper.compiled_step = _compiled_step(prepared.plan.stepper, spec.dtype,
                                                             t.device, keep_stages)
        with torch.autocast(t.device.type, enabled=False):
            solution, checkpoints, steps = solve_forward(
                prepared.plan, prepared.state, prepared.grid, prepared.times,
                keep_checkpoints=keep and not keep_stages)
    ticket = torch.tensor(-1)
    if keep:
        number = next(_TICKETS)
        ticket = torch.tensor(number)
        aligned = _align(tensors, prepared.tensors, spec.func)
        _SAVED[number] = (_SavedGraph(list(solution), [*leaves, *aligned])
                          if keep_stages else
                          _Saved(site, prepared.plan, steps.detach(),
                                 prepared.times.detach(), checkpoints, aligned))
        weakref.finalize(ticket, _SAVED.pop, number, None)
    return [c.detach() for c in solution] + [ticket]


@_solve.register_fake
def _(site, state, t, tensors, keep):
    return [*(c.new_empty((t.shape[0], *c.shape)) for c in state),
            torch.empty((), dtype=torch.int64)]


@torch.library.custom_op("rampde_fx::solve_backward", mutates_args=())
def _solve_backward(ticket: Tensor, solution_grads: list[Tensor], state: list[Tensor],
                    t: Tensor, tensors: list[Tensor], needs: list[bool]) -> list[Tensor]:
    """Gradients of the solve for ``[*state, t, *tensors]`` (zeros where not needed)."""
    saved = _SAVED.get(int(ticket))
    if saved is None:
        raise RuntimeError("rampde_fx: the checkpoints of this solve are gone; was backward "
                           "run twice without retain_graph, or on a solve made without grad?")
    if isinstance(saved, _SavedGraph):
        wanted = [need and x is not None for x, need in zip(saved.inputs, needs)]
        with _as_from_python():
            found = iter(torch.autograd.grad(
                saved.outputs, [x for x, want in zip(saved.inputs, wanted) if want],
                solution_grads, allow_unused=True))
        grads = [next(found) if want else None for want in wanted]
        return [_laid_out_like(g, x) for g, x in zip(grads, [*state, t, *tensors])]
    plan = saved.plan
    n = plan.n_components
    wants = _Wants(state=any(needs[:n]), grid=needs[n], times=needs[n],
                   tensors=[i for i, (need, read) in enumerate(zip(needs[n + 1:],
                                                                   saved.velocity_tensors))
                            if need and read is not None])
    with _as_from_python(), torch.autocast(t.device.type, enabled=False):
        grads = _backward_with_retries(plan, tuple(c.dtype for c in state), saved.grid,
                                       saved.times, saved.checkpoints, saved.velocity_tensors,
                                       solution_grads, wants)
        state_grads, (grid_grad, times_grad) = grads[:n], grads[n:n + 2]
        tensor_grads = grads[n + 2:]
        t_grad = torch.zeros_like(t)
        if needs[n]:
            with torch.enable_grad():
                leaf = t.detach().requires_grad_()
                spec = _SITES[saved.site]
                y0 = tuple(state) if spec.is_tuple else state[0]
                internal, grid, _ = internal_time(leaf, spec.options, spec.func, y0,
                                                  saved.plan.controller is not None)
                t_grad = torch.autograd.grad([grid, internal], leaf, [grid_grad, times_grad],
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
    _site, state, t, tensors, _keep = inputs
    ctx.n_components = len(state)
    ctx.needs = [x.requires_grad for x in (*state, t, *tensors)]
    ctx.save_for_backward(output[-1], t, *state, *tensors)


def _backward(ctx: Any, grads: list[Tensor | None]) -> tuple[Any, ...]:
    ticket, t, *rest = ctx.saved_tensors
    n = ctx.n_components
    state, tensors = rest[:n], rest[n:]
    solution_grads = [torch.zeros((t.shape[0], *c.shape), dtype=c.dtype, device=c.device)
                      if g is None else g for g, c in zip(grads[:n], state)]
    result = torch.ops.rampde_fx.solve_backward(ticket, solution_grads, list(state), t,
                                                list(tensors), ctx.needs)
    result = [g if need else None for g, need in zip(result, ctx.needs)]
    return None, result[:n], result[n], result[n + 1:], None


_solve.register_autograd(_backward, setup_context=_setup_context)
