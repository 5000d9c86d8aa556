"""Where a velocity's tensors live: its owner, the module whose tensors it reads, and the
slots (parameters, buffers, plain tensor attributes) that capture lifts into graph inputs."""
from __future__ import annotations

import contextlib
import dataclasses
import types
import weakref
from typing import Any, Callable, Iterator, Sequence

import torch


def velocity_owner(func: Any) -> tuple[Any, str | None]:
    """The *owner* of a velocity: the object it is, or whose bound method it is, and the name
    of that method (None where it is no method). An isinstance test and plain attribute access,
    which dynamo traces: it answers ``getattr(method, "__self__", None)`` with the default."""
    if isinstance(func, types.MethodType):
        return func.__self__, func.__func__.__name__
    return func, None


def describe(func: Any) -> str:
    """How warnings and errors name a velocity."""
    if isinstance(func, torch.nn.Module):
        return f"velocity module {type(func).__qualname__}"
    return f"velocity callable {getattr(func, '__qualname__', type(func).__qualname__)}"


def weakly(func: Any) -> Callable[[], Any]:
    """A reference to ``func`` that does not keep its module alive: captured velocities are
    cached per module (a plain function is held as it is)."""
    if isinstance(func, types.MethodType):
        return weakref.WeakMethod(func)
    if isinstance(func, torch.nn.Module):
        return weakref.ref(func)
    return lambda: func


def owner_module(func: Any) -> torch.nn.Module | None:
    """The velocity's owner where it is a module: the module whose tensors it reads by
    attribute."""
    owner, _ = velocity_owner(func)
    return owner if isinstance(owner, torch.nn.Module) else None


@dataclasses.dataclass(frozen=True)
class Slot:
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


def lifted_slots(owner: torch.nn.Module | None) -> dict[str, Slot]:
    """Every tensor of ``owner`` by qualified name (shared tensors once, at their first name)."""
    if owner is None:
        return {}
    slots: dict[str, Slot] = {}
    seen: set[int] = set()
    for prefix, module in owner.named_modules():
        for kind in ("_parameters", "_buffers", "__dict__"):
            table = vars(module) if kind == "__dict__" else getattr(module, kind)
            for key, value in table.items():
                if isinstance(value, torch.Tensor) and id(value) not in seen:
                    seen.add(id(value))
                    slots[f"{prefix}.{key}".lstrip(".")] = Slot(weakref.ref(module), kind, key)
    return slots


@contextlib.contextmanager
def substituted(slots: Sequence[Slot], values: Sequence[torch.Tensor]) -> Iterator[None]:
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
