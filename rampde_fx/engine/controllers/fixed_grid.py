"""A fixed grid as a step controller: every step is accepted."""
from __future__ import annotations

import torch

from ...capture import State
from ...stats import SolveStats
from ..callbacks import StepCallbacks
from ..step import Stepper
from . import Attempt


class FixedGridController:
    """A grid known before the solve: every step is accepted.

    Attributes:
        grid_values: the grid's times (internal time).
        outputs_per_step: for each step, the output indices it reaches.
        callbacks: the velocity's step callbacks (``callback_step`` only, as torchdiffeq).
    """

    adaptive = False

    def __init__(self, grid_values: list[float], outputs_per_step: list[list[int]],
                 callbacks: StepCallbacks) -> None:
        self.grid_values = grid_values
        self.outputs_per_step = outputs_per_step
        self.callbacks = callbacks
        self.known_steps = len(grid_values) - 1

    def start(self, stepper: Stepper, stats: SolveStats, y0: State, grid: torch.Tensor,
              times: torch.Tensor, time_values: list[float]) -> None:
        self._stepper, self._grid, self._step = stepper, grid, 0

    def attempt(self, y: State) -> Attempt | None:
        n = self._step
        if n == self.known_steps:
            return None
        grid = self._grid
        if self.callbacks:
            self.callbacks("callback_step", grid[n], y, grid[n + 1] - grid[n])
        return Attempt(grid[n], grid[n + 1], self.grid_values[n], self.grid_values[n + 1],
                       stages_read=self._stepper.interpolation_reads_stages(
                           self.outputs_per_step[n]))

    def judge(self, attempt: Attempt, y: State, y1: State, stages: list[State]) -> bool:
        return True

    def accept(self, attempt: Attempt, y1: State, stages: list[State]) -> list[int]:
        self._step += 1
        return self.outputs_per_step[self._step - 1]

    def grid_of(self, grid_values: list[float]) -> torch.Tensor:
        return self._grid

    def finish(self) -> None:
        pass
