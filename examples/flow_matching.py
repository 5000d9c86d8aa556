"""Flow matching on two moons: sample and score a trained model in float32 and in bfloat16.

A velocity network ``v(t, x)`` (an MLP that sees t as an extra input) is trained in float32
with the conditional flow-matching loss on the straight path ``x_t = (1 - t) x0 + t x1`` from
noise ``x0 ~ N(0, I)`` to data ``x1``, whose target velocity is ``x1 - x0``; training solves no
ODE. Then, written as a library writes them, a sampler integrates ``dx/dt = v(t, x)`` from noise
at t=0 to data at t=1 with ``torchdiffeq.odeint``, and a log-likelihood function integrates the
augmented ODE from data at t=1 back to noise at t=0, accumulating the exact divergence
(``torch.autograd.grad`` per dimension) in float32:
``log p(x) = log N(z) + integral from 1 to 0 of div v(t, x(t)) dt``.

Both run three times on the same noise and held-out data: as written (float32 torchdiffeq),
inside ``rampde_fx.mixed_precision(dtype=torch.bfloat16)`` (neither function is changed), and
on a float64 copy of the model, the reference the other two are measured against. The script
prints time per batch, held-out NLL and the errors against float64 of both, what the scope
converted, and saves the float32 and bfloat16 samples side by side as a PNG (with matplotlib).

    python examples/flow_matching.py [--iters 10000] [--steps 32] [--plot flow_matching.png]
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Callable

import torch
import torchdiffeq
from torch import nn

import rampde_fx
from ode_models import FlowMLPVelocity, rel_err


def two_moons(n: int, generator: torch.Generator, noise: float = 0.08) -> torch.Tensor:
    """Two interleaved half circles, centred and scaled to about unit spread."""
    angle = math.pi * torch.rand(n, generator=generator)
    lower = torch.rand(n, generator=generator) < 0.5
    x = torch.where(lower, 1.0 - angle.cos(), angle.cos())
    y = torch.where(lower, 0.5 - angle.sin(), angle.sin())
    points = torch.stack([x - 0.5, y - 0.25], dim=1) * 1.6
    return points + noise * torch.randn(n, 2, generator=generator)


def train(model: FlowMLPVelocity, iters: int, batch: int) -> float:
    """Conditional flow matching in float32; returns milliseconds per iteration."""
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iters)
    generator = torch.Generator().manual_seed(0)
    every = max(1, iters // 10)
    window = []
    start = time.perf_counter()
    for it in range(1, iters + 1):
        x1 = two_moons(batch, generator)
        x0 = torch.randn(batch, 2, generator=generator)
        t = torch.rand(batch, 1, generator=generator)
        xt = (1 - t) * x0 + t * x1
        loss = (model(t, xt) - (x1 - x0)).square().sum(dim=1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        window.append(loss.item())
        if it % every == 0 or it == iters:
            print(f"  iter {it:5d}/{iters}  flow-matching loss {sum(window) / len(window):.4f}",
                  flush=True)
            window = []
    return 1e3 * (time.perf_counter() - start) / iters


# A sampler and a log-likelihood as a library writes them: plain functions of any velocity
# network, calling torchdiffeq themselves.

def sample(model: nn.Module, noise: torch.Tensor, steps: int,
           method: str = "midpoint") -> torch.Tensor:
    """Transport noise (t=0) to data (t=1) with ``steps`` fixed steps."""
    times = torch.tensor([0.0, 1.0]).to(noise)
    path = torchdiffeq.odeint(lambda t, x: model(t, x), noise, times, method=method,
                              options={"step_size": 1.0 / steps})
    return path[-1]


def log_likelihood(model: nn.Module, x: torch.Tensor, steps: int,
                   method: str = "midpoint") -> torch.Tensor:
    """log p(x) per sample: the flow run backward from data (t=1) to noise (t=0)."""

    def augmented(t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        x, _ = state
        with torch.enable_grad():  # dv/dx, also when the solve runs without grad
            x = x.requires_grad_(True)
            v = model(t, x)
            # exact trace: one autograd.grad per dimension (two here)
            divergence = sum(torch.autograd.grad(v[:, i].sum(), x, create_graph=True)[0][:, i]
                             for i in range(x.shape[1]))
        return v, divergence

    times = torch.tensor([1.0, 0.0]).to(x)
    start = torch.zeros(x.shape[0]).to(x)
    z, integral = torchdiffeq.odeint(augmented, (x, start), times, method=method,
                                     options={"step_size": 1.0 / steps})
    log_normal = -0.5 * z[-1].square().sum(dim=1) - 0.5 * x.shape[1] * math.log(2 * math.pi)
    return log_normal + integral[-1]


def timed(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[torch.Tensor, float]:
    """fn's result and its median time in ms over ``repeats`` calls after a first one (which
    captures the velocity in a converted solve)."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return result, statistics.median(times)


