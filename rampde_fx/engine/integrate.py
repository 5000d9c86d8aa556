"""The forward loop of every solve: fixed grids and adaptive control alike.

The loop asks the plan's controller (:mod:`rampde_fx.engine.controllers`) for an attempt,
takes the step (by the stepper, or its executor), lets the controller judge it, and on
acceptance hands the step's start to the checkpoint store (``checkpoints``: every one in the
low dtype, or those a budget keeps; taken before the step, since a multistep method's
checkpoint reads the history the step extends), writes the outputs the step reaches
(interpolated inside it) and records the step for the backward pass: its times, its outputs,
its first stage's nudge and, for the steps whose start is kept, what it found: the values of
the buffers its evaluations change in place, and where the velocity draws random numbers the
generator state it drew from, in an adaptive solve also the one its first stage drew from
(evaluated at the solve's start, or by the step before). An adaptive solve records every
step's, since rejected attempts draw numbers and change buffers too.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch

from ..capture import RngState, State, Velocity, before_each_evaluation, rng_state
from .checkpoints import checkpoint_store
from .plan import SolvePlan, StepContext


class ContextRecorder:
    """Records what accepted steps found besides their states (:class:`StepContext`): the generator
    state each drew from (those the velocity draws from by name included), where the velocity
    draws random numbers, with the one its first stage drew from where another evaluation gave
    it (:meth:`first_stage_evaluation`), and the values of the buffers that its evaluations change
    in place (a power iteration's vectors; found by their version counters on the first attempt),
    for the steps the caller wants. Generator states are taken where the velocity ``may_draw``
    (one with graphs per time may capture one that draws during the solve), and kept where it
    drew (:meth:`found`)."""

    def __init__(self, buffers: dict[str, torch.Tensor], device: torch.device,
                 velocity: Velocity, may_draw: bool) -> None:
        self._buffers, self._device, self._draws = buffers, device, may_draw
        self._velocity = velocity
        self._changed: list[str] | None = None if buffers else []  # None: not yet known
        self._first: RngState | None = None  # the next step's first stage's
        self._found_first: RngState | None = None  # in the block of first_stage_evaluation
        self._contexts: dict[int, StepContext] = {}

    @contextlib.contextmanager
    def first_stage_evaluation(self, evaluation: int) -> Iterator[None]:
        """A block whose velocity evaluation ``evaluation`` (from 0), where it makes that many,
        gives the next step's first stage: records the generator state it draws from, which an
        accepted step's :meth:`next_step` makes the next step's (a later block's replaces it)."""
        if not self._draws:
            yield
            return

        def before(i: int) -> None:
            if i == evaluation:
                self._found_first = rng_state(self._device, self._velocity.generators)
        with before_each_evaluation(before):
            yield

    def next_step(self) -> None:
        """The step was accepted: the first stage found since is the next step's."""
        self._first, self._found_first = self._found_first, None

    def before_attempt(self, wanted: bool) -> None:
        """Before an attempt at a step whose context is ``wanted`` (the first attempt's
        buffers are copied all the same, to find those that change)."""
        if self._changed is None:  # the first attempt: copy every buffer, to find those that change
            self._versions = {name: x._version for name, x in self._buffers.items()}
            names = list(self._buffers)
        else:
            names = self._changed if wanted else []
        self._pending = StepContext(rng_state(self._device, self._velocity.generators)
                                    if self._draws and wanted else None,
                                    {name: self._buffers[name].clone() for name in names})

    def after_attempt(self, step: int, accepted: bool, wanted: bool) -> None:
        """After the attempt: records its context as step ``step``'s where accepted and
        wanted."""
        if self._changed is None:
            self._changed = [name for name, x in self._buffers.items()
                             if x._version != self._versions[name]]
        if accepted and wanted and (self._draws or self._changed):
            rng, buffers = self._pending.rng, self._pending.buffers
            self._contexts[step] = StepContext(
                rng, {name: buffers[name] for name in self._changed} if self._changed else None,
                self._first)

    def found(self) -> dict[int, StepContext]:
        """The recorded contexts, by step; without generator states where the velocity drew
        no numbers."""
        if not self._draws or self._velocity.draws_random:
            return self._contexts
        return {step: dataclasses.replace(context, rng=None, first_rng=None)
                for step, context in self._contexts.items() if context.buffers is not None}


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
    checkpoints = checkpoint_store(plan, y0) if keep_checkpoints else None
    mutable = velocity.mutable_tensors() if keep_checkpoints else {}
    may_draw = keep_checkpoints and (velocity.draws_random or velocity.time_indexed)
    recorder = ContextRecorder(mutable, grid.device, velocity, may_draw) \
        if mutable or may_draw else None
    # Where an adaptive step's first stage is evaluated: at the start, as the step before's
    # last stage (first-same-as-last methods), or after it (then replacing the last stage's).
    first_stage = recorder.first_stage_evaluation if recorder is not None and \
        controller.adaptive else lambda evaluation: contextlib.nullcontext()
    grid_values, outputs_per_step, start_nudges = [time_values[0]], [], []
    with first_stage(0):
        controller.start(stepper, stats, y0, grid, times, time_values)
    if recorder is not None:
        recorder.next_step()
    stepper.restart()
    y = y0
    while (attempt := controller.attempt(y)) is not None:
        step = len(outputs_per_step)
        wanted = recorder is not None and (controller.adaptive or checkpoints.keeps(step))
        if recorder is not None:
            recorder.before_attempt(wanted)
        start = checkpoints.start_of(y) if checkpoints is not None else None
        with first_stage(stepper.tableau.stages - (attempt.first is not None) - 1):
            y1, stages = stepper.take_step(
                attempt.t0, attempt.t1, y, attempt.first,
                attempt.start_nudge if attempt.first is None else None, attempt.stages_read)
        accepted = controller.judge(attempt, y, y1, stages)
        if recorder is not None:
            recorder.after_attempt(step, accepted, wanted)
        if not accepted:
            continue
        if checkpoints is not None:
            checkpoints.append(step, start)
        with first_stage(0):
            indices = controller.accept(attempt, y1, stages)
        if recorder is not None:
            recorder.next_step()
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
    kept, segments = checkpoints.result() if checkpoints is not None else ([], None)
    plan.record_steps(grid_values, outputs_per_step, start_nudges,
                      {} if recorder is None else recorder.found(), segments)
    stats.steps = plan.steps
    stats.nfe_forward = stepper.evaluations
    velocity.advance_counters(stepper.evaluations)
    controller.finish()
    return solution, kept, controller.grid_of(grid_values)
