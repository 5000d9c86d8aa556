"""Velocities from the field, written as torchdiffeq users write them."""
from __future__ import annotations

import torch
from torch import nn


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of ``a`` against the reference ``b`` in the 2-norm, computed in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


class TimeMLP(nn.Module):
    """tanh MLP whose output is modulated by the time."""

    def __init__(self, dim: int = 3, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, dim))

    def forward(self, t, y):
        return self.net(y) * torch.cos(t)


class ConcatConv2d(nn.Module):
    """ODE-Net's convolution with the time as an extra input channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels + 1, channels, 3, padding=1)

    def forward(self, t, x):
        tt = torch.ones_like(x[:, :1, :, :]) * t
        return self.conv(torch.cat([tt, x], 1))


class ODENetFunc(nn.Module):
    """ODE-Net block: GroupNorm, ReLU, time-channel convolution."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(2, channels)
        self.conv = ConcatConv2d(channels)

    def forward(self, t, x):
        return self.conv(t, torch.relu(self.norm(x)))


class NormMLP(nn.Module):
    """LayerNorm, softplus and a mean: precision-sensitive ops in one velocity."""

    def __init__(self, dim: int = 4, width: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, width)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)

    def forward(self, t, y):
        h = self.norm(torch.nn.functional.softplus(self.inp(y)))
        return self.out(h) - h.mean(dim=-1, keepdim=True)


class Hamiltonian(nn.Module):
    """Separable Hamiltonian system: q' = dT/dp, p' = -dV/dq, as a tuple state."""

    def __init__(self, dim: int = 2, width: int = 8) -> None:
        super().__init__()
        self.kinetic = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, dim))
        self.potential = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, dim))

    def forward(self, t, state):
        q, p = state
        return self.kinetic(p), -self.potential(q)
