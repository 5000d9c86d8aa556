"""``capture_velocity``: the captured velocity of a callable, cached per kind and guarded, bound
for a solve."""
from __future__ import annotations

import collections
import dataclasses
import warnings
from typing import Any

import torch

from .. import runtime
from ..errors import CaptureWarning
from ..policy import PrecisionPolicy
from .guards import guard_state
from .side_effects import SideEffects
from .slots import Slot, describe, lifted_slots, velocity_kind
from .trace import check_output, fallback_reason, trace
from .velocity import Counter, GraphVelocity, State, Velocity, eager_velocity

# Captures kept for one kind of velocity and input signature, one per guarded Python state
# (instances of one class whose structures differ have states of their own); past it the least
# recently used goes, and a warning says that the state keeps changing.
MAX_CAPTURES_PER_SIGNATURE = 64


@dataclasses.dataclass
class KindCaptures:
    """The velocities captured for one kind of velocity (``runtime.CAPTURED``; see
    :func:`~rampde_fx.capture.slots.velocity_kind`).

    Attributes:
        by_signature: per input signature, the velocities by guard state, the most recently
            used last.
        excluded: what the velocity code assigns, or appends to: outputs (counters and the
            like), left out of its guards.
        warned: whether the warning about a changing state was shown.
    """

    by_signature: dict[Any, collections.OrderedDict[tuple[Any, ...], Velocity]] = \
        dataclasses.field(default_factory=dict)
    excluded: set[str] = dataclasses.field(default_factory=set)
    warned: bool = False


def capture_velocity(func: Any, t: torch.Tensor, y: State, is_tuple: bool,
                     low_dtype: torch.dtype, policy: PrecisionPolicy,
                     bindings: dict[str, torch.Tensor] | None = None) -> Velocity:
    """The low-precision velocity for ``func`` at inputs like ``(t, y)``, bound for a solve
    (see ``GraphVelocity.bound``; ``bindings`` by qualified name, the other tensors as ``func``
    holds them now).

    Velocities are cached per kind (see :func:`~rampde_fx.capture.slots.velocity_kind`: the
    module class, or the code of a function made per call) in ``runtime.CAPTURED``, per input
    signature (the shapes, dtypes and devices of the inputs, the low dtype and the policy) and
    per guarded Python state (see :mod:`rampde_fx.capture.guards`): a graph is reused, by any
    velocity of its kind, only while the state it was traced under holds; each solve binds its
    own velocity's tensors.
    """
    signature = (getattr(func, "__func__", None), low_dtype, policy, is_tuple, t.dtype,
                 tuple((c.dtype, c.device, tuple(c.shape)) for c in y))
    try:
        captures = runtime.CAPTURED.setdefault(velocity_kind(func), KindCaptures())
    except TypeError:  # not weak-referenceable: capture every time
        captures = KindCaptures()
    slots = lifted_slots(func)
    with runtime.CAPTURE_LOCK:  # capture changes and restores attributes of the user's modules
        entries = captures.by_signature.setdefault(signature, collections.OrderedDict())
        state = guard_state(func, captures.excluded, slots)
        velocity = entries.get(state)
        if velocity is not None:
            entries.move_to_end(state)
            return velocity.bound(func, bindings, slots)
        velocity, effects = _capture(func, t, y, is_tuple, low_dtype, policy, slots)
        captures.excluded.update(effects.assigned, effects.changed,
                                 (name for name, _ in effects.counters))
        entries[guard_state(func, captures.excluded, slots)] = velocity
        if len(entries) > MAX_CAPTURES_PER_SIGNATURE:
            entries.popitem(last=False)
            if not captures.warned:
                captures.warned = True
                warnings.warn(
                    f"rampde_fx: {describe(func)} was captured again for more than "
                    f"{MAX_CAPTURES_PER_SIGNATURE} states of the Python it reads (attributes, "
                    "globals, hooks, submodules; see rampde_fx.capture.guards): each change "
                    "between solves costs a capture. Keep values that change per solve in "
                    "tensors, which each solve binds without capturing again.",
                    CaptureWarning, stacklevel=5)
        return velocity.bound(func, bindings, slots)


def _capture(func: Any, t: torch.Tensor, y: State, is_tuple: bool, low_dtype: torch.dtype,
             policy: PrecisionPolicy, slots: dict[str, Slot]
             ) -> tuple[Velocity, SideEffects]:
    example = (t.detach(), tuple(c.detach() for c in y))
    effects = SideEffects()
    try:
        traced = trace(func, *example, is_tuple, slots, effects)
    except Exception as error:  # noqa: BLE001 - any failure means: run it eagerly
        reason = fallback_reason(error)
        warnings.warn(
            f"rampde_fx: could not capture {describe(func)} as a graph ({reason}). It will run "
            f"eagerly on its state cast to {low_dtype}, under autocast; accumulation and the "
            "adjoint are unchanged, but the precision policy does not apply.",
            CaptureWarning, stacklevel=5)
        return eager_velocity(func, *example, is_tuple, low_dtype, reason), effects
    if effects:
        warnings.warn(
            f"rampde_fx: {describe(func)} {effects} in forward. Capture ran that Python code "
            "and undid what it changed; the captured graph does not repeat it during solves (a "
            "list it appends to stays as it was; integer counters do advance).",
            CaptureWarning, stacklevel=5)
    check_output(traced.output, example[1], func)
    counters = [Counter(name, delta) for name, delta in effects.counters]
    return GraphVelocity(func, is_tuple, low_dtype, policy, slots, traced, example,
                         counters), effects
