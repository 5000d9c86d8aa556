"""``rampde_fx.odeint``: torchdiffeq's ``odeint`` with a low-precision velocity."""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable

import torch

from . import dispatch
from .adaptive import ADAPTIVE_OPTIONS, make_controller
from .adjoint import MixedPrecisionSolve, SolvePlan, solve_forward
from .callbacks import find_callbacks
from .capture import capture_velocity
from .grid import check_grid, make_grid, place_outputs
from .policy import DEFAULT_POLICY, PrecisionPolicy
from .solver import Nudge, Stepper, all_finite, velocity_time
from .stats import SolveStats, record
from .tableaus import ADAPTIVE_TABLEAUS, FIXED_GRID_TABLEAUS, UNSUPPORTED_METHODS, ButcherTableau

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
SCALING_MODES = ("auto", "dynamic", "none")
CHECKPOINT_MODES = ("steps", "stages")
FIXED_GRID_OPTIONS = ("step_size", "grid_constructor", "interp", "perturb")

TensorOrTuple = torch.Tensor | tuple[torch.Tensor, ...]


def odeint(
    func: Callable[[torch.Tensor, Any], Any],
    y0: TensorOrTuple,
    t: torch.Tensor,
    *,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    method: str | None = None,
    options: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    scaling: str = "auto",
    policy: PrecisionPolicy | None = None,
    checkpoint: str = "steps",
    event_fn: Callable[..., Any] | None = None,
) -> TensorOrTuple:
    """Solve ``dy/dt = func(t, y)``, ``y(t[0]) = y0`` with the velocity in low precision.

    The calling convention is torchdiffeq's ``odeint``. The velocity is captured as a graph and
    evaluated in ``dtype`` under ``policy``; stage states and the solution are accumulated in
    ``y0``'s dtype; the per-step states are kept in ``dtype`` for a discrete-adjoint backward
    pass whose gradients are accumulated in ``y0``'s dtype.

    Args:
        func: ``func(t, y)``, an ``nn.Module`` or any callable; receives ``t`` as a 0-dim tensor
            of the state's dtype and ``y`` in the structure of ``y0``.
        y0: initial state: a floating tensor, or a tuple of them (each keeps its own dtype).
        t: 1-D tensor of output times, strictly increasing or decreasing; ``t[0]`` is the start.
        rtol, atol: tolerances of the adaptive methods (floats, or one per component of a
            tuple state), as in torchdiffeq; fixed-grid methods do not use them. Tolerances
            below what ``dtype`` resolves are met at its rounding floor instead, with a
            :class:`rampde_fx.ToleranceWarning` that gives the attainable tolerances.
        method: an adaptive method, 'dopri5' (the default, as in torchdiffeq), 'bosh3',
            'fehlberg2', 'adaptive_heun' or 'dopri8'; or a fixed-grid method, 'euler',
            'midpoint', 'heun2', 'heun3', 'ralston', 'rk4' (torchdiffeq's 3/8 rule) or
            'rk4_classic'.
        options: as in torchdiffeq. Fixed grids: 'step_size' (or 'grid_constructor(func, y0,
            t) -> grid'), 'interp' ('linear' or 'cubic') and 'perturb'; without a step size
            the grid is ``t``. Adaptive methods: 'first_step', 'safety', 'ifactor', 'dfactor',
            'max_num_steps', 'step_t', 'jump_t', 'min_step', 'max_step', 'norm' (and 'dtype',
            which has no effect: their times are float64 on the host).
        dtype: the velocity's precision: torch.bfloat16 (default), torch.float16, or
            torch.float32 / torch.float64 for no low precision at all.
        scaling: adjoint scaling: 'auto' (dynamic for float16, none otherwise), 'dynamic' or
            'none'.
        policy: which ops run in ``dtype`` and which in float32; default
            :data:`rampde_fx.DEFAULT_POLICY`.
        checkpoint: what the backward pass starts from. 'steps' (default): the state of each
            step, in ``dtype``; the backward pass recomputes each step (least memory).
            'stages': autograd keeps every stage's activations, which the low-precision velocity
            produces in ``dtype``; no recomputation (less compute, more memory, and no per-step
            adjoint scaling, so it refuses ``scaling`` that would be dynamic).
        event_fn: not supported yet; raises NotImplementedError.

    Adaptive methods run torchdiffeq's step-size controller in the state's precision, on a
    low-precision velocity; their backward pass differentiates the accepted steps, whose sizes
    are constants of the forward solve (see :mod:`rampde_fx.adaptive`).

    Under ``torch.compile`` a solve is one opaque operator, so a model compiles as one graph
    whatever the number of steps, and each step runs as inductor-compiled kernels.

    Returns:
        The solution at ``t``, shape ``(len(t), *y0.shape)`` in ``y0``'s dtype (a tuple of such
        for a tuple ``y0``).

    Inside the forward of a module made by :func:`rampde_fx.convert`, the solve is that
    conversion's: its ``dtype``, ``scaling``, ``policy`` and ``checkpoint`` replace these.

    Solve statistics are available through :func:`rampde_fx.collect_stats`.
    """
    handler = dispatch.active()
    if handler is not None:
        given = {name: value for name, value in (
            ("rtol", rtol), ("atol", atol), ("method", method), ("options", options),
            ("dtype", dtype), ("scaling", scaling), ("policy", policy),
            ("checkpoint", checkpoint), ("event_fn", event_fn))
            if value is not _DEFAULTS[name]}  # what the call passed, for explain
        return handler._rampde_intercept("rampde_fx.odeint", (func, y0, t), given)
    if torch.compiler.is_compiling():
        from .compiled import solve_in_graph  # import cycle: compiled builds on this module

        return solve_in_graph(func, y0, t, rtol=rtol, atol=atol, method=method,
                              options=options, dtype=dtype, scaling=scaling, policy=policy,
                              checkpoint=checkpoint, event_fn=event_fn)
    prepared = prepare_solve(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                             dtype=dtype, scaling=scaling, policy=policy, checkpoint=checkpoint,
                             event_fn=event_fn)
    inputs = (*prepared.state, prepared.grid, prepared.times, *prepared.tensors)
    if torch.is_grad_enabled() and any(x.requires_grad for x in inputs):
        if checkpoint == "stages":  # autograd through the steps, keeping their activations
            with torch.autocast(prepared.state[0].device.type, enabled=False):
                solution, _, _ = solve_forward(prepared.plan, prepared.state, prepared.grid,
                                               prepared.times, keep_checkpoints=False)
        else:
            solution = MixedPrecisionSolve.apply(prepared.plan, *inputs)
    else:  # inference: no checkpoints
        with torch.no_grad(), torch.autocast(prepared.state[0].device.type, enabled=False):
            solution, _, _ = solve_forward(prepared.plan, prepared.state, prepared.grid,
                                           prepared.times, keep_checkpoints=False)
    return tuple(solution) if prepared.is_tuple else solution[0]


