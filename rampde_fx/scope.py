"""``rampde_fx.mixed_precision``: a scope, in the style of ``torch.autocast``, in which every
ODE solve this thread starts is converted: library samplers, top-level helpers that call
``odeint`` themselves, code the user owns no module of.

Inside the scope the solver calls are routed as in a converted module's forward (see
``rampde_fx.interception.trampolines``): to sites made when first met, with the scope's
precision settings. Sites belong to the scope object, so one object used many times (a
decorator, say) lists every solve it met in :meth:`mixed_precision.explain`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch

from . import runtime
from .config import Budget, SolveConfig, resolve_config
from .interception import trampolines
from .interception.sites import Conversion, SolveSite
from .policy import PrecisionPolicy
from .tools.explain import explain

F = TypeVar("F", bound=Callable[..., Any])


class mixed_precision:  # noqa: N801 (named like torch.autocast, which it is used like)
    """Convert every ODE solve started in this thread while the scope is active.

    ::

        with rampde_fx.mixed_precision(dtype=torch.bfloat16) as mp:
            samples = sampler.sample(model, noise)      # a library's odeint call inside
        print(mp.explain())

        @rampde_fx.mixed_precision(dtype=torch.bfloat16)
        def log_likelihood(x): ...

    Calls of ``torchdiffeq.odeint``, ``torchdiffeq.odeint_adjoint`` and
    :func:`rampde_fx.odeint` run as in a module made by :func:`rampde_fx.convert`, with the same
    arguments: ``dtype``, ``scaling``, ``policy``, ``checkpoint``, ``compile_steps`` or
    ``config`` give the precision; ``filter_fn(module, name)`` chooses solves (``module``: the
    velocity's module, or None for a plain function; ``name``: its qualified name). The tensors
    the velocity reads (its parameters, those of modules in a closure) get their gradients when
    the solve is differentiated. Scopes nest (the innermost one converts); inside a converted
    module's forward, that module's conversion applies. Other threads are not affected.
    """

    def __init__(self, dtype: torch.dtype = torch.bfloat16, *, scaling: str = "auto",
                 policy: PrecisionPolicy | None = None, checkpoint: str | Budget = "steps",
                 compile_steps: bool = False,
                 filter_fn: Callable[[torch.nn.Module | None, str], bool] | None = None,
                 config: SolveConfig | None = None) -> None:
        config = resolve_config(config, "rampde_fx.mixed_precision", dtype=dtype,
                                scaling=scaling, policy=policy, checkpoint=checkpoint,
                                compile_steps=compile_steps)
        if filter_fn is not None and not callable(filter_fn):
            raise TypeError("rampde_fx.mixed_precision: filter_fn must be callable as "
                            "filter_fn(module, qualified_name)")
        self._rampde_conversion = Conversion(config, filter_fn)
        self._depth = 0

    @property
    def config(self) -> SolveConfig:
        """The precision settings of the scope's solves."""
        return self._rampde_conversion.config

    @property
    def sites(self) -> list[SolveSite]:
        """The solves converted so far, in the order they were first met."""
        return list(self._rampde_conversion.sites)

    def explain(self) -> str:
        """What ran in which precision in this scope (see :func:`rampde_fx.explain`)."""
        return explain(self)

    def _rampde_intercept(self, source: str, args: tuple[Any, ...],
                          kwargs: dict[str, Any]) -> Any:
        return self._rampde_conversion.solve(None, source, args, kwargs)

    def __enter__(self) -> "mixed_precision":
        trampolines.install()
        runtime.per_thread().handlers.append(self)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        handlers = runtime.per_thread().handlers
        if not handlers or handlers[-1] is not self:
            raise RuntimeError("rampde_fx.mixed_precision: scopes must be left in the order "
                               "they were entered, in the thread that entered them")
        handlers.pop()

    def __call__(self, fn: F) -> F:
        @functools.wraps(fn)
        def within_scope(*args: Any, **kwargs: Any) -> Any:
            trampolines.install()
            return trampolines.run_within(self, fn, *args, **kwargs)
        return within_scope  # type: ignore[return-value]
