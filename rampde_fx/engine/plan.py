"""The plan of a solve: its arguments validated, its velocity captured, its stepper and
controller chosen.

:func:`prepare_solve` is the one place that turns the arguments of :func:`rampde_fx.odeint`
into a :class:`SolvePlan` (host-side description) and its tensor inputs; the forward loop
(``integrate``) and the backward pass (``rampde_fx.adjoint``) run it.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Sequence

import torch

from ..capture import RngState, capture_velocity, lifted_slots
from ..config import SolveConfig
from ..stats import COMPILED, SolveStats, record
from .adams import ADAMS_METHODS, ADAMS_OPTIONS, AdamsStepper, adams_settings
from .arguments import describe, per_component, real_number, require_data
from .callbacks import find_callbacks
from .controllers import StepController
from .controllers.adaptive import ADAPTIVE_OPTIONS, adaptive_controller
from .controllers.fixed_grid import FixedGridController, SteppingController
from .events import MAX_FIXED_GRID_EVENT_STEPS, EventController, combine_event_functions
from .grid import check_grid, internal_time, place_outputs
from .schedule import Segment
from .step import Nudge, StepExecutor, Stepper, all_finite, time_dtype, velocity_time
from .tableaus import ADAPTIVE_TABLEAUS, FIXED_GRID_TABLEAUS, UNSUPPORTED_METHODS, ButcherTableau

# Every method, by name: torchdiffeq's, less scipy_solver, and tsit5 and rk4_classic.
METHODS = (*ADAPTIVE_TABLEAUS, *FIXED_GRID_TABLEAUS, *ADAMS_METHODS)

FIXED_GRID_OPTIONS = ("step_size", "grid_constructor", "interp", "perturb")

TensorOrTuple = torch.Tensor | tuple[torch.Tensor, ...]


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What a forward step found besides its state, for its recomputation.

    Attributes:
        rng: the generator state it drew from, where the velocity draws random numbers; else
            None.
        buffers: the values of the buffers that its evaluations change in place, by name;
            None where none does.
        first_rng: in an adaptive solve, the generator state its first stage drew from: the
            solve's start, or the step before evaluated it (as its last stage, or after it);
            else None.
    """

    rng: RngState | None = None
    buffers: dict[str, torch.Tensor] | None = None
    first_rng: RngState | None = None


@dataclasses.dataclass
class SolvePlan:
    """The host-side description of one solve (everything that is not a tensor input).

    The forward loop (:func:`rampde_fx.engine.integrate.integrate`) records the steps it took
    (:meth:`record_steps`): their times, the outputs each reaches, their first stages' nudges,
    what the kept ones found (:class:`StepContext`) and, under a budget, the segments the
    backward pass recomputes; the backward pass walks them.

    Attributes:
        config: the precision settings.
        stepper: the method, the velocity and where it is evaluated.
        controller: where to step (a fixed grid, or adaptive control).
        n_components: the number of state components.
        state_dtypes: the dtype of each tensor of a step's checkpoint (its start's components,
            then those of what else the stepper keeps: see :meth:`Stepper.checkpoint_of`).
        checkpoint_dtypes: the dtype each is kept in: the low dtype where narrower, for a
            complex one that of the pair of its real and imaginary parts (see
            :mod:`~rampde_fx.engine.checkpoints`).
        time_values: the output times (internal time); for an event solve its start and the
            event time (infinite until found).
        stats: what this solve did.
        contexts: what steps found besides their states, by step, where there is something to
            replay: every step's with ``checkpoint='steps'``; under a budget those of the kept
            steps (a re-run step finds the next one's), and every step's buffer values in an
            adaptive solve (its rejected attempts also change them).
        segments: under a budget, the kept steps and the states at hand for the steps after
            each (see :mod:`rampde_fx.engine.schedule`); None where every step is kept.
    """

    config: SolveConfig
    stepper: Stepper
    controller: StepController
    n_components: int
    state_dtypes: tuple[torch.dtype, ...]
    checkpoint_dtypes: tuple[torch.dtype, ...]
    time_values: list[float]
    stats: SolveStats
    grid_values: list[float] = dataclasses.field(default_factory=list)
    outputs_per_step: list[list[int]] = dataclasses.field(default_factory=list)
    start_nudges: list[Nudge | None] = dataclasses.field(default_factory=list)
    contexts: dict[int, StepContext] = dataclasses.field(default_factory=dict)
    segments: list[Segment] | None = None
    # The user's velocity, kept alive while this solve and its backward pass can run: the
    # captured velocity holds it weakly (its cache must not keep modules alive).
    func: Any = None

    def record_steps(self, grid_values: list[float], outputs_per_step: list[list[int]],
                     start_nudges: list[Nudge | None], contexts: dict[int, StepContext],
                     segments: list[Segment] | None) -> None:
        """What the forward loop took: the accepted steps' times, their outputs, their first
        stages' nudges (None: the stepper's default), what they found, and the segments of a
        budget."""
        self.grid_values, self.outputs_per_step = grid_values, outputs_per_step
        self.start_nudges, self.contexts, self.segments = start_nudges, contexts, segments

    def context_of(self, step: int) -> StepContext | None:
        """What forward step ``step`` found, where recorded."""
        return self.contexts.get(step)

    @property
    def steps(self) -> int:
        return len(self.grid_values) - 1

    def start_nudge(self, step: int) -> Nudge | None:
        return self.start_nudges[step]


