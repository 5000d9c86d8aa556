"""Capture a velocity ``func(t, y)`` as a low-precision callable.

Capture uses ``torch.fx`` symbolic tracing through every submodule (no leaf modules), which
yields a torch-level graph (``linear``, ``conv2d``, ``group_norm``, ``tanh``...) in which every
parameter, buffer and closure tensor is a ``get_attr`` node. That graph is what the precision
policy is written in, what a person can read, and what dynamo and inductor compile later.
``torch.export`` was not chosen: it costs seconds per velocity, lowers to aten (``addmm``,
``native_group_norm``) that reads worse in diagnostics, and fails on the same Python control flow.

The rewritten ``GraphModule`` reads its attributes from the user's *live* module, so parameters
stay the user's fp32 masters and re-assigned attributes are seen on the next call.

When tracing fails (Python control flow on tensor values, ``torch.autograd.grad`` inside the
velocity, data-dependent ops), :func:`capture_velocity` warns with the module and the reason and
falls back to evaluating ``func`` eagerly under autocast in the low dtype, with the same float32
accumulation and adjoint.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .policy import PrecisionPolicy
from .precision_pass import fetch_attr, rewrite_for_precision

State = tuple[torch.Tensor, ...]


class CaptureWarning(UserWarning):
    """A velocity could not be captured as a graph, or its capture changes its behaviour."""


def describe(func: Any) -> str:
    """How warnings and errors name a velocity."""
    if isinstance(func, torch.nn.Module):
        return f"velocity module {type(func).__qualname__}"
    return f"velocity callable {getattr(func, '__qualname__', type(func).__qualname__)}"


class _VelocityRoot(torch.nn.Module):
    """Traced root: calls ``velocity(t, y)``, unpacking a tuple state into its components so
    that user code receives a real Python tuple during tracing."""

    def __init__(self, func: Callable[..., Any], n_components: int | None) -> None:
        super().__init__()
        self.velocity = func  # a submodule if func is a Module, else a plain attribute
        self.n_components = n_components

    # No annotations: fx copies them into the printed graph.
    def forward(self, t, y):  # type: ignore[no-untyped-def]
        if self.n_components is not None:
            y = tuple(y[i] for i in range(self.n_components))
        return self.velocity(t, y)


# Factory functions that torch.fx cannot trace when a size is a proxy (``torch.zeros(x.shape[0],
# 1)``): recorded as graph nodes while tracing.
_FACTORIES = ("zeros", "ones", "empty", "full", "rand", "randn", "randint", "arange",
              "linspace", "eye")


@contextlib.contextmanager
def recording_calls(tracer: fx.Tracer, functions: Sequence[tuple[Any, str]] = ()):
    """While tracing, record calls of ``module.attribute`` (for each pair in ``functions``, and
    torch's factory functions) as ``call_function`` nodes when an argument is a proxy."""
    patched = [(torch, name, getattr(torch, name)) for name in _FACTORIES]
    patched += [(module, name, getattr(module, name)) for module, name in functions]

    def recording(function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if any(isinstance(a, fx.Proxy) for a in pytree.tree_leaves((args, kwargs))):
                return tracer.create_proxy("call_function", function, args, kwargs)
            return function(*args, **kwargs)
        return call

    for module, name, function in patched:
        setattr(module, name, recording(function))
    try:
        yield
    finally:
        for module, name, function in patched:
            setattr(module, name, function)


class _ThroughModulesTracer(fx.Tracer):
    """Traces into every module, so parameters become ``get_attr`` nodes next to functional ops.

    A module the velocity reaches outside its attributes (``lambda t, y: model(y)``) is adopted
    as a submodule of the root when it is called, so its parameters are ``get_attr`` nodes too.
    """

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return False

    def path_of_module(self, mod: torch.nn.Module) -> str:
        try:
            return super().path_of_module(mod)
        except NameError:
            name = f"closure_module_{sum(n.startswith('closure_module_') for n, _ in self.root.named_children())}"
            self.root.add_module(name, mod)
            self.submodule_paths.update(
                {m: f"{name}.{q}" if q else name for q, m in mod.named_modules()})
            return name


class GraphVelocity:
    """A velocity captured as an fx graph and rewritten under a precision policy."""

    def __init__(self, func: Any, graph_module: fx.GraphModule, original: fx.GraphModule,
                 is_tuple: bool) -> None:
        self.func = func
        self.graph_module = graph_module
        self.original_graph_module = original
        self.is_tuple = is_tuple
        self.fallback_reason: str | None = None
        self._attr_targets = [n.target for n in graph_module.graph.find_nodes(op="get_attr")]

    def __call__(self, t: torch.Tensor, y: State) -> State:
        return _as_state(self.graph_module(t, y if self.is_tuple else y[0]), len(y), self.func)

    def transformed(self, transform: Callable[[fx.Graph], None]) -> "GraphVelocity":
        """A twin whose graph is a copy changed in place by ``transform``; it reads the same
        live modules."""
        graph = copy.deepcopy(self.graph_module.graph)
        transform(graph)
        graph_module = fx.GraphModule(self.graph_module, graph,
                                      class_name=type(self.graph_module).__name__)
        for name, child in self.graph_module.named_children():
            setattr(graph_module, name, child)
        return GraphVelocity(self.func, graph_module, self.original_graph_module, self.is_tuple)

    def tensors_requiring_grad(self) -> list[torch.Tensor]:
        """The live tensors the velocity reads that require grad (parameters, closures...)."""
        found: dict[int, torch.Tensor] = {}
        for target in self._attr_targets:
            value = fetch_attr(self.graph_module, target)
            if isinstance(value, torch.Tensor) and value.requires_grad:
                found.setdefault(id(value), value)
        return list(found.values())


class EagerVelocity:
    """Fallback: ``func`` run eagerly on the state cast to the low dtype, under autocast."""

    def __init__(self, func: Any, low_dtype: torch.dtype, is_tuple: bool, reason: str,
                 tensors: Sequence[torch.Tensor]) -> None:
        self.func = func
        self.low_dtype = low_dtype
        self.is_tuple = is_tuple
        self.fallback_reason = reason
        self._tensors = list(tensors)

    def __call__(self, t: torch.Tensor, y: State) -> State:
        y_low = tuple(c.to(self.low_dtype) for c in y)
        with _autocast_for(y[0].device.type, self.low_dtype):
            out = self.func(t, y_low if self.is_tuple else y_low[0])
        return _as_state(out, len(y), self.func)

    def tensors_requiring_grad(self) -> list[torch.Tensor]:
        return self._tensors


Velocity = GraphVelocity | EagerVelocity


def _autocast_for(device_type: str, low_dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if low_dtype.itemsize >= 4:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=low_dtype)


def _as_state(out: Any, n_components: int, func: Any) -> State:
    if isinstance(out, torch.Tensor) and n_components == 1:
        return (out,)
    if isinstance(out, (tuple, list)) and len(out) == n_components and n_components > 1:
        return tuple(out)
    got = f"{type(out).__name__} of length {len(out)}" if isinstance(out, (tuple, list)) \
        else type(out).__name__
    raise TypeError(f"{describe(func)} returned {got} for a state of {n_components} tensor(s); "
                    "it must return one tensor per state component, in the structure of y")


class _TensorReadRecorder(TorchFunctionMode):
    """Records the tensors requiring grad that torch functions receive from outside the call
    (parameters, closure tensors), skipping those produced during it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[int, torch.Tensor] = {}
        self._produced: dict[int, torch.Tensor] = {}  # holds references so ids stay unique

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        for leaf in pytree.tree_leaves((args, kwargs)):
            if (isinstance(leaf, torch.Tensor) and leaf.requires_grad
                    and id(leaf) not in self._produced):
                self.seen.setdefault(id(leaf), leaf)
        out = func(*args, **kwargs)
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._produced[id(leaf)] = leaf
        return out


def _mutable_attributes(module: torch.nn.Module) -> dict[tuple[int, str], tuple[torch.nn.Module, str, Any]]:
    snapshot = {}
    for qualname, sub in module.named_modules():
        for key, value in vars(sub).items():
            snapshot[id(sub), key] = (sub, f"{qualname}.{key}".lstrip("."), value)
    return snapshot


@contextlib.contextmanager
def restore_attributes(module: Any, counters: list[str]):
    """Undo attribute assignments that tracing ``module`` makes (an ``nfe`` counter, a tensor
    re-assigned in forward, the tracer's own tensor constants), so tracing leaves no proxies or
    other traces on the user's modules.

    Appends to ``counters`` the names of the non-tensor attributes that were assigned: a graph
    recomputes tensor values on every call, but cannot repeat Python-side updates.
    """
    if not isinstance(module, torch.nn.Module):
        yield
        return
    before = _mutable_attributes(module)
    try:
        yield
    finally:
        after = _mutable_attributes(module)
        for key, (sub, name, value) in before.items():
            if key not in after or after[key][2] is not value:
                setattr(sub, key[1], value)
                if not isinstance(value, torch.Tensor):
                    counters.append(name)
        for key, (sub, name, value) in after.items():
            if key not in before:
                delattr(sub, key[1])
                if not isinstance(value, (torch.Tensor, fx.Proxy)) and not key[1].startswith("_"):
                    counters.append(name)


def _trace(func: Any, example: tuple[torch.Tensor, Any], low_dtype: torch.dtype,
           policy: PrecisionPolicy, n_components: int | None) -> GraphVelocity:
    root = _VelocityRoot(func, n_components)
    changed: list[str] = []
    tracer = _ThroughModulesTracer()
    with restore_attributes(func, changed), recording_calls(tracer):
        graph = tracer.trace(root)
    if graph.find_nodes(op="call_function", target=torch.autograd.grad):
        raise RuntimeError("it calls torch.autograd.grad, which a captured graph cannot replay")
    original = fx.GraphModule(root, graph, class_name="Velocity")
    with torch.no_grad():
        new_graph = rewrite_for_precision(original, example, low_dtype, policy,
                                          state_placeholder="y")
    rewritten = fx.GraphModule(root, new_graph, class_name="LowPrecisionVelocity")
    # GraphModule copied the attributes it reads into a parallel hierarchy; read the live
    # modules instead so parameters are shared and re-assigned attributes are seen.
    for name, module in root.named_children():
        setattr(original, name, module)
        setattr(rewritten, name, module)
    if changed:
        warnings.warn(
            f"rampde_fx: {describe(func)} assigns {sorted(set(changed))} in forward. The captured "
            "graph ran that Python code once, at capture time, and does not repeat it during "
            "solves (a counter such as nfe will not advance).", CaptureWarning, stacklevel=4)
    return GraphVelocity(func, rewritten, original, is_tuple=n_components is not None)


def _eager(func: Any, example: tuple[torch.Tensor, Any], low_dtype: torch.dtype,
           n_components: int | None, reason: str) -> EagerVelocity:
    recorder = _TensorReadRecorder()
    t, y = example
    state = tuple(y) if n_components is not None else (y,)
    velocity = EagerVelocity(func, low_dtype, n_components is not None, reason, [])
    with torch.no_grad(), recorder:
        velocity(t, state)
    tensors = dict(recorder.seen)
    if isinstance(func, torch.nn.Module):
        tensors.update((id(p), p) for p in func.parameters() if p.requires_grad)
    velocity._tensors = list(tensors.values())
    return velocity


_CACHE: "weakref.WeakKeyDictionary[Any, dict[Any, Velocity]]" = weakref.WeakKeyDictionary()


def capture_velocity(func: Any, t: torch.Tensor, y: State, is_tuple: bool,
                     low_dtype: torch.dtype, policy: PrecisionPolicy) -> Velocity:
    """The low-precision velocity for ``func`` at inputs like ``(t, y)``, cached per ``func``.

    The cache key holds the dtypes and devices of the inputs, the low dtype, the policy and the
    train/eval flags of ``func``'s modules (a graph bakes in ``if self.training`` branches).
    """
    owner = getattr(func, "__self__", func)  # bound methods are re-created on every access
    training = tuple(m.training for m in func.modules()) if isinstance(func, torch.nn.Module) else ()
    key = (getattr(func, "__func__", None), low_dtype, policy, is_tuple, training, t.dtype,
           tuple((c.dtype, c.device, c.dim()) for c in y))
    try:
        per_owner = _CACHE.setdefault(owner, {})
    except TypeError:  # not weak-referenceable: capture every time
        per_owner = {}
    if key not in per_owner:
        n_components = len(y) if is_tuple else None
        example = (t, tuple(y) if is_tuple else y[0])
        try:
            per_owner[key] = _trace(func, example, low_dtype, policy, n_components)
        except Exception as error:  # noqa: BLE001 - any failure means: run it eagerly
            reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            warnings.warn(
                f"rampde_fx: could not capture {describe(func)} as a graph ({reason}). It will "
                f"run eagerly on its state cast to {low_dtype}, under autocast; accumulation "
                "and the adjoint are unchanged, but the precision policy does not apply.",
                CaptureWarning, stacklevel=3)
            per_owner[key] = _eager(func, example, low_dtype, n_components, reason)
    return per_owner[key]
