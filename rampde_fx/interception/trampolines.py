"""Interception of ODE solver calls: routes the solves of a converted model's forward, at run time.

A converted model's forward runs its original code unchanged; every ODE solve that code makes
is routed here, wherever the solver came from. Users hold ``torchdiffeq.odeint`` under any alias
(``from torchdiffeq import odeint_adjoint as odeint``), in attributes chosen at construction
(``self.odeint_func``), as arguments, or as default argument values: the only thing shared by
all these references is the function *object*. So, once the first model is converted, the
function objects ``torchdiffeq.odeint``, ``torchdiffeq.odeint_adjoint`` and
``torchdiffeq.odeint_event`` get a new ``__code__``: a trampoline that hands the call to
:func:`dispatch` (injected into the function's own ``__globals__`` under a private name).
Importing rampde_fx changes nothing; :func:`uninstall` gives the functions their code back.
``rampde_fx.odeint`` asks ``runtime.active_handler()`` itself.

:func:`dispatch` looks at a thread-local stack (``runtime.per_thread().handlers``): a converted
module's method pushes the module, and a ``rampde_fx.mixed_precision`` scope pushes itself (the
*handler*), for as long as it runs. With no handler on top, the
original solver runs exactly as before, so models that are not converted, and other threads,
see plain torchdiffeq. A handler receives ``handler._rampde_intercept(source, args, kwargs)``.
While a converted solve, or an original solver that the handler leaves as it is, runs, a
``None`` marker on top *suspends* interception: nested calls (``odeint_adjoint`` calls
``odeint`` inside; a velocity may call a solver) run as written.

Under ``torch.compile`` dynamo traces all of this like user code (thread-local reads, list
pushes and pops in ``try``/``finally``, the trampoline), so a converted forward with Python
branches compiles as one graph.
"""
from __future__ import annotations

import types
from typing import Any, Callable, Protocol

from .. import runtime

# Public names of the torchdiffeq functions that get a trampoline.
TORCHDIFFEQ_SOLVERS = ("odeint", "odeint_adjoint", "odeint_event")
_DISPATCH_NAME = "_rampde_fx_dispatch"


class Handler(Protocol):
    """What a converted module's method or a scope pushes: it decides how each intercepted
    solve runs."""

    def _rampde_intercept(self, source: str, args: tuple[Any, ...],
                          kwargs: dict[str, Any]) -> Any: ...


def run_within(handler: Handler | None, fn: Callable[..., Any], *args: Any,
               **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with ``handler`` routing this thread's solves (``None``:
    interception suspended); the previous state is back afterwards, also after an exception."""
    stack = runtime.per_thread().handlers
    stack.append(handler)
    try:
        return fn(*args, **kwargs)
    finally:
        stack.pop()


def original(source: str) -> Callable[..., Any]:
    """The original solver function named ``source`` (e.g. 'torchdiffeq.odeint')."""
    return runtime.TRAMPOLINES.originals[source]


def dispatch(source: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Where the trampolines send a call of the solver ``source``."""
    handler = runtime.active_handler()
    if handler is None:
        return runtime.TRAMPOLINES.originals[source](*args, **kwargs)
    return handler._rampde_intercept(source, args, kwargs)


def install() -> None:
    """Give torchdiffeq's solver functions their trampolines (once; thread-safe). Without
    torchdiffeq there is nothing to intercept but ``rampde_fx.odeint``."""
    trampolines = runtime.TRAMPOLINES
    with trampolines.lock:
        if trampolines.installed:
            return
        try:
            import torchdiffeq
        except ImportError:
            pass
        else:
            for name in TORCHDIFFEQ_SOLVERS:
                _install_trampoline(getattr(torchdiffeq, name), f"torchdiffeq.{name}")
        trampolines.installed = True


def uninstall() -> None:
    """Give torchdiffeq's solver functions their own code back (converted models then solve in
    float32 until the next :func:`install`)."""
    trampolines = runtime.TRAMPOLINES
    with trampolines.lock:
        for source, function in trampolines.patched.items():
            function.__code__ = trampolines.originals[source].__code__
            del function.__wrapped__
        trampolines.patched.clear()
        trampolines.originals.clear()
        trampolines.installed = False


def _install_trampoline(function: types.FunctionType, source: str) -> None:
    code = function.__code__
    filename = f"<rampde_fx trampoline of {source}>"
    originals = runtime.TRAMPOLINES.originals
    runtime.TRAMPOLINES.patched[source] = function
    if code.co_filename == filename:  # installed by an earlier import of this module (a reload)
        originals[source] = function.__wrapped__
        function.__globals__[_DISPATCH_NAME] = dispatch
        return
    if code.co_freevars:  # a trampoline has no closure to match one
        raise RuntimeError(f"rampde_fx: cannot intercept {source}: it is a closure")
    copy = types.FunctionType(code, function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__qualname__, copy.__doc__ = function.__qualname__, function.__doc__
    copy.__module__ = function.__module__
    namespace: dict[str, Any] = {}
    exec(compile(f"def {function.__name__}(*args, **kwargs):\n"
                 f"    return {_DISPATCH_NAME}({source!r}, args, kwargs)\n", filename, "exec"),
         namespace)
    originals[source] = copy
    function.__globals__[_DISPATCH_NAME] = dispatch
    function.__code__ = namespace[function.__name__].__code__
    function.__wrapped__ = copy  # inspect.signature shows the original signature
