"""Converted models in training loops with torch.amp.GradScaler (DistributedDataParallel:
test_ddp.py)."""
from __future__ import annotations

import torch

import rampde_fx
from field_models import MLPODE


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
