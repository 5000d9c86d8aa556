"""What running a velocity's Python at capture changes in user state, and undoing it."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any, Iterator

import torch

from .slots import module_roots, reachable_by_name

def _mutable_attributes(func: Any) -> dict[tuple[int, str], tuple[torch.nn.Module, str, Any]]:
    """The attributes of the velocity's modules (see ``slots.module_roots``)."""
    snapshot = {}
    for root_prefix, root in module_roots(func):
        for qualname, sub in root.named_modules(prefix=root_prefix):
            for key, value in vars(sub).items():
                snapshot[id(sub), key] = (sub, f"{qualname}.{key}".lstrip("."), value)
    return snapshot


_CONTAINERS = (list, dict, set)


def _reachable_containers(func: Any) -> dict[int, tuple[str, Any]]:
    """The lists, dicts and sets that the velocity's code reaches by name, by id (see
    :func:`~rampde_fx.capture.slots.reachable_by_name`)."""
    found: dict[int, tuple[str, Any]] = {}
    for name, value, _ in reachable_by_name(func):
        if isinstance(value, _CONTAINERS):
            found.setdefault(id(value), (name, value))
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
    # Integer attributes the code incremented: (qualified name, increment).
    counters: list[tuple[str, int]] = dataclasses.field(default_factory=list)

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

    Records in ``effects`` the integer attributes incremented (counters, which the solve
    advances), the other non-tensor attributes assigned and the containers changed: a graph
    recomputes tensor values on every call but does not repeat Python-side updates.
    Containers reached otherwise (through a helper's globals, or nested in others) are not
    restored.
    """
    before = _mutable_attributes(func)
    containers = _reachable_containers(func)
    saved = {key: (copy.copy(container), _identities(container))
             for key, (_, container) in containers.items()}  # copies keep the elements alive
    try:
        yield
    finally:
        after = _mutable_attributes(func)
        for key, (sub, name, value) in before.items():
            if key not in after or after[key][2] is not value:
                setattr(sub, key[1], value)
                new = after[key][2] if key in after else None
                if _is_int(value) and _is_int(new):
                    effects.counters.append((name, new - value))
                elif not isinstance(value, torch.Tensor):
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
