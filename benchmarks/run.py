"""Side-by-side benchmark of mixed-precision solves against torchdiffeq.

Every variant of a workload runs in one process, on the same model and data, and is measured
the same way. A workload is of one of two kinds:

- training: the median forward+backward time (consecutive steps, in rounds), bytes kept for
  backward (``rampde_fx.tools.memory.saved_tensor_bytes``), and the relative error of the result
  and of all parameter gradients (one vector; the loss is the result's mean square);
- inference: the median time of the forward alone under ``torch.no_grad()`` (where rampde_fx
  keeps no checkpoints), and the relative error of the result.

Both give the step's peak CUDA memory above what was allocated before it (on cuda) and the
first call of each variant ("first s": capture, compilation and one step; with inductor's
on-disk cache as it is, so point ``TORCHINDUCTOR_CACHE_DIR`` at an empty folder for a cold
compile). The result is the final state, or what the workload names; errors are against a
float64 torchdiffeq run with the same method and options (for adaptive methods, with tolerances
of 1e-8).

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--workload NAME] [--compile-times]
                             [--json PATH]

Workloads (``--workload``, repeatable; default all, plus the compile-time section); training
unless marked:

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
- ``sample`` (inference): flow-matching sampling, noise at t=0 to data at t=1, with two
  velocities: a (x, t) -> 128 -> 128 -> 2 SiLU MLP on 2-D data, batch 4096, and three 3x3
  convolutions with t as a channel (1 -> 32 -> 32 -> 1) on 8x8 images, batch 256; euler and
  midpoint at 10 and 100 steps and dopri5 at rtol=atol=1e-3, a table each. The result: the
  samples.
- ``likelihood`` (inference): ``log p(x)`` of data under the same velocities, integrated from
  t=1 back to t=0 on the state ``(x, logp)`` in float32, the divergence by exact trace (one
  ``torch.autograd.grad`` per dimension: MLP only) and by Hutchinson's estimator (one noise
  vector per sample, drawn once; MLP and images), the autograd calls inside the velocity under
  ``torch.enable_grad()``; midpoint at 10 steps and dopri5 at rtol=atol=1e-3. The result: the
  log-densities.
- ``odernn``: ODE-RNN over 20 irregular observation times (batch 256, 4-D observations,
  hidden state 32): one ``torchdiffeq.odeint`` per interval (32-64-64-32 tanh velocity, rk4
  with step 0.125: one to four steps), then a GRU cell update; the result: all 20 outputs. Its
  variants are the model as written, under bf16 autocast, and ``rampde_fx.convert(model)``
  eager and compiled: many small solves per forward, whose compiled kernels are shared.
- ``stl10``: the rampde paper's STL-10 classifier in outline (``ode_models.STL10ODENet``): a
  3x3 stem, then per width (16, 32, 64) an ODE block whose convolutions are picked from a bank
  by ``int(t.item() * 4)`` (a graph per time value; rk4, 4 steps) and a strided convolution,
  pooling and a linear head; 32x32 inputs, batch 8; the result: the logits. Variants as
  ``odernn``.

Variants: a training workload runs torchdiffeq fp32 (the baseline of the speedups), its
``odeint_adjoint``, torchdiffeq under bf16 autocast, rampde_fx fp32 and bf16 (eager), bf16
with ``compile_steps=True`` (not compiled itself: its steps run as rampde_fx's compiled
kernels), and bf16 compiled (``torch.compile(fullgraph=True)`` of a function calling
``rampde_fx.odeint``), also with ``checkpoint="stages"``; on cuda also fp16 autocast, eager and
compiled. An inference workload runs torchdiffeq fp32, bf16 autocast, rampde_fx bf16 eager,
with ``compile_steps`` and compiled, and the torchdiffeq call inside
``rampde_fx.mixed_precision(dtype=torch.bfloat16)`` (on cuda the fp16 three too); ``odernn``
and ``stl10``, the model as written, under bf16 autocast, and converted: eager, with
``compile_steps`` and compiled. The ``compile_steps`` variants share their step kernels with
the compiled ones, so their first call ("first s") is short where the compiled variant ran
first.

``--quick`` shrinks every workload (sizes in each table's title), runs sample with euler at 100
steps and dopri5 on the MLP and midpoint at 10 steps on images, likelihood at midpoint 10 steps
with the exact trace on the MLP and Hutchinson on images, leaves out the ``checkpoint="stages"``
variant (a compilation less per training table) and the compile-time section unless
``--compile-times`` is given. On a machine whose cores are busy, run it with
``OMP_NUM_THREADS=1``: OpenMP's spinning threads then slow down by an order of magnitude or
more.

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
each after ``torch._dynamo.reset()``, with a velocity of a class of its own (captures and step
kernels are cached per velocity class) and inductor's caches off, the compilation alone (the
first call less a steady step), and the ratios of both: compile time should not grow with the
number of steps. (At full size a step at 128 steps takes seconds, so there the first call's
ratio measures the solve more than the compiler.)
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
from typing import Any, Callable, Literal, Union

import torch
import torch._dynamo
import torchdiffeq
from torch import nn

import rampde_fx
from rampde_fx.tools.memory import saved_tensor_bytes

# The workload velocities are the examples' own models.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from ode_models import (ODERNN, ConvBlockVelocity, DivergenceVelocity,  # noqa: E402
                        FlowConvVelocity, FlowMLPVelocity, HyperCNFVelocity, MLPVelocity,
                        ODENetVelocity, STL10ODENet, TinyMLPVelocity, log_density, rel_err)

State = Union[torch.Tensor, tuple[torch.Tensor, ...]]
Solve = Callable[[nn.Module, State, torch.Tensor], State]
Step = Callable[[], Any]
Variants = list[tuple[str, Solve]]


def components(state: State) -> tuple[torch.Tensor, ...]:
    return state if isinstance(state, tuple) else (state,)


def convert_state(state: State, fn: Callable[[torch.Tensor], torch.Tensor]) -> State:
    converted = tuple(fn(x) for x in components(state))
    return converted if isinstance(state, tuple) else converted[0]


def final_state(out: State) -> torch.Tensor:
    """The solution at the last time, all components flattened into one vector."""
    return torch.cat([x[-1].reshape(-1) for x in components(out)])


def all_outputs(out: torch.Tensor) -> torch.Tensor:
    return out.reshape(-1)


@dataclasses.dataclass
class Workload:
    """One table: a model, its input and solver, and what is timed and compared."""

    title: str
    make_model: Callable[[], nn.Module]  # the velocity, or a model that solves (calls_model)
    make_state: Callable[[torch.Generator], State]
    solver: dict[str, Any]  # torchdiffeq's keyword arguments: method and options or tolerances
    kind: Literal["training", "inference"] = "training"
    times: tuple[float, ...] = (0.0, 1.0)
    # What the errors are measured on (for training, the loss is its mean square)
    result: Callable[[Any], torch.Tensor] = final_state
    # The model makes its own solves (with ``solver``) and is called as model(state, times)
    calls_model: bool = False


# How a compiled variant may fail (a graph break under fullgraph=True), reported instead of
# ending the run.
COMPILE_FAILURES = (torch._dynamo.exc.Unsupported,)


def fixed(method: str, steps: int) -> dict[str, Any]:
    return {"method": method, "options": {"step_size": 1.0 / steps}}


def rk4(steps: int) -> dict[str, Any]:
    return fixed("rk4", steps)


DOPRI5 = {"method": "dopri5", "rtol": 1e-3, "atol": 1e-3}


def describe(solver: dict[str, Any]) -> str:
    if "rtol" in solver:
        return f"{solver['method']} rtol=atol={solver['rtol']:.0e}".replace("e-0", "e-")
    return f"{solver['method']} {round(1 / solver['options']['step_size'])} steps"


def workloads(quick: bool) -> dict[str, list[Workload]]:
    """Each workload's tables."""
    mlp_batch = 128 if quick else 2048
    conv_channels, conv_size, conv_batch = (32, 16, 4) if quick else (64, 32, 16)
    cnf_batch, cnf_steps = (128, 8) if quick else (1024, 32)
    net_channels, net_size, net_batch = (16, 8, 8) if quick else (64, 16, 32)
    launch_steps = 20 if quick else 100

    def cnf_state(g: torch.Generator) -> State:
        return torch.randn(cnf_batch, 2, generator=g), torch.zeros(cnf_batch, 1)

    return {
        "mlp": [Workload(f"mlp (64-256-256-64 tanh, batch {mlp_batch}, 20 rk4 steps)",
                         lambda: MLPVelocity(64, 256),
                         lambda g: torch.randn(mlp_batch, 64, generator=g), rk4(20))],
        "conv": [Workload(f"conv (conv-ReLU-InstanceNorm-convT, {conv_channels} channels, "
                          f"{conv_size}x{conv_size}, batch {conv_batch}, 4 rk4 steps)",
                          lambda: ConvBlockVelocity(conv_channels),
                          lambda g: torch.randn(conv_batch, conv_channels, conv_size, conv_size,
                                                generator=g), rk4(4))],
        "cnf": [Workload(f"cnf (hypernetwork width 64, exact trace, (z, logp), batch {cnf_batch}, "
                         f"{cnf_steps} rk4 steps)", HyperCNFVelocity, cnf_state, rk4(cnf_steps))],
        "odenet": [Workload(f"odenet (GroupNorm-ReLU-time conv, {net_channels} channels, "
                            f"{net_size}x{net_size}, batch {net_batch}, {describe(DOPRI5)})",
                            lambda: ODENetVelocity(net_channels),
                            lambda g: torch.randn(net_batch, net_channels, net_size, net_size,
                                                  generator=g), DOPRI5)],
        "launch": [Workload(f"launch (2-16-2 tanh MLP, batch 16, {launch_steps} rk4 steps)",
                            lambda: TinyMLPVelocity(2, 16),
                            lambda g: torch.randn(16, 2, generator=g), rk4(launch_steps))],
        **flow_workloads(quick),
        "odernn": [odernn_workload(quick)],
        "stl10": [stl10_workload(quick)],
    }


