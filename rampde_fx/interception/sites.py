"""The solves of a converted model: sites made when a solve is first met, and the record that
routes each intercepted solver call to its site.

A site is identified by the solver and the velocity: the velocity module (its class, for a
module that is not part of the model: one made anew on every call), or the module and the
method name of a bound method (bound methods are made anew on every access), or the code of a
plain function (a lambda or closure may be made anew on every call). The same identity is
computed while dynamo traces, from ids, so a site first met eagerly is found again under
``torch.compile`` and the other way round.

``filter_fn`` is asked once per site, with the module whose forward makes the solve. In eager
mode that is the nearest frame, up from the solver call, whose ``self`` is a module of the
converted model (a helper method or function called from a forward counts as that forward).
Dynamo cannot trace frame inspection, so a site first met while compiling takes the module from
the velocity instead: the module whose method it is, else the parent of the velocity module,
else the model itself; for the usual ``odeint(self.odefunc, ...)`` in the forward of the module
holding ``odefunc`` both agree.
"""
from __future__ import annotations

import sys
import threading
import types
import warnings
from typing import Any, Callable

import torch

from .. import runtime
from ..api import odeint, odeint_event, solve_to_event, solves_like_odeint
from ..capture import owner_module, velocity_owner
from ..compiled.op import NOT_IN_GRAPH, is_plain_function, run_between_graphs, solve_in_graph
from ..config import SolveConfig
from ..engine.plan import METHODS
from ..errors import ConversionError
from ..stats import SolveStats, collect_stats
from . import trampolines

# The positional parameters of the intercepted solvers.
_POSITIONAL = ("func", "y0", "t")
_EVENT_POSITIONAL = ("func", "y0", "t0")  # torchdiffeq.odeint_event
# Arguments of odeint_event that its solve (odeint with event_fn) does not take.
_EVENT_ONLY_ARGUMENTS = ("reverse_time", "odeint_interface")
# Arguments of the original call that the converted solve does not pass on: odeint_adjoint's
# settings of its adjoint solve (a discrete adjoint solves no adjoint ODE: warned), and
# rampde_fx.odeint's precision settings (convert's own take their place).
_ADJOINT_SOLVE_ARGUMENTS = ("adjoint_rtol", "adjoint_atol", "adjoint_method", "adjoint_options")
_DROPPED_ARGUMENTS = (*_ADJOINT_SOLVE_ARGUMENTS, "dtype", "scaling", "policy", "checkpoint",
                      "compile_steps", "config")