def plot(clouds: dict[str, torch.Tensor], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: plot skipped (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(clouds), figsize=(4 * len(clouds), 4))
    for ax, (name, points) in zip(axes, clouds.items()):
        points = points.float().numpy()
        ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5)
        ax.set(title=name, xlim=(-3, 3), ylim=(-3, 3), xticks=[], yticks=[], aspect="equal")
    fig.tight_layout()
    fig.savefig(path)
    print(f"samples saved to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=10000, help="training iterations")
    parser.add_argument("--batch", type=int, default=1024, help="training batch size")
    parser.add_argument("--samples", type=int, default=2048,
                        help="batch size of sampling and of the held-out likelihoods")
    parser.add_argument("--steps", type=int, default=32, help="solver steps over [0, 1]")
    parser.add_argument("--method", default="midpoint", choices=["euler", "midpoint", "rk4"])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    parser.add_argument("--plot", default="flow_matching.png",
                        help="where to save the PNG ('' for none)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = FlowMLPVelocity()
    print(f"training v(t, x) by conditional flow matching in float32, batch {args.batch}:")
    ms_per_iter = train(model, args.iters, args.batch)
    print(f"  {ms_per_iter:.2f} ms/iter")
    model.eval()

    noise = torch.randn(args.samples, 2, generator=torch.Generator().manual_seed(1))
    test = two_moons(args.samples, torch.Generator().manual_seed(2))
    solve = {"steps": args.steps, "method": args.method}

    with torch.no_grad():
        model64 = copy.deepcopy(model).double()
        reference = {"samples": sample(model64, noise.double(), **solve),
                     "logp": log_likelihood(model64, test.double(), **solve)}
        results = {}
        results["float32"] = (timed(lambda: sample(model, noise, **solve), args.repeats),
                              timed(lambda: log_likelihood(model, test, **solve), args.repeats))
        # the same functions, unchanged: every solve they start in the block is converted
        with rampde_fx.mixed_precision(dtype=torch.bfloat16) as mp:
            results["bfloat16"] = (
                timed(lambda: sample(model, noise, **solve), args.repeats),
                timed(lambda: log_likelihood(model, test, **solve), args.repeats))

    print(f"\n{args.samples} samples and held-out log-likelihoods, {args.method}, {args.steps} "
          "steps; errors against a float64 solve of the same model: samples and log p relative "
          "(2-norm), log p also mean absolute (nats)")
    print(f"  {'':<31} {'sample ms':>9} {'loglik ms':>9} {'NLL nats':>9} {'sample err':>10} "
          f"{'logp err':>9} {'logp |err|':>10}")
    labels = {"float32": "torchdiffeq float32", "bfloat16": "rampde_fx.mixed_precision bf16"}
    for name, ((samples, sample_ms), (logp, logp_ms)) in results.items():
        mean_abs = (logp.double() - reference["logp"]).abs().mean().item()
        print(f"  {labels[name]:<31} {sample_ms:9.1f} {logp_ms:9.1f} {-logp.mean().item():9.4f} "
              f"{rel_err(samples, reference['samples']):10.2e} "
              f"{rel_err(logp, reference['logp']):9.2e} {mean_abs:10.2e}")
    print(f"  {'float64 reference':<31} {'':>9} {'':>9} {-reference['logp'].mean().item():9.4f}")

    print(f"\nconverted by the scope: {len(mp.sites)} solve(s)")
    for line in mp.explain().splitlines():
        if line.startswith(("solve ", "  last solve:", "  velocity runs eagerly")):
            print(f"  {line.strip()}")
    if args.plot:
        plot({"float32 (torchdiffeq)": results["float32"][0][0],
              "bfloat16 (rampde_fx.mixed_precision)": results["bfloat16"][0][0]}, args.plot)


if __name__ == "__main__":
    main()