_DEFAULTS: dict[str, Any] = odeint.__kwdefaults__


def check_settings(dtype: torch.dtype, scaling: str, checkpoint: str) -> bool:
    """Validate the precision settings of a solve (shared by :func:`odeint` and
    ``rampde_fx.convert``); returns whether dynamic adjoint scaling is on."""
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {[str(d) for d in SUPPORTED_DTYPES]}, got {dtype}")
    if scaling not in SCALING_MODES:
        raise ValueError(f"scaling must be one of {SCALING_MODES}, got {scaling!r}")
    use_scaling = scaling == "dynamic" or (scaling == "auto" and dtype == torch.float16)
    if checkpoint not in CHECKPOINT_MODES:
        raise ValueError(f"checkpoint must be one of {CHECKPOINT_MODES}, got {checkpoint!r}")
    if checkpoint == "stages" and use_scaling:
        raise ValueError("checkpoint='stages' has no per-step adjoint scaling; use "
                         "checkpoint='steps' for float16, or pass scaling='none'")
    return use_scaling


@dataclasses.dataclass
class PreparedSolve:
    """A validated solve, ready to run: the plan and its tensor inputs.

    Attributes:
        plan: everything host-side (stepper, grid values, output placement, stats).
        state: the components of ``y0``.
        grid: the time grid in internal (increasing) time, differentiable in ``t``; for an
            adaptive method only its start, from which the forward solve steps.
        times: the output times in internal time.
        tensors: the tensors the velocity reads that require grad.
        is_tuple: whether ``y0`` was a tuple.
    """

    plan: SolvePlan
    state: tuple[torch.Tensor, ...]
    grid: torch.Tensor
    times: torch.Tensor
    tensors: list[torch.Tensor]
    is_tuple: bool