@dataclasses.dataclass
class PreparedSolve:
    """A validated solve, ready to run: the plan and its tensor inputs.

    Attributes:
        plan: everything host-side (stepper, grid values, output placement, stats).
        state: the components of ``y0``.
        grid: the time grid in internal (increasing) time, differentiable in ``t``; for an
            adaptive method or an event solve only its start, from which the forward solve
            steps.
        times: the output times in internal time; for an event solve, its start and a slot
            that the solve fills with the event time (float64, not differentiable: the state
            at the event is differentiated with the event time held fixed).
        tensors: the tensors the velocity reads that require grad.
        is_tuple: whether ``y0`` was a tuple.
    """

    plan: SolvePlan
    state: tuple[torch.Tensor, ...]
    grid: torch.Tensor
    times: torch.Tensor
    tensors: list[torch.Tensor]
    is_tuple: bool

    def event_time(self) -> torch.Tensor:
        """After an event solve has run: the event time, in the caller's time and ``t``'s
        dtype (a constant, as torchdiffeq's ``odeint`` returns it)."""
        return (self.plan.stepper.time_sign * self.times[1]).to(self.grid.dtype)


def prepare_solve(func: Callable[[torch.Tensor, Any], Any], y0: TensorOrTuple, t: torch.Tensor,
                  config: SolveConfig, *, rtol: Any, atol: Any, method: str | None,
                  options: dict[str, Any] | None, event_fn: Callable[..., Any] | None,
                  executor_for: Callable[[Stepper, torch.device], StepExecutor | str] | None
                  = None,
                  bindings: dict[str, torch.Tensor] | None = None,
                  adjoint_params: Sequence[torch.Tensor] | None = None) -> PreparedSolve:
    """Validate the arguments of :func:`rampde_fx.odeint`, capture the velocity and plan the
    steps; ``executor_for(stepper, device)`` gives the executor that runs the steps (compiled
    kernels), or why there is none (kept in the stats). The solve binds the velocity's tensors
    (see ``GraphVelocity.bound``): those of ``bindings``, by qualified name, and the others as
    its owner holds them now; those that require grad and are not among ``adjoint_params``
    (where given) detached. With ``event_fn``, the solve runs until the event (see
    :mod:`rampde_fx.engine.events`)."""
    name, tableau = _check_method(method)
    if not callable(func):
        raise TypeError(f"func must be callable as func(t, y), got {type(func).__name__}")
    if event_fn is not None and not callable(event_fn):
        raise TypeError(f"event_fn must be callable as event_fn(t, y), got {describe(event_fn)}")
    if adjoint_params is not None:
        bindings = {**_detached_unless_in(func, adjoint_params), **(bindings or {})}
    is_tuple, state = _check_state(y0)
    times = _check_times(t, state[0].device)
    if event_fn is not None and len(times) != 2:
        raise ValueError(f"with event_fn, t must hold two times, as in torchdiffeq: the start and "
                         f"any time in the direction of the solve; got {len(times)}")
    opts = _check_options(name, tableau, options)
    adams = (adams_settings(name, opts, rtol, atol, is_tuple, len(state))
             if name in ADAMS_METHODS else None)
    dtype = config.dtype

    perturb = bool(opts.get("perturb", False))
    start_nudge = Nudge.NEXT if perturb else Nudge.NONE
    with torch.autocast(state[0].device.type, enabled=False):
        start_only = tableau.adaptive or event_fn is not None
        internal, grid, reverse = internal_time(times, opts, func, y0, start_only)
        grid_values = grid.detach().tolist()
        internal_values = internal.detach().tolist()
        if not start_only:
            check_grid(grid_values, internal_values)
        # Made before the capture, which is the costly part: its options are checked first.
        callbacks = find_callbacks(func, name, tableau.adaptive, is_tuple, reverse)
        controller: StepController
        if tableau.adaptive:
            controller = adaptive_controller(tableau, opts, rtol, atol, state, is_tuple, dtype,
                                             reverse, callbacks)
        elif event_fn is None:
            controller = FixedGridController(
                grid_values, place_outputs(grid_values, internal_values), callbacks)
        else:
            controller = SteppingController(_event_step_size(name, opts),
                                            _event_time_dtype(tableau, state),
                                            MAX_FIXED_GRID_EVENT_STEPS)
        if event_fn is not None:  # the outputs: the start, and the event time when found
            controller = EventController(
                controller, combine_event_functions(event_fn, times[0], y0), is_tuple,
                min(per_component("atol", atol, is_tuple, len(state))),
                -1.0 if reverse else 1.0, _event_time_dtype(tableau, state))
            internal_values = [internal_values[0], math.inf]
            internal = torch.tensor([internal_values[0], math.nan], dtype=torch.float64,
                                    device=grid.device)
        # Captured at the solver's first evaluation: a velocity that reads the time's value
        # sees no time the solver would not use.
        first_time = velocity_time(grid[0].detach(), state, start_nudge, -1.0 if reverse else 1.0)
        velocity = capture_velocity(func, first_time, state, is_tuple, dtype, config.policy,
                                    bindings)
    captured = getattr(velocity, "original_graph_module", None)
    stats = SolveStats(method=name, dtype=dtype, scaling=config.dynamic_scaling,
                       velocity=velocity.kind, fallback_reason=velocity.fallback_reason,
                       graph=getattr(velocity, "graph_module", None),
                       captured_code=None if captured is None else captured.code)
    record(stats)
    stepper = (Stepper if adams is None else AdamsStepper)(
        velocity, tableau, start_nudge=start_nudge,
        end_nudge=Nudge.PREV if perturb or tableau.adaptive else Nudge.NONE,
        time_sign=-1.0 if reverse else 1.0,
        interp="dense" if tableau.adaptive else opts.get("interp", "linear"), **(adams or {}))
    if executor_for is not None:
        executor = executor_for(stepper, state[0].device)
        if isinstance(executor, str):
            stats.step_kernels = executor
        else:
            stepper.executor, stats.step_kernels = executor, COMPILED
    plan = SolvePlan(
        config=config,
        func=func,
        stepper=stepper,
        controller=controller,
        n_components=len(state),
        state_dtypes=tuple(c.dtype for c in state) * stepper.checkpoint_width,
        checkpoint_dtypes=tuple(dtype if dtype.itemsize < c.dtype.to_real().itemsize
                                else c.dtype for c in state) * stepper.checkpoint_width,
        time_values=internal_values,
        stats=stats,
    )
    return PreparedSolve(plan, state, grid, internal, velocity.tensors_requiring_grad(), is_tuple)


