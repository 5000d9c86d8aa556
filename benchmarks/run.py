"""Side-by-side benchmark of mixed-precision solves against torchdiffeq.

Every variant of a workload runs in one process, on the same model and data, and is measured
the same way: median forward+backward time (consecutive steps, in rounds), bytes kept for
backward (``rampde_fx.tools.memory.saved_tensor_bytes``), the step's peak CUDA memory above what
was allocated before it (on cuda), and the relative error of the final state and of all
parameter gradients (one vector) against a float64 torchdiffeq solve with the same method and
options (for adaptive methods, with tolerances of 1e-8).

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--workload NAME] [--compile-times]
                             [--json PATH]

Workloads (``--workload``, repeatable; default all, plus the compile-time section):

- ``mlp``: 64-256-256-64 tanh MLP, batch 2048, 20 rk4 steps.
- ``conv``: STL-10-style block (conv3x3, ReLU, InstanceNorm2d, transposed conv3x3), 64 channels,
  32x32, batch 16, 4 rk4 steps.
- ``cnf``: FFJORD-style CNF on 2-D data, hypernetwork in t, exact trace divergence with
  ``torch.autograd.grad``, state ``(z, logp)``, batch 1024, 32 rk4 steps; rampde_fx captures
  the velocity with its derivative ops as one graph.
- ``odenet``: ODE-Net block (GroupNorm, ReLU, conv with t as a channel), 64 channels, 16x16,
  batch 32, dopri5 with rtol=atol=1e-3.
- ``launch``: 2-16-2 tanh MLP, batch 16, 100 rk4 steps: so small that kernel launches and
  per-step host work set the time (the regime of a GPU at realistic sizes); run it with one
  thread (``OMP_NUM_THREADS=1``).

A compiled variant that fails in one of the ways listed in ``COMPILE_FAILURES`` is reported as
skipped, with the error, and the other variants still run.

"bf16 matmul floor" is the speedup a bf16 variant would get over torchdiffeq fp32 if only the
workload's matmuls and convolutions got faster, by the ratio measured on this machine with the
workload's own shapes: the profiler's self time of the matmul/conv ops (forward and backward) in
one torchdiffeq fp32 step and in one torchdiffeq autocast-bf16 step (the same ops with the same
shapes in bf16) gives ``mm32`` and ``mm16`` per step, and with ``T`` the median fp32 step time,
``floor = T / (T - mm32 + mm16)``. A variant above the floor also gained outside the matmuls;
below it, its other work (elementwise ops, casts, solver overhead) costs more than in fp32.

"x own floor" is a rampde_fx variant's time over the self time (device time on cuda) of the
matmul/convolution ops that its own step runs, profiled in the same run: 1.00 would be a solve
that does nothing but its 16-bit products. It is left out ("-") where the products are not
library calls (the compiled kernels trace products of at most ``SMALL_MATMUL`` multiply-adds
as fused arithmetic on CPU) or take under 1% of the step.

``--compile-times`` measures the first call (dynamo, AOTAutograd and inductor compilation plus
one forward+backward) of the compiled bf16 solve on the mlp workload at 8 and at 128 rk4 steps,
each after ``torch._dynamo.reset()``, with a fresh velocity and inductor's caches off, the
compilation alone (the first call less a steady step), and the ratios of both: compile time
should not grow with the number of steps. (At full size a step at 128 steps takes seconds, so
there the first call's ratio measures the solve more than the compiler.)
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Union

import torch
import torch._dynamo
import torchdiffeq
from torch import nn

import rampde_fx
from rampde_fx.tools.memory import saved_tensor_bytes

# The workload velocities are the examples' own models.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from ode_models import (ConvBlockVelocity, HyperCNFVelocity, MLPVelocity,  # noqa: E402
                        ODENetVelocity, TinyMLPVelocity, rel_err)

State = Union[torch.Tensor, tuple[torch.Tensor, ...]]
Solve = Callable[[nn.Module, State, torch.Tensor], State]
Step = Callable[[], Any]


@dataclasses.dataclass
class Workload:
    title: str
    make_velocity: Callable[[], nn.Module]
    make_state: Callable[[torch.Generator], State]
    solver: dict[str, Any]  # torchdiffeq's keyword arguments: method and options or tolerances


# How a compiled variant may fail (a graph break under fullgraph=True), reported instead of
# ending the run.
COMPILE_FAILURES = (torch._dynamo.exc.Unsupported,)


def rk4(steps: int) -> dict[str, Any]:
    return {"method": "rk4", "options": {"step_size": 1.0 / steps}}


def workloads(quick: bool) -> dict[str, Workload]:
    mlp_batch = 512 if quick else 2048
    conv_channels, conv_size, conv_batch = (32, 16, 4) if quick else (64, 32, 16)
    cnf_batch, cnf_steps = (256, 16) if quick else (1024, 32)
    net_channels, net_size, net_batch = (16, 8, 8) if quick else (64, 16, 32)

    launch_steps = 20 if quick else 100

    def cnf_state(g: torch.Generator) -> State:
        return torch.randn(cnf_batch, 2, generator=g), torch.zeros(cnf_batch, 1)

    return {
        "mlp": Workload(f"mlp (64-256-256-64 tanh, batch {mlp_batch}, 20 rk4 steps)",
                        lambda: MLPVelocity(64, 256),
                        lambda g: torch.randn(mlp_batch, 64, generator=g), rk4(20)),
        "conv": Workload(f"conv (conv-ReLU-InstanceNorm-convT, {conv_channels} channels, "
                         f"{conv_size}x{conv_size}, batch {conv_batch}, 4 rk4 steps)",
                         lambda: ConvBlockVelocity(conv_channels),
                         lambda g: torch.randn(conv_batch, conv_channels, conv_size, conv_size,
                                               generator=g), rk4(4)),
        "cnf": Workload(f"cnf (hypernetwork width 64, exact trace, (z, logp), batch {cnf_batch}, "
                        f"{cnf_steps} rk4 steps)", HyperCNFVelocity, cnf_state, rk4(cnf_steps)),
        "odenet": Workload(f"odenet (GroupNorm-ReLU-time conv, {net_channels} channels, "
                           f"{net_size}x{net_size}, batch {net_batch}, dopri5 rtol=atol=1e-3)",
                           lambda: ODENetVelocity(net_channels),
                           lambda g: torch.randn(net_batch, net_channels, net_size, net_size,
                                                 generator=g),
                           {"method": "dopri5", "rtol": 1e-3, "atol": 1e-3}),
        "launch": Workload(f"launch (2-16-2 tanh MLP, batch 16, {launch_steps} rk4 steps)",
                           lambda: TinyMLPVelocity(2, 16), lambda g: torch.randn(16, 2, generator=g),
                           rk4(launch_steps)),
    }


def components(state: State) -> tuple[torch.Tensor, ...]:
    return state if isinstance(state, tuple) else (state,)


def convert_state(state: State, fn: Callable[[torch.Tensor], torch.Tensor]) -> State:
    converted = tuple(fn(x) for x in components(state))
    return converted if isinstance(state, tuple) else converted[0]


def final_state(out: State) -> torch.Tensor:
    """The solution at the last time, all components flattened into one vector."""
    return torch.cat([x[-1].reshape(-1) for x in components(out)])


def make_step(solve: Solve, model: nn.Module, y0: State, t: torch.Tensor
              ) -> Callable[[], tuple[State, tuple[torch.Tensor, ...]]]:
    """One forward+backward: the solve, and the gradients of its final state's mean square."""
    params = list(model.parameters())

    def step():
        out = solve(model, y0, t)
        return out, torch.autograd.grad(final_state(out).square().mean(), params)

    return step


