"""The backward sweep of the discrete adjoint ("discretize, then optimize").

Walk the accepted steps backwards; for step ``n`` take its start, in the low dtype, from the
checkpoints (``engine.checkpoints.step_starts``: its own checkpoint, or under a budget the
state re-run from the nearest kept one), recompute the step (and the outputs interpolated
inside it) under autograd, or by the stepper's executor (a compiled backward kernel, given the
cotangents that the outputs inside the step give its ends and stages), and take one
vector-Jacobian product of that step map with the current adjoint and the outputs'
cotangents. The adjoint, the parameter
gradients and the time gradients are accumulated in float32 (the state's dtype). With a float32
velocity the checkpoints are exact and so is the gradient of the discrete solve.

Adaptive solves (and event solves) decided their steps in the forward pass; the sweep walks
them like a grid, with the step times as constants offset from the first time. An event solve's
event time is an output time like any other, held fixed.

For float16 each product runs on a cotangent scaled by a power of two (see ``scaling``); an
overflow retries the first step at once and any later one by re-running the sweep with a lower
target, so the number of host synchronisations per backward pass does not grow with the steps.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

import torch

from ..engine.checkpoints import StepStart, replaying, step_starts
from ..engine.plan import SolvePlan
from ..engine.step import Stepper, all_finite
from .scaling import RETRY_STEP_LOG2, AdjointScaler
from .vjp import vector_jacobian_product

MAX_SWEEP_RETRIES = 4
MAX_FIRST_STEP_RETRIES = 8


@dataclasses.dataclass
class Wants:
    """Which inputs of a solve want gradients: the initial state, the grid, the output times,
    and the positions of the velocity's tensors."""

    state: bool
    grid: bool
    times: bool
    tensors: list[int]


def backward_with_retries(plan: SolvePlan, grid: torch.Tensor, times: torch.Tensor,
                          checkpoints: list[torch.Tensor],
                          velocity_tensors: Sequence[torch.Tensor],
                          solution_grads: Sequence[torch.Tensor],
                          wants: Wants) -> list[torch.Tensor | None]:
    """The gradients of a solve's inputs (see :func:`_sweep`), by backward sweeps re-run with
    a lower scale target after an overflow (at most ``MAX_SWEEP_RETRIES`` times)."""
    target = None
    for sweep in range(MAX_SWEEP_RETRIES + 1):
        scaler = AdjointScaler(grid.device) if plan.config.dynamic_scaling else None
        if scaler is not None and target is not None:
            scaler.target_log2 = target
        grads = _sweep(plan, grid, times, checkpoints, velocity_tensors, solution_grads, wants,
                       scaler)
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
                  f"{MAX_SWEEP_RETRIES + 1} sweeps with lowered scales (did the forward solve "
                  "overflow?); every gradient of this solve is nan (torch.amp.GradScaler "
                  "skips such steps). Consider dtype=torch.bfloat16.",
                  RuntimeWarning, stacklevel=3)
    # Some products may have stayed finite on overflowed steps: none of them is right.
    return [None if g is None else torch.full_like(g, float("nan")) for g in grads]


def _sweep(plan: SolvePlan, grid: torch.Tensor, times: torch.Tensor,
           checkpoints: list[torch.Tensor],
           velocity_tensors: Sequence[torch.Tensor], solution_grads: Sequence[torch.Tensor],
           wants: Wants, scaler: AdjointScaler | None) -> list[torch.Tensor | None]:
    """One backward pass over all steps; returns the gradients of the Function's inputs.

    A step runs as one backward kernel where the stepper has an executor and every wanted
    tensor is one the kernel reads as an input: the cotangents of outputs at the step's end add
    to the adjoint, and those of outputs inside it reach the kernel through the interpolation's
    (linear) vector-Jacobian product (see :func:`_interpolation_cotangents`), where it does not
    evaluate the velocity and the times want no gradient; otherwise the step is recomputed
    under autograd."""
    n = plan.n_components
    stepper = plan.stepper
    adjoint = [torch.zeros(g.shape[1:], dtype=d, device=g.device)
               for g, d in zip(solution_grads, plan.state_dtypes)]
    # float32 (the tensors' own dtype) accumulators, added to in place by every step
    tensor_grads = {i: torch.zeros_like(velocity_tensors[i]) for i in wants.tensors}
    grid_grad = torch.zeros_like(grid) if wants.grid else None
    times_grad = torch.zeros_like(times) if wants.times else None
    wanted_tensors = [velocity_tensors[i] for i in wants.tensors]
    kernel_tensors = _executor_positions(stepper, velocity_tensors, wants.tensors)
    evaluations_before = stepper.evaluations
    # A multistep method's steps read earlier steps' derivatives: the cotangent of each
    # step's derivative f_n, gathered from the later steps that read it (see engine.adams).
    derivative_cotangents: dict[int, tuple[torch.Tensor, ...]] = {}
    carried = n * (stepper.checkpoint_width - 1)

    for step, start in step_starts(plan, checkpoints, grid, times):
        indices = plan.outputs_per_step[step]
        inside = [j for j in indices if plan.time_values[j] != plan.grid_values[step + 1]]
        fused = kernel_tensors is not None and not (indices and wants.times) and not (
            inside and (wants.grid or not stepper.interpolation_is_linear))
        # Only a step with outputs inside it gives the kernel its stages' cotangents: where
        # they are zero, a first-same-as-last step need not recompute its last stage.
        start_cotangent = stage_cotangents = None
        if fused:  # outputs at the step's end are its new state
            cotangents = list(adjoint)
            for j in indices:
                if j not in inside:
                    cotangents = [a + g[j] for a, g in zip(cotangents, solution_grads)]
            if inside:
                start_cotangent, end_cotangent, stage_cotangents = _interpolation_cotangents(
                    plan, step, grid, times, inside, solution_grads)
                cotangents = [a + g for a, g in zip(cotangents, end_cotangent)]
        else:
            cotangents = list(adjoint) + [solution_grads[c][j] for j in indices for c in range(n)]
        if stepper.multistep:
            cotangents += derivative_cotangents.pop(step, None) or [
                torch.zeros_like(a) for a in adjoint]
        for attempt in range(MAX_FIRST_STEP_RETRIES + 1):
            scale = scaler.scale_for(cotangents) if scaler is not None else None
            if fused:
                results, largest = _kernel_step(plan, step, grid, start, cotangents,
                                                stage_cotangents, scale, kernel_tensors, wants,
                                                None if scaler else list(tensor_grads.values()))
            else:
                results, largest = _recomputed_step(plan, step, grid, times, start, cotangents,
                                                    scale, wanted_tensors, wants)
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
        if start_cotangent is not None:
            adjoint = [a + g for a, g in zip(adjoint, start_cotangent)]
        if carried:
            sums_grads = [torch.zeros_like(c) if g is None else g
                          for g, c in zip(results[-carried:], start.state[n:])]
            results = results[:-carried]
            for earlier, cotangent in stepper.carried_cotangents(step, sums_grads):
                found = derivative_cotangents.get(earlier)
                derivative_cotangents[earlier] = cotangent if found is None else tuple(
                    a + b for a, b in zip(found, cotangent))
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
    if grid_grad is not None and plan.controller.known_steps is None:
        # Steps decided during the solve: every step time is the first time plus a constant.
        grid_grad = grid_grad.sum(0, keepdim=True).to(times.dtype)
    state_grads = [(a + g[0]) if wants.state else None for a, g in zip(adjoint, solution_grads)]
    return [*state_grads, grid_grad, times_grad,
            *[tensor_grads.get(i) for i in range(len(velocity_tensors))]]


def _executor_positions(stepper: Stepper, velocity_tensors: Sequence[torch.Tensor],
                        wanted: list[int]) -> list[int] | None:
    """For each wanted velocity tensor, its position among the tensors the stepper's executor
    reads; None if there is no executor or a wanted tensor is not among them."""
    if stepper.executor is None:
        return None
    lifted = stepper.executor.lifted()
    positions = [next((k for k, x in enumerate(lifted) if x is velocity_tensors[i]), None)
                 for i in wanted]
    return None if None in positions else positions