class SolveSite:
    """One converted ODE solve: runs :func:`rampde_fx.odeint` (for ``torchdiffeq.odeint_event``,
    :func:`rampde_fx.odeint_event`) with the conversion's precision.

    Attributes:
        source: the solver the model calls ('torchdiffeq.odeint', ...).
        module_name: the name in the model of the module that makes the solve ('' for the
            root; None for a solve of a :class:`rampde_fx.mixed_precision` scope).
        module_class: that module's class name (in a scope: the velocity's module's, or
            ``'function'``).
        velocity: how the velocity is named (its name in the model, or its qualified name).
        config: the precision settings the solve runs with.
        dropped: arguments of the last call that were not passed on.
        call_arguments: the solver arguments of the last call that were passed on.
        last_stats: the statistics of the last solve (None until one has run).
    """

    def __init__(self, *, source: str, module_name: str | None, module_class: str,
                 velocity: str, config: SolveConfig) -> None:
        self.source = source
        self.module_name = module_name
        self.module_class = module_class
        self.velocity = velocity
        self.config = config
        self.dropped: tuple[str, ...] = ()
        self.call_arguments: dict[str, Any] = {}
        self.last_stats: SolveStats | None = None

    def __str__(self) -> str:
        if self.module_name is None:
            return f"{self.source} of {self.velocity} ({self.module_class}) in a scope"
        return f"{self.source} in {self.module_class} at '{self.module_name or '<root>'}'"

    def accept(self, arguments: dict[str, Any], dropped: tuple[str, ...]) -> None:
        """Record a call's arguments, or raise ConversionError for what rampde_fx cannot solve."""
        interface = arguments.get("odeint_interface")
        if not solves_like_odeint(interface):
            raise ConversionError(
                f"rampde_fx: {self} passes odeint_interface={interface!r}; rampde_fx converts "
                "event solves made with torchdiffeq.odeint, odeint_adjoint or rampde_fx.odeint. "
                "Pass filter_fn to leave this solve as it is.")
        method = arguments.get("method")
        if method is not None and method not in METHODS:
            raise ConversionError(
                f"rampde_fx: {self} uses method={method!r}; rampde_fx solves with "
                f"{list(METHODS)}. Pass filter_fn to leave this solve as it is, or change its "
                "method.")
        ignored = [name for name in dropped
                   if name in _ADJOINT_SOLVE_ARGUMENTS and name not in self.dropped]
        if ignored:  # once per site and argument
            warnings.warn(
                f"rampde_fx: {self} passes {', '.join(ignored)}, which has no effect: the "
                "converted solve's backward pass is the discrete adjoint of its forward steps "
                "(exact for those steps), not a second ODE solve with its own tolerances.",
                RuntimeWarning, stacklevel=5)
        self.call_arguments = arguments
        self.dropped = tuple(sorted(set(self.dropped) | set(dropped)))

    @property
    def is_event_solve(self) -> bool:
        """Whether the last call solved until an event."""
        return self.source == "torchdiffeq.odeint_event" or \
            self.call_arguments.get("event_fn") is not None

    def run(self, func: Any, y0: Any, t: torch.Tensor, arguments: dict[str, Any]) -> Any:
        """The solve, eagerly (``t``: ``t0`` for ``odeint_event``); keeps its statistics in
        :attr:`last_stats`."""
        solver = odeint_event if self.source == "torchdiffeq.odeint_event" else odeint
        with collect_stats() as solves:
            solution = solver(func, y0, t, config=self.config, **arguments)
        self.last_stats = solves[-1]
        return solution


_UNSEEN = object()