def flat(tensors) -> torch.Tensor:
    return torch.cat([x.detach().reshape(-1).double() for x in tensors])


def prepare(name, solve, model, y0, t, reference, device) -> tuple[dict, Step]:
    """Warm up (capture, compile) a variant; measure its memory and errors; return the
    forward+backward step to time."""
    step = make_step(solve, model, y0, t)
    out, grads = step()
    row = {
        "variant": name,
        "saved_MiB": saved_tensor_bytes(lambda: solve(model, y0, t)) / 2**20,
        "output_err": rel_err(final_state(out), reference[0]),
        # All parameter gradients as one vector: some are zero in exact arithmetic (a conv bias
        # before a normalisation), and a relative error of each would measure only roundoff.
        "grad_err": rel_err(flat(grads), flat(reference[1])),
    }
    if device == "cuda":
        # The step's own peak, above what is allocated before it (the model, the data, and
        # whatever earlier variants keep allocated).
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        row["peak_MiB"] = (torch.cuda.max_memory_allocated() - before) / 2**20
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


def is_matmul(op: str) -> bool:
    """Matrix products and convolutions (forward and backward ops) among aten op names."""
    name = op.removeprefix("aten::")
    return op.startswith("aten::") and ("conv" in name or name.endswith(("mm", "mv", "dot")))


