"""Whole models as torchdiffeq users write them, for rampde_fx.convert."""
from __future__ import annotations

import torch
import torchdiffeq
from torch import nn
from torchdiffeq import odeint_adjoint

from models import Hamiltonian, ODENetFunc

STEP = {"step_size": 0.25}


class MLPFunc(nn.Module):
    def __init__(self, dim: int = 4, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, dim))

    def forward(self, t, y):
        return self.net(y)


class ODEBlock(nn.Module):
    """The ODE-Net block: integration_time re-assigned in forward, torchdiffeq.odeint called as
    a module attribute."""

    def __init__(self, odefunc: nn.Module) -> None:
        super().__init__()
        self.odefunc = odefunc
        self.integration_time = torch.tensor([0.0, 1.0])

    def forward(self, x):
        self.integration_time = self.integration_time.type_as(x)
        out = torchdiffeq.odeint(self.odefunc, x, self.integration_time, rtol=1e-3, atol=1e-3,
                                 method="rk4", options=STEP)
        return out[1]


class MLPODE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(3, 4)
        self.block = ODEBlock(MLPFunc())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block(self.encoder(x)))


class ODENetClassifier(nn.Module):
    """Convolutional downsampling, an ODE block of GroupNorm/ReLU/time-channel conv, a head."""

    def __init__(self, channels: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.downsample = nn.Sequential(nn.Conv2d(1, channels, 3, stride=2, padding=1),
                                        nn.ReLU())
        self.block = ODEBlock(ODENetFunc(channels))
        self.head = nn.Sequential(nn.GroupNorm(2, channels), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(channels, classes))

    def forward(self, x):
        return self.head(self.block(self.downsample(x)))


class HamiltonianModel(nn.Module):
    """Tuple (q, p) state integrated backwards in time over a buffer of output times."""

    def __init__(self) -> None:
        super().__init__()
        self.dynamics = Hamiltonian()
        self.register_buffer("times", torch.tensor([1.0, 0.5, 0.0]))

    def forward(self, q, p):
        qs, ps = torchdiffeq.odeint(self.dynamics, (q, p), self.times, method="midpoint",
                                    options={"step_size": 0.125})
        return qs[-1], ps[-1]


class ExactTraceCNF(nn.Module):
    """FFJORD-style velocity: a hypernetwork in t, divergence by exact trace with autograd."""

    def __init__(self, dim: int = 2, width: int = 16) -> None:
        super().__init__()
        self.hyper = nn.Sequential(nn.Linear(1, width), nn.Tanh(), nn.Linear(width, width))
        self.inp = nn.Linear(dim, width)
        self.out = nn.Linear(width, dim)

    def forward(self, t, states):
        z, _ = states
        with torch.enable_grad():
            z = z.requires_grad_(True)
            gate = torch.sigmoid(self.hyper(t.view(1, 1)))
            dz = self.out(torch.tanh(self.inp(z)) * gate)
            divergence = sum(torch.autograd.grad(dz[:, i].sum(), z, create_graph=True)[0][:, i]
                             for i in range(z.shape[1]))
        return dz, -divergence.view(-1, 1)


class CNFModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cnf = ExactTraceCNF()
        self.nfe = 0

    def forward(self, x):
        logp = torch.zeros(x.shape[0], 1).to(x)
        z, delta = torchdiffeq.odeint(self.cnf, (x, logp), torch.tensor([0.0, 1.0]),
                                      method="rk4", options=STEP)
        return z[-1], delta[-1]


class AdjointODE(nn.Module):
    """`from torchdiffeq import odeint_adjoint` and its adjoint-only arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.func = MLPFunc()

    def forward(self, x):
        t = torch.tensor([0.0, 0.5, 1.0])
        return odeint_adjoint(self.func, x, t, method="rk4", options=STEP,
                              adjoint_method="rk4", adjoint_options=STEP)[-1]


class DiscreteTwin(AdjointODE):
    """The same model through torchdiffeq.odeint: the discrete-gradient reference."""

    def forward(self, x):
        return torchdiffeq.odeint(self.func, x, torch.tensor([0.0, 0.5, 1.0]), method="rk4",
                                  options=STEP)[-1]
