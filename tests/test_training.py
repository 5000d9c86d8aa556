"""Converted models in training loops: DistributedDataParallel and torch.amp.GradScaler."""
from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import rampde_fx
from field_models import MLPODE
from models import rel_err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, state: dict, batch: torch.Tensor,
                out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A bounded wait: a collective that cannot complete fails the test instead of hanging it.
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        grads = {}
        for dtype in (torch.float32, torch.bfloat16):
            model = MLPODE()
            model.load_state_dict(state)
            ddp = nn.parallel.DistributedDataParallel(rampde_fx.convert(model, dtype=dtype))
            ddp(batch.chunk(world)[rank]).square().mean().backward()
            grads[dtype] = [p.grad for p in model.parameters()]
        torch.save(grads, os.path.join(out_dir, f"{rank}.pt"))
        # Tear down only once both ranks are done with every collective: a rank whose peer has
        # already exited can wait forever in destroy_process_group for work still pending.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    """float32 conversion: DDP's averaged gradients equal one process's on the full batch to
    float32 roundoff. bf16: within one unit roundoff (the weight gradients' bf16 matmuls sum
    half batches instead of the whole)."""
    torch.manual_seed(0)
    state = MLPODE().state_dict()
    batch = torch.randn(8, 3)
    expected = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = MLPODE()
        model.load_state_dict(state)
        rampde_fx.convert(model, dtype=dtype)(batch).square().mean().backward()
        expected[dtype] = [p.grad for p in model.parameters()]
    workers = mp.spawn(_ddp_worker, args=(2, _free_port(), state, batch, str(tmp_path)),
                       nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not workers.join(timeout=5):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail("DDP workers still running after 300 s")
    for rank in range(2):
        grads = torch.load(tmp_path / f"{rank}.pt")
        for dtype, tolerance in ((torch.float32, 1e-6), (torch.bfloat16, 2.0 ** -8)):
            for got, want in zip(grads[dtype], expected[dtype]):
                assert rel_err(got, want) < tolerance


def test_grad_scaler_skips_overflowing_fp16_steps():
    torch.manual_seed(0)
    model = MLPODE()
    converted = rampde_fx.convert(model, dtype=torch.float16)
    optimizer = torch.optim.SGD(converted.parameters(), lr=0.1)
    x = torch.randn(4, 3)

    overflowing = torch.amp.GradScaler("cpu", init_scale=1e38)
    before = [p.detach().clone() for p in model.parameters()]
    overflowing.scale(converted(x).square().sum() + 10.0).backward()
    overflowing.step(optimizer)
    overflowing.update()
    assert overflowing.get_scale() < 1e38  # the scaler saw inf/nan and backed off
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # step skipped

    optimizer.zero_grad()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale(converted(x).square().sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    scaler.step(optimizer)
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
