"""Interpolation of outputs between a step's ends, as torchdiffeq 0.2.5 does it."""
from __future__ import annotations

import torch


def interpolate_linear(t0: torch.Tensor, t1: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor,
                       t: torch.Tensor) -> torch.Tensor:
    """``y`` at ``t`` on the line through the step's ends."""
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
