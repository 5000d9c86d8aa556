"""The forward loop of every solve: fixed grids and adaptive control alike.

The loop asks the plan's controller (:mod:`rampde_fx.engine.controllers`) for an attempt,
takes the step (by the stepper, or its executor), lets the controller judge it, and on
acceptance keeps the step's start as a low-precision checkpoint, writes the outputs the step
reaches (interpolated inside it) and records the step for the backward pass: its times, its
outputs, its first stage's nudge, the values of the buffers its evaluations change in place,
and the generator state it drew from where the velocity draws random numbers on a fixed grid
(adaptive steps are not replayed: a warning says so).
"""
from __future__ import annotations

import warnings

import torch

from ..capture import State
from .plan import SolvePlan
from .rng import RngState, rng_state


class BufferHistory:
    """The values that a velocity's buffers had at the start of each accepted step, for those
    its evaluations change in place (a power iteration's vectors; found by their version
    counters on the first attempt): the backward pass re-runs each step with them, so it sees
    what the forward step saw."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._tensors = tensors
        self._changed: list[str] | None = None  # unknown before the first attempt
        self.per_step: list[dict[str, torch.Tensor]] = []

    def before_attempt(self) -> None:
        names = self._tensors if self._changed is None else self._changed
        self._pending = {name: self._tensors[name].clone() for name in names}
        self._versions = {name: x._version for name, x in self._tensors.items()}

    def after_attempt(self, accepted: bool) -> None:
        if self._changed is None:
            self._changed = [name for name, x in self._tensors.items()
                             if x._version != self._versions[name]]
            self._pending = {name: self._pending[name] for name in self._changed}
        if accepted:
            self.per_step.append(self._pending)

    def result(self) -> list[dict[str, torch.Tensor]] | None:
        return self.per_step if self._changed else None


class CheckpointStore:
    """The state at each accepted step's start, in the plan's checkpoint dtypes: written into
    tensors allocated once where the number of steps is known, else collected and stacked."""

    def __init__(self, y0: State, dtypes: tuple[torch.dtype, ...], steps: int | None) -> None:
        self._y0, self._dtypes = y0, dtypes
        self._count = 0
        self._stores: list[torch.Tensor] | list[list[torch.Tensor]] = (
            [[] for _ in y0] if steps is None else
            [torch.empty((steps, *c.shape), dtype=d, device=c.device) for c, d in zip(y0, dtypes)])
        self._preallocated = steps is not None

    def append(self, y: State) -> None:
        for store, c, d in zip(self._stores, y, self._dtypes):
            if self._preallocated:
                store[self._count] = c
            else:
                store.append(c.detach().to(d))
        self._count += 1

    def tensors(self) -> list[torch.Tensor]:
        if self._preallocated:
            return list(self._stores)
        return [torch.stack(store) if store else
                torch.empty((0, *c.shape), dtype=d, device=c.device)
                for store, c, d in zip(self._stores, self._y0, self._dtypes)]


def integrate(plan: SolvePlan, y0: State, grid: torch.Tensor, times: torch.Tensor,
              keep_checkpoints: bool
              ) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor], torch.Tensor]:
    """Solve from ``y0`` over the plan's steps (the grid, or adaptive steps from ``grid[0]``);
    returns the solution at every output time, the step checkpoints (where kept) and the grid of
    the steps taken. Fills in the plan's record of the steps and the forward statistics."""
    stepper, controller, stats = plan.stepper, plan.controller, plan.stats
    time_values = plan.time_values
    solution = tuple(torch.empty((len(time_values), *c.shape), dtype=c.dtype, device=c.device)
                     for c in y0)
    for out, c in zip(solution, y0):
        out[0] = c
    velocity = stepper.velocity
    replay = keep_checkpoints and velocity.draws_random
    if replay and controller.adaptive and velocity.fallback_reason is None:
        warnings.warn("rampde_fx: the velocity draws random numbers (dropout?) and the "
                      f"method {stats.method!r} is adaptive: its backward pass "
                      "recomputes the steps with new draws, so gradients do not match the "
                      "forward's; use a fixed-grid method, or eval() mode.", RuntimeWarning,
                      stacklevel=5)
    rng_states: list[RngState] | None = [] if replay and not controller.adaptive else None
    checkpoints = CheckpointStore(y0, plan.checkpoint_dtypes, controller.known_steps) \
        if keep_checkpoints else None
    mutable = velocity.mutable_tensors() if keep_checkpoints else {}
    buffers = BufferHistory(mutable) if mutable else None
    grid_values, outputs_per_step, start_nudges = [time_values[0]], [], []
    controller.start(stepper, stats, y0, grid, times, time_values)
    y = y0
    while (attempt := controller.attempt(y)) is not None:
        if rng_states is not None:
            rng_states.append(rng_state(grid.device))
        if buffers is not None:
            buffers.before_attempt()
        y1, stages = stepper.take_step(
            attempt.t0, attempt.t1, y, attempt.first,
            attempt.start_nudge if attempt.first is None else None, attempt.stages_read)
        accepted = controller.judge(attempt, y, y1, stages)
        if buffers is not None:
            buffers.after_attempt(accepted)
        if not accepted:
            continue
        if checkpoints is not None:
            checkpoints.append(y)
        indices = controller.accept(attempt, y1, stages)
        outputs = stepper.interpolate(attempt.t0, attempt.t1, y, y1, stages,
                                      [(times[j], time_values[j]) for j in indices],
                                      attempt.t0_value, attempt.t1_value)
        for j, value in zip(indices, outputs):
            for out, c in zip(solution, value):
                out[j] = c
        grid_values.append(attempt.t1_value)
        outputs_per_step.append(indices)
        start_nudges.append(attempt.start_nudge)
        y = y1
    plan.record_steps(grid_values, outputs_per_step, start_nudges, rng_states,
                      None if buffers is None else buffers.result())
    stats.steps = plan.steps
    stats.nfe_forward = stepper.evaluations
    velocity.advance_counters(stepper.evaluations)
    controller.finish()
    return solution, checkpoints.tensors() if checkpoints is not None else [], \
        controller.grid_of(grid_values)
