"""Fit torchdiffeq's spiral demo with rampde_fx.odeint in bfloat16, next to float32.

A 2 -> 50 -> 2 tanh MLP on y**3 learns the trajectory of dy/dt = (y**3) A from mini-batches of
short windows. The same initial model is trained twice on the same batches: with the velocity
in float32 (torchdiffeq) and in bfloat16 (rampde_fx). Both are then evaluated, each with its own
solver, on held-out windows, and the errors are printed side by side.

    python examples/spiral_odeint.py [--iters 300]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torchdiffeq
from torch import nn

import rampde_fx

TRUE_A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])


class SpiralVelocity(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 50), nn.Tanh(), nn.Linear(50, 2))

    def forward(self, t, y):
        return self.net(y**3)


def make_data(n_points: int = 1000, t_end: float = 25.0):
    t = torch.linspace(0.0, t_end, n_points)
    y0 = torch.tensor([[2.0, 0.0]])
    with torch.no_grad():
        trajectory = torchdiffeq.odeint(lambda t, y: (y**3) @ TRUE_A, y0, t, method="dopri5")
    return t, trajectory


def batches(t, trajectory, generator, batch_size=20, window=10):
    while True:
        start = torch.randint(0, len(t) - window, (batch_size,), generator=generator)
        y0 = trajectory[start, 0]                                    # (batch, 2)
        windows = torch.stack([trajectory[start + i, 0] for i in range(window)])  # (window, batch, 2)
        yield y0, t[:window], windows


def train(solve, model, t, trajectory, iters):
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    data = batches(t, trajectory, torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for it in range(1, iters + 1):
        y0, t_window, target = next(data)
        loss = (solve(model, y0, t_window) - target).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if it % max(1, iters // 10) == 0 or it == iters:
            print(f"  iter {it:4d}/{iters}  loss {loss.item():.4f}", flush=True)
    seconds = (time.perf_counter() - start) / iters
    held_out = batches(t, trajectory, torch.Generator().manual_seed(1), batch_size=500)
    y0, t_window, target = next(held_out)
    with torch.no_grad():
        test_loss = (solve(model, y0, t_window) - target).abs().mean().item()
    return test_loss, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    t, trajectory = make_data()
    model = SpiralVelocity()
    options = {"step_size": 0.025}

    def fp32(m, y0, tt):
        return torchdiffeq.odeint(m, y0, tt, method="rk4", options=options)

    def bf16(m, y0, tt):
        return rampde_fx.odeint(m, y0, tt, method="rk4", options=options, dtype=torch.bfloat16)

    results = {}
    for name, solve in [("torchdiffeq float32", fp32), ("rampde_fx bfloat16", bf16)]:
        print(f"{name}:")
        results[name] = train(solve, copy.deepcopy(model), t, trajectory, args.iters)
    print("\nL1 error on 500 held-out windows after training (lower is better):")
    for name, (loss, seconds) in results.items():
        print(f"  {name:<20} {loss:.4f}   {1e3 * seconds:.1f} ms/iter")


if __name__ == "__main__":
    main()
