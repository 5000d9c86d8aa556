"""Per-solve counters: steps, function evaluations, adjoint scaling."""
from __future__ import annotations

import contextlib
import dataclasses
import enum
from typing import Iterator

import torch

from . import runtime


# SolveStats.step_kernels of a solve whose steps ran as compiled kernels.
COMPILED = "compiled"


class VelocityKind(enum.Enum):
    """How a solve's velocity runs."""

    GRAPH = "graph"  # captured graphs, rewritten under the precision policy
    EAGER = "eager"  # the velocity's Python, under autocast (capture fell back; see the reason)


@dataclasses.dataclass
class SolveStats:
    """What one call of :func:`rampde_fx.odeint` did. The backward counters are filled in when
    the backward pass runs.

    Attributes:
        method: the Runge-Kutta method.
        dtype: the velocity's precision.
        velocity: how the velocity runs.
        fallback_reason: why capture fell back to :attr:`VelocityKind.EAGER` (None for a graph).
        scaling: whether dynamic adjoint scaling is on.
        steps: time steps taken (accepted steps, for adaptive methods).
        rejected_steps: steps an adaptive method rejected (each cost an evaluation of all stages).
        tolerance_limited_steps: accepted adaptive steps whose error estimate was controlled to
            the velocity dtype's rounding floor, because rtol/atol asked for less (see
            :class:`rampde_fx.ToleranceWarning`).
        nfe_forward: velocity evaluations in the forward solve (rejected steps included).
        nfe_backward: velocity evaluations in backward passes (recomputation: of each step, and
            under a ``Budget`` of the forward steps to the starts not kept), retries included.
        backward_sweeps: backward sweeps run, retries included.
        scale_retries: steps or sweeps recomputed with a smaller scale after an overflow.
        scale_log2: log2 of the scale used at each step of the last sweep (step order), on the
            device; ``None`` without scaling.
        graph: the velocity's rewritten graph; ``None`` when it runs eagerly.
        captured_code: the code of the velocity's graph as captured, before the precision
            rewrite (see :func:`rampde_fx.conversion_diff`); ``None`` when it runs eagerly.
        step_kernels: :data:`COMPILED` where the steps ran as compiled kernels (under
            ``torch.compile``, or with ``compile_steps``); where they were asked for and the
            velocity has none, why; ``None`` where none were asked for (op by op).
    """

    method: str
    dtype: torch.dtype
    velocity: VelocityKind
    fallback_reason: str | None
    scaling: bool
    steps: int = 0
    rejected_steps: int = 0
    tolerance_limited_steps: int = 0
    nfe_forward: int = 0
    nfe_backward: int = 0
    backward_sweeps: int = 0
    scale_retries: int = 0
    scale_log2: torch.Tensor | None = None
    graph: torch.fx.GraphModule | None = None
    captured_code: str | None = None
    step_kernels: str | None = None


@contextlib.contextmanager
def collect_stats() -> Iterator[list[SolveStats]]:
    """Collect a :class:`SolveStats` for every solve started inside the block::

        with rampde_fx.collect_stats() as solves:
            loss = rampde_fx.odeint(f, y0, t, method="rk4").sum()
            loss.backward()
        print(solves[0].steps, solves[0].nfe_backward)
    """
    collected: list[SolveStats] = []
    stack = runtime.per_thread().collectors
    stack.append(collected)
    try:
        yield collected
    finally:  # by identity: nested collectors can hold equal lists
        del stack[next(i for i, c in enumerate(stack) if c is collected)]


def record(stats: SolveStats) -> None:
    for collected in runtime.per_thread().collectors:
        collected.append(stats)
