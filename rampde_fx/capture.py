"""Velocity capture: ``func(t, y)`` as an aten-level graph, rewritten into a low-precision callable.

Capture traces ``func`` with ``make_fx`` on fake tensors. Tracing at the aten level, below
autograd, is what lets the velocities of real code become graphs: ``torch.autograd.grad`` inside
the velocity (exact-trace CNFs, Hutchinson estimators, Hamiltonian nets) is traced into its
backward ops, ``torch.func`` transforms are traced through, in-place writes into preallocated
tensors are plain aten ops, ``torch.tensor(t)`` is a copy of ``t``, and TorchScript helpers run
their ops through the dispatcher like any other code. The graph is what the precision policy is
written in (``addmm``, ``convolution``, ``group_norm``...), what :func:`rampde_fx.explain` prints,
and what dynamo and inductor compile later. torch.fx symbolic tracing stops at all of these;
dynamo guards Python branches but breaks on ``torch.autograd.grad``.

Inputs: the tensors of the module that owns the velocity (parameters, buffers and plain tensor
attributes, found by name) are placeholders of the graph, fetched live on every call: parameters
stay the user's float32 masters and re-assigned attributes are seen. Tensors reached otherwise
(closures) are graph constants that hold the live objects.

Python reads of the time's value (``int(t.item() * n)``, ``float(t)``) specialise the graph on
that value: the velocity keeps one graph per distinct time (a fixed grid has a few per step).
Python control flow on any other tensor value (the state's) cannot be a graph: the velocity then
falls back, with a :class:`CaptureWarning` giving the reason and the line, to running ``func``
eagerly under autocast in the low dtype, with the same float32 accumulation and adjoint.

Capture runs the velocity's Python code (once per graph, and once more to record what an eager
fallback reads), and undoes what that code changes in user state whether capture succeeds or
not: attributes of its modules (an ``nfe`` counter) and the contents of the lists, dicts and
sets its code reaches by name (``self.log.append(y)``, ``ts.append(t.item())`` on a closure or
global list), which would otherwise keep fake tensors. A graph does not repeat such updates
during solves: capture warns with a :class:`CaptureWarning` naming them.

Recomputation in the backward pass must reproduce the forward: buffers that the velocity mutates
(BatchNorm running statistics, counters kept in buffers) are mutated by forward evaluations
only (:meth:`GraphVelocity.recomputing` gives the graph copies), and :attr:`draws_random` tells
the solver to replay the RNG state of each step.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import threading
import traceback
import types
import warnings
import weakref
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import DataDependentOutputException
from torch.fx.experimental.proxy_tensor import get_proxy_mode, make_fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import _disable_current_modes

from .policy import PrecisionPolicy
from .precision_pass import fetch_attr, rewrite_for_precision

State = tuple[torch.Tensor, ...]


class CaptureWarning(UserWarning):
    """A velocity could not be captured as a graph, or its capture changes its behaviour."""


def describe(func: Any) -> str:
    """How warnings and errors name a velocity."""
    if isinstance(func, torch.nn.Module):
        return f"velocity module {type(func).__qualname__}"
    return f"velocity callable {getattr(func, '__qualname__', type(func).__qualname__)}"


def _weakly(func: Any) -> Callable[[], Any]:
    """A reference to ``func`` that does not keep its module alive: captured velocities are
    cached per module (a plain function is held as it is)."""
    if isinstance(func, types.MethodType):
        return weakref.WeakMethod(func)
    if isinstance(func, torch.nn.Module):
        return weakref.ref(func)
    return lambda: func


def _owner(func: Any) -> torch.nn.Module | None:
    """The module whose tensors the velocity reads by attribute: itself, or its method's."""
    owner = getattr(func, "__self__", func)
    return owner if isinstance(owner, torch.nn.Module) else None


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where a lifted tensor lives: ``module.<kind>[key]`` (kind: _parameters, _buffers, or the
    instance ``__dict__`` for plain tensor attributes). The module is held weakly: captured
    velocities are cached per module and must not keep it alive."""

    module_ref: "weakref.ref[torch.nn.Module]"
    kind: str
    key: str

    def _table(self) -> dict[str, Any]:
        module = self.module_ref()
        return vars(module) if self.kind == "__dict__" else getattr(module, self.kind)

    def get(self) -> torch.Tensor:
        return self._table()[self.key]

    def set(self, value: Any) -> None:
        self._table()[self.key] = value


def _lifted_slots(owner: torch.nn.Module | None) -> dict[str, _Slot]:
    """Every tensor of ``owner`` by qualified name (shared tensors once, at their first name)."""
    if owner is None:
        return {}
    slots: dict[str, _Slot] = {}
    seen: set[int] = set()
    for prefix, module in owner.named_modules():
        for kind in ("_parameters", "_buffers", "__dict__"):
            table = vars(module) if kind == "__dict__" else getattr(module, kind)
            for key, value in table.items():
                if isinstance(value, torch.Tensor) and id(value) not in seen:
                    seen.add(id(value))
                    slots[f"{prefix}.{key}".lstrip(".")] = _Slot(weakref.ref(module), kind, key)
    return slots


@contextlib.contextmanager
def _substituted(slots: Sequence[_Slot], values: Sequence[torch.Tensor]) -> Iterator[None]:
    originals = [slot.get() for slot in slots]
    for slot, value in zip(slots, values):
        slot.set(value)
    try:
        yield
    finally:
        for slot, value in zip(slots, originals):
            slot.set(value)


# User-level calls that stop gradients. make_fx also records a detach for every output that
# autograd saves; those must go (a velocity that differentiates itself with create_graph=True
# needs the saved outputs attached), and the user's must stay.
_GRADIENT_STOPPERS = frozenset({torch.Tensor.detach, torch.detach, torch.tensor, torch.as_tensor,
                                torch.Tensor.new_tensor})
_SCALAR_READS = frozenset({torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__int__,
                           torch.Tensor.__index__, torch.Tensor.tolist})
_USER_DETACH = "rampde_user_detach"


class _TracingHooks(TorchFunctionMode):
    """While tracing: answers reads of the time's value with its real value (and notes that the
    graph is specialised on it), and tags the detaches that user code asked for."""

    def __init__(self, time: torch.Tensor, real_time: torch.Tensor) -> None:
        super().__init__()
        self.time = time
        self.real_time = real_time  # read only when the velocity reads it (a host sync)
        self.reads_time_value = False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in _SCALAR_READS and args and args[0] is self.time:
            self.reads_time_value = True
            with _disable_current_modes():  # the real value, not a traced read of it
                return func(self.real_time, *args[1:], **kwargs)
        if func not in _GRADIENT_STOPPERS:
            return func(*args, **kwargs)
        graph = get_proxy_mode().tracer.graph
        before = set(graph.nodes)
        out = func(*args, **kwargs)
        for node in graph.nodes:
            if node not in before:
                node.meta[_USER_DETACH] = True
        return out


def _drop_autograd_detaches(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        if node.target is torch.ops.aten.detach.default and not node.meta.get(_USER_DETACH):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


def _with_readable_names(graph: fx.Graph, placeholder_names: list[str]) -> fx.Graph:
    """A copy of ``graph`` whose placeholders have the given names (the tracer reserved some
    of them for ops, such as ``t`` for transposes) and whose transposes of an input are
    named after it (``net_0_weight_t``)."""
    readable = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = list(graph.find_nodes(op="placeholder"))
    for node, name in zip(placeholders, placeholder_names):
        env[node] = readable.placeholder(name)
        env[node].meta = node.meta
    for node in graph.nodes:
        if node.op == "placeholder":
            continue
        env[node] = readable.node_copy(node, env.__getitem__)
        if node.target is torch.ops.aten.t.default and env[node.args[0]].op == "placeholder":
            env[node]._rename(f"{env[node.args[0]].name}_t")
    return readable


def _draws_random(graph: fx.Graph) -> bool:
    return any(torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())
               for node in graph.nodes)


@dataclasses.dataclass
class _Traced:
    graph_module: fx.GraphModule
    names: list[str]  # lifted tensors, in placeholder order after (t, *state)
    reads_time_value: bool
    output: Any  # fake values of the output, in its structure


def _trace(func: Any, t: torch.Tensor, state: State, is_tuple: bool,
           slots: dict[str, _Slot], effects: _SideEffects) -> _Traced:
    names = list(slots)
    slot_list = [slots[n] for n in names]
    lifted = [slot.get() for slot in slot_list]
    hooks_box: list[_TracingHooks] = []

    def velocity(time, *flat):  # type: ignore[no-untyped-def]
        ys, tensors = flat[:len(state)], flat[len(state):]
        hooks = _TracingHooks(time, t)
        hooks_box.append(hooks)
        with _substituted(slot_list, tensors), hooks, torch.enable_grad():
            return func(time, tuple(ys) if is_tuple else ys[0])

    with _undoing_side_effects(func, effects):
        gm = make_fx(velocity, tracing_mode="fake", _allow_non_fake_inputs=True)(
            t, *state, *lifted)
    _drop_autograd_detaches(gm.graph)
    names_in_order = ["t", *(["y"] if len(state) == 1 and not is_tuple else
                             [f"y_{i}" for i in range(len(state))]),
                      *(n.replace(".", "_") for n in names)]
    gm = fx.GraphModule(gm, _with_readable_names(gm.graph, names_in_order))
    (output,) = gm.graph.find_nodes(op="output")
    values = fx.node.map_arg(output.args[0], lambda n: n.meta.get("val"))
    return _Traced(gm, names, hooks_box[-1].reads_time_value, values)


def _check_output(out: Any, state: State, func: Any) -> None:
    components = _as_state(out, len(state), lambda: describe(func))
    for i, (k, c) in enumerate(zip(components, state)):
        if tuple(k.shape) != tuple(c.shape):
            where = f"component {i} of the state" if len(state) > 1 else "the state"
            raise ValueError(f"{describe(func)} returned shape {tuple(k.shape)} for {where} of "
                             f"shape {tuple(c.shape)}; the velocity must have the state's shape")


@dataclasses.dataclass
class _ReplayFlag:
    on: bool = False


class GraphVelocity:
    """A velocity captured as graphs and rewritten under a precision policy.

    One graph serves every time unless the velocity reads the time's value in Python; then
    there is a graph per distinct time value, captured on first use.
    """

    def __init__(self, func: Any, is_tuple: bool, low_dtype: torch.dtype,
                 policy: PrecisionPolicy, slots: dict[str, _Slot], first: _Traced,
                 example: tuple[torch.Tensor, State]) -> None:
        self._func = _weakly(func)
        self.is_tuple = is_tuple
        self.low_dtype = low_dtype
        self.policy = policy
        self.fallback_reason: str | None = None
        self._slots = slots
        self._replay = _ReplayFlag()  # shared with transformed twins
        self.compiled_steps: dict[Any, Any] = {}  # see step_kernels.kernels_for
        self.time_indexed = first.reads_time_value
        self._as_written = False
        self.names = first.names  # every graph takes the same lifted tensors, in this order
        # Buffers, not only what the graph marks as written: aten.native_batch_norm updates its
        # running statistics without declaring it in its schema.
        self._buffers = [i for i, name in enumerate(self.names)
                         if slots[name].kind != "_parameters"]
        self.draws_random = False
        self._graphs: dict[float | None, tuple[fx.GraphModule, fx.GraphModule]] = {}
        self._add(first, example)

    @property
    def func(self) -> Any:
        """The user's velocity (alive while the solve that uses it runs)."""
        return self._func()

    def name(self) -> str:
        return describe(self.func)

    def _add(self, traced: _Traced, example: tuple[torch.Tensor, State]) -> None:
        t, state = example
        original = rewritten = traced.graph_module
        if not self._as_written:
            inputs = [t, *state, *(self._slots[n].get() for n in traced.names)]
            with torch.no_grad():
                new_graph = rewrite_for_precision(
                    original, inputs, self.low_dtype, self.policy,
                    state_placeholders={n.name for n in list(original.graph.find_nodes(
                        op="placeholder"))[1:1 + len(state)]})
            rewritten = fx.GraphModule(original, new_graph, class_name="LowPrecisionVelocity")
        # Any graph that draws makes the solve replay the generators (graphs per time differ).
        self.draws_random = self.draws_random or _draws_random(original.graph)
        key = float(t.item()) if self.time_indexed else None
        self._graphs[key] = (original, rewritten)

    @property
    def original_graph_module(self) -> fx.GraphModule:
        """The captured graph before the precision rewrite (the first one captured)."""
        return next(iter(self._graphs.values()))[0]

    @property
    def graph_module(self) -> fx.GraphModule:
        """The rewritten graph that runs (the first one captured)."""
        return next(iter(self._graphs.values()))[1]

    def _graph_at(self, t: torch.Tensor, y: State) -> fx.GraphModule:
        if not self.time_indexed:
            return self.graph_module
        key = float(t.item())
        with _CAPTURING:
            if key not in self._graphs:
                example = (t.detach(), tuple(c.detach() for c in y))
                self._add(_trace(self.func, *example, self.is_tuple, self._slots,
                                 _SideEffects()), example)
        return self._graphs[key][1]

    def live_tensors(self, replaying: bool = False) -> list[torch.Tensor]:
        """The lifted tensors as they are now, in the graphs' placeholder order; ``replaying``
        a step, the buffers as copies: mutations of the velocity's buffers happen in the
        forward only."""
        tensors = [self._slots[name].get() for name in self.names]
        if replaying:
            for i in self._buffers:
                tensors[i] = tensors[i].clone()
        return tensors

    def __call__(self, t: torch.Tensor, y: State) -> State:
        return self._run(t, y, self.live_tensors(replaying=self._replay.on))

    def _run(self, t: torch.Tensor, y: State, tensors: Sequence[torch.Tensor]) -> State:
        return _as_state(self._graph_at(t, y)(t, *y, *tensors), len(y), self.name)

    def reading(self, tensors: Sequence[torch.Tensor]) -> Callable[[torch.Tensor, State], State]:
        """The velocity with ``tensors`` in place of its lifted tensors (for tracing a step
        whose parameters are inputs)."""
        return lambda t, y: self._run(t, y, tensors)

    @contextlib.contextmanager
    def recomputing(self) -> Iterator[None]:
        """Evaluations inside re-run forward steps: buffers the velocity mutates stay as they
        are."""
        self._replay.on = True
        try:
            yield
        finally:
            self._replay.on = False

    def as_written(self) -> "GraphVelocity":
        """A twin that runs the captured graphs without the precision rewrite: the velocity in
        the precisions its code was written in, the reference that measures this one's
        rounding. It reads the same live tensors."""
        twin = copy.copy(self)
        twin._as_written = True
        twin._graphs = {key: (original, original) for key, (original, _) in self._graphs.items()}
        twin.compiled_steps = {}
        return twin

    def transformed(self, transform: Callable[[fx.Graph], None]) -> "GraphVelocity":
        """A twin whose rewritten graphs are copies changed in place by ``transform``; it reads
        the same live tensors."""
        twin = copy.copy(self)
        twin._graphs = {}
        for key, (original, rewritten) in self._graphs.items():
            graph = copy.deepcopy(rewritten.graph)
            transform(graph)
            twin._graphs[key] = (original, fx.GraphModule(rewritten, graph,
                                                          class_name=type(rewritten).__name__))
        return twin

    def tensors_requiring_grad(self) -> list[torch.Tensor]:
        """The live tensors the velocity reads that require grad (parameters, closures...)."""
        found: dict[int, torch.Tensor] = {}
        values = [self._slots[name].get() for name in self.names]
        for gm in (rewritten for _, rewritten in self._graphs.values()):
            values += [fetch_attr(gm, n.target) for n in gm.graph.find_nodes(op="get_attr")]
        for value in values:
            if isinstance(value, torch.Tensor) and value.requires_grad:
                found.setdefault(id(value), value)
        return list(found.values())


