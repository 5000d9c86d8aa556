"""Convert a torchdiffeq classifier to bfloat16 with rampde_fx, compile it, train both.

An ordinary torchdiffeq model (an encoder, an ODE block that calls ``torchdiffeq.odeint`` with
rk4, a linear head) learns to classify synthetic data: Gaussian inputs labelled by a fixed random
teacher network. ``rampde_fx.convert(model, dtype=torch.bfloat16)`` turns a copy of it into a
mixed-precision model (bf16 velocity, float32 accumulation, discrete adjoint), which
``torch.compile`` compiles. Both start from the same weights and see the same batches; the
script prints their losses as they train, then the final loss, held-out accuracy, time per step
and the bytes each keeps for backward, and how much faster and lighter the bf16 model is.

    python examples/quickstart.py [--steps 300]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torchdiffeq
from torch import nn

import rampde_fx
from rampde_fx.tools.memory import saved_tensor_bytes

# Wide enough that the velocity's products, not Python, set the time of a step.
FEATURES, WIDTH, CLASSES, BATCH = 16, 128, 8, 512


class Velocity(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.Tanh(),
                                 nn.Linear(2 * WIDTH, WIDTH))

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class ODEClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(FEATURES, WIDTH)
        self.velocity = Velocity()
        self.head = nn.Linear(WIDTH, CLASSES)
        self.register_buffer("times", torch.tensor([0.0, 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torchdiffeq.odeint(self.velocity, self.encoder(x), self.times, method="rk4",
                               options={"step_size": 0.25})
        return self.head(h[-1])


def make_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and the labels a fixed random tanh network gives them."""
    teacher = torch.randn(FEATURES, 32, generator=torch.Generator().manual_seed(123))
    readout = torch.randn(32, CLASSES, generator=torch.Generator().manual_seed(456))
    x = torch.randn(n, FEATURES, generator=generator)
    return x, (torch.tanh(x @ teacher) @ readout).argmax(dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    fp32 = ODEClassifier()
    # convert shares the parameters of the module it converts: convert a copy, so that the
    # float32 original trains on its own from the same initial weights.
    bf16 = torch.compile(rampde_fx.convert(copy.deepcopy(fp32), dtype=torch.bfloat16),
                         fullgraph=True)
    models = {"torchdiffeq float32": fp32, "rampde_fx bfloat16 compiled": bf16}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=3e-3) for name, m in models.items()}
    seconds = {name: 0.0 for name in models}
    losses = {name: [] for name in models}
    generator = torch.Generator().manual_seed(0)
    loss_fn = nn.CrossEntropyLoss()
    first_step = {}
    every = max(1, args.steps // 10)
    for step in range(1, args.steps + 1):
        x, y = make_data(BATCH, generator)
        for name, model in models.items():
            start = time.perf_counter()
            loss = loss_fn(model(x), y)
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
            elapsed = time.perf_counter() - start
            if step == 1:  # capture and compilation: reported apart from the steady steps
                first_step[name] = elapsed
            else:
                seconds[name] += elapsed
            losses[name].append(loss.item())
        if step % every == 0 or step == args.steps:
            shown = "  ".join(f"{name.split()[1]} {losses[name][-1]:.3f}" for name in models)
            print(f"step {step:4d}/{args.steps}  loss  {shown}", flush=True)

    x_test, y_test = make_data(4096, torch.Generator().manual_seed(1))
    x, y = make_data(BATCH, torch.Generator().manual_seed(2))
    summary = {}
    print(f"\nafter {args.steps} steps (final loss: mean of the last {min(10, args.steps)} "
          "steps' training losses):")
    for name, model in models.items():
        with torch.no_grad():
            accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
        saved = saved_tensor_bytes(lambda: loss_fn(model(x), y)) / 2**20
        final = sum(losses[name][-10:]) / len(losses[name][-10:])
        per_step = 1e3 * seconds[name] / max(1, args.steps - 1)
        print(f"  {name:<28} final loss {final:.4f}  held-out accuracy {accuracy:.3f}  "
              f"{per_step:.1f} ms/step (first step {first_step[name]:.1f} s)  "
              f"saved for backward {saved:.2f} MiB")
        summary[name] = per_step, saved
    (fp32_ms, fp32_mib), (bf16_ms, bf16_mib) = summary.values()
    print(f"\nrampde_fx bfloat16 compiled: {fp32_ms / bf16_ms:.2f}x the speed of torchdiffeq "
          f"float32, {fp32_mib / bf16_mib:.1f}x less memory kept for backward")


if __name__ == "__main__":
    main()
