"""The specs of compiled solves: their non-tensor arguments, registered while dynamo traces and
named in the graph by an integer key.

The velocity, method, precision settings and the structure of the options of a solve are
registered once per compiled call site (:func:`register`); the spec is held by the velocity's
module (``runtime.SPECS_OF``) and goes with it. Python numbers among the tolerances and options
(a step size, say) are a tensor input of the op instead: a new value runs the same graph (dynamo
may recompile once, when it first sees the number change). Objects reach the registration as
they are, which needs dynamo of torch 2.13 or later.
"""
from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any, Callable

import torch
from torch import Tensor

from .. import runtime
from ..capture import lifted_slots
from ..capture.slots import MODULE_INTERNALS
from ..config import Budget, SolveConfig, resolve_config

# Python numbers among a solve's tolerances and options are inputs of the op, not constants of
# the graph, so a new step size or tolerance needs no recompilation. In the registered
# arguments each is replaced by a marker ``(_NUMBER, position in the op's numbers, is int)``:
# a plain tuple, which dynamo passes to the registration as a constant.
_NUMBER = "rampde_fx.number"
# A Budget among the settings reaches the registration as ``(_BUDGET, states)``: dynamo passes
# a tuple of constants, but not a frozen dataclass made in the compiled code.
_BUDGET = "rampde_fx.Budget"


def lift_budget(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings keywords with a :class:`~rampde_fx.Budget` checkpoint as a plain tuple (see
    :func:`register`, which makes it a Budget again)."""
    checkpoint = settings.get("checkpoint")
    if isinstance(checkpoint, Budget):
        return {**settings, "checkpoint": (_BUDGET, checkpoint.states)}
    return settings


def _lower_budget(settings: dict[str, Any]) -> dict[str, Any]:
    checkpoint = settings.get("checkpoint")
    if isinstance(checkpoint, tuple) and len(checkpoint) == 2 and checkpoint[0] == _BUDGET:
        return {**settings, "checkpoint": Budget(checkpoint[1])}
    return settings


def lift_numbers(value: Any, numbers: list[Any]) -> Any:
    """``value`` with its Python numbers, at any depth of lists, tuples and dicts, replaced by
    markers; the numbers are appended to ``numbers``."""
    if isinstance(value, (int, float, torch.SymInt, torch.SymFloat)) \
            and not isinstance(value, bool):
        numbers.append(value)
        return (_NUMBER, len(numbers) - 1, isinstance(value, (int, torch.SymInt)))
    if isinstance(value, (list, tuple)):
        return type(value)(lift_numbers(v, numbers) for v in value)
    if isinstance(value, dict):
        return {k: lift_numbers(v, numbers) for k, v in value.items()}
    return value


def lower_numbers(value: Any, numbers: list[float]) -> Any:
    """The inverse of :func:`lift_numbers`, with the numbers of this call."""
    if isinstance(value, tuple) and len(value) == 3 and value[0] == _NUMBER:
        return int(numbers[value[1]]) if value[2] else numbers[value[1]]
    if isinstance(value, (list, tuple)):
        return type(value)(lower_numbers(v, numbers) for v in value)
    if isinstance(value, dict):
        return {k: lower_numbers(v, numbers) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class CompiledSolveSpec:
    """The non-tensor arguments of a compiled solve (numbers as markers, see
    :func:`lift_numbers`). The velocity's owner and the reporting object are held weakly: a
    compiled graph must not keep a deleted model alive."""

    owner: "weakref.ref[Any]"
    method_name: str | None
    rtol: Any
    atol: Any
    method: str | None
    options: dict[str, Any]
    config: SolveConfig
    is_tuple: bool
    report_to: "weakref.ref[Any] | None"  # whose ``last_stats`` each run sets (a convert site)
    # The tensors of the velocity's owner, by qualified name, in the order the op takes them.
    tensor_names: tuple[str, ...]
    # An event solve's event function: its owner (held weakly) and method name, as the
    # velocity's; None without an event.
    event_owner: "weakref.ref[Any] | None" = None
    event_method_name: str | None = None

    @property
    def func(self) -> Callable[..., Any]:
        return _resolved(self.owner, self.method_name, "velocity")

    @property
    def event_fn(self) -> Callable[..., Any] | None:
        if self.event_owner is None:
            return None
        return _resolved(self.event_owner, self.event_method_name, "event function")


def _resolved(owner_ref: "weakref.ref[Any]", method_name: str | None,
              what: str) -> Callable[..., Any]:
    """The callable that ``owner_ref`` and ``method_name`` name (see CompiledSolveSpec)."""
    owner = owner_ref()
    if owner is None:
        raise RuntimeError(f"rampde_fx: the {what} of this compiled solve was deleted")
    return owner if method_name is None else getattr(owner, method_name)


DYNAMO_PASSES_OBJECTS = tuple(int(part) for part in
                              torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)


@torch.compiler.assume_constant_result
def register(owner: torch.nn.Module, method_name: Any, config: Any, settings: Any,
             report_to_key: Any, rtol: Any, atol: Any, method: Any, options: Any,
             is_tuple: Any, event_owner: Any = None, event_method_name: Any = None) -> int:
    """Runs while dynamo traces a solve: the key of its spec, a constant of the graph. The
    velocity is ``owner`` itself or its method ``method_name`` (an event solve's event
    function likewise ``event_owner`` or its method); the precision settings are
    ``config``, or those the settings keywords give (see :func:`rampde_fx.config.resolve_config`).
    An equal spec of the same owner is reused, so recompilation registers nothing new. 0 for a
    velocity module made inside the compiled code (see :func:`made_while_tracing`)."""
    if made_while_tracing(owner) or made_while_tracing(event_owner):
        return 0
    config = resolve_config(config, None, **_lower_budget(settings))
    report_to = None if report_to_key is None else runtime.object_of(report_to_key)
    func = owner if method_name is None else getattr(owner, method_name)
    # Options that are no dict are kept as given: the solve refuses them, as an eager one does.
    spec = CompiledSolveSpec(weakref.ref(owner), method_name, rtol, atol, method,
                             {} if options is None else options, config, is_tuple,
                             None if report_to is None else weakref.ref(report_to),
                             tuple(lifted_slots(func)),
                             None if event_owner is None else weakref.ref(event_owner),
                             event_method_name)
    specs = runtime.SPECS_OF.setdefault(owner, {})
    key = next((key for key, known in specs.items() if known == spec), None)
    if key is None:
        key = runtime.new_key(spec)
        specs[key] = spec
    return key


def made_while_tracing(owner: Any) -> bool:
    """Whether ``owner`` is a velocity module made inside the compiled code (a vector-field
    wrapper built per call): it reaches a registration as dynamo rebuilds it, with nn.Module's
    own state and without what its ``__init__`` set."""
    return isinstance(owner, torch.nn.Module) \
        and type(owner).__init__ is not torch.nn.Module.__init__ \
        and set(vars(owner)) <= MODULE_INTERNALS \
        and not (owner._modules or owner._parameters or owner._buffers)


@torch.compiler.assume_constant_result
def tensor_names(spec_key: int) -> tuple[str, ...]:
    """Runs while dynamo traces a solve: the qualified names of the tensors of the velocity's
    owner (its parameters, buffers and tensor attributes), a constant of the graph. The traced
    code reads them by these names, so a tensor assigned before the solve is the one it gets."""
    return runtime.object_of(spec_key).tensor_names


def tensor_at(owner: Any, name: str) -> Tensor:
    """The tensor of ``owner`` at the qualified name ``name`` (``sub.weight``)."""
    return functools.reduce(getattr, name.split("."), owner)