class EagerVelocity:
    """Fallback: ``func`` run eagerly on the state cast to the low dtype, under autocast."""

    draws_random = True  # unknown: the solver replays the RNG state of every step
    time_indexed = False

    def __init__(self, func: Any, low_dtype: torch.dtype, is_tuple: bool, reason: str,
                 tensors: Sequence[torch.Tensor]) -> None:
        self._func = _weakly(func)
        self.low_dtype = low_dtype
        self.is_tuple = is_tuple
        self.fallback_reason = reason
        self._tensors = list(tensors)
        self._slots = {name: slot for name, slot in _lifted_slots(_owner(func)).items()
                       if slot.kind == "_buffers"}
        self._replay = _ReplayFlag()
        self._as_written = False

    func = GraphVelocity.func
    name = GraphVelocity.name

    def __call__(self, t: torch.Tensor, y: State) -> State:
        if self._as_written:
            precision = torch.autocast(y[0].device.type, enabled=False)
        else:
            y, precision = tuple(c.to(self.low_dtype) for c in y), \
                _autocast_for(y[0].device.type, self.low_dtype)
        slots = list(self._slots.values()) if self._replay.on else []
        with precision, _substituted(slots, [slot.get().clone() for slot in slots]):
            out = self.func(t, y if self.is_tuple else y[0])
        return _as_state(out, len(y), self.name)

    def as_written(self) -> "EagerVelocity":
        """A twin that runs ``func`` on the state as it is, without autocast (see
        :meth:`GraphVelocity.as_written`)."""
        twin = copy.copy(self)
        twin._as_written = True
        return twin

    recomputing = GraphVelocity.recomputing

    def tensors_requiring_grad(self) -> list[torch.Tensor]:
        return self._tensors


