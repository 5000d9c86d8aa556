"""Fixed grids as step controllers: every step is accepted. ``FixedGridController``'s grid is
known before the solve; ``SteppingController`` steps by a fixed size until an event."""
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


class SteppingController:
    """Steps of a fixed size from the start, until the step that reaches the last output time:
    the grid of torchdiffeq's fixed-grid event handling, whose end (an event) is found as the
    solve goes. Every step is accepted.

    Each step's end is its start plus ``step_size`` in ``time_dtype`` (the state's dtype, as
    torchdiffeq adds them); the step times are tensors of that dtype, the start's plus a
    constant, so that gradients with respect to the start reach every step.

    Attributes:
        step_size: the step size (internal time).
        time_dtype: the dtype of the step times.
        max_steps: the most steps to take (torchdiffeq's limit of 20000).

    As torchdiffeq's event handling, it calls no step callbacks.
    """

    adaptive = False
    known_steps = None

    def __init__(self, step_size: float, time_dtype: torch.dtype, max_steps: int) -> None:
        self.step_size = step_size
        self.time_dtype = time_dtype
        self.max_steps = max_steps

    def start(self, stepper: Stepper, stats: SolveStats, y0: State, grid: torch.Tensor,
              times: torch.Tensor, time_values: list[float]) -> None:
        self._origin = grid[0].to(torch.float64)
        self._times = time_values
        self._t = torch.tensor(time_values[0], dtype=self.time_dtype).item()
        self._steps = 0
        self._target = 1  # the next output index to reach

    def _at(self, value: float) -> torch.Tensor:
        return (self._origin + (value - self._times[0])).to(self.time_dtype)

    def attempt(self, y: State) -> Attempt | None:
        if self._target >= len(self._times):
            return None
        if self._steps == self.max_steps:
            raise RuntimeError(
                f"rampde_fx: no event within {self.max_steps} steps of options['step_size']="
                f"{self.step_size:g} (torchdiffeq's limit); check the event function, or take "
                "larger steps")
        t1 = (torch.tensor(self._t, dtype=self.time_dtype) + self.step_size).item()
        return Attempt(self._at(self._t), self._at(t1), self._t, t1)

    def judge(self, attempt: Attempt, y: State, y1: State, stages: list[State]) -> bool:
        return True

    def accept(self, attempt: Attempt, y1: State, stages: list[State]) -> list[int]:
        indices = []
        while self._target < len(self._times) and self._times[self._target] <= attempt.t1_value:
            indices.append(self._target)
            self._target += 1
        self._t = attempt.t1_value
        self._steps += 1
        return indices

    def grid_of(self, grid_values: list[float]) -> torch.Tensor:
        offsets = torch.tensor(grid_values, dtype=torch.float64, device=self._origin.device)
        return (self._origin + offsets.sub_(self._times[0])).to(self.time_dtype)

    def finish(self) -> None:
        pass
