"""Tracing a velocity to an aten graph with ``make_fx`` on fake tensors, and why it failed."""
from __future__ import annotations

import dataclasses
import itertools
import os
import re
import traceback
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import DataDependentOutputException, is_fake
from torch.fx.experimental.proxy_tensor import get_proxy_mode, make_fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import _disable_current_modes

from ..passes.cleanup import (USER_DETACH, detach_inputs_of_out_variants,
                              drop_autograd_detaches, with_readable_names)
from .side_effects import SideEffects, undoing_side_effects
from .slots import Slot, describe, substituted

State = tuple[torch.Tensor, ...]

# User-level calls that stop gradients. make_fx also records a detach for every output that
# autograd saves; those must go (a velocity that differentiates itself with create_graph=True
# needs the saved outputs attached), and the user's must stay.
_GRADIENT_STOPPERS = frozenset({torch.Tensor.detach, torch.detach, torch.tensor, torch.as_tensor,
                                torch.Tensor.new_tensor})
_SCALAR_READS = frozenset({torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__int__,
                           torch.Tensor.__index__, torch.Tensor.__bool__, torch.Tensor.tolist})
_DATA_DEPENDENT = (DataDependentOutputException, GuardOnDataDependentSymNode)


@dataclasses.dataclass
class _Shadow:
    """The real value of a traced tensor computed from the time, constants and lifted tensors
    that want no gradient alone, and the names of those lifted tensors."""

    value: torch.Tensor
    sources: frozenset[str]


