"""Only the low-precision state of each step is saved for backward."""
from __future__ import annotations

import torch
import torchdiffeq
from torch import nn

import rampde_fx
from rampde_fx.tools.memory import saved_tensor_bytes as saved_bytes


def test_saved_bytes_are_one_bf16_state_per_step():
    torch.manual_seed(0)
    func = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 16))
    velocity = lambda t, y: func(y)  # noqa: E731
    y0 = torch.randn(256, 16, requires_grad=True)
    t = torch.linspace(0, 1, 5)
    steps = 20
    options = {"step_size": 1 / steps}

    ours = saved_bytes(lambda: rampde_fx.odeint(velocity, y0, t, method="rk4", options=options))
    grid_and_times = (steps + 1 + len(t)) * 4
    assert ours == steps * y0.numel() * 2 + grid_and_times

    reference = saved_bytes(lambda: torchdiffeq.odeint(velocity, y0, t, method="rk4",
                                                       options=options))
    # torchdiffeq keeps every stage's activations in float32: more than 20x as much here.
    assert reference > 20 * ours


def test_inference_saves_nothing():
    func = nn.Linear(4, 4)
    y0 = torch.randn(8, 4)
    with torch.no_grad():
        assert saved_bytes(lambda: rampde_fx.odeint(lambda t, y: func(y), y0,
                                                    torch.linspace(0, 1, 3), method="rk4")) == 0
