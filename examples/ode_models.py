"""Velocities from the field, written as torchdiffeq users write them.

Shared by the examples and by ``benchmarks/run.py`` so that both exercise the same models.
"""
from __future__ import annotations

import torch
from torch import nn


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of ``a`` against the reference ``b`` in the 2-norm, computed in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


class MLPVelocity(nn.Module):
    """``dim -> width -> width -> dim`` tanh MLP, autonomous."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, width),
                                 nn.Tanh(), nn.Linear(width, dim))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y)


class TinyMLPVelocity(nn.Module):
    """``dim -> width -> dim`` tanh MLP, autonomous: small enough that launches set its time."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, dim))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y)


class ConvBlockVelocity(nn.Module):
    """STL-10-style ODE block: conv3x3, ReLU, InstanceNorm2d, transposed conv3x3 (same size)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.InstanceNorm2d(channels, affine=True)
        self.deconv = nn.ConvTranspose2d(channels, channels, 3, padding=1)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.deconv(self.norm(torch.relu(self.conv(x))))


class ConcatConv2d(nn.Module):
    """ODE-Net's 3x3 convolution that sees the time as an extra input channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels + 1, channels, 3, padding=1)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        time_channel = torch.ones_like(x[:, :1]) * t
        return self.conv(torch.cat([time_channel, x], 1))


class ODENetVelocity(nn.Module):
    """ODE-Net classifier block: (GroupNorm, ReLU, time-channel conv) twice, then GroupNorm."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        groups = min(32, channels)
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = ConcatConv2d(channels)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = ConcatConv2d(channels)
        self.norm3 = nn.GroupNorm(groups, channels)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(t, torch.relu(self.norm1(x)))
        x = self.conv2(t, torch.relu(self.norm2(x)))
        return self.norm3(x)


class HyperCNFVelocity(nn.Module):
    """FFJORD-style CNF velocity on ``(z, logp)``: a hypernetwork maps t to the weights of a
    width-``width`` tanh layer, ``dz = tanh(z W(t) + b(t)) U(t)``, and ``dlogp = -tr(dz/dz)``
    by exact trace (one ``torch.autograd.grad`` per dimension)."""

    def __init__(self, dim: int = 2, width: int = 64, hidden: int = 32) -> None:
        super().__init__()
        self.dim, self.width = dim, width
        self.hyper = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                                   nn.Tanh(), nn.Linear(hidden, 2 * dim * width + width))

    def forward(self, t: torch.Tensor, states: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        z, _ = states
        weights = self.hyper(t.reshape(1, 1)).reshape(-1)
        in_weight, out_weight, bias = weights.split([self.dim * self.width] * 2 + [self.width])
        # The divergence differentiates dz with respect to z, also when the solve itself runs
        # without autograd (evaluation), so z gets its own graph here.
        with torch.enable_grad():
            z = z.requires_grad_(True)
            hidden = torch.tanh(z @ in_weight.view(self.dim, self.width) + bias)
            dz = hidden @ out_weight.view(self.width, self.dim)
            divergence = sum(torch.autograd.grad(dz[:, i].sum(), z, create_graph=True)[0][:, i]
                             for i in range(self.dim))
        return dz, -divergence.view(-1, 1)
