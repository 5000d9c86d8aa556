"""What binding and guarding cost per solve, and what velocities made per call cost.

    python benchmarks/per_call.py [--calls 1000]

For each velocity pattern, in one process: the median time (over three rounds, in turn) of a
forward and backward bf16 rk4 solve (8 steps, batch 256) with a velocity made once and reused,
and with an equal velocity made anew for every call (a lambda closing over the network and a
condition tensor, or a vector-field module built per call); then, after ``--calls`` per-call solves, how many graphs
the capture cache holds for the pattern, how many solve sites ``explain`` lists, and how many
tensors and captured velocities are alive (garbage collected first). Last, the time of the
guard check alone (``capture.guards.guard_state``) for the velocities of ``benchmarks/run.py``.
"""
from __future__ import annotations

import argparse
import gc
import pathlib
import statistics
import sys
import time
import warnings
from typing import Callable

import torch
import torchdiffeq
from torch import nn

import rampde_fx
from rampde_fx.capture import GraphVelocity, lifted_slots
from rampde_fx.capture.guards import guard_state
from rampde_fx.tools import debug

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from ode_models import HyperCNFVelocity, MLPVelocity, ODENetVelocity  # noqa: E402

T = torch.tensor([0.0, 1.0])
SOLVER = {"method": "rk4", "options": {"step_size": 1 / 8}}


class Conditioned(nn.Module):
    def __init__(self, dim: int = 16, width: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 2, width), nn.Tanh(), nn.Linear(width, dim))

    def forward(self, t, y, cond):
        return self.net(torch.cat([y, cond, t.expand(y.shape[0], 1)], dim=1))


class Field(nn.Module):
    def __init__(self, net: nn.Module, cond: torch.Tensor) -> None:
        super().__init__()
        self.net, self.cond = net, cond

    def forward(self, t, y):
        return self.net(t, y, self.cond)


class Sampler(nn.Module):
    """Solves with a velocity made once (``reused``) or anew per call."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.model, self.how = Conditioned(), how
        self.field = Field(self.model, torch.zeros(0))

    def forward(self, y, cond):
        if self.how == "reused":
            self.field.cond = cond
            func = self.field
        elif self.how == "lambda":
            func = lambda t, z: self.model(t, z, cond)  # noqa: E731
        else:
            func = Field(self.model, cond)
        return torchdiffeq.odeint(func, y, T, **SOLVER)[-1]


def median_ms(step: Callable[[], None], repeats: int = 15) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def alive() -> tuple[int, int]:
    gc.collect()
    objects = gc.get_objects()
    with warnings.catch_warnings():  # isinstance on deprecated module proxies warns
        warnings.simplefilter("ignore", FutureWarning)
        return (sum(isinstance(o, GraphVelocity) for o in objects),
                sum(isinstance(o, torch.Tensor) for o in objects))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args()
    torch.manual_seed(0)
    y, cond = torch.randn(256, 16), torch.randn(256, 1)
    print(f"{'velocity':<10}{'ms/call':>10}{'x reused':>10}{'graphs':>8}{'sites':>7}"
          f"{'velocities alive':>18}{'tensors alive':>15}")
    models = {how: rampde_fx.convert(Sampler(how)) for how in ("reused", "lambda", "module")}

    def step(model: nn.Module) -> Callable[[], None]:
        return lambda: model(y, cond).square().sum().backward()

    # Rounds in turn, so that the machine's drift reaches every variant alike.
    rounds = {how: [median_ms(step(model)) for _ in range(1)] for how, model in models.items()}
    for _ in range(2):
        for how, model in models.items():
            rounds[how].append(median_ms(step(model)))
    reference = statistics.median(rounds["reused"])
    for how, model in models.items():
        ms = statistics.median(rounds[how])
        before = alive()
        for _ in range(args.calls):
            with torch.no_grad():
                model(y, cond)
        after = alive()
        kind = {"reused": model.field, "module": model.field,
                "lambda": lambda t, z: model.model(t, z, cond)}[how]
        graphs = len(debug.captured_velocities(kind)) if how != "lambda" else "-"
        print(f"{how:<10}{ms:>10.2f}{ms / reference:>10.2f}{graphs!s:>8}"
              f"{len(debug.sites(model)):>7}{f'{before[0]} -> {after[0]}':>18}"
              f"{f'{before[1]} -> {after[1]}':>15}")
    print("\nguard check per solve (guard_state):")
    for name, velocity in (("mlp", MLPVelocity(64, 256)), ("odenet", ODENetVelocity(64)),
                           ("cnf", HyperCNFVelocity())):
        slots = lifted_slots(velocity)
        ms = median_ms(lambda velocity=velocity, slots=slots: guard_state(velocity, set(), slots),
                       repeats=200)
        print(f"  {name:<8}{ms * 1e3:8.1f} us")


if __name__ == "__main__":
    main()
