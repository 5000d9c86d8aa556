"""Every piece of process-wide state of rampde_fx, with its lifetime, and the settings.

Nothing else in the package keeps state beyond one call, except what a converted module or a
captured velocity holds on itself. Registries that name user objects hold them weakly, so
deleting a model frees everything made for it.

Settings change through :func:`patch`, a context manager (tests use it instead of setting
attributes by hand)::

    with rampde_fx.runtime.patch(kernel_backend="aot_eager"):
        ...

What lives here, and for how long:

- ``settings``: :class:`Settings`, for the process; changed only inside :func:`patch`.
- Interception (``interception.trampolines``): ``TRAMPOLINES``, the original torchdiffeq solver
  functions by name and the functions given a trampoline, from the first ``convert`` until
  :func:`rampde_fx.interception.trampolines.uninstall` (from the first ``convert`` or
  ``mixed_precision`` scope); ``per_thread().handlers``, the stack of converted modules' methods
  and ``mixed_precision`` scopes running in a thread, pushed and popped around each of them.
- ``CAPTURED``: captured velocities per kind of velocity (a module class, a function's code;
  weak keys), at most ``capture.cache.MAX_CAPTURES_PER_SIGNATURE`` per input signature; and
  ``CAPTURE_LOCK``, held while capture swaps attributes of user modules.
- ``CONVERTED_CLASSES``: the ``Converted<Name>`` subclass made for each converted model class,
  for the process (a class is small, and pickles refer to it by its original).
- ``STEP_KERNELS``: the compiled step kernels of each captured velocity (weak keys: they go
  with the velocity, which goes with its module).
- Compiled solves (``compiled``): ``key_of``/``object_of`` name objects (the specs of compiled
  solves, the sites of conversions) by integer keys that are constants of compiled graphs,
  held weakly; ``SPECS_OF`` holds each velocity module's compiled-solve specs (they live as
  long as it); ``SAVED_SOLVES`` what a compiled solve keeps for its backward pass, from its
  forward until its ticket tensor is freed.
- ``WARNED_TOLERANCES``: the (method, dtype, tolerances) whose ``ToleranceWarning`` was shown,
  for the process (shown once each).
- ``per_thread().collectors``: the lists of :func:`rampde_fx.collect_stats` blocks open in a
  thread.
- ``per_thread().evaluation_hooks``: what runs as each velocity evaluation of a solve starts in
  a thread (``capture.rng.before_each_evaluation``), pushed and popped around the parts of the
  forward loop and of a step's recomputation that act between evaluations.

Debug accessors for tests and investigations are in :mod:`rampde_fx.tools.debug`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
import weakref
from typing import Any, Callable, Iterator


@dataclasses.dataclass
class Settings:
    """Process-wide settings.

    Attributes:
        kernel_backend: the dynamo backend that compiles the step kernels of compiled solves:
            "inductor" for real use; "aot_eager" keeps their structure without code
            generation (fast tests), or any backend callable ``(graph_module, inputs)``.
        small_matmul: on CPU, matrix products of at most this many multiply-adds are traced
            into the step kernels as broadcast products summed in float32, which inductor fuses
            with their neighbours (a library call costs more than the arithmetic there); 0
            keeps every product a library call.
        widened_matmul: on CPU, 16-bit matrix products of at most this many multiply-adds
            (and of at least 16 inner terms and 32 columns) run in the step kernels as float32
            library products of their operands widened, exactly, to float32: a 16-bit library
            product costs about 15 microseconds more per call there, and accumulates in
            float32 too. 0 keeps every 16-bit product a 16-bit library call.
    """

    kernel_backend: str | Callable[..., Any] = "inductor"
    small_matmul: int = 4096
    widened_matmul: int = 2**19


settings = Settings()
_SETTINGS_LOCK = threading.Lock()


@contextlib.contextmanager
def patch(**changes: Any) -> Iterator[Settings]:
    """Change :data:`settings` inside the block and restore them afterwards (also after an
    exception)."""
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(Settings)})
    if unknown:
        raise AttributeError(f"rampde_fx.runtime.patch: no settings {unknown}; the settings "
                             f"are {[f.name for f in dataclasses.fields(Settings)]}")
    with _SETTINGS_LOCK:
        before = {name: getattr(settings, name) for name in changes}
        for name, value in changes.items():
            setattr(settings, name, value)
    try:
        yield settings
    finally:
        with _SETTINGS_LOCK:
            for name, value in before.items():
                setattr(settings, name, value)


class _PerThread(threading.local):
    def __init__(self) -> None:
        # Made in every thread before its first read: a compiled forward that guarded on
        # whether the stack exists would be recompiled after the first call.
        self.handlers: list[Any] = []
        self.collectors: list[list[Any]] = []
        self.evaluation_hooks: list[Callable[[], None]] = []


_THREAD = _PerThread()


def per_thread() -> _PerThread:
    """This thread's interception stack (``handlers``), stats collectors and evaluation
    hooks."""
    return _THREAD


def active_handler() -> Any:
    """The converted module or ``mixed_precision`` scope whose solves this thread routes (see
    ``interception``); None if there is none, or if interception is suspended."""
    stack = _THREAD.handlers
    return stack[-1] if stack else None


@dataclasses.dataclass
class _Trampolines:
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    originals: dict[str, Callable[..., Any]] = dataclasses.field(default_factory=dict)
    patched: dict[str, Any] = dataclasses.field(default_factory=dict)
    installed: bool = False


TRAMPOLINES = _Trampolines()

CAPTURE_LOCK = threading.RLock()
CAPTURED: "weakref.WeakKeyDictionary[Any, dict[Any, Any]]" = weakref.WeakKeyDictionary()

CONVERTED_CLASSES: dict[type, type] = {}
CONVERTED_CLASSES_LOCK = threading.Lock()

STEP_KERNELS: "weakref.WeakKeyDictionary[Any, dict[Any, Any]]" = weakref.WeakKeyDictionary()

_BY_KEY: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
_KEY_OF: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()
_KEYS = itertools.count(1)
SPECS_OF: "weakref.WeakKeyDictionary[Any, dict[int, Any]]" = weakref.WeakKeyDictionary()
SAVED_SOLVES: dict[int, Any] = {}
TICKETS = itertools.count()

WARNED_TOLERANCES: set[tuple[Any, ...]] = set()


def key_of(obj: Any) -> int:
    """A key, a constant of compiled graphs, that names ``obj`` (hashed by identity) while it
    lives."""
    key = _KEY_OF.get(obj)
    if key is None:
        key = _KEY_OF[obj] = new_key(obj)
    return key


def new_key(obj: Any) -> int:
    """A fresh key for ``obj`` (an object hashed by value gets one per registration)."""
    key = next(_KEYS)
    _BY_KEY[key] = obj
    return key


def object_of(key: int) -> Any:
    """The live object named by ``key``; None if it was freed."""
    return _BY_KEY.get(key)


def named_objects() -> int:
    """How many objects are named by keys now."""
    return len(_BY_KEY)