def _detached_unless_in(func: Any, adjoint_params: Sequence[torch.Tensor]
                        ) -> dict[str, torch.Tensor]:
    """The velocity's tensors that require grad and are not among ``adjoint_params``,
    detached, by qualified name."""
    if isinstance(adjoint_params, torch.Tensor) or not all(
            isinstance(p, torch.Tensor) for p in adjoint_params):
        raise TypeError("adjoint_params must be a sequence of tensors (the parameters that get "
                        f"gradients), got {type(adjoint_params).__name__}")
    chosen = {id(p) for p in adjoint_params}
    return {name: value.detach() for name, slot in lifted_slots(func).items()
            if (value := slot.get()).requires_grad and id(value) not in chosen}


def _event_time_dtype(tableau: ButcherTableau, state: tuple[torch.Tensor, ...]) -> torch.dtype:
    """The dtype of an event solve's step times, as torchdiffeq's: float64 for adaptive methods,
    the state's for fixed steps."""
    if tableau.adaptive:
        return torch.float64
    return time_dtype(state)


def _event_step_size(method: str, opts: dict[str, Any]) -> float:
    if opts.get("step_size") is None:
        raise ValueError(f"an event solve with the fixed-grid method {method!r} needs "
                         "options['step_size'], as in torchdiffeq: its steps go on until the "
                         "event")
    return float(opts["step_size"])


