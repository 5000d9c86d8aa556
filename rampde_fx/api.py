"""``rampde_fx.odeint`` and ``rampde_fx.odeint_event``: torchdiffeq's ``odeint`` and
``odeint_event`` with a low-precision velocity.

The entry point of a solve: an intercepted call goes to the converted model that routes it;
under ``torch.compile`` a solve is the compiled path's opaque op (a velocity or event function
made inside the compiled code runs between graphs); otherwise the engine plans it and runs it
under the discrete adjoint's autograd function (or without checkpoints, where nothing wants
gradients).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from . import runtime
from .adjoint.event_time import through_event_time
from .adjoint.function import MixedPrecisionSolve
from .compiled.kernels import step_kernels
from .compiled.op import NOT_IN_GRAPH, run_between_graphs, solve_in_graph
from .config import Budget, SolveConfig, resolve_config
from .engine.integrate import integrate
from .engine.plan import TensorOrTuple, prepare_solve
from .policy import PrecisionPolicy


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
    checkpoint: str | Budget = "steps",
    compile_steps: bool = False,
    event_fn: Callable[..., Any] | None = None,
    config: SolveConfig | None = None,
    adjoint_params: Sequence[torch.Tensor] | None = None,
) -> TensorOrTuple | tuple[torch.Tensor, TensorOrTuple]:
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
        method: an adaptive method, 'dopri5' (the default, as in torchdiffeq), 'tsit5'
            (Tsitouras 5(4)), 'bosh3', 'fehlberg2', 'adaptive_heun' or 'dopri8'; or a
            fixed-grid method, 'euler', 'midpoint', 'heun2', 'heun3', 'ralston', 'rk4'
            (torchdiffeq's 3/8 rule) or 'rk4_classic'; or a fixed-grid Adams method,
            'explicit_adams' or 'implicit_adams' (also named 'fixed_adams'), whose corrector
            stops where two iterates agree to ``rtol``/``atol``.
        options: a dict, as in torchdiffeq; its numbers are Python numbers or one-element
            tensors. Fixed grids: 'step_size' (or 'grid_constructor(func, y0, t) -> grid'),
            'interp' ('linear' or 'cubic') and 'perturb'; without a step size the grid is
            ``t``. Adams methods also take 'max_order' (2 to 12, default 12) and 'max_iters'
            (corrector evaluations per step, default 4). Adaptive methods: 'first_step',
            'safety', 'ifactor', 'dfactor', 'max_num_steps', 'step_t', 'jump_t', 'min_step',
            'max_step', 'norm' (and 'dtype', which has no effect: their times are float64 on
            the host).
        dtype: the velocity's precision: torch.bfloat16 (default), torch.float16, or
            torch.float32 / torch.float64 for no low precision at all.
        scaling: adjoint scaling: 'auto' (dynamic for float16, none otherwise), 'dynamic' or
            'none'.
        policy: which ops run in ``dtype`` and which in float32; default
            :data:`rampde_fx.DEFAULT_POLICY`.
        checkpoint: what the backward pass starts from. 'steps' (default): the state of each
            step, in ``dtype``; the backward pass recomputes each step. 'stages': autograd
            keeps every stage's activations, which the low-precision velocity produces in
            ``dtype``; no recomputation (less compute, more memory, and no per-step adjoint
            scaling, so it refuses ``scaling`` that would be dynamic).
            ``rampde_fx.Budget(n)``: at most ``n`` states (in ``y0``'s dtype) whatever the
            number of steps; the backward pass recomputes the others from them by binomial
            checkpointing (Griewank's revolve: on a fixed grid of ``l`` steps, the fewest
            recomputed steps any schedule of ``n`` states achieves; an adaptive solve keeps
            evenly spaced accepted steps), and its gradients equal those of 'steps'.
        compile_steps: run each step and each step of the backward pass as a compiled kernel
            (inductor, compiled on the first call per shape and cached on disk) instead of
            op by op: the fast path for small models, whose steps cost more in Python calls
            than in arithmetic. A solve under ``torch.compile`` does so anyway. See
            :class:`rampde_fx.SolveConfig`.
        event_fn: ``event_fn(t, y) -> Tensor``: solve until it changes sign, as torchdiffeq
            does (see Returns). ``t`` must then hold two times: the start, and any time in the
            direction of the solve. The event function runs as written, in float32 on the
            solution (all its outputs start positive once multiplied by their signs at the
            start; the first to change sign is the event). After each accepted step it is
            evaluated at the step's end; the event time is found by bisection on the step's
            interpolant to ``atol``, as torchdiffeq does. Fixed-grid methods need
            ``options['step_size']`` (at most 20000 steps).
        config: a :class:`rampde_fx.SolveConfig` in place of ``dtype``, ``scaling``,
            ``policy``, ``checkpoint`` and ``compile_steps`` (which then must keep their
            defaults).
        adjoint_params: as in torchdiffeq's ``odeint_adjoint``: the only tensors read by the
            velocity that get gradients (None: all of them). ``y0`` and ``t`` get theirs
            either way.

    Adaptive methods run torchdiffeq's step-size controller in the state's precision, on a
    low-precision velocity; their backward pass differentiates the accepted steps, whose sizes
    are constants of the forward solve (see :mod:`rampde_fx.engine.controllers`).

    Under ``torch.compile`` a solve is one opaque operator, so a model compiles as one graph
    whatever the number of steps, and each step runs as inductor-compiled kernels.

    Returns:
        The solution at ``t``, shape ``(len(t), *y0.shape)`` in ``y0``'s dtype (a tuple of such
        for a tuple ``y0``). With ``event_fn``, as torchdiffeq's ``odeint``: ``(event_t,
        solution)``, the event time (0-dim, ``t``'s dtype, a constant for autograd) and the
        solution at ``t[0]`` and ``event_t``; its gradients hold the event time fixed, so that
        :func:`rampde_fx.odeint_event` (or ``torchdiffeq.odeint_event`` with
        ``odeint_interface=rampde_fx.odeint``) adds the gradient through the event time.

    Inside the forward of a module made by :func:`rampde_fx.convert`, the solve is that
    conversion's: its ``dtype``, ``scaling``, ``policy``, ``checkpoint`` and
    ``compile_steps`` replace these.

    Solve statistics are available through :func:`rampde_fx.collect_stats`.

    The backward pass is a custom autograd function: ``torch.autograd.grad`` and
    ``backward()`` work, with ``create_graph=True`` too (second derivatives, by a replay of
    the solve under autograd); ``torch.func`` transforms (grad, vjp, jacrev, jacfwd, vmap) are
    refused with an error that says what to use instead.
    """
    refuse_functorch_transforms()
    handler = runtime.active_handler()
    if handler is not None:
        given = {name: value for name, value in (
            ("rtol", rtol), ("atol", atol), ("method", method), ("options", options),
            ("dtype", dtype), ("scaling", scaling), ("policy", policy),
            ("checkpoint", checkpoint), ("compile_steps", compile_steps),
            ("event_fn", event_fn), ("config", config),
            ("adjoint_params", adjoint_params))
            if value is not _DEFAULTS[name]}  # what the call passed, for explain
        return handler._rampde_intercept("rampde_fx.odeint", (func, y0, t), given)
    settings = {"dtype": dtype, "scaling": scaling, "policy": policy, "checkpoint": checkpoint,
                "compile_steps": compile_steps}
    if torch.compiler.is_compiling():  # the config is made where the solve is registered
        arguments = dict(rtol=rtol, atol=atol, method=method, options=options, config=config,
                         adjoint_params=adjoint_params, **settings)
        solution = solve_in_graph(func, y0, t, config, settings, rtol=rtol, atol=atol,
                                  method=method, options=options, adjoint_params=adjoint_params,
                                  event_fn=event_fn)
        if solution is NOT_IN_GRAPH:
            return run_between_graphs(odeint, func, y0, t, event_fn=event_fn, **arguments)
        return solution
    config = resolve_config(config, None, **settings)
    prepared = prepare_solve(func, y0, t, config, rtol=rtol, atol=atol, method=method,
                             options=options, event_fn=event_fn, adjoint_params=adjoint_params,
                             executor_for=step_kernels(config.dtype, config.keeps_stages)
                             if config.compile_steps else None)
    inputs = (*prepared.state, prepared.grid, prepared.times, *prepared.tensors)
    if torch.is_grad_enabled() and any(x.requires_grad for x in inputs):
        if config.keeps_stages:  # autograd through the steps, keeping their activations
            with torch.autocast(prepared.state[0].device.type, enabled=False):
                solution, _, _ = integrate(prepared.plan, prepared.state, prepared.grid,
                                           prepared.times, keep_checkpoints=False)
        else:
            solution = MixedPrecisionSolve.apply(prepared.plan, *inputs)
    else:  # inference: no checkpoints
        with torch.no_grad(), torch.autocast(prepared.state[0].device.type, enabled=False):
            solution, _, _ = integrate(prepared.plan, prepared.state, prepared.grid,
                                       prepared.times, keep_checkpoints=False)
    solution = tuple(solution) if prepared.is_tuple else solution[0]
    return solution if event_fn is None else (prepared.event_time(), solution)


