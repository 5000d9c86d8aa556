"""Time grids: internal time, grids from a step size or a constructor, and the placement of
output times on the grid.

All of it follows torchdiffeq 0.2.5's solvers, so that float32 results match. The *grid* is
the tensor of step times; ``steps`` is always a number of steps.
"""
from __future__ import annotations

import bisect
import math
from typing import Any, Callable, Sequence

import torch


def grid_from_step_size(t: torch.Tensor, step_size: float) -> torch.Tensor:
    """``t0 + k * step_size`` for ``k = 0..ceil((t1 - t0) / step_size + 1) - 1``, the last point
    replaced by ``t1``; differentiable in ``t[0]`` and ``t[-1]``."""
    niters = int(torch.ceil((t[-1] - t[0]) / step_size + 1).item())
    points = torch.arange(0, niters, dtype=t.dtype, device=t.device) * step_size + t[0]
    return torch.cat([points[:-1], t[-1:]])


def make_grid(t: torch.Tensor, step_size: float | None,
              grid_constructor: Callable[..., torch.Tensor] | None, func: Any,
              y0: Any) -> torch.Tensor:
    """The grid of a fixed-grid solve: from ``step_size``, from ``grid_constructor(func, y0,
    t)``, or ``t`` itself."""
    if step_size is not None:
        return grid_from_step_size(t, step_size)
    if grid_constructor is not None:
        return grid_constructor(func, y0, t)
    return t


def place_outputs(grid: Sequence[float], times: Sequence[float]) -> list[list[int]]:
    """For each step ``n`` (from ``grid[n]`` to ``grid[n+1]``), the indices ``j >= 1`` of the
    output times it produces: the first step whose end reaches ``times[j]``."""
    per_step: list[list[int]] = [[] for _ in range(len(grid) - 1)]
    for j in range(1, len(times)):
        step = bisect.bisect_left(grid, times[j], lo=1) - 1
        per_step[min(step, len(per_step) - 1)].append(j)
    return per_step


def check_grid(grid: Sequence[float], times: Sequence[float]) -> None:
    """The grid must span the output times exactly and increase."""
    if not all(math.isfinite(g) for g in grid):
        raise ValueError("the time grid has non-finite points; check step_size or grid_constructor")
    if grid[0] != times[0] or grid[-1] != times[-1]:
        raise ValueError(f"the time grid must start at t[0] and end at t[-1]; it runs from "
                         f"{grid[0]} to {grid[-1]} for t from {times[0]} to {times[-1]}")
    if any(b < a for a, b in zip(grid, grid[1:])):
        raise ValueError("the time grid from grid_constructor must be monotone in the "
                         "direction of t")


def internal_time(t: torch.Tensor, options: dict[str, Any], func: Any, y0: Any,
                  start_only: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Output times and grid in internal time, which increases (``-t`` for decreasing ``t``,
    as torchdiffeq does), both differentiable in ``t``; and whether time was reversed. With
    ``start_only`` (steps decided during the solve: adaptive ones, those until an event) the
    grid is its start only."""
    reverse = len(t) > 1 and bool(t[0] > t[1])
    internal = -t if reverse else t
    if start_only:
        return internal, internal[:1], reverse
    constructor = options.get("grid_constructor")
    if reverse and constructor is not None:
        constructor = lambda f, y, tt, _gc=constructor: -_gc(f, y, -tt)  # noqa: E731
    return internal, make_grid(internal, options.get("step_size"), constructor, func, y0), reverse
