"""Random generator states of a step, kept in the forward and replayed in its recomputation.

A step's evaluations draw in turn from the generators, so the state before the step gives its
draws, but for an adaptive step's first stage: the step before evaluated it (its last stage,
or after it), so it drew from an earlier state. The engine runs every velocity evaluation in
:func:`evaluating`, and a compiled step marks the start of each evaluation's draws
(:func:`evaluation_starts`), so that a block can act between them
(:func:`before_each_evaluation`): record the state the next step's first stage draws from in
the forward, set it for the first evaluation only in the recomputation (:func:`replayed_rng`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
from typing import Callable, ContextManager, Iterator, Sequence

import torch

from .. import runtime


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
def before_each_evaluation(hook: Callable[[int], None]) -> Iterator[None]:
    """Inside the block, in this thread, run ``hook(i)`` as the ``i``-th velocity evaluation
    (from 0) of the block starts (:func:`evaluation_starts`); an inner block's hook takes over
    until that block ends."""
    count = itertools.count()

    def starts() -> None:
        hook(next(count))
    hooks = runtime.per_thread().evaluation_hooks
    hooks.append(starts)
    try:
        yield
    finally:
        hooks.remove(starts)


def evaluation_starts() -> None:
    """Marks the start of a velocity evaluation, or of the draws of one evaluation of a compiled
    step: runs the innermost :func:`before_each_evaluation` hook."""
    hooks = runtime.per_thread().evaluation_hooks
    if hooks:
        hooks[-1]()


def evaluating() -> ContextManager[None]:
    """A block for a velocity evaluation of the engine: marks its start
    (:func:`evaluation_starts`), and hides the evaluations of a solve made inside it (a
    velocity that solves an ODE of its own) from the hooks of the solve it belongs to."""
    hooks = runtime.per_thread().evaluation_hooks
    if not hooks:  # the common case, cheaply
        return contextlib.nullcontext()
    hooks[-1]()
    return hidden_evaluations()


def hidden_evaluations() -> ContextManager[None]:
    """A block whose evaluations reach no hook of the blocks around it (a solve nested in an
    evaluation, the tracing of a compiled step)."""
    return before_each_evaluation(_ignore)


def _ignore(evaluation: int) -> None:
    pass


@contextlib.contextmanager
def replayed_rng(state: RngState | None, device: torch.device,
                 first: RngState | None = None) -> Iterator[None]:
    """Run with the generators at ``state`` (as in the forward step being recomputed) and leave
    them as they were, as ``torch.utils.checkpoint`` does; nothing for ``None``. ``first``: the
    state the first evaluation in the block draws from, where the forward's drew from another
    (an adaptive step's first stage); the later ones then draw from ``state``."""
    if state is None:
        yield
        return
    named = [(generator, generator.get_state()) for generator in state.generators]

    def after_the_first(i: int) -> None:
        if i == 1:
            _set_rng_state(state, device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            (contextlib.nullcontext() if first is None
             else before_each_evaluation(after_the_first)):
        _set_rng_state(state if first is None else first, device)
        try:
            yield
        finally:
            for generator, before in named:
                generator.set_state(before)


def _set_rng_state(state: RngState, device: torch.device) -> None:
    torch.set_rng_state(state.cpu)
    if state.cuda is not None:
        torch.cuda.set_rng_state(state.cuda, device)
    for generator, recorded in state.named:
        generator.set_state(recorded)
