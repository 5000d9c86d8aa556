"""Random generator states of a step, kept in the forward and replayed in its recomputation."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Sequence

import torch


@dataclasses.dataclass(frozen=True)
class RngState:
    """The generator states a step draws from: PyTorch's default CPU generator's, the CUDA
    device's, and those of the generators its velocity draws from by name (a ``generator=``
    argument), each with its generator."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    named: tuple[tuple[torch.Generator, torch.Tensor], ...] = ()

    @property
    def generators(self) -> list[torch.Generator]:
        return [generator for generator, _ in self.named]


def rng_state(device: torch.device, generators: Sequence[torch.Generator] = ()) -> RngState:
    """The generator states a step on ``device`` draws from, ``generators`` included."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return RngState(torch.get_rng_state(), cuda,
                    tuple((generator, generator.get_state()) for generator in generators))


@contextlib.contextmanager
def replayed_rng(state: RngState | None, device: torch.device) -> Iterator[None]:
    """Run with the generators at ``state`` (as in the forward step being recomputed) and leave
    them as they were, as ``torch.utils.checkpoint`` does; nothing for ``None``."""
    if state is None:
        yield
        return
    named = [(generator, generator.get_state()) for generator in state.generators]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state.cpu)
        if state.cuda is not None:
            torch.cuda.set_rng_state(state.cuda, device)
        for generator, recorded in state.named:
            generator.set_state(recorded)
        try:
            yield
        finally:
            for generator, before in named:
                generator.set_state(before)
