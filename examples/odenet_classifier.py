"""Train an ODE-Net classifier on scikit-learn's 8x8 digits, float32 and bfloat16.

The model is ODE-Net's: a convolution lifts the image to ``--channels`` channels, an ODE block
(GroupNorm, ReLU, convolution with t as an extra channel, twice) is solved with
``torchdiffeq.odeint`` over t in [0, 1], and a pooled linear head classifies. The same initial
model is trained twice on the same batches: as written, in float32 with torchdiffeq, and
converted by ``rampde_fx.convert`` to a bfloat16 velocity. The script prints both test
accuracies, time per epoch, and how far the bf16 solve's logits are from a float64 solve of the
same trained weights. The digits ship with scikit-learn (no download).

``--method rk4`` (the default) uses 4 fixed steps; ``--method dopri5`` solves with
rtol=atol=1e-3 as ODE-Net does, where rampde_fx has adaptive methods.

    python examples/odenet_classifier.py [--epochs 5] [--channels 32] [--method rk4|dopri5]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torchdiffeq
from sklearn.datasets import load_digits
from torch import nn

import rampde_fx
from ode_models import ODENetVelocity, rel_err


class ODEBlock(nn.Module):
    def __init__(self, channels: int, method: str) -> None:
        super().__init__()
        self.velocity = ODENetVelocity(channels)
        self.method = method
        self.options = {"step_size": 0.25} if method == "rk4" else None
        self.register_buffer("times", torch.tensor([0.0, 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torchdiffeq.odeint(self.velocity, x, self.times, rtol=1e-3, atol=1e-3,
                                  method=self.method, options=self.options)[-1]


class ODENetClassifier(nn.Module):
    def __init__(self, channels: int, method: str) -> None:
        super().__init__()
        self.lift = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1),
                                  nn.GroupNorm(min(32, channels), channels), nn.ReLU())
        self.block = ODEBlock(channels, method)
        self.head = nn.Sequential(nn.GroupNorm(min(32, channels), channels), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(channels, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.lift(x)))


def load() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and test images (N, 1, 8, 8) in [0, 1] and labels; a fixed 80/20 split."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--method", default="rk4", choices=["rk4", "dopri5"])
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    x_train, y_train, x_test, y_test = load()
    torch.manual_seed(0)
    fp32 = ODENetClassifier(args.channels, args.method)
    # convert shares the parameters of the module it converts: bf16_weights is the float32
    # torchdiffeq model that holds what the bf16 training learns.
    bf16_weights = copy.deepcopy(fp32)
    models = {"torchdiffeq float32": fp32,
              "rampde_fx bfloat16": rampde_fx.convert(bf16_weights, dtype=torch.bfloat16)}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=3e-3) for name, m in models.items()}
    seconds = {name: 0.0 for name in models}
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(epoch))
        for name, model in models.items():
            start = time.perf_counter()
            for batch in order.split(args.batch):
                loss = loss_fn(model(x_train[batch]), y_train[batch])
                optimizers[name].zero_grad()
                loss.backward()
                optimizers[name].step()
            seconds[name] += time.perf_counter() - start
        shown = "  ".join(f"{name.split()[1]} {accuracy(m, x_test, y_test):.3f}"
                          for name, m in models.items())
        print(f"epoch {epoch}/{args.epochs}  test accuracy  {shown}", flush=True)

    print(f"\nafter {args.epochs} epochs ({args.method}), {len(y_test)} test digits:")
    for name, model in models.items():
        print(f"  {name:<20} test accuracy {accuracy(model, x_test, y_test):.4f}  "
              f"{seconds[name] / args.epochs:.1f} s/epoch")
    with torch.no_grad():
        logits = models["rampde_fx bfloat16"](x_test)
        reference = copy.deepcopy(bf16_weights).double()(x_test.double())
    print(f"bf16 solve's test logits, relative error against a float64 solve of the same "
          f"weights: {rel_err(logits, reference):.1e}")


if __name__ == "__main__":
    main()