def internal_time(t: torch.Tensor, options: dict[str, Any], func: Any, y0: Any,
                  adaptive: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Output times and grid in internal time, which increases (``-t`` for decreasing ``t``,
    as torchdiffeq does), both differentiable in ``t``; and whether time was reversed. The grid
    of an adaptive method is its start only."""
    reverse = len(t) > 1 and bool(t[0] > t[1])
    internal = -t if reverse else t
    if adaptive:
        return internal, internal[:1], reverse
    constructor = options.get("grid_constructor")
    if reverse and constructor is not None:
        constructor = lambda f, y, tt, _gc=constructor: -_gc(f, y, -tt)  # noqa: E731
    return internal, make_grid(internal, options.get("step_size"), constructor, func, y0), reverse


def prepare_solve(func: Callable[[torch.Tensor, Any], Any], y0: TensorOrTuple, t: torch.Tensor,
                  *, rtol: Any, atol: Any, method: str | None, options: dict[str, Any] | None, dtype: torch.dtype,
                  scaling: str, policy: PrecisionPolicy | None, checkpoint: str,
                  event_fn: Callable[..., Any] | None) -> PreparedSolve:
    """Validate the arguments of :func:`odeint`, capture the velocity and plan the steps."""
    tableau = _check_method(method, event_fn)
    use_scaling = check_settings(dtype, scaling, checkpoint)
    if not callable(func):
        raise TypeError(f"func must be callable as func(t, y), got {type(func).__name__}")
    is_tuple, state = _check_state(y0)
    times = _check_times(t, state[0].device)
    opts = _check_options(tableau, options)
    policy = DEFAULT_POLICY if policy is None else policy

    perturb = bool(opts.get("perturb", False))
    start_nudge = Nudge.NEXT if perturb else Nudge.NONE
    with torch.autocast(state[0].device.type, enabled=False):
        internal, grid, reverse = internal_time(times, opts, func, y0, tableau.adaptive)
        grid_values = grid.detach().tolist()
        internal_values = internal.detach().tolist()
        if not tableau.adaptive:
            check_grid(grid_values, internal_values)
        # Captured at the solver's first evaluation: a velocity that reads the time's value
        # sees no time the solver would not use.
        first_time = velocity_time(grid[0].detach(), state, start_nudge, -1.0 if reverse else 1.0)
        velocity = capture_velocity(func, first_time, state, is_tuple, dtype, policy)
    captured = getattr(velocity, "original_graph_module", None)
    stats = SolveStats(method=tableau.name, dtype=dtype, scaling=use_scaling,
                       velocity="graph" if velocity.fallback_reason is None
                       else f"eager: {velocity.fallback_reason}",
                       graph=getattr(velocity, "graph_module", None),
                       captured_code=None if captured is None else captured.code)
    record(stats)
    plan = SolvePlan(
        func=func,
        stepper=Stepper(velocity, tableau, start_nudge=start_nudge,
                        end_nudge=Nudge.PREV if perturb or tableau.adaptive else Nudge.NONE,
                        time_sign=-1.0 if reverse else 1.0,
                        interp="dense" if tableau.adaptive else opts.get("interp", "linear")),
        n_components=len(state),
        checkpoint_dtypes=tuple(dtype if dtype.itemsize < c.dtype.itemsize else c.dtype
                                for c in state),
        grid_values=grid_values,
        time_values=internal_values,
        outputs_per_step=[] if tableau.adaptive else place_outputs(grid_values, internal_values),
        scaling=use_scaling,
        stats=stats,
        controller=make_controller(tableau, opts, rtol, atol, state, is_tuple, dtype, reverse)
        if tableau.adaptive else None,
        callbacks=find_callbacks(func, tableau, is_tuple, reverse),
    )
    return PreparedSolve(plan, state, grid, internal, velocity.tensors_requiring_grad(), is_tuple)


def _check_method(method: str | None, event_fn: Any) -> ButcherTableau:
    if event_fn is not None:
        raise NotImplementedError("rampde_fx.odeint does not support event_fn yet; solve to a "
                                  "fixed end time, or use torchdiffeq.odeint for event handling")
    method = "dopri5" if method is None else method
    known = {**ADAPTIVE_TABLEAUS, **FIXED_GRID_TABLEAUS}
    if method in UNSUPPORTED_METHODS:
        raise NotImplementedError(f"method {method!r} is not supported by rampde_fx; use one of "
                                  f"{', '.join(repr(m) for m in known)}")
    if method not in known:
        raise ValueError(f"unknown method {method!r}; rampde_fx solves with "
                         f"{', '.join(repr(m) for m in known)}")
    return known[method]


def _check_state(y0: Any) -> tuple[bool, tuple[torch.Tensor, ...]]:
    is_tuple = isinstance(y0, tuple)
    state = y0 if is_tuple else (y0,)
    if not state or not all(isinstance(c, torch.Tensor) for c in state):
        raise TypeError(f"y0 must be a tensor or a non-empty tuple of tensors, got "
                        f"{type(y0).__name__}")
    for i, c in enumerate(state):
        name = f"y0[{i}]" if is_tuple else "y0"
        if c.is_complex():
            raise NotImplementedError(f"{name} is complex ({c.dtype}); rampde_fx does not support "
                                      "complex states yet (solve the real and imaginary parts as "
                                      "a tuple state, or use torchdiffeq)")
        if not c.is_floating_point():
            raise ValueError(f"{name} must be a floating point tensor (the high precision of the "
                             f"solve), got {c.dtype}; convert it with .float()")
        if not all_finite([c]):
            raise ValueError(f"{name} contains inf or nan")
        if c.device != state[0].device:
            raise ValueError(f"all components of y0 must be on one device, got {c.device} and "
                             f"{state[0].device}")
    return is_tuple, state


def _check_times(t: Any, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() != 1:
        raise ValueError(f"t must be a 1-D tensor of output times, got "
                         f"{type(t).__name__ if not isinstance(t, torch.Tensor) else f'a {t.dim()}-D tensor'}")
    if not t.is_floating_point():
        raise ValueError(f"t must be a floating point tensor, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError("t is empty; give at least the start time t[0]")
    values = t.detach().tolist()
    if not all(math.isfinite(v) for v in values):
        raise ValueError("t contains inf or nan")
    steps = [b - a for a, b in zip(values, values[1:])]
    if not (all(s > 0 for s in steps) or all(s < 0 for s in steps)):
        raise ValueError("t must be strictly increasing or strictly decreasing")
    if t.device != device:
        warnings.warn(f"t is on {t.device} and y0 on {device}; moving t to {device}", stacklevel=3)
        t = t.to(device)
    return t


def _check_options(tableau: ButcherTableau, options: dict[str, Any] | None) -> dict[str, Any]:
    opts = dict(options or {})
    allowed = ADAPTIVE_OPTIONS if tableau.adaptive else FIXED_GRID_OPTIONS
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        kind = "adaptive" if tableau.adaptive else "fixed-grid"
        raise ValueError(f"method {tableau.name!r} does not take options {unknown}; {kind} "
                         f"methods take {list(allowed)}")
    if opts.get("step_size") is not None and opts.get("grid_constructor") is not None:
        raise ValueError("options step_size and grid_constructor are mutually exclusive")
    step = opts.get("step_size")
    if step is not None:
        value = float(step)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"options['step_size'] must be a positive finite number, got {step}")
    if opts.get("interp", "linear") not in ("linear", "cubic"):
        raise ValueError(f"options['interp'] must be 'linear' or 'cubic', got {opts['interp']!r}")
    return opts