def _check_method(method: str | None) -> tuple[str, ButcherTableau]:
    """The method's name and its tableau (for the Adams methods, that of their first steps)."""
    method = "dopri5" if method is None else method
    known = ", ".join(repr(m) for m in METHODS)
    if method in UNSUPPORTED_METHODS:
        raise NotImplementedError(f"method {method!r} is not supported by rampde_fx; use one of "
                                  f"{known}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; rampde_fx solves with {known}")
    return method, {**ADAPTIVE_TABLEAUS, **FIXED_GRID_TABLEAUS}.get(method,
                                                                   FIXED_GRID_TABLEAUS["rk4"])


def _check_state(y0: Any) -> tuple[bool, tuple[torch.Tensor, ...]]:
    is_tuple = isinstance(y0, tuple)
    state = y0 if is_tuple else (y0,)
    if not state or not all(isinstance(c, torch.Tensor) for c in state):
        raise TypeError(f"y0 must be a tensor or a non-empty tuple of tensors, got "
                        f"{type(y0).__name__}")
    for i, c in enumerate(state):
        name = f"y0[{i}]" if is_tuple else "y0"
        require_data(name, c)
        if not (c.is_floating_point() or c.is_complex()):
            raise ValueError(f"{name} must be a floating point or complex tensor (the high "
                             f"precision of the solve), got {c.dtype}; convert it with .float()")
        if not all_finite([c]):
            raise ValueError(f"{name} contains inf or nan")
        if c.device != state[0].device:
            raise ValueError(f"all components of y0 must be on one device, got {c.device} and "
                             f"{state[0].device}")
    return is_tuple, state


def _check_times(t: Any, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() != 1:
        got = type(t).__name__ if not isinstance(t, torch.Tensor) else f"a {t.dim()}-D tensor"
        raise ValueError(f"t must be a 1-D tensor of output times, got {got}")
    if not t.is_floating_point():
        raise ValueError(f"t must be a floating point tensor, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError("t is empty; give at least the start time t[0]")
    require_data("t", t)
    values = t.detach().tolist()
    if not all(math.isfinite(v) for v in values):
        raise ValueError("t contains inf or nan")
    gaps = [b - a for a, b in zip(values, values[1:])]
    if not (all(g > 0 for g in gaps) or all(g < 0 for g in gaps)):
        raise ValueError("t must be strictly increasing or strictly decreasing")
    if t.device != device:
        warnings.warn(f"t is on {t.device} and y0 on {device}; moving t to {device}", stacklevel=3)
        t = t.to(device)
    return t


def _check_options(method: str, tableau: ButcherTableau,
                   options: dict[str, Any] | None) -> dict[str, Any]:
    """The options, checked here where every method takes them; the adaptive controller
    checks its own (see :func:`~rampde_fx.engine.controllers.adaptive.adaptive_controller`)."""
    if not isinstance(options, (dict, type(None))):
        raise TypeError(f"options must be a dict of option names to values (or None), got "
                        f"{describe(options)}; pass a dict, e.g. options={{'step_size': 0.1}}")
    opts = dict(options or {})
    kind, allowed = ("adaptive", ADAPTIVE_OPTIONS) if tableau.adaptive else \
        ("Adams", FIXED_GRID_OPTIONS + ADAMS_OPTIONS) if method in ADAMS_METHODS else \
        ("fixed-grid", FIXED_GRID_OPTIONS)
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(f"method {method!r} does not take options {unknown}; {kind} "
                         f"methods take {list(allowed)}")
    if opts.get("step_size") is not None and opts.get("grid_constructor") is not None:
        raise ValueError("options step_size and grid_constructor are mutually exclusive")
    if opts.get("step_size") is not None:
        real_number("options['step_size']", opts["step_size"], sign="positive")
    constructor = opts.get("grid_constructor")
    if constructor is not None and not callable(constructor):
        raise TypeError(f"options['grid_constructor'] must be callable as grid_constructor(func, "
                        f"y0, t), got {describe(constructor)}")
    if opts.get("interp", "linear") not in ("linear", "cubic"):
        raise ValueError(f"options['interp'] must be 'linear' or 'cubic', got {opts['interp']!r}")
    return opts