def flow_workloads(quick: bool) -> dict[str, list[Workload]]:
    """The tables of ``sample`` and ``likelihood``: each velocity with each solver."""
    mlp_batch, image_batch = (512, 16) if quick else (4096, 256)
    # (name, velocity, batch shape)
    velocities = [(f"(x, t)-128-128-2 SiLU MLP, batch {mlp_batch}",
                   lambda: FlowMLPVelocity(2, 128), (mlp_batch, 2)),
                  (f"time-conv 1-32-32-1 on 8x8 images, batch {image_batch}",
                   lambda: FlowConvVelocity(1, 32), (image_batch, 1, 8, 8))]
    if quick:
        sample_solvers = [[fixed("euler", 100), DOPRI5], [fixed("midpoint", 10)]]
        likelihood_solvers = [fixed("midpoint", 10)]
    else:
        sample_solvers = 2 * [[fixed(method, steps) for method in ("euler", "midpoint")
                               for steps in (10, 100)] + [DOPRI5]]
        likelihood_solvers = [fixed("midpoint", 10), DOPRI5]

    def noise(shape: tuple[int, ...]) -> Callable[[torch.Generator], State]:
        return lambda g: torch.randn(shape, generator=g)

    def with_logp(shape: tuple[int, ...]) -> Callable[[torch.Generator], State]:
        return lambda g: (torch.randn(shape, generator=g), torch.zeros(shape[0], 1))

    def divergence(make: Callable[[], nn.Module], shape: tuple[int, ...], hutchinson: bool
                   ) -> Callable[[], nn.Module]:
        return lambda: DivergenceVelocity(make(), torch.randn(shape) if hutchinson else None)

    sample = [Workload(f"sample ({name}, {describe(solver)})", make, noise(shape), solver,
                       "inference")
              for (name, make, shape), solvers in zip(velocities, sample_solvers)
              for solver in solvers]
    # The exact trace takes a backward pass per dimension: 64 on an 8x8 image.
    divergences = [(velocities[0], "exact trace"), (velocities[1], "Hutchinson")]
    if not quick:
        divergences.insert(1, (velocities[0], "Hutchinson"))
    likelihood = [Workload(f"likelihood ({name}, {how}, {describe(solver)})",
                           divergence(make, shape, how == "Hutchinson"), with_logp(shape),
                           solver, "inference", times=(1.0, 0.0), result=log_density)
                  for (name, make, shape), how in divergences for solver in likelihood_solvers]
    return {"sample": sample, "likelihood": likelihood}


