"""``MixedPrecisionSolve``: a solve as an autograd function whose backward is the discrete
adjoint."""
from __future__ import annotations

from typing import Any

import torch

from ..engine.integrate import integrate
from ..engine.plan import SolvePlan
from .replay import replay
from .sweep import Wants, backward_with_retries


class MixedPrecisionSolve(torch.autograd.Function):
    """``(plan, *y0, grid, times, *velocity_tensors) -> solution components``.

    The velocity reads detached aliases of its tensors, so the backward sweep's per-step
    products reach no hook of theirs: a tensor hook fires once, on the total gradient that
    the function returns."""

    @staticmethod
    def forward(ctx: Any, plan: SolvePlan, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = plan.n_components
        y0 = inputs[:n]
        grid, times = inputs[n:n + 2]
        tensors = inputs[n + 2:]
        ctx.velocity_tensors = plan.stepper.velocity.swap_bound(
            tensors, [x.detach().requires_grad_(x.requires_grad) for x in tensors])
        with torch.autocast(grid.device.type, enabled=False):
            solution, checkpoints, grid = integrate(plan, y0, grid, times, keep_checkpoints=True)
        ctx.plan = plan
        ctx.save_for_backward(grid, times, *checkpoints)
        ctx.inputs = inputs  # for a recorded backward pass (see replay)
        return solution

    @staticmethod
    def backward(ctx: Any, *solution_grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True
            return (None, *_replayed_gradients(ctx, solution_grads))
        plan: SolvePlan = ctx.plan
        grid, times, *checkpoints = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        n = plan.n_components
        wants = Wants(state=any(needs[:n]), grid=needs[n], times=needs[n + 1],
                      tensors=[i for i, need in enumerate(needs[n + 2:]) if need])
        with torch.autocast(grid.device.type, enabled=False):
            grads = backward_with_retries(plan, grid, times, checkpoints,
                                          ctx.velocity_tensors, solution_grads, wants)
        return (None, *grads)


def _replayed_gradients(ctx: Any, solution_grads: tuple[torch.Tensor, ...]
                        ) -> list[torch.Tensor | None]:
    """The gradients of the function's inputs as a differentiable function of them and of
    ``solution_grads``: by the solve replayed under autograd on the inputs themselves."""
    plan: SolvePlan = ctx.plan
    n = plan.n_components
    inputs, needs = ctx.inputs, ctx.needs_input_grad[1:]
    velocity = plan.stepper.velocity
    tensors = inputs[n + 2:]
    velocity.swap_bound(ctx.velocity_tensors, tensors)
    try:
        with torch.autocast(inputs[0].device.type, enabled=False):
            solution = replay(plan, inputs[:n], inputs[n], inputs[n + 1])
    finally:
        velocity.swap_bound(tensors, ctx.velocity_tensors)
    wanted = [x for x, need in zip(inputs, needs) if need]
    found = iter(torch.autograd.grad(solution, wanted, solution_grads, create_graph=True,
                                     allow_unused=True))
    return [next(found) if need else None for need in needs]
