"""Side-by-side benchmark of mixed-precision solves against torchdiffeq.

Every variant of a workload runs in one process, on the same model and data, and is measured
the same way: median forward+backward time (consecutive steps, in rounds), bytes kept for backward
(``rampde_fx.diagnostics.saved_tensor_bytes``), and the relative error of the output and of the
parameter gradients against a float64 torchdiffeq solve.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--workload mlp] [--json PATH]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
import torchdiffeq
from torch import nn

import rampde_fx
from rampde_fx.diagnostics import saved_tensor_bytes


@dataclasses.dataclass
class Workload:
    name: str
    make_velocity: Callable[[], nn.Module]
    make_state: Callable[[torch.Generator], torch.Tensor]
    method: str
    steps: int


class MLPVelocity(nn.Module):
    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, width),
                                 nn.Tanh(), nn.Linear(width, dim))

    def forward(self, t, y):
        return self.net(y)


def workloads(quick: bool) -> dict[str, Workload]:
    batch = 512 if quick else 2048
    return {
        "mlp": Workload("mlp (64-256-256-64 tanh, batch %d, 20 rk4 steps)" % batch,
                        lambda: MLPVelocity(64, 256),
                        lambda g: torch.randn(batch, 64, generator=g), "rk4", 20),
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def prepare(name, solve, model, y0, t, reference, device):
    """Warm up (capture, compile) a variant; measure its memory and errors; return the
    forward+backward step to time."""
    params = list(model.parameters())

    def step():
        out = solve(model, y0, t)
        grads = torch.autograd.grad(out[-1].square().mean(), params)
        return out, grads

    out, grads = step()
    row = {
        "variant": name,
        "saved_MiB": saved_tensor_bytes(lambda: solve(model, y0, t)) / 2**20,
        "output_err": rel_err(out[-1], reference[0]),
        "grad_err": max(rel_err(g, r) for g, r in zip(grads, reference[1])),
    }
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step()
        row["peak_MiB"] = torch.cuda.max_memory_allocated() / 2**20
    return row, step


def time_in_rounds(steps, repeats, device, rounds=3):
    """Median seconds of each step. Each round times every variant over consecutive steps
    after one untimed step, as a training loop runs it (allocations reused); rounds repeat in
    turn so that drift in the machine's speed affects every variant alike."""
    times = [[] for _ in steps]
    for _ in range(rounds):
        for own, step in zip(times, steps):
            step()
            for _ in range(max(1, repeats // rounds)):
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                step()
                if device == "cuda":
                    torch.cuda.synchronize()
                own.append(time.perf_counter() - start)
    return [statistics.median(own) for own in times]


def run_workload(work: Workload, device: str, repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = work.make_velocity().to(device)
    y0 = work.make_state(g).to(device)
    t = torch.tensor([0.0, 1.0], device=device)
    options = {"step_size": 1.0 / work.steps}

    model64 = copy.deepcopy(model).double()
    out64 = torchdiffeq.odeint(model64, y0.double(), t.double(), method=work.method,
                               options=options)
    grads64 = torch.autograd.grad(out64[-1].square().mean(), list(model64.parameters()))
    reference = (out64[-1], grads64)

    def tdq(m, y, tt):
        return torchdiffeq.odeint(m, y, tt, method=work.method, options=options)

    def tdq_adjoint(m, y, tt):
        return torchdiffeq.odeint_adjoint(m, y, tt, method=work.method, options=options,
                                          adjoint_method=work.method,
                                          adjoint_options=options)

    def tdq_autocast(m, y, tt):
        with torch.autocast(device, dtype=torch.bfloat16):
            return tdq(m, y, tt)

    def ours(dtype, checkpoint="steps"):
        return lambda m, y, tt: rampde_fx.odeint(m, y, tt, method=work.method, options=options,
                                                 dtype=dtype, checkpoint=checkpoint)

    def ours_compiled(dtype, checkpoint="steps"):
        solve = torch.compile(ours(dtype, checkpoint), fullgraph=True)
        return lambda m, y, tt: solve(m, y, tt)

    variants = [("torchdiffeq fp32", tdq), ("torchdiffeq fp32 adjoint", tdq_adjoint),
                ("torchdiffeq autocast bf16", tdq_autocast),
                ("rampde_fx fp32", ours(torch.float32)), ("rampde_fx bf16", ours(torch.bfloat16)),
                ("rampde_fx bf16 compiled", ours_compiled(torch.bfloat16)),
                ("rampde_fx bf16 stages compiled", ours_compiled(torch.bfloat16, "stages"))]
    if device == "cuda":
        variants += [("rampde_fx fp16", ours(torch.float16)),
                     ("rampde_fx fp16 compiled", ours_compiled(torch.float16))]
    prepared = [prepare(name, solve, model, y0, t, reference, device) for name, solve in variants]
    rows = [row for row, _ in prepared]
    for row, seconds in zip(rows, time_in_rounds([step for _, step in prepared], repeats,
                                                 device)):
        row["median_ms"] = 1e3 * seconds
    base = rows[0]["median_ms"]
    for row in rows:
        row["speedup"] = base / row["median_ms"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workload", action="append", help="workload name (repeatable)")
    parser.add_argument("--json", default="benchmarks/results.json", help="where to write JSON")
    args = parser.parse_args()
    available = workloads(args.quick)
    names = args.workload or list(available)
    unknown = set(names) - set(available)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; choose from {sorted(available)}")
    repeats = 3 if args.quick else 12
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    report = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "torch": torch.__version__,
              "machine": f"{platform.processor() or platform.machine()}, "
                         f"{torch.get_num_threads()} threads, {args.device}",
              "workloads": {}}
    for name in names:
        rows = run_workload(available[name], args.device, repeats)
        report["workloads"][name] = rows
        print(f"\n{available[name].name}")
        header = f"{'variant':<32}{'ms':>9}{'speedup':>9}{'saved MiB':>11}{'out err':>10}{'grad err':>10}"
        print(header)
        for r in rows:
            print(f"{r['variant']:<32}{r['median_ms']:>9.1f}{r['speedup']:>9.2f}"
                  f"{r['saved_MiB']:>11.2f}{r['output_err']:>10.1e}{r['grad_err']:>10.1e}")
    with open(args.json, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"\n{report['date']}, commit {commit}, torch {torch.__version__}, {report['machine']}; "
          f"JSON in {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