Velocity = GraphVelocity | EagerVelocity


def _autocast_for(device_type: str, low_dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if low_dtype.itemsize >= 4:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=low_dtype)


def _as_state(out: Any, n_components: int, name: Callable[[], str]) -> State:
    """``out`` as a tuple of state components; ``name()`` names the velocity in the error."""
    if isinstance(out, torch.Tensor) and n_components == 1:
        return (out,)
    if isinstance(out, (tuple, list)) and len(out) == n_components:
        return tuple(out)
    got = f"{type(out).__name__} of length {len(out)}" if isinstance(out, (tuple, list)) \
        else type(out).__name__
    raise TypeError(f"{name()} returned {got} for a state of {n_components} tensor(s); it must "
                    "return one tensor per state component, in the structure of y")


class _TensorReadRecorder(TorchFunctionMode):
    """Records the tensors requiring grad that torch functions receive from outside the call
    (parameters, closure tensors), skipping the call's inputs and what it produces."""

    def __init__(self, inputs: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.seen: dict[int, torch.Tensor] = {}
        self._produced: dict[int, torch.Tensor] = {id(x): x for x in inputs}  # keeps ids unique

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        for leaf in pytree.tree_leaves((args, kwargs)):
            if (isinstance(leaf, torch.Tensor) and leaf.requires_grad
                    and id(leaf) not in self._produced):
                self.seen.setdefault(id(leaf), leaf)
        out = func(*args, **kwargs)
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._produced[id(leaf)] = leaf
        return out


def _mutable_attributes(module: torch.nn.Module) -> dict[tuple[int, str], tuple[torch.nn.Module, str, Any]]:
    snapshot = {}
    for qualname, sub in module.named_modules():
        for key, value in vars(sub).items():
            snapshot[id(sub), key] = (sub, f"{qualname}.{key}".lstrip("."), value)
    return snapshot


_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()))
_CONTAINERS = (list, dict, set)


