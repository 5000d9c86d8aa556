"""Documented read-only accessors of rampde_fx's internal state, for tests and investigations.

They answer questions about what the package holds right now; none of them changes anything
except :func:`forget_tolerance_warnings`.
"""
from __future__ import annotations

from typing import Any

import torch

from .. import runtime
from ..capture import Velocity, velocity_kind
from ..interception.sites import SolveSite, sites_of

__all__ = ["captured_velocities", "compiled_specs_of", "forget_tolerance_warnings",
           "named_objects", "saved_compiled_solves", "sites"]


def sites(converted: torch.nn.Module) -> list[SolveSite]:
    """The solves ``converted`` converted, in the order they were first met."""
    return sites_of(converted)


def captured_velocities(func: Any) -> list[Velocity]:
    """The captured velocities cached for velocities of ``func``'s kind (per input signature,
    dtype, policy and guarded Python state)."""
    captures = runtime.CAPTURED.get(velocity_kind(func))
    if captures is None:
        return []
    return [velocity for entries in captures.by_signature.values() for velocity in entries.values()]


def saved_compiled_solves() -> int:
    """How many compiled solves hold what their backward pass needs, right now."""
    return len(runtime.SAVED_SOLVES)


def named_objects() -> int:
    """How many objects (compiled-solve specs, conversion sites) compiled graphs name by key."""
    return runtime.named_objects()


def compiled_specs_of(owner: Any) -> int:
    """How many compiled-solve specs the velocity owner ``owner`` holds."""
    return len(runtime.SPECS_OF.get(owner, {}))


def forget_tolerance_warnings() -> None:
    """Show every ``ToleranceWarning`` again (each is shown once per method, dtype and
    tolerances)."""
    runtime.WARNED_TOLERANCES.clear()
