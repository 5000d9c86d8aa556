"""torch.compile integration.

Under ``torch.compile`` a solve is one opaque custom op, ``rampde_fx::solve``, and its backward
another, ``rampde_fx::solve_backward``: dynamo and AOTAutograd see a single node per solve
whatever the number of steps, so the model compiles as one graph with no breaks, in a time that
does not grow with the steps, and the data-dependent parts of a solve (the grid from
``step_size``, the fp16 scaler's retries) stay out of the graph. Inside the ops the step loop is
plain Python around two compiled kernels per step (``step_kernels``): the forward step, and the
backward step with its recomputation, vector-Jacobian product and gradient accumulation.
Compilation is per velocity and method, cached, and independent of the steps.

This was chosen over a loop operator (``torch._higher_order_ops.scan``) inside the graph: the
ops are public API, let the forward keep its low-precision checkpoints outside the graph (their
number depends on the values of ``t``), and share the eager engine.

The non-tensor arguments of a solve (the velocity, method, dtype, scaling, policy, and the
structure of its options) are registered while dynamo traces and named in the graph by an
integer key; the site they make is held by the velocity's module and goes with it. Python
numbers among the tolerances and options (a step size, say) are a tensor input instead: a new
value runs the same graph (dynamo may recompile once, when it first sees the number change).
Objects reach the registration as they are, which needs dynamo of torch 2.13 or later.

The forward op returns the solution and a *ticket*, a 0-dim int64 tensor naming the solve's
saved plan and checkpoints; the backward op takes the ticket. The saved entry lives as long as
the ticket tensor, which autograd keeps until the backward pass is done with it.
"""
from __future__ import annotations

import contextlib
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
from .solver import vector_jacobian_product
from .capture import CaptureWarning, describe
from .step_kernels import kernels_for


# Python numbers among a solve's tolerances and options are inputs of the op, not constants of
# the graph, so a new step size or tolerance needs no recompilation. In the registered
# arguments each is replaced by a marker ``(_NUMBER, position in the op's numbers, is int)``:
# a plain tuple, which dynamo passes to the registration as a constant.
_NUMBER = "rampde_fx.number"


def _lift_numbers(value: Any, numbers: list[Any]) -> Any:
    """``value`` with its Python numbers, at any depth of lists, tuples and dicts, replaced by
    markers; the numbers are appended to ``numbers``."""
    if isinstance(value, (int, float, torch.SymInt, torch.SymFloat)) \
            and not isinstance(value, bool):
        numbers.append(value)
        return (_NUMBER, len(numbers) - 1, isinstance(value, (int, torch.SymInt)))
    if isinstance(value, (list, tuple)):
        return type(value)(_lift_numbers(v, numbers) for v in value)
    if isinstance(value, dict):
        return {k: _lift_numbers(v, numbers) for k, v in value.items()}
    return value


