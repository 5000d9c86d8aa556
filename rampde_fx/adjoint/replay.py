"""Second derivatives: the solve replayed under autograd.

The discrete adjoint's backward sweep starts each step from a detached checkpoint, so its
gradients are constants for autograd. Where the backward pass itself is recorded
(``create_graph=True``: gradient penalties, Hessian-vector products), the solve is replayed
instead: from the initial state, along the steps the forward pass accepted (their sizes are
constants, as in the sweep), with the velocity reading the solve's own tensors. The replay is
the forward solve, operation for operation, so its gradient is that of the discrete solve and
autograd can differentiate it again. It keeps every stage, as ``checkpoint='stages'`` does.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..engine.checkpoints import rerun_step
from ..engine.plan import SolvePlan, StepContext


def replay(plan: SolvePlan, y0: Sequence[torch.Tensor], grid: torch.Tensor,
           times: torch.Tensor) -> list[torch.Tensor]:
    """The solution at every output time, recomputed under autograd from ``y0`` along the
    recorded steps; ``grid``: the solve's grid input (for an adaptive solve, its start)."""
    stepper = plan.stepper
    if plan.controller.known_steps is None:  # every step time is the start plus a constant
        offsets = torch.tensor(plan.grid_values, dtype=torch.float64, device=grid.device)
        grid = grid[:1].to(torch.float64) + (offsets - plan.grid_values[0])
    found: dict[int, tuple[torch.Tensor, ...]] = {0: tuple(y0)}
    y = tuple(y0)
    context = plan.context_of(0) or StepContext()
    executor, stepper.executor = stepper.executor, None  # compiled kernels record no graph
    stepper.rewind()
    try:
        for step in range(plan.steps):
            y, values, context = rerun_step(plan, step, grid, times, y, context)
            found.update(zip(plan.outputs_per_step[step], values))
    finally:
        stepper.executor = executor
    return [torch.stack([found[j][c] for j in range(len(plan.time_values))])
            for c in range(plan.n_components)]
