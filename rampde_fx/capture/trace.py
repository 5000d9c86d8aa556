"""Tracing a velocity to an aten graph with ``make_fx`` on fake tensors, and why it failed."""
from __future__ import annotations

import dataclasses
import os
import traceback
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import DataDependentOutputException
from torch.fx.experimental.proxy_tensor import get_proxy_mode, make_fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _disable_current_modes

from ..passes.cleanup import USER_DETACH, drop_autograd_detaches, with_readable_names
from .side_effects import SideEffects, undoing_side_effects
from .slots import Slot, describe, substituted

State = tuple[torch.Tensor, ...]

_GRADIENT_STOPPERS = frozenset({torch.Tensor.detach, torch.detach, torch.tensor, torch.as_tensor,
                                torch.Tensor.new_tensor})
_SCALAR_READS = frozenset({torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__int__,
                           torch.Tensor.__index__, torch.Tensor.tolist})


class TracingHooks(TorchFunctionMode):
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
                node.meta[USER_DETACH] = True
        return out



def draws_random(graph: fx.Graph) -> bool:
    return any(torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())
               for node in graph.nodes)


@dataclasses.dataclass
class Traced:
    graph_module: fx.GraphModule
    names: list[str]  # lifted tensors, in placeholder order after (t, *state)
    reads_time_value: bool
    output: Any  # fake values of the output, in its structure


def trace(func: Any, t: torch.Tensor, state: State, is_tuple: bool,
           slots: dict[str, Slot], effects: SideEffects) -> Traced:
    names = list(slots)
    slot_list = [slots[n] for n in names]
    lifted = [slot.get() for slot in slot_list]
    hooks_box: list[TracingHooks] = []

    def velocity(time, *flat):  # type: ignore[no-untyped-def]
        ys, tensors = flat[:len(state)], flat[len(state):]
        hooks = TracingHooks(time, t)
        hooks_box.append(hooks)
        with substituted(slot_list, tensors), hooks, torch.enable_grad():
            return func(time, tuple(ys) if is_tuple else ys[0])

    with undoing_side_effects(func, effects):
        gm = make_fx(velocity, tracing_mode="fake", _allow_non_fake_inputs=True)(
            t, *state, *lifted)
    drop_autograd_detaches(gm.graph)
    names_in_order = ["t", *(["y"] if len(state) == 1 and not is_tuple else
                             [f"y_{i}" for i in range(len(state))]),
                      *(n.replace(".", "_") for n in names)]
    gm = fx.GraphModule(gm, with_readable_names(gm.graph, names_in_order))
    (output,) = gm.graph.find_nodes(op="output")
    values = fx.node.map_arg(output.args[0], lambda n: n.meta.get("val"))
    return Traced(gm, names, hooks_box[-1].reads_time_value, values)


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
    if isinstance(error, (GuardOnDataDependentSymNode, DataDependentOutputException)):
        reason = "Python control flow on the value of a tensor other than the time"
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