def _lower_numbers(value: Any, numbers: list[float]) -> Any:
    """The inverse of :func:`_lift_numbers`, with the numbers of this call."""
    if isinstance(value, tuple) and len(value) == 3 and value[0] == _NUMBER:
        return int(numbers[value[1]]) if value[2] else numbers[value[1]]
    if isinstance(value, (list, tuple)):
        return type(value)(_lower_numbers(v, numbers) for v in value)
    if isinstance(value, dict):
        return {k: _lower_numbers(v, numbers) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class _Site:
    """The non-tensor arguments of a solve, registered once per compiled call site (numbers
    as markers, see :func:`_lift_numbers`). The velocity's module and the reporting object are held
    weakly: a compiled graph must not keep a deleted model alive."""

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


_DYNAMO_PASSES_OBJECTS = tuple(int(part) for part in
                               torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)

# Objects that compiled graphs name by an integer key (sites), held weakly: an entry goes with
# its object. Each velocity module holds its own solve sites, so they live as long as it.
_BY_KEY: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
_KEY_OF: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()
_SITES_OF: "weakref.WeakKeyDictionary[torch.nn.Module, dict[int, _Site]]" = \
    weakref.WeakKeyDictionary()
_KEYS = itertools.count(1)


def key_of(obj: Any) -> int:
    """A key, a constant of compiled graphs, that names ``obj`` (hashed by identity) while it
    lives."""
    key = _KEY_OF.get(obj)
    if key is None:
        key = _KEY_OF[obj] = next(_KEYS)
        _BY_KEY[key] = obj
    return key


def object_of(key: int) -> Any:
    """The live object named by ``key``; None if it was freed."""
    return _BY_KEY.get(key)


@torch.compiler.assume_constant_result
def _register(owner: torch.nn.Module, method_name: Any, policy: Any, report_to_key: Any,
              rtol: Any, atol: Any, method: Any, options: Any, dtype: Any, scaling: Any,
              checkpoint: Any, is_tuple: Any) -> int:
    """Runs while dynamo traces a solve: the key of its site, a constant of the graph. The
    velocity is ``owner`` itself or its method ``method_name``; an equal site of the same
    module is reused, so recompilation registers nothing new."""
    report_to = None if report_to_key is None else object_of(report_to_key)
    site = _Site(weakref.ref(owner), method_name, rtol, atol, method, dict(options or {}),
                 dtype, scaling, policy, checkpoint, is_tuple,
                 None if report_to is None else weakref.ref(report_to))
    sites = _SITES_OF.setdefault(owner, {})
    key = next((key for key, known in sites.items() if known == site), None)
    if key is None:
        key = next(_KEYS)
        sites[key] = _BY_KEY[key] = site
    return key


def velocity_owner(func: Any) -> tuple[Any, str | None]:
    """The object a velocity belongs to and the name of its method (``func`` itself and None
    where it is no method). An isinstance test and plain attribute access, which dynamo
    traces: it answers ``getattr(method, "__self__", None)`` with the default."""
    if isinstance(func, types.MethodType):
        return func.__self__, func.__func__.__name__
    return func, None


def _grad_tensors(owner: Any) -> list[Tensor]:
    """Tensors the velocity may read that require grad: the parameters and buffers of the
    module it is, or whose method it is (``owner``). (Closure tensors of plain functions cannot
    be found while tracing; capture them as module attributes.)"""
    if not isinstance(owner, torch.nn.Module):
        return []
    return [x for x in itertools.chain(owner.parameters(), owner.buffers()) if x.requires_grad]


def solve_in_graph(func: Any, y0: Any, t: Tensor, *, rtol: Any = 1e-7, atol: Any = 1e-9,
                   method: str | None = None, options: dict[str, Any] | None = None,
                   dtype: torch.dtype, scaling: str, policy: PrecisionPolicy | None,
                   checkpoint: str, event_fn: Any = None,
                   report_to_key: int | None = None) -> Any:
    """:func:`rampde_fx.odeint` while dynamo traces: one call of the opaque solve op.

    ``report_to_key`` names (see :func:`key_of`) a live object (a site of
    ``rampde_fx.convert``) whose ``last_stats`` receives each run's :class:`SolveStats`."""
    if event_fn is not None:
        raise NotImplementedError("rampde_fx.odeint does not support event_fn yet")
    if not _DYNAMO_PASSES_OBJECTS:
        raise NotImplementedError(
            f"rampde_fx under torch.compile needs torch 2.13 or later (this is "
            f"{torch.__version__}): its dynamo passes the velocity module to the solve's "
            "registration. Run the converted model without torch.compile, or upgrade torch.")
    if not isinstance(func, (torch.nn.Module, types.MethodType)):
        raise NotImplementedError(
            "rampde_fx.odeint under torch.compile: func must be an nn.Module or a method of "
            "one (a function cannot be registered as a constant of the graph); keep the "
            "tensors it reads as attributes of the module")
    is_tuple = isinstance(y0, tuple)
    state = list(y0) if is_tuple else [y0]
    owner, method_name = velocity_owner(func)
    numbers: list[Any] = []
    rtol, atol, options = _lift_numbers((rtol, atol, options), numbers)
    site = _register(owner, method_name, policy, report_to_key, rtol, atol, method, options,
                     dtype, scaling, checkpoint, is_tuple)
    tensors = _grad_tensors(owner)
    recording = torch.is_grad_enabled()
    needs = [recording and x.requires_grad for x in [*state, t, *tensors]]
    *solution, _ticket = torch.ops.rampde_fx.solve(
        site, torch.tensor(numbers, dtype=torch.float64), state, t, tensors, needs)
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
    site: _Site
    options: dict[str, Any]  # with this call's numbers
    plan: SolvePlan
    grid: Tensor
    times: Tensor
    checkpoints: list[Tensor]
    velocity_tensors: list[Tensor | None]  # aligned with the op's tensor inputs


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


def _graph_transform(dtype: torch.dtype, device: torch.device,
                     keeps_activations: bool) -> Callable[[torch.fx.Graph], None] | None:
    """On CPU a 16-bit velocity gets :func:`tanh_for_cpu_kernels`, unless the solve keeps its
    stage activations (checkpoint='stages'): its float32 internals would be kept too."""
    if device.type == "cpu" and dtype.itemsize == 2 and not keeps_activations:
        return _use_cpu_tanh
    return None


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
def _solve(site: int, numbers: Tensor, state: list[Tensor], t: Tensor, tensors: list[Tensor],
           needs: list[bool]) -> list[Tensor]:
    """The whole forward solve; returns the solution components and a ticket. ``needs``: which
    of ``[*state, t, *tensors]`` want gradients (the solve keeps what its backward needs for
    those only)."""
    spec = object_of(site)
    if spec is None:
        raise RuntimeError("rampde_fx: the model of this compiled solve was deleted; compile "
                           "the model that is called")
    rtol, atol, options = _lower_numbers((spec.rtol, spec.atol, spec.options), numbers.tolist())
    keep = any(needs)
    keep_stages = keep and spec.checkpoint == "stages"
    with _as_from_python(), torch.set_grad_enabled(keep_stages):
        # Only the inputs that want gradients are recorded: a time that requires grad would
        # keep every stage in float32 for its gradient.
        leaves = [x.detach().requires_grad_(keep_stages and need)
                  for x, need in zip((*state, t), needs)]
        y0 = tuple(leaves[:-1]) if spec.is_tuple else leaves[0]
        prepared = prepare_solve(spec.func, y0, leaves[-1], rtol=rtol, atol=atol,
                                 method=spec.method,
                                 options=options, dtype=spec.dtype, scaling=spec.scaling,
                                 policy=spec.policy, checkpoint=spec.checkpoint, event_fn=None)
        report_to = None if spec.report_to is None else spec.report_to()
        if report_to is not None:
            report_to.last_stats = prepared.plan.stats
        prepared.plan.stepper.kernels = kernels_for(
            prepared.plan.stepper, spec.dtype, t.device, keep_stages,
            _graph_transform(spec.dtype, t.device, keep_stages))
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
                          _Saved(spec, options, prepared.plan, steps.detach(),
                                 prepared.times.detach(), checkpoints, aligned))
        weakref.finalize(ticket, _SAVED.pop, number, None)
    return [c.detach() for c in solution] + [ticket]


@_solve.register_fake
def _(site, numbers, state, t, tensors, needs):
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
            found = iter(vector_jacobian_product(
                saved.outputs, [x for x, want in zip(saved.inputs, wanted) if want],
                solution_grads, None))
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
                spec = saved.site
                y0 = tuple(state) if spec.is_tuple else state[0]
                internal, grid, _ = internal_time(leaf, saved.options, spec.func, y0,
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
    _site, _numbers, state, t, tensors, needs = inputs
    ctx.n_components = len(state)
    ctx.needs = list(needs)
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
    return None, None, result[:n], result[n], result[n + 1:], None


_solve.register_autograd(_backward, setup_context=_setup_context)
