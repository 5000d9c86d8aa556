"""Step counts and errors of one adaptive solve in float32, bfloat16 and float16.

One problem, the ODE-Net block of ``benchmarks/run.py``'s ``odenet`` workload (GroupNorm, ReLU,
convolutions with t as a channel) on a state of magnitude about 10, solved with dopri5 at two
tolerances: one that bfloat16 resolves (1e-3) and one below bfloat16's rounding floor (1e-6),
where rampde_fx warns and controls the steps to the floor. Rows: torchdiffeq in float32 and in
float16 (on a float16 copy of the model and state, as torchdiffeq runs it), and rampde_fx with a
float32, bfloat16 and float16 velocity. Columns: accepted and rejected steps (rampde_fx's
``SolveStats``), velocity evaluations forward and backward, and the relative errors of the
final state and of all parameter gradients (one vector) against a float64 torchdiffeq solve at
rtol=atol=1e-10.

    python benchmarks/adaptive_steps.py [--channels 16] [--size 8] [--batch 8]
"""
from __future__ import annotations

import argparse
import copy
import warnings

import torch
import torchdiffeq
from torch import nn

import rampde_fx
from run import final_state, flat, make_step  # also puts examples/ on the path
from ode_models import ODENetVelocity, rel_err  # noqa: E402


class Counted(nn.Module):
    """Counts the velocity evaluations torchdiffeq makes."""

    def __init__(self, func: nn.Module) -> None:
        super().__init__()
        self.func, self.evaluations = func, 0

    def forward(self, t, y):
        self.evaluations += 1
        return self.func(t, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = ODENetVelocity(args.channels)
    y0 = 10 + torch.randn(args.batch, args.channels, args.size, args.size)
    t = torch.tensor([0.0, 1.0])
    reference = make_step(
        lambda m, y, tt: torchdiffeq.odeint(m, y, tt, rtol=1e-10, atol=1e-10),
        copy.deepcopy(model).double(), y0.double(), t.double())()

    print(f"ODE-Net block, {args.channels} channels, {args.size}x{args.size}, batch "
          f"{args.batch}, |y0| ~ 10, dopri5, t in [0, 1]")
    print(f"{'tol':>6} {'variant':<22}{'accepted':>9}{'rejected':>9}{'nfe fwd':>9}"
          f"{'nfe bwd':>9}{'out err':>10}{'grad err':>10}")

    def row(tol, name, accepted, rejected, nfe_forward, nfe_backward, got):
        out, grads = got
        print(f"{tol:>6.0e} {name:<22}{accepted:>9}{rejected:>9}{nfe_forward:>9}"
              f"{nfe_backward:>9}{rel_err(final_state(out), final_state(reference[0])):>10.1e}"
              f"{rel_err(flat(grads), flat(reference[1])):>10.1e}")

    for tol in (1e-3, 1e-6):
        for name, dtype in (("torchdiffeq fp32", torch.float32),
                            ("torchdiffeq fp16", torch.float16)):
            counted = Counted(copy.deepcopy(model).to(dtype))
            try:
                got = make_step(lambda m, y, tt: torchdiffeq.odeint(m, y, tt, rtol=tol, atol=tol),
                                counted, y0.to(dtype), t.to(dtype))()
            except AssertionError as error:  # torchdiffeq's "underflow in dt"
                print(f"{tol:>6.0e} {name:<22}failed: {error}")
                continue
            row(tol, name, "-", "-", counted.evaluations, "-", got)
        for name, dtype in (("rampde_fx fp32", torch.float32),
                            ("rampde_fx bf16", torch.bfloat16),
                            ("rampde_fx fp16", torch.float16)):
            with warnings.catch_warnings(record=True) as caught, \
                    rampde_fx.collect_stats() as solves:
                warnings.simplefilter("always", rampde_fx.ToleranceWarning)
                got = make_step(lambda m, y, tt: rampde_fx.odeint(m, y, tt, rtol=tol, atol=tol,
                                                                  dtype=dtype),
                                model, y0, t)()
            stats = solves[0]
            row(tol, name, stats.steps, stats.rejected_steps, stats.nfe_forward,
                stats.nfe_backward, got)
            if caught:
                print(f"{'':>7}ToleranceWarning: {caught[0].message}")


if __name__ == "__main__":
    main()