class Conversion:
    """What ``convert`` set up, and the solves met since: kept on the converted module as the
    plain attribute ``_rampde_conversion`` (not part of ``state_dict``).

    Attributes:
        config: the precision settings of every converted solve.
        filter_fn: chooses the solves that convert (see :func:`rampde_fx.convert`).
        sites: the converted solves, in the order they were first met.
        notes: what else a reader should know (solves that ``filter_fn`` left as they are).

    Copies and pickles keep the settings only: sites are found again by the copy's own calls.
    """

    def __init__(self, config: SolveConfig,
                 filter_fn: Callable[[torch.nn.Module, str], bool] | None) -> None:
        self.config = config
        self.filter_fn = filter_fn
        self._reset()

    def _reset(self) -> None:
        self.sites: list[SolveSite] = []
        self.notes: list[str] = []
        self._by_key: dict[tuple[Any, ...], SolveSite | None] = {}
        self._lock = threading.RLock()

    def __getstate__(self) -> dict[str, Any]:
        return {key: self.__dict__[key] for key in ("config", "filter_fn")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def solve(self, root: torch.nn.Module | None, source: str, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> Any:
        """Run an intercepted call of ``source`` made inside a method of ``root`` (None: in a
        :class:`rampde_fx.mixed_precision` scope)."""
        positional = _EVENT_POSITIONAL if source == "torchdiffeq.odeint_event" else _POSITIONAL
        if len(args) > len(positional):
            raise TypeError(f"{source}() takes {len(positional)} positional arguments but "
                            f"{len(args)} were given")
        call = dict(zip(positional, args))
        call.update(kwargs)
        func, y0, t = (call.pop(name, None) for name in positional)
        # Tensors: passed to the solve, not kept with the site's arguments (nor made constants
        # of a compiled graph).
        adjoint_params = call.pop("adjoint_params", None)
        arguments = {k: v for k, v in call.items() if k not in _DROPPED_ARGUMENTS}
        dropped = tuple(k for k in call if k in _DROPPED_ARGUMENTS)
        solver = odeint if source == "rampde_fx.odeint" else trampolines.original(source)
        if torch.compiler.is_compiling():
            event_fn = arguments.get("event_fn")
            if is_plain_function(func) or (event_fn is not None and is_plain_function(event_fn)):
                return run_between_graphs(self.solve, root, source, args, kwargs)
            owner, method_name = velocity_owner(func)
            # dynamo passes modules to the registration, not bound methods in a dict
            event_owner, event_method = (None, None) if event_fn is None else \
                velocity_owner(event_fn)
            site_key = _site_while_compiling(
                self, root, source, owner, method_name,
                {k: _constants(v) for k, v in arguments.items() if k != "event_fn"}, dropped,
                event_owner, event_method)
            if not site_key:
                return trampolines.run_within(None, solver, *args, **kwargs)
            in_graph = {k: v for k, v in arguments.items() if k not in _EVENT_ONLY_ARGUMENTS}

            def solve(times: torch.Tensor) -> Any:
                found = solve_in_graph(func, y0, times, self.config, {}, **in_graph,
                                       report_to_key=site_key, adjoint_params=adjoint_params)
                if found is NOT_IN_GRAPH:  # a velocity module made in the compiled code
                    return run_between_graphs(odeint, func, y0, times, config=self.config,
                                              **in_graph, adjoint_params=adjoint_params)
                return found

            if source == "torchdiffeq.odeint_event":
                return solve_to_event(solve, func, y0, t, event_fn,
                                      arguments.get("reverse_time", False),
                                      arguments.get("odeint_interface"))
            return solve(t)
        # Frames up from the caller of the handler's _rampde_intercept.
        site = self.site(root, source, func, arguments, dropped, caller=sys._getframe(2))
        if site is None:
            return trampolines.run_within(None, solver, *args, **kwargs)
        return trampolines.run_within(None, site.run, func, y0, t,
                                      {**arguments, "adjoint_params": adjoint_params})

    def site(self, root: torch.nn.Module | None, source: str, func: Any,
             arguments: dict[str, Any],
             dropped: tuple[str, ...], *, caller: types.FrameType | None) -> SolveSite | None:
        """The site of a solve, made when first met; None for a solve that ``filter_fn`` left
        as it is. ``caller``: the frame from which to look for the module that makes the solve
        (None: take it from the velocity)."""
        key = (source, *_velocity_identity(func, root))
        site = self._by_key.get(key, _UNSEEN)
        if site is _UNSEEN:
            with self._lock:  # filter_fn is asked once per site, whichever thread meets it
                site = self._by_key.get(key, _UNSEEN)
                if site is _UNSEEN:
                    site = self._by_key[key] = self._new_site(root, source, func, caller)
        if site is not None:
            site.accept(arguments, dropped)
        return site

    def _new_site(self, root: torch.nn.Module | None, source: str, func: Any,
                  caller: types.FrameType | None) -> SolveSite | None:
        if root is None:  # a scope: the solve is its velocity's
            module, velocity = owner_module(func), _velocity_name(func, {})
            site = SolveSite(source=source, module_name=None, velocity=velocity,
                             module_class="function" if module is None else class_name(module),
                             config=self.config)
            asked: tuple[Any, str] = (module, velocity)
        else:
            modules = {id(m): (name, m) for name, m in root.named_modules()}
            found = _module_in_frames(caller, modules) if caller is not None else None
            module_name, module = found or _module_of_velocity(func, modules, root)
            site = SolveSite(source=source, module_name=module_name,
                             module_class=class_name(module),
                             velocity=_velocity_name(func, modules), config=self.config)
            asked = (module, module_name)
        if self.filter_fn is not None and not self.filter_fn(*asked):
            self.notes.append(f"{site} runs as written: filter_fn left it as it is")
            return None
        self.sites.append(site)
        return site


def _constants(value: Any) -> Any:
    """``value`` with its numbers replaced by a placeholder, at any depth of lists, tuples and
    dicts: the site's registration takes constants only, and dynamo traces a number that
    changed between calls as a tensor. Each call's numbers reach the solve op as its input, and
    the op writes them into the site's arguments."""
    if isinstance(value, (int, float, torch.SymInt, torch.SymFloat)) \
            and not isinstance(value, bool):
        return "<per call>"
    if isinstance(value, (list, tuple)):
        return type(value)(_constants(v) for v in value)
    if isinstance(value, dict):
        return {k: _constants(v) for k, v in value.items()}
    return value


@torch.compiler.assume_constant_result
def _site_while_compiling(conversion: Conversion, root: torch.nn.Module | None, source: str,
                          owner: Any, method_name: str | None, arguments: dict[str, Any],
                          dropped: tuple[str, ...], event_owner: Any,
                          event_method: str | None) -> int:
    """Runs while dynamo traces a solve: the key (``runtime.key_of``) of its site, which the
    conversion keeps alive, or 0 for a solve that runs as written. The velocity is ``owner``
    or its method ``method_name``; an event solve's event function likewise ``event_owner``
    or its method ``event_method``."""
    func = owner if method_name is None else getattr(owner, method_name)
    if event_owner is not None:
        arguments = {**arguments, "event_fn": event_owner if event_method is None
                     else getattr(event_owner, event_method)}
    site = conversion.site(root, source, func, arguments, dropped, caller=None)
    return 0 if site is None else runtime.key_of(site)


def _velocity_identity(func: Any, root: torch.nn.Module | None) -> tuple[Any, Any]:
    if isinstance(func, types.MethodType):  # bound methods are made anew on every access
        return id(func.__self__), func.__func__.__name__
    if isinstance(func, types.FunctionType):  # a lambda or closure may be made on every call
        return func.__code__, None
    if isinstance(func, torch.nn.Module) and (
            root is None or not any(m is func for m in root.modules())):
        return type(func), None  # a velocity module made on every call
    return id(func), None


def _named(obj: Any, modules: dict[int, tuple[str, torch.nn.Module]]) -> tuple[str, Any] | None:
    found = modules.get(id(obj))
    return found if found is not None and found[1] is obj else None


def _module_in_frames(frame: types.FrameType | None,
                      modules: dict[int, tuple[str, torch.nn.Module]]) -> tuple[str, Any] | None:
    while frame is not None:
        found = _named(frame.f_locals.get("self"), modules)
        if found is not None:
            return found
        frame = frame.f_back
    return None


def _module_of_velocity(func: Any, modules: dict[int, tuple[str, torch.nn.Module]],
                        root: torch.nn.Module) -> tuple[str, Any]:
    found = _named(getattr(func, "__self__", None), modules)
    if found is not None:
        return found
    found = _named(func, modules)
    if found is not None and found[0]:
        parent = found[0].rpartition(".")[0]
        return parent, root.get_submodule(parent)
    return "", root


def _velocity_name(func: Any, modules: dict[int, tuple[str, torch.nn.Module]]) -> str:
    found = _named(func, modules)
    if found is not None:
        return found[0] or "<root>"
    return getattr(func, "__qualname__", type(func).__qualname__)


def class_name(module: torch.nn.Module) -> str:
    """The class name of ``module``; for a converted module, of the class it was made from."""
    return getattr(type(module), "_rampde_original", type(module)).__qualname__


def sites_of(converted: torch.nn.Module) -> list[SolveSite]:
    """The solves that ``converted`` (made by :func:`rampde_fx.convert`) converted, in the
    order they were first met."""
    conversion = getattr(converted, "_rampde_conversion", None)
    if conversion is None:
        raise ValueError(f"{type(converted).__qualname__} was not made by rampde_fx.convert")
    return list(conversion.sites)
