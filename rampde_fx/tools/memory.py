"""Bytes kept for backward, as the benchmarks and ``rampde_fx.check`` measure them."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch._subclasses.fake_tensor import is_fake

from ..compiled.op import held_checkpoints


def saved_tensor_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the distinct storages kept for backward by what ``fn()`` returns.

    Counts what autograd saves (through ``torch.autograd.graph.saved_tensors_hooks``) and the
    checkpoints that compiled solves keep beside the graph; a storage kept several times (or
    through several views) counts once.
    """
    storages: dict[int, int] = {}

    def count(tensor: torch.Tensor) -> torch.Tensor:
        if is_fake(tensor):  # a velocity being captured: it holds no memory
            return tensor
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    held_before = {id(t) for t in held_checkpoints()}
    with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
        result = fn()
    for tensor in held_checkpoints():
        if id(tensor) not in held_before:
            count(tensor)
    del result
    return sum(storages.values())
