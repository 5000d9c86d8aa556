"""torchdiffeq's step callbacks: methods of the velocity object that the solver calls.

``callback_step(t0, y0, dt)`` before every step (every attempt, for adaptive methods),
``callback_accept_step(t0, y0, dt)`` and ``callback_reject_step(t0, y0, dt)`` after an adaptive
method decides on an attempt; ``t0`` is the user's time at the step's start (a tensor of the
times' dtype: float64 for adaptive methods), ``y0`` the state there in the structure of ``y0``,
``dt`` the step's size, positive in either direction of time. They run in the forward solve
only, on real tensors, as in torchdiffeq's ``odeint``. ``odeint_adjoint`` also calls
``callback_step_adjoint`` and its kin in its adjoint solve; rampde_fx's backward pass recomputes
the accepted steps instead of solving an adjoint ODE, and warns that it does not call them.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import torch


CALLBACK_NAMES = ("callback_step", "callback_accept_step", "callback_reject_step")


@dataclasses.dataclass
class StepCallbacks:
    """The step callbacks one solve calls.

    Attributes:
        found: the velocity's callbacks by name, those the method supports.
        is_tuple: whether they receive the state as a tuple.
        time_sign: -1 when integrating backwards (internal time is the user's, negated).
    """

    found: dict[str, Callable[..., Any]] = dataclasses.field(default_factory=dict)
    is_tuple: bool = False
    time_sign: float = 1.0

    def __bool__(self) -> bool:
        return bool(self.found)

    def __call__(self, name: str, t0: torch.Tensor, y: tuple[torch.Tensor, ...],
                 dt: torch.Tensor | float) -> None:
        """Call callback ``name``, if the velocity has it, at internal time ``t0``."""
        callback = self.found.get(name)
        if callback is not None:
            t0 = t0.detach()
            dt = torch.as_tensor(dt, dtype=t0.dtype, device=t0.device).detach()
            callback(-t0 if self.time_sign < 0 else t0, y if self.is_tuple else y[0], dt)


def find_callbacks(func: Any, method: str, adaptive: bool, is_tuple: bool,
                   reverse: bool) -> StepCallbacks:
    """The callbacks ``func`` defines; those the method does not call (a fixed grid only
    calls ``callback_step``) are left out with torchdiffeq's warning."""
    found = {name: getattr(func, name) for name in CALLBACK_NAMES
             if callable(getattr(func, name, None))}
    adjoint = [f"{name}_adjoint" for name in CALLBACK_NAMES
               if callable(getattr(func, f"{name}_adjoint", None))]
    if adjoint:
        warnings.warn(f"rampde_fx does not call {adjoint}: its backward pass recomputes the "
                      "accepted steps, it solves no adjoint ODE", stacklevel=4)
    supported = CALLBACK_NAMES if adaptive else CALLBACK_NAMES[:1]
    unsupported = sorted(set(found) - set(supported))
    if unsupported:
        warnings.warn(f"Solver {method!r} does not support callbacks {unsupported}",
                      stacklevel=4)
    return StepCallbacks({name: found[name] for name in supported if name in found}, is_tuple,
                         -1.0 if reverse else 1.0)
