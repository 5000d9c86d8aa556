"""What running a velocity's Python at capture changes in user state, and undoing it."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import types
from typing import Any, Iterator

import torch

from .slots import owner_module

def _mutable_attributes(module: torch.nn.Module
                        ) -> dict[tuple[int, str], tuple[torch.nn.Module, str, Any]]:
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

    owner = owner_module(func)
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
class SideEffects:
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
def undoing_side_effects(func: Any, effects: SideEffects) -> Iterator[None]:
    """Undo what running ``func``'s Python code changes in user state: attributes assigned on
    its modules (an ``nfe`` counter, a tensor re-assigned in forward) and the contents of the
    lists, dicts and sets it reaches by name (see :func:`_reachable_containers`), so that
    capture leaves no fake tensors or other traces there, whether it succeeds or not.

    Records in ``effects`` the non-tensor attributes assigned and the containers changed: a
    graph recomputes tensor values on every call but does not repeat Python-side updates.
    Containers reached otherwise (through a helper's globals, or nested in others) are not
    restored.
    """
    module = owner_module(func)
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
