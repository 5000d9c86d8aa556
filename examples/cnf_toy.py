"""Train an FFJORD-style continuous normalizing flow on a 2-D toy density, float32 and bfloat16.

The data are 8 Gaussians on a circle. The flow's velocity has a hypernetwork in t and an exact
trace divergence (``torch.autograd.grad`` inside the velocity), which rampde_fx captures as one
graph with its derivative ops and runs under its bfloat16 policy. The same initial model is
trained twice on the same batches: with ``torchdiffeq.odeint`` in float32, and converted by
``rampde_fx.convert`` to bfloat16. Both trained models are then scored on held-out samples with
the same float32 torchdiffeq solve; the bf16 model also with its own bf16 solve, whose error is
measured against a float64 solve of the same weights. With matplotlib installed, the learned
densities are saved side by side as a PNG.

    python examples/cnf_toy.py [--iters 300] [--plot cnf_toy.png]
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torchdiffeq
from torch import nn

import rampde_fx
from ode_models import HyperCNFVelocity, rel_err

STEPS = 16  # rk4 steps over t in [0, 1]


class CNF(nn.Module):
    """Log-likelihood of data under a flow from the data (t=0) to a standard normal (t=1)."""

    def __init__(self) -> None:
        super().__init__()
        self.velocity = HyperCNFVelocity(dim=2, width=64)
        self.register_buffer("times", torch.tensor([0.0, 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp0 = torch.zeros(x.shape[0], 1).to(x)
        z, delta = torchdiffeq.odeint(self.velocity, (x, logp0), self.times, method="rk4",
                                      options={"step_size": 1.0 / STEPS})
        # d(logp)/dt = -div, so log p(x) = log N(z(1)) - delta(1).
        log_normal = -0.5 * z[-1].square().sum(dim=1) - math.log(2 * math.pi)
        return log_normal - delta[-1].squeeze(1)


def eight_gaussians(n: int, generator: torch.Generator) -> torch.Tensor:
    angles = torch.randint(0, 8, (n,), generator=generator) * (math.pi / 4)
    centres = 2.0 * torch.stack([angles.cos(), angles.sin()], dim=1)
    return centres + 0.2 * torch.randn(n, 2, generator=generator)


def train(model: nn.Module, iters: int, batch: int, label: str) -> float:
    """Maximum-likelihood training; returns seconds per iteration."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    every = max(1, iters // 10)
    start = time.perf_counter()
    for it in range(1, iters + 1):
        loss = -model(eight_gaussians(batch, generator)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if it % every == 0 or it == iters:
            print(f"  {label} iter {it:4d}/{iters}  nll {loss.item():.3f}", flush=True)
    return (time.perf_counter() - start) / iters


def plot(models: dict[str, nn.Module], data: torch.Tensor, path: str) -> None:
    """Data histogram and each model's density (float32 solve) on a grid, side by side."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: plot skipped (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = torch.linspace(-3.5, 3.5, 80)
    grid = torch.cartesian_prod(side, side)
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(4 * (len(models) + 1), 4))
    axes[0].hist2d(data[:, 0].numpy(), data[:, 1].numpy(), bins=80,
                   range=[[-3.5, 3.5], [-3.5, 3.5]])
    axes[0].set_title("data")
    for ax, (name, model) in zip(axes[1:], models.items()):
        with torch.no_grad():
            density = model(grid).exp().view(80, 80)
        ax.imshow(density.T.numpy(), origin="lower", extent=[-3.5, 3.5, -3.5, 3.5])
        ax.set_title(name)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    print(f"densities saved to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--plot", default="cnf_toy.png", help="where to save the PNG")
    args = parser.parse_args()
    torch.manual_seed(0)
    fp32 = CNF()
    # convert shares the parameters of the module it converts: bf16_weights is the float32
    # torchdiffeq model that holds what the bf16 training learns.
    bf16_weights = copy.deepcopy(fp32)
    bf16 = rampde_fx.convert(bf16_weights, dtype=torch.bfloat16)
    seconds = {"float32": train(fp32, args.iters, args.batch, "torchdiffeq float32"),
               "bfloat16": train(bf16, args.iters, args.batch, "rampde_fx bfloat16")}

    test = eight_gaussians(4096, torch.Generator().manual_seed(1))
    with torch.no_grad():
        nll = {"fp32": -fp32(test).mean().item(), "bf16": -bf16_weights(test).mean().item()}
        own = bf16(test)
        reference = copy.deepcopy(bf16_weights).double()(test.double())
    print(f"\nheld-out NLL (nats, lower is better) on {len(test)} samples, float32 "
          "torchdiffeq solve of each trained model:")
    print(f"  trained in float32 (torchdiffeq)   {nll['fp32']:.4f}   "
          f"{1e3 * seconds['float32']:.0f} ms/iter")
    print(f"  trained in bfloat16 (rampde_fx)    {nll['bf16']:.4f}   "
          f"{1e3 * seconds['bfloat16']:.0f} ms/iter")
    print(f"bf16 model with its own bf16 solve: NLL {-own.mean().item():.4f}; log-likelihoods' "
          f"relative error against a float64 solve {rel_err(own, reference):.1e}")
    plot({"float32 (torchdiffeq)": fp32, "bfloat16 (rampde_fx)": bf16_weights}, test, args.plot)


if __name__ == "__main__":
    main()