def _code_of(func: Any) -> types.FunctionType | None:
    """The Python function that runs when ``func`` is called."""
    if isinstance(func, torch.nn.Module):
        code = type(func).forward
    elif isinstance(func, types.MethodType):
        code = func.__func__
    else:
        code = func if isinstance(func, types.FunctionType) else getattr(type(func), "__call__",
                                                                         None)
    return code if isinstance(code, types.FunctionType) else None


def _reachable_containers(func: Any) -> dict[int, tuple[str, Any]]:
    """The lists, dicts and sets that the velocity's code reaches by name, by id: attributes of
    its modules, and the closure cells and globals of its function (or ``forward``)."""
    found: dict[int, tuple[str, Any]] = {}

    def add(name: str, value: Any) -> None:
        if isinstance(value, _CONTAINERS):
            found.setdefault(id(value), (name, value))

    owner = _owner(func)
    for qualname, sub in owner.named_modules() if owner is not None else ():
        for key, value in vars(sub).items():
            if key not in _MODULE_INTERNALS:
                add(f"{qualname}.{key}".lstrip("."), value)
    code = _code_of(func)
    if code is not None:
        for name, cell in zip(code.__code__.co_freevars, code.__closure__ or ()):
            with contextlib.suppress(ValueError):  # a cell not filled yet
                add(name, cell.cell_contents)
        for name in code.__code__.co_names:
            add(name, code.__globals__.get(name))
    return found