class TracingHooks(TorchFunctionMode):
    """While tracing: answers Python reads of values computed from the time, constants and
    lifted tensors that want no gradient (``int(t.item() * n)``, ``bucketize(t, knots)`` used
    as an index, ``t > 0.5``, the time passed where a number is expected) with their real
    values, and notes that the graph is specialised on the time and on those tensors'
    values; tags the detaches that user code asked for.

    Each such value is *shadowed*: computed again on the real inputs, on copies (an in-place
    op changes no user tensor)."""

    def __init__(self, time: torch.Tensor, real_time: torch.Tensor,
                 lifted: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        # Real values are read only where the velocity reads them (a host sync).
        self._shadows: dict[int, _Shadow] = {id(time): _Shadow(real_time, frozenset())}
        self._alive = [time]  # the traced tensors shadowed: their ids stay theirs
        for name, (traced, real) in lifted.items():
            if not real.requires_grad:
                self._shadows[id(traced)] = _Shadow(real, frozenset({name}))
                self._alive.append(traced)
        self.reads_time_value = False
        self.value_names: set[str] = set()

    def _shadow(self, value: Any) -> _Shadow | None:
        if not isinstance(value, torch.Tensor):
            return None
        if not is_fake(value):  # a constant of the graph (a closure's or a global tensor)
            return _Shadow(value, frozenset())
        return self._shadows.get(id(value))

    def _read(self, shadow: _Shadow) -> torch.Tensor:
        self.reads_time_value = True
        self.value_names |= shadow.sources
        return shadow.value

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        shadow = self._shadow(args[0]) if args else None
        if func in _SCALAR_READS and shadow is not None:
            with _disable_current_modes():  # the real value, not a traced read of it
                return func(self._read(shadow), *args[1:], **kwargs)
        # What the call adds to the graph (the tracer appends it); inside torch.func transforms
        # and TorchScript calls no tracer is at hand here.
        proxy_mode = get_proxy_mode()
        graph = None if proxy_mode is None else proxy_mode.tracer.graph
        last = None if graph is None else next(iter(reversed(graph.nodes)), None)
        try:
            out = func(*args, **kwargs)
        except _DATA_DEPENDENT:
            # A shadowed tensor where Python needs a number (an index, a fill value): the
            # number it holds.
            leaves, spec = pytree.tree_flatten((args, kwargs))
            numbers = [self._as_number(leaf) for leaf in leaves]
            if all(number is leaf for number, leaf in zip(numbers, leaves)):
                raise
            for node in self._added(graph, last):
                graph.erase_node(node)  # what the failed attempt recorded
            args, kwargs = pytree.tree_unflatten(numbers, spec)
            out = func(*args, **kwargs)
        added = self._added(graph, last)
        if func in _GRADIENT_STOPPERS:
            for node in added:
                node.meta[USER_DETACH] = True
        # Outputs of random ops have no real value to read; nor where no tracer was at hand.
        random = graph is None or any(is_random_op(node.target) for node in added)
        self._shadow_outputs(func, args, kwargs, out, random)
        return out

    @staticmethod
    def _added(graph: fx.Graph | None, last: fx.Node | None) -> list[fx.Node]:
        """The nodes after ``last`` in ``graph``, the last first."""
        if graph is None:
            return []
        return list(itertools.takewhile(lambda node: node is not last, reversed(graph.nodes)))

    def _as_number(self, value: Any) -> Any:
        shadow = self._shadow(value)
        if shadow is None or shadow.value.dim() != 0:
            return value
        return self._read(shadow).item()

    def _shadow_outputs(self, func: Any, args: Any, kwargs: dict[str, Any], out: Any,
                        random: bool) -> None:
        """Shadow the outputs of a call whose tensor inputs are all shadowed (none: a
        constant), unless it draws random numbers."""
        inputs = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        shadows = [self._shadow(x) for x in inputs]
        outputs = [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
        if not outputs or None in shadows or random:
            for x in outputs:  # an in-place op on a shadowed tensor ends its shadow
                self._shadows.pop(id(x), None)
            return
        try:
            with _disable_current_modes():  # real tensors: copies made outside the tracing
                real_args, real_kwargs = pytree.tree_map(
                    lambda x: self._shadow(x).value.clone() if isinstance(x, torch.Tensor) else x,
                    (args, kwargs))
                real = func(*real_args, **real_kwargs)
        except Exception:  # noqa: BLE001 - no real value: nothing read from it specialises
            return
        sources = frozenset().union(*(s.sources for s in shadows))
        for traced, value in zip(outputs, [x for x in pytree.tree_leaves(real)
                                           if isinstance(x, torch.Tensor)]):
            self._shadows[id(traced)] = _Shadow(value, sources)
            self._alive.append(traced)


def is_random_op(target: Any) -> bool:
    """Whether a graph node's target is an op that draws random numbers."""
    return torch.Tag.nondeterministic_seeded in getattr(target, "tags", ())


def graph_draws_random(graph: fx.Graph) -> bool:
    return any(is_random_op(node.target) for node in graph.nodes)


@dataclasses.dataclass
class Traced:
    graph_module: fx.GraphModule
    names: list[str]  # lifted tensors, in placeholder order after (t, *state)
    reads_time_value: bool  # specialised on the time's value
    value_names: set[str]  # and on the values of these lifted tensors
    output: Any  # fake values of the output, in its structure


def trace(func: Any, t: torch.Tensor, state: State, is_tuple: bool,
           slots: dict[str, Slot], effects: SideEffects) -> Traced:
    names = list(slots)
    slot_list = [slots[n] for n in names]
    lifted = [slot.get() for slot in slot_list]
    hooks_box: list[TracingHooks] = []

    def velocity(time, *flat):  # type: ignore[no-untyped-def]
        ys, tensors = flat[:len(state)], flat[len(state):]
        hooks = TracingHooks(time, t, dict(zip(names, zip(tensors, lifted))))
        hooks_box.append(hooks)
        with substituted(slot_list, tensors), hooks, torch.enable_grad():
            return func(time, tuple(ys) if is_tuple else ys[0])

    with undoing_side_effects(func, effects):
        gm = make_fx(velocity, tracing_mode="fake", _allow_non_fake_inputs=True)(
            t, *state, *lifted)
    detach_inputs_of_out_variants(drop_autograd_detaches(gm.graph))
    names_in_order = ["t", *(["y"] if len(state) == 1 and not is_tuple else
                             [f"y_{i}" for i in range(len(state))]),
                      *(re.sub(r"\W+", "_", n).rstrip("_") for n in names)]
    gm = fx.GraphModule(gm, with_readable_names(gm.graph, names_in_order))
    (output,) = gm.graph.find_nodes(op="output")
    values = fx.node.map_arg(output.args[0], lambda n: n.meta.get("val"))
    hooks = hooks_box[-1]
    return Traced(gm, names, hooks.reads_time_value, hooks.value_names, values)


def check_output(out: Any, state: State, func: Any) -> None:
    components = as_state(out, len(state), lambda: describe(func))
    for i, (k, c) in enumerate(zip(components, state)):
        if tuple(k.shape) != tuple(c.shape):
            where = f"component {i} of the state" if len(state) > 1 else "the state"
            raise ValueError(f"{describe(func)} returned shape {tuple(k.shape)} for {where} of "
                             f"shape {tuple(c.shape)}; the velocity must have the state's shape")


_LIBRARY_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))


def fallback_reason(error: Exception) -> str:
    """Why capture failed: the error's first line, and the line of user code that raised it."""
    text = str(error).strip()
    reason = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
    if isinstance(error, _DATA_DEPENDENT):
        reason = ("Python control flow on the value of a tensor computed from the state or "
                  "from tensors that require grad")
    user = [frame for frame in traceback.extract_tb(error.__traceback__)
            if not frame.filename.startswith(_LIBRARY_DIRS)]
    if user:
        reason += f", at {os.path.basename(user[-1].filename)}:{user[-1].lineno} " \
                  f"in {user[-1].name}: {user[-1].line}"
    return reason


def as_state(out: Any, n_components: int, name: Callable[[], str]) -> State:
    """``out`` as a tuple of state components; ``name()`` names the velocity in the error."""
    if isinstance(out, torch.Tensor) and n_components == 1:
        return (out,)
    if isinstance(out, (tuple, list)) and len(out) == n_components:
        return tuple(out)
    got = f"{type(out).__name__} of length {len(out)}" if isinstance(out, (tuple, list)) \
        else type(out).__name__
    raise TypeError(f"{name()} returned {got} for a state of {n_components} tensor(s); it must "
                    "return one tensor per state component, in the structure of y")
