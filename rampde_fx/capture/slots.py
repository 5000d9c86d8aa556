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


def velocity_kind(func: Any) -> Any:
    """What velocities that can share a captured graph have in common: the class of a module
    (or of the module whose method it is), the code of a plain function (a lambda or closure
    made per call); any other callable is its own kind. Which of them does share one is for
    the guards to say (see ``guards``)."""
    owner, _ = velocity_owner(func)
    if isinstance(owner, torch.nn.Module):
        return type(owner)
    if isinstance(func, types.FunctionType):
        return func.__code__
    return func


def describe(func: Any) -> str:
    """How warnings and errors name a velocity."""
    if isinstance(func, torch.nn.Module):
        return f"velocity module {type(func).__qualname__}"
    return f"velocity callable {getattr(func, '__qualname__', type(func).__qualname__)}"


def weakly(func: Any) -> Callable[[], Any]:
    """A reference to ``func`` that does not keep it, its module or its closure alive:
    captured velocities are cached beyond their solves (what cannot be referenced weakly is
    held as it is)."""
    if isinstance(func, types.MethodType):
        return weakref.WeakMethod(func)
    try:
        return weakref.ref(func)
    except TypeError:
        return lambda: func


def owner_module(func: Any) -> torch.nn.Module | None:
    """The velocity's owner where it is a module: the module whose tensors it reads by
    attribute."""
    owner, _ = velocity_owner(func)
    return owner if isinstance(owner, torch.nn.Module) else None


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where a lifted tensor lives: ``module.<kind>[key]`` (kind: _parameters, _buffers, or the
    instance ``__dict__`` for plain tensor attributes; the module held weakly), or, for a
    function's closure, a cell (kind ``cell``) or an item of a dict or list in a cell (kind
    ``item``)."""

    holder: Any  # a weakref.ref to the module, the cell, or the dict or list
    kind: str
    key: Any

    def _table(self) -> Any:
        if self.kind == "item":
            return self.holder
        module = self.holder()
        return vars(module) if self.kind == "__dict__" else getattr(module, self.kind)

    def get(self) -> torch.Tensor:
        if self.kind == "cell":
            return self.holder.cell_contents
        return self._table()[self.key]

    def set(self, value: Any) -> None:
        if self.kind == "cell":
            self.holder.cell_contents = value
        else:
            self._table()[self.key] = value


def closure_of(func: Any) -> dict[str, Any]:
    """The closure cells of a plain function velocity (a lambda or closure made per call), by
    name; empty for modules, methods and other callables, whose tensors live in modules."""
    if not isinstance(func, types.FunctionType) or not func.__closure__:
        return {}
    return dict(zip(func.__code__.co_freevars, func.__closure__))


def cell_value(cell: Any) -> Any:
    """A cell's contents; None for a cell not filled yet."""
    try:
        return cell.cell_contents
    except ValueError:
        return None


def module_roots(func: Any) -> list[tuple[str, torch.nn.Module]]:
    """The modules whose tensors the velocity reads by name, with the prefix of their names:
    its owner (prefix ''), or the modules in its closure cells (prefixed by the cell's name)."""
    owner = owner_module(func)
    if owner is not None:
        return [("", owner)]
    return [(name, value) for name, cell in closure_of(func).items()
            if isinstance(value := cell_value(cell), torch.nn.Module)]


def lifted_slots(func: Any) -> dict[str, Slot]:
    """Every tensor the velocity reads by name, by qualified name (shared tensors once, at
    their first name): the parameters, buffers and tensor attributes of its modules (see
    :func:`module_roots`), and the tensors in its closure cells, directly or as items of a
    dict or list there."""
    slots: dict[str, Slot] = {}
    seen: set[int] = set()

    def add(name: str, value: Any, holder: Any, kind: str, key: Any) -> None:
        if isinstance(value, torch.Tensor) and id(value) not in seen:
            seen.add(id(value))
            slots[name] = Slot(holder, kind, key)

    for root_prefix, root in module_roots(func):
        for prefix, module in root.named_modules(prefix=root_prefix):
            holder = weakref.ref(module)
            for kind in ("_parameters", "_buffers", "__dict__"):
                table = vars(module) if kind == "__dict__" else getattr(module, kind)
                for key, value in table.items():
                    # Every attribute of every module, every solve: names and slots are made
                    # for the tensors only.
                    if isinstance(value, torch.Tensor):
                        add(f"{prefix}.{key}".lstrip("."), value, holder, kind, key)
    for name, cell in closure_of(func).items():
        value = cell_value(cell)
        add(name, value, cell, "cell", None)
        items = value.items() if isinstance(value, dict) else \
            enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            add(f"{name}[{key!r}]", item, value, "item", key)
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


# nn.Module's own attributes (parameters, buffers, submodules, hooks, the training flag).
MODULE_INTERNALS = frozenset(vars(torch.nn.Module()))


def code_of(func: Any) -> types.FunctionType | None:
    """The Python function that runs when ``func`` is called."""
    if isinstance(func, torch.nn.Module):
        code = type(func).forward
    elif isinstance(func, types.MethodType):
        code = func.__func__
    else:
        code = func if isinstance(func, types.FunctionType) else getattr(type(func), "__call__",
                                                                         None)
    return code if isinstance(code, types.FunctionType) else None


def reachable_by_name(func: Any) -> Iterator[tuple[str, Any, str]]:
    """What the velocity's Python reaches by name, with that name and where it was found
    (``attribute``, ``cell`` or ``global``): the attributes of its modules (``sub.attr``; see
    :func:`module_roots`; nn.Module's own internals left out), and the closure cells (other
    than those modules) and the globals named by its function (or ``forward``)."""
    for root_prefix, root in module_roots(func):
        for qualname, sub in root.named_modules(prefix=root_prefix):
            for key, value in vars(sub).items():
                if key not in MODULE_INTERNALS:
                    yield f"{qualname}.{key}".lstrip("."), value, "attribute"
    code = code_of(func)
    if code is not None:
        for name, cell in zip(code.__code__.co_freevars, code.__closure__ or ()):
            value = cell_value(cell)
            if not isinstance(value, torch.nn.Module):
                yield name, value, "cell"
        for name in code.__code__.co_names:
            if name in code.__globals__:
                yield name, code.__globals__[name], "global"
