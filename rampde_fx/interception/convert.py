"""``rampde_fx.convert``: run the ODE solves of a float32 model in mixed precision.

Nothing is traced at convert time. The converted module is a shallow copy of the model whose
class is ``Converted<Name>``, a subclass of the model's class made once per class
(``runtime.CONVERTED_CLASSES``): its forward (one per converted module) runs the original
forward, as written, inside the interception of :mod:`rampde_fx.interception.trampolines`, and
so does every other method that the model's own classes define (``sample``, ``log_prob``,
``compute_all_losses``, helpers). Python control flow, default arguments, ``self.training``,
loops before the solve and solvers kept in attributes or passed as arguments all run as the
user wrote them, on every call. Each call of ``torchdiffeq.odeint``,
``torchdiffeq.odeint_adjoint``, ``torchdiffeq.odeint_event`` or ``rampde_fx.odeint`` that such a
method makes is routed to a :class:`SolveSite`, made when that solve is first met and kept for
the next calls: it runs :func:`rampde_fx.odeint` (:func:`rampde_fx.odeint_event`) with the
original method, options, tolerances, output times and event function and ``convert``'s
precision settings.

How sites are identified, and which module ``filter_fn`` is asked about, is described in
:mod:`rampde_fx.interception.sites`.

``odeint_adjoint`` becomes the discrete adjoint with low-precision checkpoints: memory grows with
the number of steps (one low-precision state per step, instead of torchdiffeq's constant
memory), and the gradient is the exact gradient of the discrete solve (torchdiffeq's continuous
adjoint differs from it by the solver's discretisation error). Its ``adjoint_params`` choose
the tensors that get gradients, as there; its ``adjoint_rtol``, ``adjoint_atol``,
``adjoint_method`` and ``adjoint_options`` configure an adjoint ODE solve that a discrete
adjoint does not make: they are dropped with a warning, and the ``dtype``, ``scaling``,
``policy`` and ``checkpoint`` of a ``rampde_fx.odeint`` call are dropped for ``convert``'s;
``explain`` lists what was dropped.
"""
from __future__ import annotations

import copy
import functools
import types
from typing import Any, Callable, Iterator

import torch

from .. import runtime
from ..config import Budget, SolveConfig, resolve_config
from ..errors import ConversionError
from ..policy import PrecisionPolicy
from . import trampolines
from .sites import Conversion, class_name


class _ConvertedModule:
    """The mixin of every ``Converted<Name>(_ConvertedModule, <Name>)`` class."""

    _rampde_original: type[torch.nn.Module]
    _rampde_conversion: Conversion

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return trampolines.run_within(self, super().forward, *args, **kwargs)  # type: ignore[misc]

    def _rampde_intercept(self, source: str, args: tuple[Any, ...],
                          kwargs: dict[str, Any]) -> Any:
        return self._rampde_conversion.solve(self, source, args, kwargs)  # type: ignore[arg-type]

    def __reduce_ex__(self, protocol: int) -> tuple[Any, ...]:
        # The class is made at run time: pickle and deepcopy rebuild it from the original.
        state = {key: value for key, value in self.__getstate__().items() if key != "forward"}
        return _rebuild, (self._rampde_original, state)


def _converted_class(original: type[torch.nn.Module]) -> type:
    classes = runtime.CONVERTED_CLASSES
    with runtime.CONVERTED_CLASSES_LOCK:
        if original not in classes:
            namespace = {name: _intercepting(method) for name, method in _methods(original)}
            classes[original] = type(f"Converted{original.__name__}",
                                     (_ConvertedModule, original),
                                     {**namespace, "_rampde_original": original})
        return classes[original]


def _methods(original: type[torch.nn.Module]) -> Iterator[tuple[str, types.FunctionType]]:
    """The methods that the model's own classes define (not nn.Module's, not dunder methods,
    not forward, which every converted module has its own of), by name, most derived first."""
    seen = {"forward"}
    for klass in original.__mro__:
        if klass is object or klass.__module__.partition(".")[0] == "torch":
            continue
        for name, value in vars(klass).items():
            if isinstance(value, types.FunctionType) and name not in seen and not (
                    name.startswith("__") and name.endswith("__")):
                seen.add(name)
                yield name, value


def _intercepting(method: types.FunctionType) -> Callable[..., Any]:
    """``method``, running with this converted module routing the solves it makes (sampling,
    likelihood and training entry points, helpers)."""
    @functools.wraps(method)
    def converted_method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return trampolines.run_within(self, method, self, *args, **kwargs)
    return converted_method


def _with_own_forward(module: torch.nn.Module) -> torch.nn.Module:
    """``module``, given a forward with a code object of its own: dynamo caches compiled frames,
    guards on the module they run for, and counts recompilations against its limit, per code
    object, so that any number of converted modules of one class compile."""
    shared = _ConvertedModule.forward
    forward = types.FunctionType(shared.__code__.replace(), shared.__globals__, shared.__name__,
                                 shared.__defaults__, shared.__closure__)
    vars(module)["forward"] = types.MethodType(forward, module)
    return module