def odeint_event(
    func: Callable[[torch.Tensor, Any], Any],
    y0: TensorOrTuple,
    t0: torch.Tensor,
    *,
    event_fn: Callable[..., Any],
    reverse_time: bool = False,
    odeint_interface: Callable[..., Any] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, TensorOrTuple]:
    """torchdiffeq's ``odeint_event`` with a low-precision velocity: solve from ``(t0, y0)``
    until ``event_fn(t, y)`` changes sign.

    Args:
        func, y0: as in :func:`odeint`.
        t0: the start time, a tensor.
        event_fn: ``event_fn(t, y) -> Tensor`` (see :func:`odeint`).
        reverse_time: solve backwards in time.
        odeint_interface: as in torchdiffeq: ``torchdiffeq.odeint``, ``odeint_adjoint`` or
            :func:`odeint` (each solves with :func:`odeint`, the discrete adjoint); None for
            :func:`odeint`.
        kwargs: the keywords of :func:`odeint` (``rtol``, ``atol``, ``method``, ``options``,
            ``dtype``, ``config``, ``adjoint_params``, ...).

    Returns:
        ``(event_t, solution)``: the event time (``t0``'s dtype) and the solution at ``t0`` and
        ``event_t``. Their gradients go through the event time by the implicit function
        theorem, as torchdiffeq defines them (see :mod:`rampde_fx.adjoint.event_time`): for
        ``y0``, ``t0``, the velocity's parameters, and also for the event function's own
        tensors (torchdiffeq gives those none).

    Under ``torch.compile`` the solve is one op of the graph, as :func:`odeint`'s, where the
    velocity and the event function are modules or their methods; one made inside the compiled
    code (a lambda, a closure) runs eagerly between two compiled graphs (a graph break; under
    ``fullgraph=True`` dynamo's error says so).
    """
    return solve_to_event(lambda t: odeint(func, y0, t, event_fn=event_fn, **kwargs), func, y0,
                          t0, event_fn, reverse_time, odeint_interface)


