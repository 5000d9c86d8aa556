"""Converted models under DistributedDataParallel: two gloo processes on CPU, each given half
of a batch, reach the gradients that one process computes, for a fixed grid, a checkpoint
budget, an event solve, an adaptive method and an Adams method, in float32 and bfloat16
modes."""
from __future__ import annotations

import datetime
import os
import time
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchdiffeq
from torch import nn

import rampde_fx
from models import TimeMLP, rel_err
from rampde_fx.engine.schedule import fewest_recomputed_steps
from test_events import float64_reference

WORLD = 2
DTYPES = (torch.float32, torch.bfloat16)
T = torch.tensor([0.0, 0.5, 1.0])
RK4 = {"method": "rk4", "options": {"step_size": 0.05}}
RK4_STEPS = 20  # over T
BUDGET = 4
BATCH = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))


class Flow(nn.Module):
    """A linear encoder, then a velocity MLP solved over ``T`` by ``torchdiffeq.odeint``; each
    sample on its own except through what its whole batch decides: an adaptive solve's steps,
    an Adams corrector's convergence."""

    def __init__(self, **solve_kwargs) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(3, 3)
        self.func = TimeMLP()
        self.solve_kwargs = solve_kwargs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (torchdiffeq.odeint(self.func, self.encoder(x), T.to(x), **self.solve_kwargs),)


class Event(nn.Module):
    """A linear encoder, then a velocity MLP solved by ``torchdiffeq.odeint_event`` up to an
    event near t = 0.5 that the batch's mean state shifts: the event time, an output, depends
    on the parameters."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(3, 3)
        self.func = TimeMLP()
        self.solve_kwargs = {**RK4, "atol": 1e-7}

    def event(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return t - 0.5 + 0.1 * torch.tanh(y.mean())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        event_t, solution = torchdiffeq.odeint_event(self.func, self.encoder(x),
                                                     torch.zeros((), dtype=x.dtype),
                                                     event_fn=self.event, **self.solve_kwargs)
        return event_t, solution[-1]


# name: (model, convert's options, whether each sample is solved on its own). The models seed
# their initialisation, so every process builds the same one.
CASES: dict[str, tuple[Callable[[], nn.Module], dict, bool]] = {
    "rk4": (lambda: Flow(**RK4), {}, True),
    "budget": (lambda: Flow(**RK4), {"checkpoint": rampde_fx.Budget(BUDGET)}, True),
    "event": (Event, {}, False),
    "dopri5": (lambda: Flow(rtol=1e-5, atol=1e-6), {}, False),
    # The corrector stops where the whole batch of its solve has converged.
    "implicit_adams": (lambda: Flow(method="implicit_adams", options={"step_size": 0.05},
                                    rtol=1e-4, atol=1e-6), {}, False),
}
# Gradients of float32 mode against float32 torchdiffeq: fixed grids agree to float32
# roundoff; the event time to float32's resolution of a step (see test_events.FP32_TOLERANCE);
# torchdiffeq's adaptive gradients also differentiate its step-size controller.
FP32_TOLERANCE = {"rk4": 1e-6, "budget": 1e-6, "event": 5e-6, "dopri5": 1e-4,
                  "implicit_adams": 1e-6}


def loss(outputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean squares, summed over the outputs: for a solve of each sample on its own, the
    mean of two halves' losses is the whole batch's loss."""
    return sum(o.square().mean() for o in outputs)


def gradient(model: nn.Module) -> torch.Tensor:
    """The parameters' gradients as one vector."""
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def one_process(run: nn.Module, model: nn.Module, whole_batch: bool,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The gradient for ``model``'s parameters of ``run``'s loss on the batch, or (not
    ``whole_batch``) of the mean of its losses on the halves, which DDP averages."""
    batch = BATCH.to(dtype)
    parts = [batch] if whole_batch else batch.chunk(WORLD)
    (sum(loss(run(part)) for part in parts) / len(parts)).backward()
    return gradient(model)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    # The ranks and the test's own process share the machine: one thread each, since OpenMP
    # threads beyond the cores spin and slow every process many times over.
    torch.set_num_threads(1)
    # bf16 dopri5 at float32 tolerances, as the test itself filters
    warnings.filterwarnings("ignore", category=rampde_fx.ToleranceWarning)
    # A bounded wait: a collective that cannot complete fails the test instead of hanging it.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        results = {}
        for name, (make, options, _) in CASES.items():
            for dtype in DTYPES:
                model = make()
                ddp = nn.parallel.DistributedDataParallel(
                    rampde_fx.convert(model, dtype=dtype, **options))
                with rampde_fx.collect_stats() as solves:
                    loss(ddp(BATCH.chunk(WORLD)[rank])).backward()
                results[name, dtype] = gradient(model), solves[0].nfe_backward
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
        # Tear down only once both ranks are done with every collective: a rank whose peer has
        # already exited can wait forever in destroy_process_group for work still pending.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::rampde_fx.ToleranceWarning")
def test_ddp_gradients_are_one_process_gradients(tmp_path):
    """Both ranks hold the same gradient, the one process's that solves what the ranks solve
    (the whole batch where each sample is solved on its own; else each half, as an adaptive
    solve's steps and an event time depend on the whole batch of the solve), to float32
    roundoff in float32 mode and within a unit roundoff in bf16 (the weight gradients' bf16
    matmuls sum half batches instead of the whole). float32 mode also gives float32
    torchdiffeq's gradient (see FP32_TOLERANCE); bf16 that of float64 torchdiffeq within 1e-2.
    The budget's steps are recomputed in the ranks' backward passes."""
    workers = mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)),
                       nprocs=WORLD, join=False)
    expected = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # beside the ranks (see _worker)
    try:
        for name, (make, options, separable) in CASES.items():
            model = make()
            for dtype in DTYPES:
                model.zero_grad()
                expected[name, dtype] = one_process(
                    rampde_fx.convert(model, dtype=dtype, **options), model, separable)
            model.zero_grad()
            expected[name, "torchdiffeq"] = one_process(model, model, separable)
            reference = float64_reference(model)
            expected[name, "float64"] = one_process(reference, reference, separable,
                                                    torch.float64)
    finally:
        torch.set_num_threads(threads)
    deadline = time.monotonic() + 300
    while not workers.join(timeout=5):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail("DDP workers still running after 300 s")
    ranks = [torch.load(tmp_path / f"{rank}.pt") for rank in range(WORLD)]
    grads = {key: grad for key, (grad, _) in ranks[0].items()}
    for name in CASES:
        for dtype, tolerance in ((torch.float32, 1e-6), (torch.bfloat16, 2.0**-8)):
            assert all(torch.equal(results[name, dtype][0], grads[name, dtype])
                       for results in ranks[1:])
            assert rel_err(grads[name, dtype], expected[name, dtype]) < tolerance
        assert rel_err(grads[name, torch.float32], expected[name, "torchdiffeq"]) \
            < FP32_TOLERANCE[name]
        assert rel_err(grads[name, torch.bfloat16], expected[name, "float64"]) < 1e-2
    for dtype in DTYPES:  # rk4: four evaluations per recomputed step
        assert ranks[0]["budget", dtype][1] - ranks[0]["rk4", dtype][1] \
            == 4 * fewest_recomputed_steps(RK4_STEPS, BUDGET) > 0
