"""Random generator states of a step, kept in the forward and replayed in its recomputation."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

RngState = tuple[torch.Tensor, torch.Tensor | None]


def rng_state(device: torch.device) -> RngState:
    """The generator states a step on ``device`` draws from (the CPU's, and the CUDA device's)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def replayed_rng(state: RngState | None, device: torch.device) -> Iterator[None]:
    """Run with the generators at ``state`` (as in the forward step being recomputed) and leave
    them as they were, as ``torch.utils.checkpoint`` does; nothing for ``None``."""
    if state is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield
