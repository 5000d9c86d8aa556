"""``MixedPrecisionSolve``: a solve as an autograd function whose backward is the discrete
adjoint."""
from __future__ import annotations

from typing import Any

import torch

from ..engine.integrate import integrate
from ..engine.plan import SolvePlan
from .sweep import Wants, backward_with_retries


class MixedPrecisionSolve(torch.autograd.Function):
    """``(plan, *y0, grid, times, *velocity_tensors) -> solution components``."""

    @staticmethod
    def forward(ctx: Any, plan: SolvePlan, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y0 = inputs[:plan.n_components]
        grid, times = inputs[plan.n_components:plan.n_components + 2]
        with torch.autocast(grid.device.type, enabled=False):
            solution, checkpoints, grid = integrate(plan, y0, grid, times, keep_checkpoints=True)
        ctx.plan = plan
        ctx.save_for_backward(grid, times, *checkpoints)
        ctx.velocity_tensors = inputs[plan.n_components + 2:]
        ctx.state_dtypes = tuple(c.dtype for c in y0)
        return solution

    @staticmethod
    def backward(ctx: Any, *solution_grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        plan: SolvePlan = ctx.plan
        grid, times, *checkpoints = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        n = plan.n_components
        wants = Wants(state=any(needs[:n]), grid=needs[n], times=needs[n + 1],
                       tensors=[i for i, need in enumerate(needs[n + 2:]) if need])
        with torch.autocast(grid.device.type, enabled=False):
            grads = backward_with_retries(plan, ctx.state_dtypes, grid, times, checkpoints,
                                          ctx.velocity_tensors, solution_grads, wants)
        return (None, *grads)