def _interpolation_cotangents(plan: SolvePlan, step: int, grid: torch.Tensor,
                              times: torch.Tensor, inside: list[int],
                              solution_grads: Sequence[torch.Tensor]
                              ) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                         list[torch.Tensor] | None]:
    """The cotangents that the outputs ``inside`` step ``step`` give its start, its end and
    its stages (None where the interpolation reads no stages): the vector-Jacobian product of
    the stepper's interpolation, linear in those for fixed times
    (``Stepper.interpolation_is_linear``), so taken at zeros of their shapes and dtypes (the
    same product as at the step's own values)."""
    stepper = plan.stepper
    n = plan.n_components
    like = [g[0] for g in solution_grads[:n]]
    with torch.enable_grad():
        def zeros() -> tuple[torch.Tensor, ...]:
            return tuple(torch.zeros(x.shape, dtype=d, device=x.device, requires_grad=True)
                         for x, d in zip(like, plan.state_dtypes))
        y0, y1 = zeros(), zeros()
        stages = [zeros() for _ in range(stepper.tableau.stages)] \
            if stepper.interpolation_reads_stages(inside) else []
        outputs = stepper.interpolate(grid[step].detach(), grid[step + 1].detach(), y0, y1,
                                      stages, [(times[j].detach(), plan.time_values[j])
                                               for j in inside],
                                      plan.grid_values[step], plan.grid_values[step + 1])
        inputs = [*y0, *y1, *(c for k in stages for c in k)]
        found = vector_jacobian_product([c for value in outputs for c in value], inputs,
                                        [solution_grads[c][j] for j in inside for c in range(n)],
                                        None)
    found = [torch.zeros_like(x) if g is None else g for g, x in zip(found, inputs)]
    return found[:n], found[n:2 * n], found[2 * n:] if stages else None


def _kernel_step(plan: SolvePlan, step: int, grid: torch.Tensor, start: StepStart,
                 cotangents: list[torch.Tensor], stage_cotangents: list[torch.Tensor] | None,
                 scale: torch.Tensor | None, positions: list[int], wants: Wants,
                 accumulators: list[torch.Tensor] | None
                 ) -> tuple[list[torch.Tensor | None], list[torch.Tensor]]:
    """A step by the stepper's executor (``stage_cotangents``: those of the step's stages, or
    None); the results are unscaled, and the tensors' gradients are None where the executor
    added them to ``accumulators``."""
    with replaying(plan, start.context, grid.device):
        adjoint, grads, extra = plan.stepper.executor.backward_step(
            grid[step], grid[step + 1], start.state, plan.state_dtypes,
            cotangents, stage_cotangents, scale, plan.start_nudge(step), positions,
            accumulators, wants.grid)
    plan.stepper.evaluations += plan.stepper.tableau.stages
    largest = extra[-1:] if scale is not None else []
    return [*adjoint, *(grads or [None] * len(positions)),
            *(extra[:2] if wants.grid else [])], largest


def _recomputed_step(plan: SolvePlan, step: int, grid: torch.Tensor, times: torch.Tensor,
                     start: StepStart,
                     cotangents: list[torch.Tensor], scale: torch.Tensor | None,
                     wanted_tensors: list[torch.Tensor], wants: Wants
                     ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """A step recomputed under autograd and its vector-Jacobian product; returns the unscaled
    results and the scaled ones (to watch for overflow)."""
    stepper = plan.stepper
    indices = plan.outputs_per_step[step]
    with torch.enable_grad(), replaying(plan, start.context, grid.device):
        n = plan.n_components
        # The start, then (multistep) the sums of earlier derivatives that the step read.
        leaves = [c.to(d).detach().requires_grad_()
                  for c, d in zip(start.state, plan.state_dtypes)]
        y_start, sums = tuple(leaves[:n]), tuple(leaves[n:])
        t0 = grid[step].detach().requires_grad_(wants.grid)
        t1 = grid[step + 1].detach().requires_grad_(wants.grid)
        output_times = [(times[j].detach().requires_grad_(wants.times), plan.time_values[j])
                        for j in indices]
        values = (plan.grid_values[step], plan.grid_values[step + 1])
        if stepper.multistep:  # also the step's derivative, which later steps read
            y_end, stages = stepper.recompute(step, t0, t1, y_start, sums,
                                              plan.start_nudge(step))
            outputs = stepper.interpolate(t0, t1, y_start, y_end, stages, output_times, *values)
            derivative = list(stages[0])
        else:
            y_end, outputs = stepper.advance(t0, t1, y_start, output_times, *values,
                                             plan.start_nudge(step))
            derivative = []
        produced = list(y_end) + [c for value in outputs for c in value] + derivative
        inputs = [*y_start, *wanted_tensors]
        inputs += [t0, t1] if wants.grid else []
        inputs += [t for t, _ in output_times] if wants.times else []
        inputs += list(sums)
        scaled = vector_jacobian_product(produced, inputs, cotangents, scale)
    results = scaled if scale is None else [None if r is None else r / scale for r in scaled]
    results[:n] = [torch.zeros_like(y) if r is None else r for r, y in zip(results[:n], y_start)]
    return results, scaled