def _identities(container: Any) -> list[int]:
    """The identities of a container's elements (a dict's keys and values), in order."""
    elements = [*container.keys(), *container.values()] if isinstance(container, dict) \
        else container
    return [id(element) for element in elements]


@dataclasses.dataclass
class _SideEffects:
    """What running the velocity's code at capture changed, by name (and capture undid)."""

    assigned: list[str] = dataclasses.field(default_factory=list)
    changed: list[str] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.assigned or self.changed)

    def __str__(self) -> str:
        parts = []
        if self.assigned:
            parts.append(f"assigns {sorted(set(self.assigned))}")
        if self.changed:
            parts.append(f"changes the contents of {sorted(set(self.changed))}")
        return " and ".join(parts)


@contextlib.contextmanager
def _undoing_side_effects(func: Any, effects: _SideEffects) -> Iterator[None]:
    """Undo what running ``func``'s Python code changes in user state: attributes assigned on
    its modules (an ``nfe`` counter, a tensor re-assigned in forward) and the contents of the
    lists, dicts and sets it reaches by name (see :func:`_reachable_containers`), so that
    capture leaves no fake tensors or other traces there, whether it succeeds or not.

    Records in ``effects`` the non-tensor attributes assigned and the containers changed: a
    graph recomputes tensor values on every call but does not repeat Python-side updates.
    Containers reached otherwise (through a helper's globals, or nested in others) are not
    restored.
    """
    module = _owner(func)
    before = _mutable_attributes(module) if module is not None else {}
    containers = _reachable_containers(func)
    saved = {key: (copy.copy(container), _identities(container))
             for key, (_, container) in containers.items()}  # copies keep the elements alive
    try:
        yield
    finally:
        after = _mutable_attributes(module) if module is not None else {}
        for key, (sub, name, value) in before.items():
            if key not in after or after[key][2] is not value:
                setattr(sub, key[1], value)
                if not isinstance(value, torch.Tensor):
                    effects.assigned.append(name)
        for key, (sub, name, value) in after.items():
            if key not in before:
                delattr(sub, key[1])
                if not isinstance(value, torch.Tensor) and not key[1].startswith("_"):
                    effects.assigned.append(name)
        for key, (name, container) in containers.items():
            original, identities = saved[key]
            if _identities(container) != identities:
                container.clear()
                if isinstance(container, list):
                    container.extend(original)
                else:
                    container.update(original)
                effects.changed.append(name)