def solve_to_event(solve: Callable[[torch.Tensor], tuple[torch.Tensor, Any]],
                   func: Callable[[torch.Tensor, Any], Any], y0: TensorOrTuple,
                   t0: torch.Tensor, event_fn: Callable[..., Any], reverse_time: bool,
                   odeint_interface: Callable[..., Any] | None
                   ) -> tuple[torch.Tensor, TensorOrTuple]:
    """:func:`odeint_event` by ``solve(t)``, an event solve over ``t = [t0, t0 +- 1]`` (as
    :func:`odeint` with ``event_fn``), with the gradients through the event time."""
    if not solves_like_odeint(odeint_interface):
        raise ValueError(f"odeint_interface must be torchdiffeq.odeint, odeint_adjoint or "
                         f"rampde_fx.odeint, got {odeint_interface!r}")
    if not isinstance(t0, torch.Tensor):
        raise TypeError(f"t0 must be a tensor (as in torchdiffeq), got {type(t0).__name__}")
    start = t0.reshape(-1)
    t = torch.cat([start, start.detach() + (-1.0 if reverse_time else 1.0)])
    event_t, solution = solve(t)
    return through_event_time(func, event_fn, y0, t[0], event_t, solution)


def solves_like_odeint(interface: Any) -> bool:
    """Whether ``odeint_interface`` of an ``odeint_event`` call is one that :func:`odeint`
    stands for: None, :func:`odeint`, ``torchdiffeq.odeint`` or ``torchdiffeq.odeint_adjoint``."""
    if interface is None or interface is odeint:
        return True
    try:
        import torchdiffeq
    except ImportError:
        return False
    return interface is torchdiffeq.odeint or interface is torchdiffeq.odeint_adjoint


_DEFAULTS: dict[str, Any] = odeint.__kwdefaults__

# What to use instead of each torch.func transform.
_INSTEAD = {
    "Grad": ("torch.func.grad, vjp, jacrev or hessian",
             "torch.autograd.grad on the loss (with torch.func.functional_call for given "
             "parameters), or torch.autograd.functional.vjp, jacobian or hessian"),
    "Jvp": ("torch.func.jvp or jacfwd",
            "torch.autograd.functional.jvp or jacobian (reverse mode; create_graph=True works)"),
    "Vmap": ("torch.func.vmap",
             "one solve of the batch stacked along a leading dimension of y0, or a loop"),
    "Functionalize": ("torch.func.functionalize", "the model as it is, or torch.compile"),
}


def refuse_functorch_transforms() -> None:
    """Raise where a ``torch.func`` transform is active: the solve's discrete adjoint is an
    autograd function that reads host values (step sizes, the grid) and captures graphs, which
    functorch's transforms cannot carry. Raised before anything is captured or cached, so a
    refused call leaves no trace."""
    if torch.compiler.is_compiling():  # dynamo handles torch.func transforms itself
        return
    interpreter = torch._C._functorch.peek_interpreter_stack()
    if interpreter is None:
        return
    transform, instead = _INSTEAD.get(interpreter.key().name, (str(interpreter.key()), ""))
    raise NotImplementedError(
        f"rampde_fx: a mixed-precision solve cannot run under {transform}. Use {instead}"
        f"{' instead' if instead else ''}; or leave this solve in float32 "
        "(rampde_fx.convert(..., filter_fn=...)).")
