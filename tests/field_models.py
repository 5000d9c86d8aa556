"""Whole models as torchdiffeq users write them, for rampde_fx.convert."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchdiffeq
from torch import nn
from torchdiffeq import odeint, odeint_adjoint
from torchdiffeq import odeint as integrate

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


class LinearTraceODEfunc(nn.Module):
    """FFJORD's ODEfunc on the state (z, logp), with an exact divergence computed from the
    weights instead of autograd: for dz = W2 tanh(W1 z + b1 + t c) + b2,
    div = sum_k tanh'(h_k) (W1 W2)_kk."""

    def __init__(self, dim: int = 2, width: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, width)
        self.time = nn.Parameter(0.5 * torch.randn(width))
        self.out = nn.Linear(width, dim)

    def forward(self, t, states):
        z, _ = states
        h = torch.tanh(self.inp(z) + t * self.time)
        diagonal = (self.inp.weight * self.out.weight.t()).sum(dim=1)
        divergence = ((1 - h * h) * diagonal).sum(dim=1, keepdim=True)
        return self.out(h), -divergence


class CNF(nn.Module):
    """FFJORD's CNF layer: branches on None defaults and on ``reverse``, which flips the times."""

    def __init__(self, odefunc: nn.Module, end_time: float = 1.0) -> None:
        super().__init__()
        self.odefunc = odefunc
        self.register_buffer("sqrt_end_time", torch.sqrt(torch.tensor(end_time)))
        self.solver_options = {"step_size": 0.25}

    def forward(self, z, logpz=None, integration_times=None, reverse=False):
        _logpz = torch.zeros(z.shape[0], 1).to(z) if logpz is None else logpz
        if integration_times is None:
            integration_times = torch.stack([torch.zeros_like(self.sqrt_end_time),
                                             self.sqrt_end_time * self.sqrt_end_time])
        if reverse:
            integration_times = torch.flip(integration_times, [0])
        state_t = odeint_adjoint(self.odefunc, (z, _logpz), integration_times.to(z), atol=1e-5,
                                 rtol=1e-5, method="rk4", options=self.solver_options)
        if len(integration_times) == 2:
            state_t = tuple(s[1] for s in state_t)
        z_t, logpz_t = state_t[:2]
        if logpz is not None:
            return z_t, logpz_t
        return z_t


class SequentialFlow(nn.Module):
    """FFJORD's chain of CNF layers, run backwards for sampling."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.chain = nn.ModuleList(layers)

    def forward(self, x, logpx=None, reverse=False, inds=None):
        if inds is None:
            inds = range(len(self.chain) - 1, -1, -1) if reverse else range(len(self.chain))
        if logpx is None:
            for i in inds:
                x = self.chain[i](x, reverse=reverse)
            return x
        for i in inds:
            x, logpx = self.chain[i](x, logpx, reverse=reverse)
        return x, logpx


def ffjord() -> SequentialFlow:
    return SequentialFlow([CNF(LinearTraceODEfunc()), CNF(LinearTraceODEfunc())])


class LatentODE(nn.Module):
    """torchdiffeq's latent_ode.py: an RNN runs backwards over ``range(x.size(1))``, its hidden
    state gives the latent initial state (its mean: no sampling), odeint solves to the output
    times ``ts``, a decoder maps back."""

    def __init__(self, obs_dim: int = 2, latent_dim: int = 4, hidden: int = 8) -> None:
        super().__init__()
        self.hidden = hidden
        self.i2h = nn.Linear(obs_dim + hidden, hidden)
        self.h2o = nn.Linear(hidden, 2 * latent_dim)
        self.func = MLPFunc(latent_dim)
        self.dec = nn.Sequential(nn.Linear(latent_dim, 16), nn.Tanh(), nn.Linear(16, obs_dim))

    def forward(self, x, ts):
        h = x.new_zeros(x.size(0), self.hidden)
        for i in reversed(range(x.size(1))):
            h = torch.tanh(self.i2h(torch.cat((x[:, i, :], h), dim=1)))
        qz0_mean, qz0_logvar = self.h2o(h).chunk(2, dim=1)
        pred_z = odeint(self.func, qz0_mean, ts, method="rk4",
                        options={"step_size": 0.125}).permute(1, 0, 2)
        return self.dec(pred_z), qz0_logvar


class AugmentedODEBlock(nn.Module):
    """Augmented neural ODEs' ODEBlock: the final state, or the states at ``eval_times``."""

    def __init__(self) -> None:
        super().__init__()
        self.odefunc = MLPFunc()

    def forward(self, x, eval_times=None):
        if eval_times is None:
            integration_time = torch.tensor([0, 1]).float().type_as(x)
        else:
            integration_time = eval_times.type_as(x)
        out = torchdiffeq.odeint(self.odefunc, x, integration_time, method="rk4", options=STEP)
        if eval_times is None:
            return out[1]
        return out


class Simulator(nn.Module):
    """torchdiffeq's learn_physics.py: the solve is in a helper method, through a module-level
    alias of odeint."""

    def __init__(self) -> None:
        super().__init__()
        self.dynamics = MLPFunc()
        self.register_buffer("times", torch.linspace(0.0, 1.0, 3))

    def simulate(self, state, times):
        return integrate(self.dynamics, state, times, method="midpoint",
                         options={"step_size": 0.125})

    def forward(self, x):
        return self.simulate(x, self.times)[-1]


class StoredSolver(nn.Module):
    """The solver chosen at construction and kept in an attribute (rampde's STL-10 model)."""

    def __init__(self, adjoint: bool = True) -> None:
        super().__init__()
        self.odefunc = MLPFunc()
        self.odeint_func = odeint_adjoint if adjoint else odeint

    def forward(self, x):
        return self.odeint_func(self.odefunc, x, torch.tensor([0.0, 1.0]), method="rk4",
                                options=STEP)[-1]


class PassedSolver(nn.Module):
    """The solver is an argument of forward."""

    def __init__(self) -> None:
        super().__init__()
        self.odefunc = MLPFunc()

    def forward(self, x, solver=torchdiffeq.odeint):
        return solver(self.odefunc, x, torch.tensor([0.0, 0.5, 1.0]), method="heun3",
                      options=STEP)[-1]


class DropoutODE(MLPODE):
    """Dropout in the outer forward, switched by ``self.training``."""

    def forward(self, x):
        h = F.dropout(self.encoder(x), 0.3, self.training)
        return self.head(self.block(h))
