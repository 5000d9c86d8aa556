"""Memory and recomputation of ``checkpoint=rampde_fx.Budget(n)`` on long fixed-grid solves.

One velocity (a dim-64-dim tanh MLP in bfloat16, batch 256, dim 16: a 16 KiB float32 state),
rk4 on a fixed grid. The table solves ``--steps`` steps once per checkpoint setting, forward and
backward, and reports the bytes kept for backward (``saved_tensor_bytes``: the states kept and
the grid), the states kept, the velocity evaluations forward and backward, the forward steps
the backward pass recomputed and their ratio to revolve's bound (the fewest that any schedule
keeping ``n`` states recomputes, ``rampde_fx.engine.schedule.fewest_recomputed_steps``), the
time of the forward and backward pass, and the largest difference of the gradients from those
of ``checkpoint='steps'`` (one bfloat16 state per step).

The long solve (``--long-steps``, 0 to skip) runs with ``Budget(--long-states)`` only, and
sets its bytes kept beside what ``checkpoint='steps'`` would keep there: the bytes per step that
the table measured, times the steps.

    OMP_NUM_THREADS=1 python benchmarks/budget.py [--steps 10000] [--states 16 64 256]
                                                  [--long-steps 50000] [--long-states 64]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import rampde_fx
from rampde_fx.engine.schedule import fewest_recomputed_steps
from rampde_fx.tools.memory import saved_tensor_bytes

STAGES = 4  # rk4


class Velocity(nn.Module):
    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, dim))

    def forward(self, t, y):
        return self.net(y)


def run(func: nn.Module, y0: torch.Tensor, steps: int, checkpoint) -> dict:
    """One forward and backward pass of a ``steps``-step solve: bytes kept, stats, time and
    the gradients (of y0 and the parameters)."""
    t = torch.tensor([0.0, 1.0])
    y0 = y0.clone().requires_grad_()
    kept: dict = {}
    with rampde_fx.collect_stats() as stats:
        start = time.perf_counter()
        saved = saved_tensor_bytes(lambda: kept.setdefault("out", rampde_fx.odeint(
            func, y0, t, method="rk4", options={"step_size": 1 / steps},
            checkpoint=checkpoint)))
        forward = time.perf_counter() - start
        grads = torch.autograd.grad(kept.pop("out")[-1].square().mean(),
                                    [y0, *func.parameters()])
        backward = time.perf_counter() - start - forward
    return {"saved": saved, "stats": stats[0], "forward": forward, "backward": backward,
            "grads": grads}


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--states", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--long-steps", type=int, default=50_000)
    parser.add_argument("--long-states", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--width", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    func = Velocity(args.dim, args.width)
    y0 = torch.randn(args.batch, args.dim)
    state = y0.numel() * y0.element_size()
    grid = (args.steps + 1 + 2) * 4  # the grid and the two output times, float32
    print(f"rk4, {args.steps} steps, bfloat16 {args.dim}-{args.width}-{args.dim} tanh MLP, "
          f"batch {args.batch}: a {state / 2**10:.0f} KiB float32 state; torch "
          f"{torch.__version__}, {torch.get_num_threads()} thread(s)")
    header = (f"{'checkpoint':<12}{'kept':>12}{'states':>8}{'nfe fwd':>9}{'nfe bwd':>9}"
              f"{'recomputed':>12}{'bound':>8}{'ratio':>7}{'fwd s':>8}{'bwd s':>8}"
              f"{'grad diff':>11}")
    print(header)
    reference = None
    per_step_bytes = None
    for states in [None, *args.states]:
        checkpoint = "steps" if states is None else rampde_fx.Budget(states)
        result = run(func, y0, args.steps, checkpoint)
        stats = result["stats"]
        recomputed = stats.nfe_backward // STAGES - args.steps
        if states is None:
            reference = result["grads"]
            per_step_bytes = (result["saved"] - grid) / args.steps
            kept_states, bound, ratio = f"{args.steps}*", 0, "-"
        else:
            kept_states = f"{(result['saved'] - grid) / state:.0f}"
            bound = fewest_recomputed_steps(args.steps, states)
            ratio = f"{recomputed / bound:.3f}" if bound else "-"
        difference = max((g - r).abs().max().item() for g, r in zip(result["grads"], reference))
        print(f"{str(states or 'steps'):<12}{mib(result['saved']):>12}{kept_states:>8}"
              f"{stats.nfe_forward:>9}{stats.nfe_backward:>9}{recomputed:>12}{bound:>8}"
              f"{ratio:>7}{result['forward']:>8.1f}{result['backward']:>8.1f}"
              f"{difference:>11.1e}")
    print("* one bfloat16 state per step (half a float32 state); a budget keeps float32 states")
    if args.long_steps:
        result = run(func, y0, args.long_steps, rampde_fx.Budget(args.long_states))
        stats = result["stats"]
        recomputed = stats.nfe_backward // STAGES - args.long_steps
        bound = fewest_recomputed_steps(args.long_steps, args.long_states)
        print(f"\n{args.long_steps} steps, Budget({args.long_states}): kept "
              f"{mib(result['saved'])}; checkpoint='steps' would keep "
              f"{mib(per_step_bytes * args.long_steps)} ({per_step_bytes:.0f} bytes per step); "
              f"{recomputed} steps recomputed, bound {bound}, ratio {recomputed / bound:.3f}; "
              f"forward {result['forward']:.1f} s, backward {result['backward']:.1f} s")


if __name__ == "__main__":
    main()