def odernn_workload(quick: bool) -> Workload:
    batch, hidden = (64, 16) if quick else (256, 32)
    dim, observations = 4, 20
    # Irregular observation times, 0.125 to 0.5 apart: one to four rk4 steps per interval.
    gaps = 0.125 + 0.375 * torch.rand(observations - 1, generator=torch.Generator().manual_seed(1))
    times = tuple(torch.cat([torch.zeros(1), gaps.cumsum(0)]).tolist())
    return Workload(f"odernn (GRU cell, hidden {hidden}, {hidden}-64-64-{hidden} tanh velocity, "
                    f"batch {batch}, {observations} observation times, a solve of rk4 with step "
                    "0.125 between each two)",
                    lambda: ODERNN(dim, hidden, 64, rk4(8)),
                    lambda g: torch.randn(batch, observations, dim, generator=g), rk4(8),
                    times=times, result=all_outputs, calls_model=True)


def stl10_workload(quick: bool) -> Workload:
    size, batch = (16, 4) if quick else (32, 8)
    return Workload(f"stl10 (the rampde paper's STL-10 net: widths 16-32-64, weights picked by "
                    f"int(t.item() * 4), {size}x{size}, batch {batch}, rk4 with 4 steps per "
                    "block)", STL10ODENet,
                    lambda g: torch.randn(batch, 3, size, size, generator=g), rk4(4),
                    result=all_outputs, calls_model=True)


