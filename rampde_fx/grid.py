"""Time grids, the placement of output times on the grid, and interpolation between steps.

All of it follows torchdiffeq 0.2.5's solvers, so that float32 results match.
"""
from __future__ import annotations

import bisect
import math
from typing import Callable, Sequence

import torch


def grid_from_step_size(t: torch.Tensor, step_size: float) -> torch.Tensor:
    """``t0 + k * step_size`` for ``k = 0..ceil((t1 - t0) / step_size + 1) - 1``, the last point
    replaced by ``t1``; differentiable in ``t[0]`` and ``t[-1]``."""
    niters = int(torch.ceil((t[-1] - t[0]) / step_size + 1).item())
    points = torch.arange(0, niters, dtype=t.dtype, device=t.device) * step_size + t[0]
    return torch.cat([points[:-1], t[-1:]])


def make_grid(t: torch.Tensor, step_size: float | None,
              grid_constructor: Callable[..., torch.Tensor] | None, func, y0) -> torch.Tensor:
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


def interpolate_linear(t0: torch.Tensor, t1: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor,
                       t: torch.Tensor, t0_value: float, t1_value: float,
                       t_value: float) -> torch.Tensor:
    """``y`` at ``t`` on the line through the step's ends; exact ends are returned as they are."""
    if t_value == t0_value:
        return y0
    if t_value == t1_value:
        return y1
    slope = (t - t0) / (t1 - t0)
    return y0 + slope * (y1 - y0)


def interpolate_cubic(t0: torch.Tensor, t1: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor,
                      f0: torch.Tensor, f1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Cubic Hermite interpolation from the values and slopes at both ends of a step."""
    s = (t - t0) / (t1 - t0)
    h00 = (1 + 2 * s) * (1 - s) * (1 - s)
    h10 = s * (1 - s) * (1 - s)
    h01 = s * s * (3 - 2 * s)
    h11 = s * s * (s - 1)
    dt = t1 - t0
    return h00 * y0 + h10 * dt * f0 + h01 * y1 + h11 * dt * f1


def dense_output_coefficients(y0: torch.Tensor, y1: torch.Tensor, y_mid: torch.Tensor,
                              f0: torch.Tensor, f1: torch.Tensor,
                              dt: torch.Tensor) -> list[torch.Tensor]:
    """Coefficients, lowest power first, of the quartic ``p(x)`` on ``x in [0, 1]`` with the
    step's values at both ends and its midpoint, and its slopes ``dt * f`` at both ends: the
    dense output of torchdiffeq's adaptive methods."""
    return [y0,
            dt * f0,
            dt * (f1 - 4 * f0) - 11 * y0 - 5 * y1 + 16 * y_mid,
            dt * (5 * f0 - 3 * f1) + 18 * y0 + 14 * y1 - 32 * y_mid,
            2 * dt * (f1 - f0) - 8 * (y1 + y0) + 16 * y_mid]


def evaluate_polynomial(coefficients: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``sum_i coefficients[i] * x**i``, in the coefficients' dtype."""
    x = x.to(coefficients[0].dtype)
    total = coefficients[0] + x * coefficients[1]
    power = x
    for coefficient in coefficients[2:]:
        power = power * x
        total = total + power * coefficient
    return total


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
