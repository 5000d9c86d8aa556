"""Captured velocities: graphs rewritten under the precision policy, or the eager fallback."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .. import runtime
from ..passes.precision import fetch_attr, rewrite_for_precision
from ..policy import PrecisionPolicy
from ..stats import VelocityKind
from .rng import replayed_rng, rng_state
from .side_effects import SideEffects, undoing_side_effects
from .slots import (Slot, describe, lifted_slots, module_roots, reachable_by_name, substituted,
                    weakly)
from .trace import State, Traced, as_state, graph_draws_random, trace


@dataclasses.dataclass
class _Shared:
    """What a velocity shares with its twins (bound, as written, transformed)."""

    replaying: bool = False  # evaluations inside re-run forward steps
    # The copies of the mutable tensors that a re-run step reads, by name (see recomputing).
    replay_tensors: dict[str, torch.Tensor] | None = None
    draws_random: bool = False  # some graph draws random numbers
    # The generators that graphs draw from by name (generator=...), beside PyTorch's own.
    generators: list[torch.Generator] = dataclasses.field(default_factory=list)
    # Lifted tensors whose values the graphs are specialised on, beside the time's.
    value_names: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Counter:
    """An integer attribute that the velocity's Python increments by ``delta`` per call (an
    ``nfe`` counter): a graph does not run that Python, so the solve advances it. ``name`` is
    its qualified name among the velocity's modules (``sub.nfe``)."""

    name: str
    delta: int