def _eager(func: Any, t: torch.Tensor, state: State, is_tuple: bool, low_dtype: torch.dtype,
           reason: str) -> EagerVelocity:
    recorder = _TensorReadRecorder([t, *state])
    velocity = EagerVelocity(func, low_dtype, is_tuple, reason, [])
    with torch.no_grad(), recorder, velocity.recomputing(), torch.random.fork_rng(
            devices=[state[0].device] if state[0].device.type == "cuda" else []), \
            _undoing_side_effects(func, _SideEffects()):
        velocity(t, state)
    tensors = dict(recorder.seen)
    owner = _owner(func)
    if owner is not None:
        tensors.update((id(p), p) for p in owner.parameters() if p.requires_grad)
    velocity._tensors = list(tensors.values())
    return velocity


_LIBRARY_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(__file__))


def _reason(error: Exception) -> str:
    """Why capture failed: the error's first line, and the line of user code that raised it."""
    text = str(error).strip()
    reason = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
    if isinstance(error, (GuardOnDataDependentSymNode, DataDependentOutputException)):
        reason = "Python control flow on the value of a tensor other than the time"
    user = [frame for frame in traceback.extract_tb(error.__traceback__)
            if not frame.filename.startswith(_LIBRARY_DIRS)]
    if user:
        reason += f", at {os.path.basename(user[-1].filename)}:{user[-1].lineno} " \
                  f"in {user[-1].name}: {user[-1].line}"
    return reason


