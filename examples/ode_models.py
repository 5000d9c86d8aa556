"""Velocities from the field, written as torchdiffeq users write them.

Shared by the examples and by ``benchmarks/run.py`` so that both exercise the same models.
"""
from __future__ import annotations

import math

import torch
import torchdiffeq
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
    """ODE-Net's 3x3 convolution that sees the time as an extra input channel
    (``channels -> out_channels``, by default ``channels``)."""

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels + 1, out_channels or channels, 3, padding=1)

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


class FlowMLPVelocity(nn.Module):
    """Flow-matching velocity ``v(t, x)``: a ``dim + 1 -> width -> width -> dim`` SiLU MLP on
    ``(x, t)``."""

    def __init__(self, dim: int = 2, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, width),
                                 nn.SiLU(), nn.Linear(width, dim))

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # t: one time for the batch (a solver's) or one per sample (training)
        t = t.reshape(-1, 1).expand(x.shape[0], 1)
        return self.net(torch.cat([x, t], dim=1))


class FlowConvVelocity(nn.Module):
    """Flow-matching velocity on images: three time-channel 3x3 convolutions,
    ``channels -> width -> width -> channels``, with SiLU between them."""

    def __init__(self, channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.conv1 = ConcatConv2d(channels, width)
        self.conv2 = ConcatConv2d(width)
        self.conv3 = ConcatConv2d(width, channels)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.silu(self.conv1(t, x))
        x = nn.functional.silu(self.conv2(t, x))
        return self.conv3(t, x)


class DivergenceVelocity(nn.Module):
    """The log-density ODE of a flow ``v(t, x)`` on ``(x, logp)``: ``(v, div v)``, the
    divergence by exact trace (one ``torch.autograd.grad`` per dimension of a sample) or, with
    ``noise`` (the shape of ``x``, drawn once), Hutchinson's estimate ``noise . (dv/dx) noise``
    (one ``torch.autograd.grad`` in all). Integrated from data at t=1 to noise at t=0, ``logp``
    accumulates ``log p(x) - log N(z)`` (see :func:`log_density`)."""

    def __init__(self, velocity: nn.Module, noise: torch.Tensor | None = None) -> None:
        super().__init__()
        self.velocity = velocity
        self.register_buffer("noise", noise)

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        x, _ = state
        # dv/dx, also when the solve itself runs without autograd (sampling, evaluation)
        with torch.enable_grad():
            x = x.requires_grad_(True)
            v = self.velocity(t, x)
            if self.noise is None:
                flat_v = v.flatten(1)
                divergence = sum(
                    torch.autograd.grad(flat_v[:, i].sum(), x, create_graph=True)[0]
                    .flatten(1)[:, i] for i in range(flat_v.shape[1]))
            else:
                vjp, = torch.autograd.grad(v, x, self.noise, create_graph=True)
                divergence = (vjp * self.noise).flatten(1).sum(1)
        return v, divergence.view(-1, 1)


def log_density(solution: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``log p(x)`` per sample from the solution of a :class:`DivergenceVelocity` from t=1 to
    t=0: the standard normal's log-density at the end point plus the accumulated divergence."""
    z, integral = solution[0][-1].flatten(1), solution[1][-1].view(-1)
    return -0.5 * z.square().sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi) + integral


class ODERNN(nn.Module):
    """ODE-RNN (Rubanova et al., 2019) over irregular observation times: a GRU cell updates the
    hidden state with each observation, a readout maps it to an output, and between
    consecutive times the hidden state evolves by an ODE solve of a tanh-MLP velocity (one
    ``torchdiffeq.odeint`` call per interval, with ``solver``'s method and options)."""

    def __init__(self, dim: int, hidden: int, width: int, solver: dict) -> None:
        super().__init__()
        self.func = MLPVelocity(hidden, width)
        self.cell = nn.GRUCell(dim, hidden)
        self.readout = nn.Linear(hidden, dim)
        self.solver = solver

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Outputs ``(len(t), batch, dim)`` for observations ``x`` ``(batch, len(t), dim)``."""
        h = x.new_zeros(x.shape[0], self.cell.hidden_size)
        outputs = []
        for i in range(len(t)):
            if i > 0:
                h = torchdiffeq.odeint(self.func, h, t[i - 1:i + 1], **self.solver)[-1]
            h = self.cell(x[:, i], h)
            outputs.append(self.readout(h))
        return torch.stack(outputs)


class TimeBankConvVelocity(nn.Module):
    """An STL-10-style ODE block whose weights depend on time as in the rampde paper's model:
    a bank of ``intervals`` pairs of 3x3 convolutions, the pair picked by the interval that
    t's value falls in (``int(t.item() * intervals)``), with InstanceNorm and ReLU between."""

    def __init__(self, channels: int, intervals: int) -> None:
        super().__init__()
        scale = 1.0 / math.sqrt(9 * channels)
        self.first = nn.Parameter(scale * torch.randn(intervals, channels, channels, 3, 3))
        self.second = nn.Parameter(scale * torch.randn(intervals, channels, channels, 3, 3))
        self.norm = nn.InstanceNorm2d(channels, affine=True)
        self.intervals = intervals

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        k = min(int(t.item() * self.intervals), self.intervals - 1)
        h = torch.relu(self.norm(nn.functional.conv2d(x, self.first[k], padding=1)))
        return nn.functional.conv2d(h, self.second[k], padding=1)


class STL10ODENet(nn.Module):
    """The rampde paper's STL-10 classifier in outline: a 3x3 stem, then per width an ODE
    block (:class:`TimeBankConvVelocity`, rk4 over [0, 1] in ``steps`` steps, one weight pair
    per step) and a strided 3x3 convolution that halves the resolution into the next width,
    then average pooling and a linear head over 10 classes."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), steps: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList(TimeBankConvVelocity(w, steps) for w in widths)
        self.downs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1)
                                   for a, b in zip(widths, widths[1:]))
        self.head = nn.Linear(widths[-1], 10)
        self.options = {"step_size": 1.0 / steps}

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for i, block in enumerate(self.blocks):
            h = torchdiffeq.odeint(block, h, t, method="rk4", options=self.options)[-1]
            if i < len(self.downs):
                h = torch.relu(self.downs[i](h))
        return self.head(h.mean(dim=(2, 3)))