class GraphVelocity:
    """A velocity captured as graphs and rewritten under a precision policy.

    One graph serves every time unless the velocity reads the time's value in Python; then
    there is a graph per distinct time value, captured on first use.
    """

    kind = VelocityKind.GRAPH

    def __init__(self, func: Any, is_tuple: bool, low_dtype: torch.dtype,
                 policy: PrecisionPolicy, slots: dict[str, Slot], first: Traced,
                 example: tuple[torch.Tensor, State], counters: Sequence[Counter] = ()) -> None:
        self._func = weakly(func)
        self.is_tuple = is_tuple
        self.low_dtype = low_dtype
        self.policy = policy
        self.fallback_reason: str | None = None  # the eager fallback's; a graph has none
        self.counters = list(counters)
        self._slots = slots
        self._shared = _Shared()
        self._base: GraphVelocity | None = None  # the velocity a twin was made from
        self._bound: list[torch.Tensor] | None = None  # one solve's tensors (see bound())
        self.time_indexed = first.reads_time_value
        self._shared.value_names = sorted(first.value_names)
        self._as_written = False
        self.names = first.names  # every graph takes the same lifted tensors, in this order
        # Buffers, not only what the graph marks as written: aten.native_batch_norm updates its
        # running statistics without declaring it in its schema.
        self._buffers = [i for i, name in enumerate(self.names)
                         if slots[name].kind != "_parameters"]
        self._graphs: dict[float | None, tuple[fx.GraphModule, fx.GraphModule]] = {}
        self._pinned: list[fx.GraphModule] | None = None  # see running()
        self._add(first, example)

    @property
    def func(self) -> Any:
        """The user's velocity (alive while the solve that uses it runs)."""
        return self._func()

    def name(self) -> str:
        return describe(self.func)

    @property
    def base(self) -> "GraphVelocity":
        """The captured velocity this one is a twin of (itself if it is none)."""
        return self if self._base is None else self._base

    @property
    def draws_random(self) -> bool:
        """Whether any of its graphs draws random numbers (the solve then replays the
        generators of each step)."""
        return self._shared.draws_random

    @property
    def generators(self) -> list[torch.Generator]:
        """The generators its graphs draw from by name (``generator=g``): the solve replays
        their states with the default generators'."""
        return self._shared.generators

    @property
    def reads_buffer_values(self) -> bool:
        """Whether its graphs are specialised on the value of a buffer: one its evaluations
        may change in place (``BatchNorm(momentum=None)`` reads ``num_batches_tracked``), so
        that which graph an evaluation runs depends on the evaluations before it."""
        buffers = {self.names[i] for i in self._buffers}
        return any(name in buffers for name in self._shared.value_names)

    def bound(self, func: Any, bindings: dict[str, torch.Tensor] | None,
              slots: dict[str, Slot]) -> "GraphVelocity":
        """A twin for one solve of ``func``, this velocity's or an equal one (the same code
        and guarded state, made anew for the call, say): it reads the tensors that ``func``'s
        ``slots`` hold now (or, by qualified name, those of ``bindings``), whatever is assigned
        to them later, so the solve's backward pass sees the values its forward used. It shares
        this velocity's graphs."""
        bindings = bindings or {}
        twin = copy.copy(self)
        twin._base = self.base
        twin._func = weakly(func)
        twin._slots = slots
        twin._bound = [bindings[name] if name in bindings else slots[name].get()
                       for name in self.names]
        return twin

    def swap_bound(self, old: Sequence[torch.Tensor],
                   new: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Read ``new[i]`` wherever this solve's velocity reads ``old[i]`` (by identity);
        returns, per position, the tensor it reads now (``old[i]`` where it is not among the
        bound tensors: a constant of a graph)."""
        return _swap(self._bound, old, new)

    def advance_counters(self, calls: int) -> None:
        """Advance the counters of this velocity's modules as ``calls`` runs of its Python
        would have."""
        if not self.counters:
            return
        modules = {prefix: module for root_prefix, root in module_roots(self.func)
                   for prefix, module in root.named_modules(prefix=root_prefix)}
        for counter in self.counters:
            prefix, _, attribute = counter.name.rpartition(".")
            module = modules.get(prefix)
            if module is not None:
                setattr(module, attribute, getattr(module, attribute) + counter.delta * calls)

    def _add(self, traced: Traced, example: tuple[torch.Tensor, State]) -> None:
        t, state = example
        original = rewritten = traced.graph_module
        if not self._as_written:
            inputs = [t, *state, *(self._slots[n].get() for n in traced.names)]
            with torch.no_grad():
                new_graph = rewrite_for_precision(
                    original.graph, inputs, self.low_dtype, self.policy,
                    state_placeholders={n.name for n in list(original.graph.find_nodes(
                        op="placeholder"))[1:1 + len(state)]})
            rewritten = fx.GraphModule(original, new_graph, class_name="LowPrecisionVelocity")
        # Any graph that draws makes the solve replay the generators (graphs per time differ).
        if graph_draws_random(original.graph):
            self._shared.draws_random = True
        for node in original.graph.find_nodes(op="get_attr"):
            value = fetch_attr(original, node.target)
            if isinstance(value, torch.Generator) and \
                    all(value is not known for known in self._shared.generators):
                self._shared.generators.append(value)
        self._graphs[self._key(t) if self.time_indexed else None] = (original, rewritten)

    @property
    def original_graph_module(self) -> fx.GraphModule:
        """The captured graph before the precision rewrite (the first one captured)."""
        return next(iter(self._graphs.values()))[0]

    @property
    def graph_module(self) -> fx.GraphModule:
        """The rewritten graph that runs (the first one captured)."""
        return next(iter(self._graphs.values()))[1]

    def graph_modules(self) -> list[fx.GraphModule]:
        """The rewritten graphs captured so far."""
        return [rewritten for _, rewritten in self._graphs.values()]

    def graph_times(self) -> list[float]:
        """The time of each of its graphs, where it has one per time (see ``time_indexed``)."""
        return [key[0] for key in self._graphs if key is not None]

    def _key(self, t: torch.Tensor) -> Any:
        """Which graph serves time ``t``: its value, and the values of the lifted tensors the
        graphs are specialised on (read from this velocity's tensors, host synchronisations;
        in a re-run step, from the buffer copies it evaluates with)."""
        tensors = dict(zip(self.names, self.live_tensors(replaying=self._shared.replaying)))
        return (float(t.item()), *(tuple(tensors[name].detach().flatten().tolist())
                                   for name in self._shared.value_names))

    def _graph_at(self, t: torch.Tensor, y: State) -> fx.GraphModule:
        if self._pinned is not None:
            return self._pinned.pop(0)
        if not self.time_indexed:
            return self.graph_module
        with runtime.CAPTURE_LOCK:
            if self._key(t) not in self._graphs:
                example = (t.detach(), tuple(c.detach() for c in y))
                traced = trace(self.func, *example, self.is_tuple, self._slots, SideEffects())
                names = self._shared.value_names
                names[:] = sorted(set(names) | traced.value_names)  # a wider key from now on
                self._add(traced, example)
            return self._graphs[self._key(t)][1]

    def live_tensors(self, replaying: bool = False) -> list[torch.Tensor]:
        """The lifted tensors, in the graphs' placeholder order: those bound for the solve
        (see :meth:`bound`), else as they are now; ``replaying`` a step, the buffers as copies:
        mutations of the velocity's buffers happen in the forward only."""
        tensors = list(self._bound) if self._bound is not None else \
            [self._slots[name].get() for name in self.names]
        if replaying:
            replay = self._shared.replay_tensors or {}
            for i in self._buffers:
                tensors[i] = replay[self.names[i]] if self.names[i] in replay else \
                    tensors[i].clone()
        return tensors

    def mutable_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that evaluations may change in place (buffers, tensor attributes), by
        name: the forward keeps their values per step where it does (see ``recomputing``)."""
        tensors = self.live_tensors()
        return {self.names[i]: tensors[i] for i in self._buffers}

    def __call__(self, t: torch.Tensor, y: State) -> State:
        return self._run(t, y, self.live_tensors(replaying=self._shared.replaying))

    def _run(self, t: torch.Tensor, y: State, tensors: Sequence[torch.Tensor]) -> State:
        return as_state(self._graph_at(t, y)(t, *y, *tensors), len(y), self.name)

    def reading(self, tensors: Sequence[torch.Tensor]) -> Callable[[torch.Tensor, State], State]:
        """The velocity with ``tensors`` in place of its lifted tensors (for tracing a step
        whose parameters are inputs)."""
        return lambda t, y: self._run(t, y, tensors)

    @contextlib.contextmanager
    def recomputing(self, values: dict[str, torch.Tensor] | None = None
                    ) -> Iterator[dict[str, torch.Tensor]]:
        """Evaluations inside a re-run forward step: they read copies, made once for the step,
        of the velocity's mutable tensors (its in-place updates of its buffers happen in the
        forward only, and carry from one stage to the next as they did there); copies of
        ``values`` where given (the buffers as the forward step found them, by name). Yields
        the copies, by name: after the step, the values it left."""
        values = values or {}
        self._shared.replaying = True
        self._shared.replay_tensors = copies = {name: values.get(name, x).clone()
                                                for name, x in self.mutable_tensors().items()}
        try:
            yield copies
        finally:
            self._shared.replaying, self._shared.replay_tensors = False, None

    def as_written(self) -> "GraphVelocity":
        """A twin that runs the captured graphs without the precision rewrite: the velocity in
        the precisions its code was written in, the reference that measures this one's
        rounding. It reads the same tensors."""
        twin = copy.copy(self)
        twin._as_written = True
        twin._graphs = {key: (original, original) for key, (original, _) in self._graphs.items()}
        return twin

    def transformed(self, transform: Callable[[fx.Graph], None]) -> "GraphVelocity":
        """A twin whose rewritten graphs are copies changed in place by ``transform``; it reads
        the same tensors."""
        twin = copy.copy(self)
        twin._graphs = {key: (original, transformed_graph(rewritten, transform))
                        for key, (original, rewritten) in self._graphs.items()}
        return twin

    def graphs_at(self, times: Sequence[torch.Tensor], y: State) -> list[fx.GraphModule]:
        """The rewritten graph that serves each of ``times`` (captured where it is new, with
        ``y`` as the example state), without evaluating any."""
        return [self._graph_at(t, y) for t in times]

    def running(self, graphs: Sequence[fx.GraphModule]) -> "GraphVelocity":
        """A twin whose i-th evaluation runs ``graphs[i]``, whatever time it is given: a step of
        a velocity with graphs per time, traced with symbolic times (see ``graphs_at``)."""
        twin = copy.copy(self)
        twin._pinned = list(graphs)
        return twin

    def tensors_requiring_grad(self) -> list[torch.Tensor]:
        """The tensors the velocity reads that require grad (parameters, closures...). Where
        one graph serves every time, only those it reads: a tensor attribute that it does not
        read (one its Python assigns anew, as ``spectral_norm``'s hook does) gets no gradient,
        which would reach whatever graph made it."""
        found: dict[int, torch.Tensor] = {}
        values: list[Any] = self.live_tensors()
        if not self.time_indexed:  # graphs per time are captured during the solve
            placeholders = self.original_graph_module.graph.find_nodes(op="placeholder")
            lifted = placeholders[len(placeholders) - len(self.names):]
            values = [x for x, node in zip(values, lifted) if node.users]
        for gm in (rewritten for _, rewritten in self._graphs.values()):
            values += [fetch_attr(gm, n.target) for n in gm.graph.find_nodes(op="get_attr")]
        for value in values:
            if isinstance(value, torch.Tensor) and value.requires_grad:
                found.setdefault(id(value), value)
        return list(found.values())


class EagerVelocity:
    """Fallback: ``func`` run eagerly on the state cast to the low dtype, under autocast."""

    kind = VelocityKind.EAGER
    draws_random = True  # unknown: the solver replays the RNG state of every step
    time_indexed = False

    def __init__(self, func: Any, low_dtype: torch.dtype, is_tuple: bool, reason: str,
                 other_tensors: Sequence[torch.Tensor]) -> None:
        self._func = weakly(func)
        self.low_dtype = low_dtype
        self.is_tuple = is_tuple
        self.fallback_reason = reason
        self._other_tensors = list(other_tensors)  # read outside the owner's slots (closures)
        self._slots = lifted_slots(func)
        self._bound: dict[str, torch.Tensor] | None = None
        self._shared = _Shared()
        self._as_written = False

    func = GraphVelocity.func
    name = GraphVelocity.name
    counters: list[Counter] = []  # its Python runs: counters advance themselves

    @property
    def generators(self) -> list[torch.Generator]:
        """The generators its Python reaches by name (its modules' attributes, its closure
        and globals): those it may draw from beside PyTorch's own."""
        found: list[torch.Generator] = []
        for _, value, _ in reachable_by_name(self.func):
            if isinstance(value, torch.Generator) and all(value is not g for g in found):
                found.append(value)
        return found

    def bound(self, func: Any, bindings: dict[str, torch.Tensor] | None,
              slots: dict[str, Slot]) -> "EagerVelocity":
        """A twin for one solve of ``func``: while it runs, its ``slots`` hold the tensors
        they hold now, or those of ``bindings`` (see :meth:`GraphVelocity.bound`)."""
        bindings = bindings or {}
        twin = copy.copy(self)
        twin._func = weakly(func)
        twin._slots = slots
        twin._bound = {name: bindings[name] if name in bindings else slot.get()
                       for name, slot in twin._slots.items()}
        return twin

    def swap_bound(self, old: Sequence[torch.Tensor],
                   new: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """See :meth:`GraphVelocity.swap_bound`; tensors read outside the slots (closures)
        stay as they are."""
        if self._bound is None:
            return list(old)
        names = list(self._bound)
        values = list(self._bound.values())
        read = _swap(values, old, new)
        self._bound = dict(zip(names, values))
        return read

    def advance_counters(self, calls: int) -> None:
        pass

    def mutable_tensors(self) -> dict[str, torch.Tensor]:
        """See :meth:`GraphVelocity.mutable_tensors`."""
        tensors = self._bound if self._bound is not None else \
            {name: slot.get() for name, slot in self._slots.items()}
        return {name: tensors[name] for name, slot in self._slots.items()
                if slot.kind != "_parameters"}

    def __call__(self, t: torch.Tensor, y: State) -> State:
        if self._as_written:
            precision = torch.autocast(y[0].device.type, enabled=False)
        else:
            y, precision = tuple(c.to(self.low_dtype) for c in y), \
                autocast_for(y[0].device.type, self.low_dtype)
        # The bound tensors where a slot holds another one now; in a re-run forward step,
        # copies of the buffers (mutations of buffers happen in the forward only).
        values = {name: value for name, value in (self._bound or {}).items()
                  if self._slots[name].get() is not value}
        if self._shared.replaying:
            values.update(self._shared.replay_tensors or {})
        with precision, substituted([self._slots[name] for name in values], list(values.values())):
            out = self.func(t, y if self.is_tuple else y[0])
        return as_state(out, len(y), self.name)

    def as_written(self) -> "EagerVelocity":
        """A twin that runs ``func`` on the state as it is, without autocast (see
        :meth:`GraphVelocity.as_written`)."""
        twin = copy.copy(self)
        twin._as_written = True
        return twin

    recomputing = GraphVelocity.recomputing

    def tensors_requiring_grad(self) -> list[torch.Tensor]:
        slots = self._bound if self._bound is not None else \
            {name: slot.get() for name, slot in self._slots.items()}
        found = {id(x): x for x in slots.values() if x.requires_grad}
        found.update((id(x), x) for x in self._other_tensors)
        return list(found.values())


Velocity = GraphVelocity | EagerVelocity


def _swap(bound: list[torch.Tensor] | None, old: Sequence[torch.Tensor],
          new: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Replace, in place in ``bound``, each ``old[i]`` by ``new[i]``; returns per position
    what ``bound`` holds now (``old[i]`` where it held none)."""
    if bound is None:
        return list(old)
    position = {id(x): i for i, x in enumerate(old)}
    found = set()
    for k, x in enumerate(bound):
        i = position.get(id(x))
        if i is not None and x is old[i]:
            bound[k] = new[i]
            found.add(i)
    return [new[i] if i in found else x for i, x in enumerate(old)]


def autocast_for(device_type: str, low_dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if low_dtype.itemsize >= 4:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=low_dtype)


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


def eager_velocity(func: Any, t: torch.Tensor, state: State, is_tuple: bool,
                   low_dtype: torch.dtype, reason: str) -> EagerVelocity:
    """The fallback for ``func``, having run it once to record the tensors it reads."""
    recorder = _TensorReadRecorder([t, *state])
    velocity = EagerVelocity(func, low_dtype, is_tuple, reason, [])
    device = state[0].device
    with torch.no_grad(), recorder, velocity.recomputing(), \
            replayed_rng(rng_state(device, velocity.generators), device), \
            undoing_side_effects(func, SideEffects()):
        velocity(t, state)
    in_slots = {id(slot.get()) for slot in velocity._slots.values()}
    velocity._other_tensors = [x for key, x in recorder.seen.items() if key not in in_slots]
    return velocity


def transformed_graph(module: fx.GraphModule, transform: Callable[[fx.Graph], None]
                      ) -> fx.GraphModule:
    """A copy of ``module`` whose graph ``transform`` changed in place."""
    graph = copy.deepcopy(module.graph)
    transform(graph)
    return fx.GraphModule(module, graph, class_name=type(module).__name__)