_CAPTURING = threading.RLock()
_CACHE: "weakref.WeakKeyDictionary[Any, dict[Any, Velocity]]" = weakref.WeakKeyDictionary()


def capture_velocity(func: Any, t: torch.Tensor, y: State, is_tuple: bool,
                     low_dtype: torch.dtype, policy: PrecisionPolicy) -> Velocity:
    """The low-precision velocity for ``func`` at inputs like ``(t, y)``, cached per ``func``.

    The cache key holds the shapes, dtypes and devices of the inputs, the low dtype, the policy
    and the train/eval flags of ``func``'s modules (a graph bakes in ``if self.training``
    branches and the shapes it was traced with).
    """
    owner = getattr(func, "__self__", func)  # bound methods are re-created on every access
    module = _owner(func)
    training = tuple(m.training for m in module.modules()) if module is not None else ()
    key = (getattr(func, "__func__", None), low_dtype, policy, is_tuple, training, t.dtype,
           tuple((c.dtype, c.device, tuple(c.shape)) for c in y))
    try:
        per_owner = _CACHE.setdefault(owner, {})
    except TypeError:  # not weak-referenceable: capture every time
        per_owner = {}
    with _CAPTURING:  # capture changes and restores attributes of the user's modules
        if key not in per_owner:
            per_owner[key] = _capture(func, t, y, is_tuple, low_dtype, policy, module)
    return per_owner[key]


def _capture(func: Any, t: torch.Tensor, y: State, is_tuple: bool, low_dtype: torch.dtype,
             policy: PrecisionPolicy, module: torch.nn.Module | None) -> Velocity:
    example = (t.detach(), tuple(c.detach() for c in y))
    effects = _SideEffects()
    slots = _lifted_slots(module)
    try:
        traced = _trace(func, *example, is_tuple, slots, effects)
    except Exception as error:  # noqa: BLE001 - any failure means: run it eagerly
        reason = _reason(error)
        warnings.warn(
            f"rampde_fx: could not capture {describe(func)} as a graph ({reason}). It will run "
            f"eagerly on its state cast to {low_dtype}, under autocast; accumulation and the "
            "adjoint are unchanged, but the precision policy does not apply.",
            CaptureWarning, stacklevel=4)
        return _eager(func, *example, is_tuple, low_dtype, reason)
    if effects:
        warnings.warn(
            f"rampde_fx: {describe(func)} {effects} in forward. Capture ran that Python code "
            "and undid what it changed; the captured graph does not repeat it during solves (a "
            "counter such as nfe will not advance, a list it appends to stays as it was).",
            CaptureWarning, stacklevel=4)
    _check_output(traced.output, example[1], func)
    return GraphVelocity(func, is_tuple, low_dtype, policy, slots, traced, example)
