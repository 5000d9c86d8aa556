"""The forward solve with low-precision checkpoints, and its discrete adjoint.

Forward: march the grid in the high precision and keep the state of every step start, cast to
the low dtype (``steps x |y0| x 2`` bytes for bf16/fp16): no stage activations are saved.

Backward ("discretize, then optimize"): walk the steps backwards; for step ``n`` rebuild the
state from its checkpoint, recompute the step (and the outputs interpolated inside it) under
autograd, and take one vector-Jacobian product of that step map with the current adjoint and
the outputs' cotangents. The adjoint, the parameter gradients and the time gradients are
accumulated in float32 (the state's dtype). With a float32 velocity the checkpoints are exact
and so is the gradient of the discrete solve.

Adaptive solves decide their steps in the forward pass (``adaptive``); the backward pass walks
the accepted steps like a grid, with the step times as constants offset from the first time.

For float16 each product runs on a cotangent scaled by a power of two (see ``scaling``); an
overflow retries the first step at once and any later one by re-running the sweep with a lower
target, so the number of host synchronisations per backward pass does not grow with the steps.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Sequence

import torch

from .adaptive import Controller, solve_adaptive
from .callbacks import StepCallbacks
from .scaling import RETRY_STEP_LOG2, AdjointScaler
from .solver import (Nudge, RngState, State, Stepper, all_finite, replayed_rng, rng_state,
                     vector_jacobian_product)
from .stats import SolveStats

MAX_SWEEP_RETRIES = 4
MAX_FIRST_STEP_RETRIES = 8


@dataclasses.dataclass
class SolvePlan:
    """The host-side description of one solve (everything that is not a tensor input).

    For an adaptive solve (``controller`` set) the forward pass fills in the grid, the outputs
    per step and the first-stage nudges of the steps it accepted.
    """

    stepper: Stepper
    n_components: int
    checkpoint_dtypes: tuple[torch.dtype, ...]
    grid_values: list[float]
    time_values: list[float]
    outputs_per_step: list[list[int]]
    scaling: bool
    stats: SolveStats
    controller: Controller | None = None
    callbacks: StepCallbacks = dataclasses.field(default_factory=StepCallbacks)
    start_nudges: list[Nudge] | None = None
    rng_states: list[RngState] | None = None
    # The user's velocity, kept alive while this solve and its backward pass can run: the
    # captured velocity holds it weakly (its cache must not keep modules alive).
    func: Any = None

    def rng_state_of(self, step: int) -> RngState | None:
        """What the generators were at the start of forward step ``step``, if the velocity
        draws random numbers and the grid is fixed (adaptive steps are not replayed)."""
        return None if self.rng_states is None else self.rng_states[step]

    @property
    def steps(self) -> int:
        return len(self.grid_values) - 1

    def outputs_of(self, step: int, times: torch.Tensor) -> list[tuple[torch.Tensor, float]]:
        return [(times[j], self.time_values[j]) for j in self.outputs_per_step[step]]

    def start_nudge(self, step: int) -> Nudge | None:
        return None if self.start_nudges is None else self.start_nudges[step]


def solve_forward(plan: SolvePlan, y0: State, grid: torch.Tensor, times: torch.Tensor,
                  keep_checkpoints: bool
                  ) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor], torch.Tensor]:
    """March the grid, or the adaptive steps from ``grid[0]``; returns the solution at every
    output time, the step checkpoints and the grid of the steps taken."""
    n_times = len(plan.time_values)
    solution = tuple(torch.empty((n_times, *c.shape), dtype=c.dtype, device=c.device) for c in y0)
    for out, c in zip(solution, y0):
        out[0] = c
    if plan.controller is not None:
        if keep_checkpoints and plan.stepper.velocity.draws_random \
                and plan.stepper.velocity.fallback_reason is None:
            warnings.warn("rampde_fx: the velocity draws random numbers (dropout?) and the "
                          f"method {plan.stats.method!r} is adaptive: its backward pass "
                          "recomputes the steps with new draws, so gradients do not match the "
                          "forward's; use a fixed-grid method, or eval() mode.", RuntimeWarning,
                          stacklevel=4)
        checkpoints = solve_adaptive(plan, y0, grid[0], times, solution, keep_checkpoints)
        grid = grid[0].to(torch.float64) + torch.tensor(
            plan.grid_values, dtype=torch.float64, device=grid.device).sub_(plan.grid_values[0])
        plan.stats.steps = plan.steps
        plan.stats.nfe_forward = plan.stepper.evaluations
        return solution, checkpoints, grid
    checkpoints = [torch.empty((plan.steps, *c.shape), dtype=d, device=c.device)
                   for c, d in zip(y0, plan.checkpoint_dtypes)] if keep_checkpoints else []
    random = keep_checkpoints and plan.stepper.velocity.draws_random
    plan.rng_states = [] if random else None
    y = y0
    for n in range(plan.steps):
        for store, c in zip(checkpoints, y):
            store[n] = c
        if random:
            plan.rng_states.append(rng_state(grid.device))
        if plan.callbacks:
            plan.callbacks("callback_step", grid[n], y, grid[n + 1] - grid[n])
        y, outputs = plan.stepper.advance(grid[n], grid[n + 1], y, plan.outputs_of(n, times),
                                          plan.grid_values[n], plan.grid_values[n + 1])
        for j, value in zip(plan.outputs_per_step[n], outputs):
            for out, c in zip(solution, value):
                out[j] = c
    plan.stats.steps = plan.steps
    plan.stats.nfe_forward = plan.stepper.evaluations
    return solution, checkpoints, grid


class MixedPrecisionSolve(torch.autograd.Function):
    """``(plan, *y0, grid, times, *velocity_tensors) -> solution components``."""

    @staticmethod
    def forward(ctx: Any, plan: SolvePlan, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y0 = inputs[:plan.n_components]
        grid, times = inputs[plan.n_components:plan.n_components + 2]
        with torch.autocast(grid.device.type, enabled=False):
            solution, checkpoints, steps = solve_forward(plan, y0, grid, times,
                                                         keep_checkpoints=True)
        ctx.plan = plan
        ctx.save_for_backward(steps, times, *checkpoints)
        ctx.velocity_tensors = inputs[plan.n_components + 2:]
        ctx.state_dtypes = tuple(c.dtype for c in y0)
        return solution

    @staticmethod
    def backward(ctx: Any, *solution_grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        plan: SolvePlan = ctx.plan
        steps, times, *checkpoints = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        n = plan.n_components
        wants = _Wants(state=any(needs[:n]), grid=needs[n], times=needs[n + 1],
                       tensors=[i for i, need in enumerate(needs[n + 2:]) if need])
        with torch.autocast(steps.device.type, enabled=False):
            grads = _backward_with_retries(plan, ctx.state_dtypes, steps, times, checkpoints,
                                           ctx.velocity_tensors, solution_grads, wants)
        return (None, *grads)


@dataclasses.dataclass
class _Wants:
    state: bool
    grid: bool
    times: bool
    tensors: list[int]


def _backward_with_retries(plan: SolvePlan, state_dtypes, grid, times, checkpoints,
                           velocity_tensors, solution_grads, wants: _Wants):
    target = None
    for sweep in range(MAX_SWEEP_RETRIES + 1):
        scaler = AdjointScaler(grid.device) if plan.scaling else None
        if scaler is not None and target is not None:
            scaler.target_log2 = target
        grads = _sweep(plan, state_dtypes, grid, times, checkpoints, velocity_tensors,
                       solution_grads, wants, scaler)
        plan.stats.backward_sweeps += 1
        if scaler is None:
            return grads
        plan.stats.scale_log2 = torch.stack(scaler.exponents[::-1]) if scaler.exponents else None
        if not bool(scaler.overflow):  # one host synchronisation per sweep
            return grads
        if not all_finite(solution_grads):
            return grads  # the incoming cotangent itself is not finite: nothing to rescale
        target = scaler.target_log2 - RETRY_STEP_LOG2  # growth exceeded the headroom
        plan.stats.scale_retries += 1
    warnings.warn(f"rampde_fx: the {plan.stats.dtype} adjoint overflowed in every one of "
                  f"{MAX_SWEEP_RETRIES + 1} sweeps with lowered scales; returning non-finite "
                  "gradients (torch.amp.GradScaler skips such steps). Consider dtype=torch.bfloat16.",
                  RuntimeWarning, stacklevel=3)
    return grads


def _sweep(plan: SolvePlan, state_dtypes: Sequence[torch.dtype], grid: torch.Tensor,
           times: torch.Tensor, checkpoints: list[torch.Tensor],
           velocity_tensors: Sequence[torch.Tensor], solution_grads: Sequence[torch.Tensor],
           wants: _Wants, scaler: AdjointScaler | None) -> list[torch.Tensor | None]:
    """One backward pass over all steps; returns the gradients of the Function's inputs.

    A step runs as one compiled backward kernel where the stepper has kernels, every wanted
    tensor is one the kernel reads as an input, and the step's outputs (if any) are at its end
    (their cotangents then add to the adjoint); otherwise it is recomputed under autograd."""
    n = plan.n_components
    stepper = plan.stepper
    adjoint = [torch.zeros(g.shape[1:], dtype=d, device=g.device)
               for g, d in zip(solution_grads, state_dtypes)]
    # float32 (the tensors' own dtype) accumulators, added to in place by every step
    tensor_grads = {i: torch.zeros_like(velocity_tensors[i]) for i in wants.tensors}
    grid_grad = torch.zeros_like(grid) if wants.grid else None
    times_grad = torch.zeros_like(times) if wants.times else None
    wanted_tensors = [velocity_tensors[i] for i in wants.tensors]
    kernel_tensors = _kernel_positions(stepper, velocity_tensors, wants.tensors)
    evaluations_before = stepper.evaluations

    for step in reversed(range(plan.steps)):
        indices = plan.outputs_per_step[step]
        fused = kernel_tensors is not None and all(
            plan.time_values[j] == plan.grid_values[step + 1] for j in indices) and not (
            indices and wants.times)
        if fused:  # outputs at the step's end are its new state
            cotangents = list(adjoint)
            for j in indices:
                cotangents = [a + g[j] for a, g in zip(cotangents, solution_grads)]
        else:
            cotangents = list(adjoint) + [solution_grads[c][j] for j in indices for c in range(n)]
        for attempt in range(MAX_FIRST_STEP_RETRIES + 1):
            scale = scaler.scale_for(cotangents) if scaler is not None else None
            if fused:
                results, largest = _kernel_step(plan, step, grid, state_dtypes, checkpoints,
                                                cotangents, scale, kernel_tensors, wants,
                                                None if scaler else list(tensor_grads.values()))
            else:
                results, largest = _recomputed_step(plan, step, grid, times, state_dtypes,
                                                    checkpoints, cotangents, scale,
                                                    wanted_tensors, wants)
            if scaler is None:
                break
            overflowed = scaler.observe(largest)
            # The first step has no observed gain yet: check it at once (a bounded number of
            # synchronisations per sweep); later overflows are caught at the sweep's end.
            if step != plan.steps - 1 or attempt == MAX_FIRST_STEP_RETRIES or not bool(overflowed):
                break
            scaler.assume_more_gain()
            plan.stats.scale_retries += 1
        adjoint = [a.detach() for a in results[:n]]
        rest = results[n:]
        for i, r in zip(wants.tensors, rest[:len(wants.tensors)]):
            if r is not None:
                tensor_grads[i].add_(r)
        rest = rest[len(wants.tensors):]
        if wants.grid:
            for index, r in zip((step, step + 1), rest[:2]):
                if r is not None:
                    grid_grad[index] += r
            rest = rest[2:]
        if wants.times:
            for j, r in zip(indices, rest):
                if r is not None:
                    times_grad[j] += r

    plan.stats.nfe_backward += stepper.evaluations - evaluations_before
    if grid_grad is not None and plan.controller is not None:
        # Every adaptive step time is the first time plus a constant.
        grid_grad = grid_grad.sum(0, keepdim=True).to(times.dtype)
    state_grads = [(a + g[0]) if wants.state else None for a, g in zip(adjoint, solution_grads)]
    return [*state_grads, grid_grad, times_grad,
            *[tensor_grads.get(i) for i in range(len(velocity_tensors))]]


def _kernel_positions(stepper: Stepper, velocity_tensors: Sequence[torch.Tensor],
                      wanted: list[int]) -> list[int] | None:
    """For each wanted velocity tensor, its position among the tensors the stepper's kernels
    take; None if there are no kernels or a wanted tensor is not among them."""
    if stepper.kernels is None:
        return None
    lifted = stepper.kernels.lifted()
    positions = [next((k for k, x in enumerate(lifted) if x is velocity_tensors[i]), None)
                 for i in wanted]
    return None if None in positions else positions


def _kernel_step(plan: SolvePlan, step: int, grid: torch.Tensor,
                 state_dtypes: Sequence[torch.dtype], checkpoints: list[torch.Tensor],
                 cotangents: list[torch.Tensor], scale: torch.Tensor | None,
                 positions: list[int], wants: _Wants,
                 accumulators: list[torch.Tensor] | None
                 ) -> tuple[list[torch.Tensor | None], list[torch.Tensor]]:
    """A step by the stepper's backward kernel; the results are unscaled, and the tensors'
    gradients are None where the kernel added them to ``accumulators``."""
    adjoint, grads, extra = plan.stepper.kernels.backward_step(
        grid[step], grid[step + 1], [store[step] for store in checkpoints], state_dtypes,
        cotangents, scale, plan.start_nudge(step), positions, accumulators, wants.grid)
    plan.stepper.evaluations += plan.stepper.tableau.stages
    largest = extra[-1:] if scale is not None else []
    return [*adjoint, *(grads or [None] * len(positions)),
            *(extra[:2] if wants.grid else [])], largest


def _recomputed_step(plan: SolvePlan, step: int, grid: torch.Tensor, times: torch.Tensor,
                     state_dtypes: Sequence[torch.dtype], checkpoints: list[torch.Tensor],
                     cotangents: list[torch.Tensor], scale: torch.Tensor | None,
                     wanted_tensors: list[torch.Tensor], wants: _Wants
                     ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """A step recomputed under autograd and its vector-Jacobian product; returns the unscaled
    results and the scaled ones (to watch for overflow)."""
    stepper = plan.stepper
    indices = plan.outputs_per_step[step]
    with torch.enable_grad(), stepper.velocity.recomputing(), \
            replayed_rng(plan.rng_state_of(step), grid.device):
        y_start = tuple(store[step].to(d).detach().requires_grad_()
                        for store, d in zip(checkpoints, state_dtypes))
        t0 = grid[step].detach().requires_grad_(wants.grid)
        t1 = grid[step + 1].detach().requires_grad_(wants.grid)
        output_times = [(times[j].detach().requires_grad_(wants.times), plan.time_values[j])
                        for j in indices]
        y_end, outputs = stepper.advance(t0, t1, y_start, output_times, plan.grid_values[step],
                                         plan.grid_values[step + 1], plan.start_nudge(step))
        produced = list(y_end) + [c for value in outputs for c in value]
        inputs = [*y_start, *wanted_tensors]
        inputs += [t0, t1] if wants.grid else []
        inputs += [t for t, _ in output_times] if wants.times else []
        scaled = vector_jacobian_product(produced, inputs, cotangents, scale)
    results = scaled if scale is None else [None if r is None else r / scale for r in scaled]
    n = plan.n_components
    results[:n] = [torch.zeros_like(y) if r is None else r for r, y in zip(results[:n], y_start)]
    return results, scaled
