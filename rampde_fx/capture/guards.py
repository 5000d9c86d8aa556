"""Guards: the Python state a captured graph was traced under, compared before it is reused.

A graph bakes in what the velocity's Python read while it was traced: branches on attributes
and on ``self.training``, numbers and functions held in attributes, globals and closure cells,
the hooks of its modules and which modules they are, the shapes of their tensors. Before a
cached graph runs a solve, :func:`guard_state` computes that state again; a graph captured under
another state is not reused (the velocity is captured again).

Guarded, for each of the velocity's modules (its owner, or the modules in its closure) and
every submodule: its name and class (a parametrization changes it), its training flag, its
forward and backward hooks (and the global module hooks), the names, shapes, dtypes and devices
of its parameters, buffers and tensor attributes, and the value of every other attribute:
numbers, strings, booleans, None, dtypes, devices, enums and tuples of them by value, lists
and dicts by their contents (one level), any other object (a function, a module held outside
``_modules``, a config object) by identity. The closure cells of the velocity's function, the
same way (tensors in them, and in lists and dicts there, are bound per solve), and the globals
its code names, tensors among them by identity (a graph holds them as constants).

Which module a slot belongs to is not guarded, only its structure: a velocity module made anew
for every call, or a swapped submodule of the same kind, reuses the graph with its own tensors
(each solve binds them, see ``GraphVelocity.bound``).

Not guarded: the contents of other objects (an object mutated in place keeps its identity),
state read only through helper functions or other modules' globals, and attributes the
velocity itself assigns or lists it appends to (outputs such as an ``nfe`` counter, not
inputs).
"""
from __future__ import annotations

import enum
from typing import Any

import torch
from torch.nn.modules import module as module_internals

from .slots import Slot, module_roots, reachable_by_name

_BY_VALUE = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, enum.Enum)
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks",
                 "_global_backward_hooks", "_global_backward_pre_hooks")


def guard_state(func: Any, excluded: frozenset[str] | set[str],
                slots: dict[str, Slot]) -> tuple[Any, ...]:
    """The Python state of ``func`` that a graph captured from it depends on (see the module
    docstring), leaving out the attributes named in ``excluded`` (``sub.attr``, as
    :func:`~rampde_fx.capture.slots.reachable_by_name` names them); ``slots``: its
    :func:`~rampde_fx.capture.slots.lifted_slots`. Hashable, equal for equal states."""
    state: list[Any] = []
    for root_prefix, root in module_roots(func):
        for qualname, sub in root.named_modules(prefix=root_prefix):
            state.append((qualname, type(sub), sub.training,
                          tuple(tuple(map(_Identity, getattr(sub, hooks, {}).values()))
                                for hooks in _HOOKS),
                          tuple((key, _tensor_guard(value))
                                for key, value in sub._parameters.items()),
                          tuple((key, _tensor_guard(value))
                                for key, value in sub._buffers.items())))
    lifted = {id(slot.get()) for slot in slots.values()}
    for name, value, _ in reachable_by_name(func):
        if name not in excluded:
            state.append((name, _guard(value, lifted)))
    state.append(tuple(tuple(map(_Identity, getattr(module_internals, hooks, {}).values()))
                       for hooks in _GLOBAL_HOOKS))
    return tuple(state)


def _guard(value: Any, lifted: set[int], depth: int = 0) -> Any:
    """``value`` as guarded: tensors bound per solve (their ids in ``lifted``) by metadata,
    other tensors by identity; containers by their contents to one level below the first."""
    if isinstance(value, torch.Tensor):
        return _tensor_guard(value) if id(value) in lifted else _Identity(value)
    if isinstance(value, float):
        return float, repr(value)  # nan equals itself
    if isinstance(value, _BY_VALUE):
        return type(value), value
    if depth < 2 and isinstance(value, (list, tuple)):
        return type(value), tuple(_guard(v, lifted, depth + 1) for v in value)
    if depth < 2 and isinstance(value, dict):
        return dict, tuple((_guard(k, set(), 2), _guard(v, lifted, depth + 1))
                           for k, v in value.items())
    return _Identity(value)


class _Identity:
    """Equal to another only for the same object, which it keeps alive (a freed object's id
    can be another's later)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Identity) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)


def _tensor_guard(value: torch.Tensor | None) -> Any:
    if value is None:
        return None
    return "tensor", tuple(value.shape), value.dtype, value.device