def make_step(solve: Solve, model: nn.Module, y0: State, t: torch.Tensor,
              result: Callable[[Any], torch.Tensor] = final_state, training: bool = True
              ) -> Callable[[], tuple[Any, tuple[torch.Tensor, ...]]]:
    """One step: for training the solve and the gradients of its result's mean square; for
    inference the solve under ``torch.no_grad()``, and no gradients."""
    params = list(model.parameters())

    def step():
        if not training:
            with torch.no_grad():
                return solve(model, y0, t), ()
        out = solve(model, y0, t)
        return out, torch.autograd.grad(result(out).square().mean(), params)

    return step


def flat(tensors) -> torch.Tensor:
    return torch.cat([x.detach().reshape(-1).double() for x in tensors])


def prepare(name: str, solve: Solve, model: nn.Module, y0: State, t: torch.Tensor,
            work: Workload, reference: tuple[torch.Tensor, tuple[torch.Tensor, ...]],
            device: str) -> tuple[dict, Step]:
    """Warm up (capture, compile) a variant, timing that first call; measure its memory and
    errors; return the step to time."""
    training = work.kind == "training"
    step = make_step(solve, model, y0, t, work.result, training)
    start = time.perf_counter()
    out, grads = step()
    row = {"variant": name, "first_call_s": time.perf_counter() - start,
           "output_err": rel_err(work.result(out), reference[0])}
    if training:
        row["saved_MiB"] = saved_tensor_bytes(lambda: solve(model, y0, t)) / 2**20
        # All parameter gradients as one vector: some are zero in exact arithmetic (a conv
        # bias before a normalisation), and a relative error of each would measure only
        # roundoff.
        row["grad_err"] = rel_err(flat(grads), flat(reference[1]))
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


def plain(work: Workload, solver: dict[str, Any]) -> Solve:
    """The workload as written: its torchdiffeq solve with ``solver``, or its model's call."""
    if work.calls_model:
        return lambda m, y, tt: m(y, tt)
    return lambda m, y, tt: torchdiffeq.odeint(m, y, tt, **solver)


def under_autocast(solve: Solve, device: str, dtype: torch.dtype) -> Solve:
    def autocast_solve(m, y, tt):
        with torch.autocast(device, dtype=dtype):
            return solve(m, y, tt)
    return autocast_solve


def ours(solver: dict[str, Any], dtype: torch.dtype, checkpoint: str = "steps",
         compile_steps: bool = False) -> Solve:
    return lambda m, y, tt: rampde_fx.odeint(m, y, tt, **solver, dtype=dtype,
                                             checkpoint=checkpoint, compile_steps=compile_steps)


def compiled(solve: Solve) -> Solve:
    return torch.compile(solve, fullgraph=True)


def variants(work: Workload, model: nn.Module, device: str, quick: bool) -> Variants:
    """The variants that run ``work`` on ``model``, the baseline (torchdiffeq fp32) first;
    ``quick`` leaves out checkpoint='stages' (one compilation less per table)."""
    solver, bf16 = work.solver, torch.bfloat16
    tdq = plain(work, solver)
    baselines = [("torchdiffeq fp32", tdq),
                 ("torchdiffeq autocast bf16", under_autocast(tdq, device, bf16))]
    if work.calls_model:
        converted = rampde_fx.convert(model, dtype=bf16)
        compiled_model = torch.compile(converted, fullgraph=True)
        kernels = rampde_fx.convert(model, dtype=bf16, compile_steps=True)
        return baselines + [("rampde_fx bf16 convert", lambda m, y, tt: converted(y, tt)),
                            ("rampde_fx bf16 convert compiled",
                             lambda m, y, tt: compiled_model(y, tt)),
                            ("rampde_fx bf16 convert compile_steps",
                             lambda m, y, tt: kernels(y, tt))]
    if work.kind == "inference":
        # The last runs torchdiffeq.odeint as written, converted by the scope.
        found = baselines + [("rampde_fx bf16", ours(solver, bf16)),
                             ("rampde_fx bf16 compiled", compiled(ours(solver, bf16))),
                             ("rampde_fx bf16 compile_steps", ours(solver, bf16,
                                                                   compile_steps=True)),
                             ("rampde_fx.mixed_precision bf16",
                              rampde_fx.mixed_precision(dtype=bf16)(tdq))]
    else:
        def tdq_adjoint(m, y, tt):
            return torchdiffeq.odeint_adjoint(m, y, tt, **solver,
                                              adjoint_method=solver["method"],
                                              adjoint_options=solver.get("options"))

        found = [baselines[0], ("torchdiffeq fp32 adjoint", tdq_adjoint), baselines[1],
                 ("rampde_fx fp32", ours(solver, torch.float32)),
                 ("rampde_fx bf16", ours(solver, bf16)),
                 ("rampde_fx bf16 compiled", compiled(ours(solver, bf16))),
                 ("rampde_fx bf16 compile_steps", ours(solver, bf16, compile_steps=True))]
        if not quick:
            found.append(("rampde_fx bf16 stages compiled",
                          compiled(ours(solver, bf16, "stages"))))
    if device == "cuda":
        found += [("torchdiffeq autocast fp16", under_autocast(tdq, device, torch.float16)),
                  ("rampde_fx fp16", ours(solver, torch.float16)),
                  ("rampde_fx fp16 compiled", compiled(ours(solver, torch.float16)))]
    return found