def _rebuild(original: type[torch.nn.Module], state: dict[str, Any]) -> torch.nn.Module:
    cls = _converted_class(original)
    module = cls.__new__(cls)
    module.__setstate__(state)
    return _with_own_forward(module)


# nn.Module's own containers (parameters, buffers, submodules, hooks): the copy gets its own.
_MODULE_CONTAINERS = tuple(name for name, value in vars(torch.nn.Module()).items()
                           if isinstance(value, (dict, set)))


def convert(
    model: torch.nn.Module,
    *,
    dtype: torch.dtype = torch.bfloat16,
    scaling: str = "auto",
    policy: PrecisionPolicy | None = None,
    checkpoint: str | Budget = "steps",
    compile_steps: bool = False,
    filter_fn: Callable[[torch.nn.Module, str], bool] | None = None,
    config: SolveConfig | None = None,
) -> torch.nn.Module:
    """A new module that computes ``model`` with its ODE solves in mixed precision.

    Args:
        model: a float32 model whose forward calls ``torchdiffeq.odeint``,
            ``torchdiffeq.odeint_adjoint``, ``torchdiffeq.odeint_event`` or ``rampde_fx.odeint``
            (with or without ``event_fn``), directly or in submodules, however the solver was
            imported, stored or passed. It is left untouched and stays
            usable as the float32 reference.
        dtype: the velocity's precision in every converted solve (see :func:`rampde_fx.odeint`).
        scaling: adjoint scaling of every converted solve: 'auto', 'dynamic' or 'none'.
        policy: the precision policy of the velocities; default
            :data:`rampde_fx.DEFAULT_POLICY`.
        checkpoint: 'steps', 'stages' or a :class:`rampde_fx.Budget`, for every converted
            solve (see :func:`rampde_fx.odeint`).
        compile_steps: run the steps of every converted solve as compiled kernels, also
            where the model is not compiled (see :func:`rampde_fx.odeint`).
        filter_fn: ``filter_fn(module, qualified_name) -> bool`` is called once per solve, when
            it is first met, with the module whose forward makes it and that module's name in
            ``model`` ('' for ``model`` itself); solves for which it returns False run as
            written.
        config: a :class:`rampde_fx.SolveConfig` in place of ``dtype``, ``scaling``,
            ``policy``, ``checkpoint`` and ``compile_steps`` (which then must keep their
            defaults).

    Solves made in ``forward`` and in every other method of ``model``'s own classes (a
    ``sample()``, ``log_prob()`` or ``compute_all_losses()``, directly or through the
    submodules and functions it calls) are converted. A submodule's method called directly
    (``mp.decoder.sample()``) runs that shared submodule as written: convert the submodule
    itself, or call it inside a :class:`rampde_fx.mixed_precision` scope.

    Returns:
        An instance of a subclass of ``type(model)`` that shares ``model``'s submodules,
        parameters and buffers (an optimizer on either trains both; ``state_dict`` keys are
        the same; ``train()``/``eval()`` on either switch the shared submodules). It can be
        pickled, saved with ``torch.save`` and deep-copied (``filter_fn`` must then be
        picklable).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``policy`` is not a
            ``PrecisionPolicy``.
        ValueError: an invalid ``dtype``, ``scaling`` or ``checkpoint``, or ``config`` given
            beside them.
        ConversionError: ``model`` is already converted. Solves that are not supported (an
            unknown method, an ``odeint_event`` with another ``odeint_interface``)
            raise it when first called.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"rampde_fx.convert takes an nn.Module, got {type(model).__qualname__}; "
                        "to solve one ODE, call rampde_fx.odeint")
    config = resolve_config(config, "rampde_fx.convert", dtype=dtype, scaling=scaling,
                            policy=policy, checkpoint=checkpoint, compile_steps=compile_steps)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError("rampde_fx.convert: filter_fn must be callable as "
                        "filter_fn(module, qualified_name)")
    for name, module in model.named_modules():
        if isinstance(module, _ConvertedModule):
            raise ConversionError(f"rampde_fx.convert: {class_name(module)} at "
                                  f"'{name or '<root>'}' was already converted; convert the "
                                  "original float32 model instead")
    trampolines.install()
    cls = _converted_class(type(model))
    converted = cls.__new__(cls)
    state = dict(vars(model))
    state.pop("_compiled_call_impl", None)  # model.compile() made it for the original
    state.update((name, copy.copy(state[name])) for name in _MODULE_CONTAINERS if name in state)
    converted.__dict__.update(state)
    converted._rampde_conversion = Conversion(config, filter_fn)
    return _with_own_forward(converted)
