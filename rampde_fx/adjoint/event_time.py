"""Gradients through the event time, by the implicit function theorem (torchdiffeq's
``odeint_event``).

An event solve returns the state ``y(t*)`` at the event time ``t*``, differentiated by the
discrete adjoint with ``t*`` held fixed. The event time depends on every input through
``g(t*, y(t*)) = 0``; the implicit function theorem gives its derivative with respect to any
input ``p`` (``y0``, the velocity's parameters, the start time, the event function's own
tensors)::

    dt*/dp = -(dg/dp) / (dg/dt),    dg/dt = g_t + g_y . f(t*, y(t*))

with ``dg/dp`` through the fixed-time state and the event function's own tensors, and ``f`` the
velocity. The state then moves with the event time: ``dy(t*)/dp = dy/dp + f dt*/dp``. These
are torchdiffeq's ``ImplicitFnGradientRerouting``'s gradients (``f`` and the partial
derivatives of ``g`` evaluated in float32 on the solve's state, ``1e-12`` added to ``dg/dt`` as
there), made by autograd instead of a custom backward: the event time and the state are
returned as their values plus a shift of value zero whose gradient is ``dt*/dp``. So the
event function's own tensors (a learned threshold) get gradients too, which torchdiffeq's
rerouting leaves out.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..engine.events import EventFn, combine_event_functions


def through_event_time(func: Callable[[torch.Tensor, Any], Any], event_fn: EventFn,
                       y0: Any, t0: torch.Tensor, event_t: torch.Tensor,
                       solution: Any) -> tuple[torch.Tensor, Any]:
    """``(event_t, solution)`` of an event solve from ``(t0, y0)`` (the solution at the start
    and at the event time, differentiable with the event time held fixed), with gradients
    through the event time. ``func`` is the velocity, ``event_fn`` the event function as the
    solve was given it."""
    is_tuple = isinstance(solution, tuple)
    rows = solution if is_tuple else (solution,)

    def structured(components: list[torch.Tensor]) -> Any:
        return tuple(components) if is_tuple else components[0]

    event = combine_event_functions(event_fn, t0, y0)
    state = [c[-1] for c in rows]
    t = event_t.detach()
    with torch.no_grad():
        velocity = func(t, structured([c.detach() for c in state]))
    velocity = list(velocity) if is_tuple else [velocity]
    # g_t and g_y at the event, by torch.func (which dynamo traces, unlike autograd.grad)
    value, pullback = torch.func.vjp(lambda time, *y: event(time, structured(list(y))), t,
                                     *[c.detach() for c in state])
    g_t, *g_y = pullback(torch.ones_like(value))
    # Re(conj(g_y) v): autograd's gradient of a real function of a complex state is conjugated
    along_flow = g_t + sum(torch.sum(d.conj() * v).real for d, v in zip(g_y, velocity))
    residual = event(t, structured(state))  # its value is about 0; its gradient is dg/dp
    shift = -(residual - residual.detach()) / (along_flow.detach() + 1e-12)
    rows = [torch.stack([c[0], s + v.detach() * shift.to(s.dtype)])
            for c, s, v in zip(rows, state, velocity)]
    return t + shift.to(t.dtype), structured(rows)
