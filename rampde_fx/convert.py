"""``rampde_fx.convert``: find the ODE solves of a float32 model and make them mixed precision.

The model is traced with torch.fx; calls of ``torchdiffeq.odeint``, ``torchdiffeq.odeint_adjoint``
and ``rampde_fx.odeint`` (however they were imported) are recorded as single nodes, at any depth
of submodules. Each becomes a call of a :class:`SolveSite` submodule that runs
:func:`rampde_fx.odeint` with the original method, options, tolerances and output times. The
rest of the model is left as it was.

The converted module is a ``GraphModule`` whose submodules, parameters and buffers are the
original objects: an optimizer built on either model trains both, and ``state_dict`` keys are
the original ones. The original model is not modified.

``odeint_adjoint`` becomes the discrete adjoint with low-precision checkpoints: memory grows with
the number of steps (one low-precision state per step, instead of torchdiffeq's constant
memory), and the gradient is the exact gradient of the discrete solve (torchdiffeq's continuous
adjoint differs from it by the solver's discretisation error). Its ``adjoint_*`` arguments have
no counterpart and are dropped, as are the ``dtype``, ``scaling`` and ``policy`` of a
``rampde_fx.odeint`` call (``convert``'s apply); ``explain`` lists what was dropped.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import types
import warnings
from typing import Any, Callable

import torch
import torch.fx as fx

from .capture import CaptureWarning, recording_calls, restore_attributes
from .compiled import solve_in_graph
from .odeint import odeint
from .policy import DEFAULT_POLICY, PrecisionPolicy
from .precision_pass import fetch_attr
from .stats import SolveStats, collect_stats
from .tableaus import ADAPTIVE_TABLEAUS, FIXED_GRID_TABLEAUS

METHODS = {**ADAPTIVE_TABLEAUS, **FIXED_GRID_TABLEAUS}

# Arguments of the original call that the converted solve does not pass on: odeint_adjoint's
# adjoint settings (no counterpart in the discrete adjoint), and rampde_fx.odeint's precision
# settings (convert's own take their place).
_DROPPED_ARGUMENTS = ("adjoint_rtol", "adjoint_atol", "adjoint_method", "adjoint_options",
                      "adjoint_params", "dtype", "scaling", "policy", "checkpoint")


def solver_functions() -> dict[Callable[..., Any], str]:
    """The ODE solver functions whose calls ``convert`` rewrites, with their public names."""
    found: dict[Callable[..., Any], str] = {odeint: "rampde_fx.odeint"}
    try:
        import torchdiffeq
    except ImportError:  # models without torchdiffeq can only call rampde_fx.odeint
        return found
    found[torchdiffeq.odeint] = "torchdiffeq.odeint"
    found[torchdiffeq.odeint_adjoint] = "torchdiffeq.odeint_adjoint"
    return found


class ConversionError(ValueError):
    """A model, or one of its ODE solves, cannot be converted."""


class SolveSite(torch.nn.Module):
    """One converted ODE solve: calls :func:`rampde_fx.odeint` with the site's precision.

    Holds no parameters; keeps the statistics of its last solve for :func:`rampde_fx.explain`.
    """

    def __init__(self, *, source: str, qualname: str, owner: str, velocity: str,
                 dtype: torch.dtype, scaling: str, policy: PrecisionPolicy, checkpoint: str,
                 dropped: tuple[str, ...]) -> None:
        super().__init__()
        self.source = source
        self.qualname = qualname
        self.owner = owner
        self.velocity = velocity
        self.dtype = dtype
        self.scaling = scaling
        self.policy = policy
        self.checkpoint = checkpoint
        self.dropped = dropped
        self.call_arguments: dict[str, Any] = {}
        self.last_stats: SolveStats | None = None

    def forward(self, func, y0, t, **kwargs):
        self.call_arguments = kwargs
        if torch.compiler.is_compiling():  # one opaque op, which reports its statistics here
            return solve_in_graph(func, y0, t, rtol=kwargs.get("rtol", 1e-7),
                                  atol=kwargs.get("atol", 1e-9), method=kwargs.get("method"),
                                  options=kwargs.get("options"), dtype=self.dtype,
                                  scaling=self.scaling, policy=self.policy,
                                  checkpoint=self.checkpoint, event_fn=kwargs.get("event_fn"),
                                  report_to=self)
        with collect_stats() as solves:
            solution = odeint(func, y0, t, dtype=self.dtype, scaling=self.scaling,
                              policy=self.policy, checkpoint=self.checkpoint, **kwargs)
        self.last_stats = solves[-1]
        return solution


@dataclasses.dataclass
class Conversion:
    """What ``convert`` did, kept on the converted module for ``explain`` and graph diffs.

    Attributes:
        dtype: the low precision of the solves.
        sites: the converted solves, in the order of the model's forward.
        traced: for each traced module, its name and its code before and after conversion.
        notes: what else a reader should know (modules converted piecewise, counters).
    """

    dtype: torch.dtype
    sites: list[SolveSite]
    traced: list[tuple[str, str, str]]
    notes: list[str]


class _SolveCallTracer(fx.Tracer):
    """Records every call of an ODE solver function as one ``call_function`` node.

    Functions and bound methods passed as arguments (``odeint(self.dynamics, ...)``, an
    ``event_fn``) become attributes read by ``get_attr`` nodes, as tensor constants do.
    """

    def __init__(self, solvers: dict[Callable[..., Any], str]) -> None:
        super().__init__(autowrap_functions=tuple(solvers))  # catches `from ... import odeint`
        self._callables: dict[int, str] = {}

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, (types.FunctionType, types.MethodType, functools.partial)):
            if id(a) not in self._callables:
                name = f"_callable_{len(self._callables)}"
                setattr(self.root, name, a)
                self._callables[id(a)] = name
            return self.create_node("get_attr", self._callables[id(a)], (), {})
        return super().create_arg(a)



def convert(
    model: torch.nn.Module,
    *,
    dtype: torch.dtype = torch.bfloat16,
    scaling: str = "auto",
    policy: PrecisionPolicy | None = None,
    checkpoint: str = "steps",
    filter_fn: Callable[[torch.nn.Module, str], bool] | None = None,
) -> torch.nn.Module:
    """A new module that computes ``model`` with its ODE solves in mixed precision.

    Args:
        model: a float32 model whose forward calls ``torchdiffeq.odeint``,
            ``torchdiffeq.odeint_adjoint`` or ``rampde_fx.odeint``, directly or in submodules.
            It is left untouched and stays usable as the float32 reference.
        dtype: the velocity's precision in every converted solve (see :func:`rampde_fx.odeint`).
        scaling: adjoint scaling of every converted solve: 'auto', 'dynamic' or 'none'.
        policy: the precision policy of the velocities; default
            :data:`rampde_fx.DEFAULT_POLICY`.
        checkpoint: 'steps' or 'stages', for every converted solve (see
            :func:`rampde_fx.odeint`).
        filter_fn: ``filter_fn(module, qualified_name) -> bool`` is called with the module whose
            forward makes a solve, and its name in ``model`` ('' for ``model`` itself); solves
            for which it returns False are left as they are.

    Returns:
        A module sharing ``model``'s parameters and buffers, with the same ``state_dict`` keys.

    Raises:
        ConversionError: a module that calls a solver cannot be traced, or a solve uses a
            feature rampde_fx does not support (``event_fn``, an adaptive or implicit method).
    """
    if any(isinstance(m, SolveSite) for m in model.modules()):
        raise ConversionError(f"rampde_fx.convert: {type(model).__qualname__} was already "
                              "converted; convert the original float32 model instead")
    policy = DEFAULT_POLICY if policy is None else policy
    config = dict(dtype=dtype, scaling=scaling, policy=policy, checkpoint=checkpoint,
                  filter_fn=filter_fn)
    record = Conversion(dtype=dtype, sites=[], traced=[], notes=[])
    converted = _convert_module(model, "", config, record)
    if not record.sites:
        warnings.warn(f"rampde_fx.convert: found no call of {', '.join(solver_functions().values())} "
                      f"in {type(model).__qualname__}; nothing was converted", CaptureWarning,
                      stacklevel=2)
        return model
    converted._rampde_conversion = record  # a plain attribute: not part of state_dict
    return converted


def _describe_module(module: torch.nn.Module, qualname: str) -> str:
    return f"{type(module).__qualname__} at '{qualname or '<root>'}'"


def _calls_solver_directly(module: torch.nn.Module, solvers: dict[Callable[..., Any], str]) -> bool:
    forward = type(module).forward
    names = forward.__code__.co_names
    return any(forward.__globals__.get(name) is solver for name in names for solver in solvers) \
        or any(public.rpartition(".")[2] in names for public in solvers.values())


def _convert_module(module: torch.nn.Module, qualname: str, config: dict[str, Any],
                    record: Conversion) -> torch.nn.Module:
    """``module`` with its solves converted (``module`` itself if it has none)."""
    solvers = solver_functions()
    try:
        return _trace_and_convert(module, qualname, config, solvers, record)
    except ConversionError:
        raise
    except Exception as error:  # noqa: BLE001 - an untraceable module is converted piecewise
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    if _calls_solver_directly(module, solvers):
        raise ConversionError(
            f"rampde_fx.convert: {_describe_module(module, qualname)} calls an ODE solver in its "
            f"forward, which torch.fx cannot trace ({reason}). Move the untraceable code out of "
            "the module that calls the solver, or call rampde_fx.odeint there directly.")
    sites_before = len(record.sites)
    children = {name: _convert_module(child, f"{qualname}.{name}".lstrip("."), config, record)
                for name, child in module.named_children()}
    if len(record.sites) == sites_before:
        return module
    record.notes.append(f"{_describe_module(module, qualname)} could not be traced ({reason}); "
                        "its submodules were converted one by one and its own forward runs as "
                        "written")
    warnings.warn(f"rampde_fx.convert: {record.notes[-1]}", CaptureWarning, stacklevel=4)
    shell = copy.copy(module)  # shares parameters and buffers; only the children differ
    shell._modules = dict(module._modules)
    shell._modules.update(children)
    return shell


def _trace_and_convert(module: torch.nn.Module, qualname: str, config: dict[str, Any],
                       solvers: dict[Callable[..., Any], str],
                       record: Conversion) -> torch.nn.Module:
    tracer = _SolveCallTracer(solvers)
    counters: list[str] = []
    attribute_calls = [(importlib.import_module(public.rpartition(".")[0]), public.rpartition(".")[2])
                       for public in solvers.values()]  # ``torchdiffeq.odeint(...)`` style
    before = set(vars(module))
    with restore_attributes(module, counters), recording_calls(tracer, attribute_calls):
        graph = tracer.trace(module)
        # What the tracer attached to `module` (tensor constants, callables) is removed with
        # the rest of tracing's changes: take it now; read everything else once restored.
        added = {k: v for k, v in vars(module).items() if k not in before}
    targets = {node.target: added[node.target] if node.target in added
               else fetch_attr(module, node.target)
               for node in graph.nodes if node.op in ("get_attr", "call_module")}
    original_code = graph.python_code(root_module="self").src
    sites: dict[str, SolveSite] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in solvers:
            continue
        owner_path = next(reversed(node.meta.get("nn_module_stack", {"": ("", None)}).values()))[0]
        site_owner = f"{qualname}.{owner_path}".strip(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        if config["filter_fn"] is not None and not config["filter_fn"](owner, site_owner):
            continue
        name = f"rampde_solve_{len(sites)}"
        sites[name] = _make_site(node, solvers[node.target], site_owner, owner, config, targets)
        with graph.inserting_before(node):
            call = graph.call_module(name, node.args, {k: v for k, v in node.kwargs.items()
                                                       if k not in _DROPPED_ARGUMENTS})
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    if not sites:
        return module
    if counters:
        record.notes.append(f"{_describe_module(module, qualname)} assigns "
                            f"{sorted(set(counters))} in forward; the converted module does not "
                            "repeat those Python-side updates")
        warnings.warn(f"rampde_fx.convert: {record.notes[-1]}", CaptureWarning, stacklevel=5)
    converted = fx.GraphModule({**targets, **sites}, graph,
                               class_name=f"Converted{type(module).__name__}")
    # GraphModule placed the attributes the graph reads in a parallel hierarchy: use the
    # original modules, parameters and buffers instead (shared state, same state_dict order).
    # Tensors the graph reads that are not the module's buffers (constants made in forward,
    # plain tensor attributes) stay as non-persistent buffers: kept out of state_dict.
    constants = {k: v for k, v in converted._buffers.items() if k not in module._buffers}
    converted._modules = {**module._modules, **sites}
    converted._parameters = dict(module._parameters)
    converted._buffers = {**module._buffers, **constants}
    converted._non_persistent_buffers_set = set(module._non_persistent_buffers_set) | set(constants)
    converted.train(module.training)
    record.sites += sites.values()
    record.traced.append((qualname, original_code, converted.code))
    return converted


def _make_site(node: fx.Node, source: str, site_owner: str, owner: torch.nn.Module,
               config: dict[str, Any], targets: dict[str, Any]) -> SolveSite:
    where = f"{source} in {type(owner).__qualname__} at '{site_owner or '<root>'}'"
    kwargs = node.kwargs
    if kwargs.get("event_fn") is not None:
        raise ConversionError(f"rampde_fx.convert: {where} uses event_fn, which rampde_fx does "
                              "not support yet")
    method = kwargs.get("method")
    if isinstance(method, fx.Node) or (method is not None and method not in METHODS):
        raise ConversionError(
            f"rampde_fx.convert: {where} uses method={method!r}; rampde_fx solves with "
            f"{list(METHODS)}. Pass filter_fn to leave this solve as it is, or change its "
            "method.")
    func = node.args[0] if node.args else kwargs.get("func")
    velocity = str(func)
    if isinstance(func, fx.Node) and func.op == "get_attr":
        value = targets[func.target]
        velocity = func.target if isinstance(value, torch.nn.Module) else value.__qualname__
    return SolveSite(source=source, qualname=site_owner, owner=type(owner).__qualname__,
                     velocity=velocity, dtype=config["dtype"], scaling=config["scaling"],
                     policy=config["policy"], checkpoint=config["checkpoint"],
                     dropped=tuple(k for k in kwargs if k in _DROPPED_ARGUMENTS))
