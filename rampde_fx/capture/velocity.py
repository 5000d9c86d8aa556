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
from .side_effects import SideEffects, undoing_side_effects
from .slots import Slot, describe, lifted_slots, owner_module, substituted, weakly
from .trace import State, Traced, as_state, draws_random, trace


@dataclasses.dataclass
class _ReplayFlag:
    on: bool = False


class GraphVelocity:
    """A velocity captured as graphs and rewritten under a precision policy.

    One graph serves every time unless the velocity reads the time's value in Python; then
    there is a graph per distinct time value, captured on first use.
    """

    kind = VelocityKind.GRAPH

    def __init__(self, func: Any, is_tuple: bool, low_dtype: torch.dtype,
                 policy: PrecisionPolicy, slots: dict[str, Slot], first: Traced,
                 example: tuple[torch.Tensor, State]) -> None:
        self._func = weakly(func)
        self.is_tuple = is_tuple
        self.low_dtype = low_dtype
        self.policy = policy
        self.fallback_reason: str | None = None  # the eager fallback's; a graph has none
        self._slots = slots
        self._replay = _ReplayFlag()  # shared with transformed twins
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
        self.draws_random = self.draws_random or draws_random(original.graph)
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
        with runtime.CAPTURE_LOCK:
            if key not in self._graphs:
                example = (t.detach(), tuple(c.detach() for c in y))
                self._add(trace(self.func, *example, self.is_tuple, self._slots,
                                 SideEffects()), example)
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
        return as_state(self._graph_at(t, y)(t, *y, *tensors), len(y), self.name)

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

    kind = VelocityKind.EAGER
    draws_random = True  # unknown: the solver replays the RNG state of every step
    time_indexed = False

    def __init__(self, func: Any, low_dtype: torch.dtype, is_tuple: bool, reason: str,
                 tensors: Sequence[torch.Tensor]) -> None:
        self._func = weakly(func)
        self.low_dtype = low_dtype
        self.is_tuple = is_tuple
        self.fallback_reason = reason
        self._tensors = list(tensors)
        self._slots = {name: slot for name, slot in lifted_slots(owner_module(func)).items()
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
                autocast_for(y[0].device.type, self.low_dtype)
        slots = list(self._slots.values()) if self._replay.on else []
        with precision, substituted(slots, [slot.get().clone() for slot in slots]):
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
        return self._tensors


Velocity = GraphVelocity | EagerVelocity


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
    with torch.no_grad(), recorder, velocity.recomputing(), torch.random.fork_rng(
            devices=[state[0].device] if state[0].device.type == "cuda" else []), \
            undoing_side_effects(func, SideEffects()):
        velocity(t, state)
    tensors = dict(recorder.seen)
    owner = owner_module(func)
    if owner is not None:
        tensors.update((id(p), p) for p in owner.parameters() if p.requires_grad)
    velocity._tensors = list(tensors.values())
    return velocity
