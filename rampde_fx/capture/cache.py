"""``capture_velocity``: the captured velocity of a callable, cached per velocity object."""
from __future__ import annotations

import warnings
from typing import Any

import torch

from .. import runtime
from ..errors import CaptureWarning
from ..policy import PrecisionPolicy
from .side_effects import SideEffects
from .slots import describe, lifted_slots, owner_module, velocity_owner
from .trace import check_output, fallback_reason, trace
from .velocity import GraphVelocity, State, Velocity, eager_velocity


def capture_velocity(func: Any, t: torch.Tensor, y: State, is_tuple: bool,
                     low_dtype: torch.dtype, policy: PrecisionPolicy) -> Velocity:
    """The low-precision velocity for ``func`` at inputs like ``(t, y)``, cached per ``func``.

    Velocities are cached per owner (see :func:`velocity_owner`) in ``runtime.CAPTURED``. The
    cache key holds the shapes, dtypes and devices of the inputs, the low dtype, the policy
    and the train/eval flags of ``func``'s modules (a graph bakes in ``if self.training``
    branches and the shapes it was traced with).
    """
    owner, _ = velocity_owner(func)  # bound methods are re-created on every access
    module = owner_module(func)
    training = tuple(m.training for m in module.modules()) if module is not None else ()
    key = (getattr(func, "__func__", None), low_dtype, policy, is_tuple, training, t.dtype,
           tuple((c.dtype, c.device, tuple(c.shape)) for c in y))
    try:
        per_owner = runtime.CAPTURED.setdefault(owner, {})
    except TypeError:  # not weak-referenceable: capture every time
        per_owner = {}
    with runtime.CAPTURE_LOCK:  # capture changes and restores attributes of the user's modules
        if key not in per_owner:
            per_owner[key] = _capture(func, t, y, is_tuple, low_dtype, policy, module)
    return per_owner[key]


def _capture(func: Any, t: torch.Tensor, y: State, is_tuple: bool, low_dtype: torch.dtype,
             policy: PrecisionPolicy, module: torch.nn.Module | None) -> Velocity:
    example = (t.detach(), tuple(c.detach() for c in y))
    effects = SideEffects()
    slots = lifted_slots(module)
    try:
        traced = trace(func, *example, is_tuple, slots, effects)
    except Exception as error:  # noqa: BLE001 - any failure means: run it eagerly
        reason = fallback_reason(error)
        warnings.warn(
            f"rampde_fx: could not capture {describe(func)} as a graph ({reason}). It will run "
            f"eagerly on its state cast to {low_dtype}, under autocast; accumulation and the "
            "adjoint are unchanged, but the precision policy does not apply.",
            CaptureWarning, stacklevel=4)
        return eager_velocity(func, *example, is_tuple, low_dtype, reason)
    if effects:
        warnings.warn(
            f"rampde_fx: {describe(func)} {effects} in forward. Capture ran that Python code "
            "and undid what it changed; the captured graph does not repeat it during solves (a "
            "counter such as nfe will not advance, a list it appends to stays as it was).",
            CaptureWarning, stacklevel=4)
    check_output(traced.output, example[1], func)
    return GraphVelocity(func, is_tuple, low_dtype, policy, slots, traced, example)