def float64_reference(work: Workload, model: nn.Module, y0: State, t: torch.Tensor
                      ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The result, and for training the parameter gradients, of the workload as written in
    float64 (no gradients for inference)."""
    model64 = copy.deepcopy(model).double()
    y64, t64 = convert_state(y0, torch.Tensor.double), t.double()
    training = work.kind == "training"
    solve = plain(work, work.solver)
    if "rtol" in work.solver:
        # An adaptive workload's reference is far tighter than its tolerance (so its errors
        # include the method's own error at that tolerance, which the fp32 rows show); for
        # training with the continuous adjoint: autograd through hundreds of steps would not
        # fit in memory.
        tight = {**work.solver, "rtol": 1e-8, "atol": 1e-8}
        solve = plain(work, tight)
        if training:
            def solve(m, y, tt):
                return torchdiffeq.odeint_adjoint(m, y, tt, **tight, adjoint_rtol=1e-8,
                                                  adjoint_atol=1e-8)
    out, grads = make_step(solve, model64, y64, t64, work.result, training)()
    return work.result(out), grads


def run_workload(work: Workload, device: str, repeats: int, quick: bool) -> list[dict]:
    """Rows of measurements, one per variant."""
    # The compiled solves of every table share their code: dynamo's limit on recompilations
    # counts per code object.
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = work.make_model().to(device)
    y0 = convert_state(work.make_state(g), lambda x: x.to(device))
    t = torch.tensor(work.times, device=device)
    reference = float64_reference(work, model, y0, t)
    rows, steps = [], {}
    for name, solve in variants(work, model, device, quick):
        try:
            row, step = prepare(name, solve, model, y0, t, work, reference, device)
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
        # A velocity class of its own: rampde_fx caches captures and their compiled steps per
        # velocity class and input shapes, which the mlp workload may have met.
        model = type(f"MLPVelocity{steps}", (MLPVelocity,), {})(64, width).to(device)
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


# The table's columns, shown where some row has them: header, key, width, format.
COLUMNS = [("ms", "median_ms", 9, ".1f"), ("speedup", "speedup", 9, ".2f"),
           ("saved MiB", "saved_MiB", 11, ".2f"), ("peak MiB", "peak_MiB", 10, ".1f"),
           ("out err", "output_err", 10, ".1e"), ("grad err", "grad_err", 10, ".1e"),
           ("mm floor", "matmul_floor", 10, ".2f"), ("x own floor", "own_floor", 13, ".2f"),
           ("first s", "first_call_s", 9, ".1f")]


def print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    shown = [column for column in COLUMNS if any(column[1] in row for row in rows)]
    print(f"{'variant':<33}" + "".join(f"{header:>{width}}" for header, _, width, _ in shown))
    for r in rows:
        if "skipped" in r:
            print(f"{r['variant']:<33}skipped: {r['skipped']}")
            continue
        print(f"{r['variant']:<33}" + "".join(
            f"{format(r[key], spec) if key in r else '-':>{width}}"
            for _, key, width, spec in shown))
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workload", action="append", help="workload name (repeatable)")
    parser.add_argument("--compile-times", action="store_true",
                        help="measure compile time at 8 and 128 steps (on by default when "
                             "neither --workload nor --quick is given)")
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
        report["workloads"][name] = []
        for work in available[name]:
            rows = run_workload(work, args.device, repeats, args.quick)
            print_rows(work.title, rows)
            report["workloads"][name] += [{"table": work.title, **row} for row in rows]
    # Inductor's caches are off for the compile times: under --quick, only when asked for.
    if args.compile_times or not (args.workload or args.quick):
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