def matmul_seconds(step: Step, device: str) -> tuple[float, int]:
    """Self time (device time on cuda) and number of the matmul/conv ops of one step."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    seconds, count = 0.0, 0
    for event in profile.key_averages():
        if is_matmul(event.key):
            seconds += 1e-6 * (event.self_device_time_total if device == "cuda"
                               else event.self_cpu_time_total)
            count += event.count
    return seconds, count


def matmul_floor(fp32_step: Step, bf16_step: Step, fp32_seconds: float, device: str) -> float:
    """Speedup over ``fp32_seconds`` if only the matmuls/convs ran at their bf16 speed (see the
    module docstring). Per-op means make it independent of how many steps an adaptive solve
    took in each precision."""
    mm32, count32 = matmul_seconds(fp32_step, device)
    mm16, count16 = matmul_seconds(bf16_step, device)
    return fp32_seconds / (fp32_seconds - mm32 + mm16 * count32 / count16)


def run_workload(work: Workload, device: str, repeats: int) -> list[dict]:
    """Rows of measurements, one per variant."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = work.make_velocity().to(device)
    y0 = convert_state(work.make_state(g), lambda x: x.to(device))
    t = torch.tensor([0.0, 1.0], device=device)
    solver = work.solver

    model64 = copy.deepcopy(model).double()
    y64 = convert_state(y0, torch.Tensor.double)
    if "rtol" in solver:
        # An adaptive workload's reference is far tighter than its tolerance (so its errors
        # include the method's own error at that tolerance, which the fp32 rows show), with
        # the continuous adjoint: autograd through hundreds of steps would not fit in memory.
        tight = {"rtol": 1e-8, "atol": 1e-8}
        out64 = torchdiffeq.odeint_adjoint(model64, y64, t.double(), **{**solver, **tight},
                                           adjoint_rtol=1e-8, adjoint_atol=1e-8)
    else:
        out64 = torchdiffeq.odeint(model64, y64, t.double(), **solver)
    grads64 = torch.autograd.grad(final_state(out64).square().mean(),
                                  list(model64.parameters()))
    reference = (final_state(out64), grads64)

    def tdq(m, y, tt):
        return torchdiffeq.odeint(m, y, tt, **solver)

    def tdq_adjoint(m, y, tt):
        return torchdiffeq.odeint_adjoint(m, y, tt, **solver, adjoint_method=solver["method"],
                                          adjoint_options=solver.get("options"))

    def tdq_autocast(dtype):
        def solve(m, y, tt):
            with torch.autocast(device, dtype=dtype):
                return tdq(m, y, tt)
        return solve

    def ours(dtype, checkpoint="steps"):
        return lambda m, y, tt: rampde_fx.odeint(m, y, tt, **solver, dtype=dtype,
                                                 checkpoint=checkpoint)

    def ours_compiled(dtype, checkpoint="steps"):
        solve = torch.compile(ours(dtype, checkpoint), fullgraph=True)
        return lambda m, y, tt: solve(m, y, tt)

    variants = [("torchdiffeq fp32", tdq), ("torchdiffeq fp32 adjoint", tdq_adjoint),
                ("torchdiffeq autocast bf16", tdq_autocast(torch.bfloat16)),
                ("rampde_fx fp32", ours(torch.float32)), ("rampde_fx bf16", ours(torch.bfloat16)),
                ("rampde_fx bf16 compiled", ours_compiled(torch.bfloat16)),
                ("rampde_fx bf16 stages compiled", ours_compiled(torch.bfloat16, "stages"))]
    if device == "cuda":
        variants += [("torchdiffeq autocast fp16", tdq_autocast(torch.float16)),
                     ("rampde_fx fp16", ours(torch.float16)),
                     ("rampde_fx fp16 compiled", ours_compiled(torch.float16))]
    rows, steps = [], {}
    for name, solve in variants:
        try:
            row, step = prepare(name, solve, model, y0, t, reference, device)
        except COMPILE_FAILURES as error:
            if "compiled" not in name:
                raise
            rows.append({"variant": name, "skipped": f"{type(error).__name__}: "
                                                     f"{str(error).splitlines()[0]}"})
            continue
        rows.append(row)
        steps[name] = step
    timed = [row for row in rows if "skipped" not in row]
    for row, seconds in zip(timed, time_in_rounds(list(steps.values()), repeats, device)):
        row["median_ms"] = 1e3 * seconds
    base = rows[0]["median_ms"]
    floor = matmul_floor(steps["torchdiffeq fp32"], steps["torchdiffeq autocast bf16"],
                         1e-3 * base, device)
    for row in timed:
        row["speedup"] = base / row["median_ms"]
        if "bf16" in row["variant"]:
            row["matmul_floor"] = floor
        if row["variant"].startswith("rampde_fx"):
            products, _ = matmul_seconds(steps[row["variant"]], device)
            if products > 0.01e-3 * row["median_ms"]:
                row["own_floor"] = 1e-3 * row["median_ms"] / products
    return rows


def compile_times(quick: bool, device: str) -> dict[str, float]:
    """First-call and steady-state seconds of the compiled bf16 mlp solve at 8 and 128 steps."""
    batch, width = (64, 32) if quick else (2048, 256)
    result = {}
    for steps in (8, 128):
        torch._dynamo.reset()
        # A fresh velocity: rampde_fx caches its compiled step per velocity module.
        model = MLPVelocity(64, width).to(device)
        y0 = torch.randn(batch, 64, device=device)
        t = torch.tensor([0.0, 1.0], device=device)
        solver = rk4(steps)
        solve = torch.compile(lambda m, y, tt: rampde_fx.odeint(m, y, tt, **solver),
                              fullgraph=True)
        step = make_step(solve, model, y0, t)
        seconds = []
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            for _ in range(2):  # the first call compiles; the second is a steady step
                start = time.perf_counter()
                step()
                if device == "cuda":
                    torch.cuda.synchronize()
                seconds.append(time.perf_counter() - start)
        result[f"first_call_s_{steps}"], result[f"steady_s_{steps}"] = seconds
        # What the first call spends beyond a steady step: the compilation itself.
        result[f"compile_s_{steps}"] = seconds[0] - seconds[1]
    for name in ("first_call", "compile"):
        result[f"{name}_ratio"] = result[f"{name}_s_128"] / result[f"{name}_s_8"]
    return result


def print_rows(title: str, rows: list[dict], device: str) -> None:
    print(f"\n{title}")
    peak = device == "cuda"
    print(f"{'variant':<32}{'ms':>9}{'speedup':>9}{'saved MiB':>11}"
          + (f"{'peak MiB':>10}" if peak else "")
          + f"{'out err':>10}{'grad err':>10}{'mm floor':>10}{'x own floor':>13}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['variant']:<32}skipped: {r['skipped']}")
            continue
        floor = f"{r['matmul_floor']:.2f}" if "matmul_floor" in r else "-"
        own = f"{r['own_floor']:.2f}" if "own_floor" in r else "-"
        print(f"{r['variant']:<32}{r['median_ms']:>9.1f}{r['speedup']:>9.2f}{r['saved_MiB']:>11.2f}"
              + (f"{r['peak_MiB']:>10.1f}" if peak else "")
              + f"{r['output_err']:>10.1e}{r['grad_err']:>10.1e}{floor:>10}{own:>13}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workload", action="append", help="workload name (repeatable)")
    parser.add_argument("--compile-times", action="store_true",
                        help="measure compile time at 8 and 128 steps (on by default when no "
                             "--workload is given)")
    parser.add_argument("--json", default="benchmarks/results.json", help="where to write JSON")
    args = parser.parse_args()
    available = workloads(args.quick)
    if args.workload:
        names = args.workload
    else:  # --compile-times alone measures only compile times
        names = [] if args.compile_times else list(available)
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
        print_rows(available[name].title, rows, args.device)
    if args.compile_times or not args.workload:
        times = compile_times(args.quick, args.device)
        report["compile_times"] = times
        print(f"\ncompiled bf16 mlp solve, first call (compile + one step): "
              f"{times['first_call_s_8']:.1f} s at 8 steps, {times['first_call_s_128']:.1f} s "
              f"at 128 steps, ratio {times['first_call_ratio']:.2f}; steady steps "
              f"{times['steady_s_8']:.2f} s and {times['steady_s_128']:.2f} s; compilation "
              f"(first call - steady step) {times['compile_s_8']:.1f} s and "
              f"{times['compile_s_128']:.1f} s, ratio {times['compile_ratio']:.2f}")
    with open(args.json, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"\n{report['date']}, commit {commit}, torch {torch.__version__}, {report['machine']}; "
          f"JSON in {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
