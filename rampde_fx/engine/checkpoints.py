"""What a solve keeps for its backward pass, and the start of every step rebuilt from it.

The forward loop hands each accepted step's start to a store: :class:`CheckpointStore`
(``checkpoint='steps'``) keeps every one in the low dtype; :class:`BudgetStore`
(``checkpoint=Budget(n)``) keeps at most ``n``, in the state's own dtype, at the steps that
:mod:`~rampde_fx.engine.schedule` chooses. The backward pass walks :func:`step_starts`: every
step's start, last step first, in the checkpoint dtypes, with what the step found
(:class:`~rampde_fx.engine.plan.StepContext`). Under a budget it re-runs forward steps from the
kept states (:func:`rerun_step`, as the forward took them: the same kernels, generator states
and buffer values) and rounds each start as ``'steps'`` would have kept it, so the backward
pass computes the same gradients. (In an adaptive solve a re-run step evaluates its first stage
anew where the forward's came from the step before: the same value, with the same draws,
except for a velocity that reads buffers it changes in place.) A multistep method's
step also reads earlier steps' derivatives: a budget keeps them with each state, and a re-run
step continues from them (see :meth:`~rampde_fx.engine.step.Stepper.resume`). A complex
component is kept as the pair of its real and imaginary parts in the low dtype
(:func:`stored`), and the backward pass gets it back as a complex tensor (:func:`restored`).

Between the forward and the backward pass a budget keeps at most ``n`` states; while the
backward pass of a fixed grid runs, the states it recomputes (at most ``n - 1`` at a time) come
on top of them.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import torch

from ..capture import State, replayed_rng, rng_state
from .plan import SolvePlan, StepContext
from .step import Stepper
from .schedule import Segment, Thinning, binomial_split, fixed_grid_segments


class CheckpointStore:
    """``checkpoint='steps'``: each accepted step's checkpoint (its start, and for a multistep
    method what else it reads: :meth:`Stepper.checkpoint_of`), in the plan's checkpoint dtypes:
    written into tensors allocated once where the number of steps is known, else collected and
    stacked."""

    def __init__(self, stepper: Stepper, y0: State, dtypes: tuple[torch.dtype, ...],
                 steps: int | None) -> None:
        self._stepper = stepper
        y0 = tuple(y0) * stepper.checkpoint_width
        self._y0, self._dtypes = y0, dtypes
        self._count = 0
        self._stores: list[torch.Tensor] | list[list[torch.Tensor]] = (
            [[] for _ in y0] if steps is None else
            [torch.empty((steps, *_stored_shape(c, d)), dtype=d, device=c.device)
             for c, d in zip(y0, dtypes)])
        self._preallocated = steps is not None

    def keeps(self, step: int) -> bool:
        """Whether the start of accepted step ``step`` is kept: every one is."""
        return True

    def start_of(self, y: State) -> State:
        """What :meth:`append` takes of the step about to be taken from ``y``."""
        return self._stepper.checkpoint_of(y)

    def append(self, step: int, y: State) -> None:
        """The :meth:`start_of` ``y`` of accepted step ``step`` (steps come in order)."""
        for store, c, d in zip(self._stores, y, self._dtypes):
            if self._preallocated:
                store[self._count] = stored(c, d)
            else:
                store.append(stored(c.detach(), d))
        self._count += 1

    def result(self) -> tuple[list[torch.Tensor], list[Segment] | None]:
        """One tensor per component, ``(steps, *shape)``; no segments."""
        if self._preallocated:
            return list(self._stores), None
        return [torch.stack(store) if store else
                torch.empty((0, *_stored_shape(c, d)), dtype=d, device=c.device)
                for store, c, d in zip(self._stores, self._y0, self._dtypes)], None


class BudgetStore:
    """``checkpoint=Budget(n)``: at most ``n`` step starts (for a multistep method with the
    earlier derivatives that the steps from there read: :meth:`Stepper.resume_point`), in the
    state's dtype. On a fixed grid, those of the optimal binomial schedule
    (:func:`fixed_grid_segments`); in an adaptive solve, evenly spaced ones
    (:class:`Thinning`)."""

    def __init__(self, stepper: Stepper, states: int, steps: int | None) -> None:
        self._stepper = stepper
        self._kept: dict[int, tuple[torch.Tensor, ...]] = {}
        self._steps = 0
        self._thinning = Thinning(states) if steps is None else None
        self._segments = None if steps is None else fixed_grid_segments(steps, states)
        self._starts = None if steps is None else {s.start for s in self._segments}

    def keeps(self, step: int) -> bool:
        """Whether the start of accepted step ``step`` is kept (for now, in an adaptive
        solve)."""
        return self._thinning.keeps(step) if self._starts is None else step in self._starts

    def start_of(self, y: State) -> State:
        """What :meth:`append` takes of the step about to be taken from ``y``."""
        return self._stepper.resume_point(y)

    def append(self, step: int, y: State) -> None:
        """The :meth:`start_of` ``y`` of accepted step ``step`` (steps come in order)."""
        self._steps = step + 1
        if self._thinning is not None:
            for dropped in self._thinning.add(step):
                del self._kept[dropped]
        if self.keeps(step):  # a copy: a storage of its own, apart from the caller's
            self._kept[step] = tuple(c.detach().clone() for c in y)

    def result(self) -> tuple[list[torch.Tensor], list[Segment] | None]:
        """The kept states' components, one tensor each, in step order; the segments."""
        segments = self._segments if self._thinning is None else \
            self._thinning.segments(self._steps)
        return [c for step in sorted(self._kept) for c in self._kept[step]], segments


Store = CheckpointStore | BudgetStore


def stored(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a checkpoint keeps it, in ``dtype``: a complex one in a real ``dtype`` as the
    pair of its real and imaginary parts (there is no low-precision complex dtype)."""
    if _as_pairs(x.dtype, dtype):
        return torch.view_as_real(x).to(dtype)
    return x.to(dtype)


def restored(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A kept checkpoint ``x`` of a ``dtype`` tensor, back as one: a pair of parts becomes a
    complex ``dtype`` tensor; a real one stays in its (checkpoint) dtype."""
    if _as_pairs(dtype, x.dtype):
        return torch.view_as_complex(x.to(dtype.to_real()))
    return x


def _as_pairs(value: torch.dtype, kept: torch.dtype) -> bool:
    """Whether a ``value`` tensor is kept in ``kept`` as pairs of real and imaginary parts."""
    return value.is_complex and not kept.is_complex


def _stored_shape(x: torch.Tensor, dtype: torch.dtype) -> tuple[int, ...]:
    return (*x.shape, 2) if _as_pairs(x.dtype, dtype) else tuple(x.shape)


def checkpoint_store(plan: SolvePlan, y0: State) -> Store:
    """The store of the plan's checkpoint setting."""
    budget, steps = plan.config.budget, plan.controller.known_steps
    if budget is None:
        return CheckpointStore(plan.stepper, y0, plan.checkpoint_dtypes, steps)
    return BudgetStore(plan.stepper, budget, steps)


@dataclasses.dataclass
class StepStart:
    """A step's start, as the backward pass recomputes the step from it.

    Attributes:
        state: its components in the checkpoint dtypes (as ``checkpoint='steps'`` keeps them).
        context: what the forward step found besides its state.
    """

    state: list[torch.Tensor]
    context: StepContext


def step_starts(plan: SolvePlan, kept: list[torch.Tensor], grid: torch.Tensor,
                times: torch.Tensor) -> Iterator[tuple[int, StepStart]]:
    """Every step and its start, last step first, from what the store kept (``kept``: its
    :meth:`~CheckpointStore.result`). Under a budget, recomputed from the kept states by the
    binomial schedule of each segment: a segment with one state at hand, or of one step, runs
    from its start to each of its steps in turn; a longer one keeps the state that
    :func:`binomial_split` chooses and reverses the steps after it with one state fewer, then
    those before it."""
    if plan.segments is None:
        for step in reversed(range(plan.steps)):
            yield step, StepStart([restored(c[step], d) for c, d in zip(kept, plan.state_dtypes)],
                                  plan.context_of(step) or StepContext())
        return
    stepper = plan.stepper
    n = plan.n_components * stepper.resume_width
    # (segment, its start's resume point and context), the last segment on top
    pending = [(segment, tuple(kept[i * n:(i + 1) * n]),
                plan.context_of(segment.start) or StepContext())
               for i, segment in enumerate(plan.segments)]
    while pending:
        (start, end, states), y, context = pending.pop()
        if states > 1 and end - start > 1:
            middle = start + binomial_split(end - start, states)
            pending.append((Segment(start, middle, states), y, context))
            pending.append((Segment(middle, end, states - 1),
                            *_rerun_steps(plan, grid, times, start, middle, y, context)))
            continue
        for step in reversed(range(start, end)):
            kept_step, found = _rerun_steps(plan, grid, times, start, step, y, context)
            checkpoint = stepper.checkpoint_of(stepper.resume(step, kept_step))
            yield step, StepStart([restored(stored(c, d), state_dtype) for c, d, state_dtype in
                                   zip(checkpoint, plan.checkpoint_dtypes, plan.state_dtypes)],
                                  found)


def _rerun_steps(plan: SolvePlan, grid: torch.Tensor, times: torch.Tensor, start: int,
                 end: int, kept: State, context: StepContext) -> tuple[State, StepContext]:
    """Step ``end``'s resume point and what that step finds, by re-running the steps from
    ``start`` (its resume point ``kept``, context ``context``) without recording them."""
    stepper = plan.stepper
    y = stepper.resume(start, kept)
    with torch.no_grad():
        for step in range(start, end):
            y, _, context = rerun_step(plan, step, grid, times, y, context)
    return stepper.resume_point(y), context


def rerun_step(plan: SolvePlan, step: int, grid: torch.Tensor, times: torch.Tensor, y: State,
               context: StepContext) -> tuple[State, list[State], StepContext]:
    """Forward step ``step`` again from ``y``, as the forward loop took it (its outputs
    included: their evaluations draw numbers and change buffers as the forward's did), where
    it found ``context``. Returns its end, its outputs, and what the next step finds."""
    stepper = plan.stepper
    indices = plan.outputs_per_step[step]
    with replaying(plan, context, grid.device) as found:
        y1, outputs = stepper.advance(
            grid[step], grid[step + 1], y, [(times[j], plan.time_values[j]) for j in indices],
            plan.grid_values[step], plan.grid_values[step + 1], plan.start_nudge(step))
        after = found()
    return y1, outputs, plan.context_of(step + 1) or after


@contextlib.contextmanager
def replaying(plan: SolvePlan, context: StepContext, device: torch.device
              ) -> Iterator[Callable[[], StepContext]]:
    """Evaluations of a re-run forward step that find what the forward step found
    (``context``): the buffers at its values (copies: the forward's buffers are left as they
    are), the generators at its state (its first stage's at theirs). Yields a function that,
    called at the step's end inside the block, gives what the step leaves for the next one."""
    with plan.stepper.velocity.recomputing(context.buffers) as copies, \
            replayed_rng(context.rng, device, context.first_rng):
        yield lambda: StepContext(
            None if context.rng is None else rng_state(device, context.rng.generators),
            None if context.buffers is None else {name: copies[name] for name in context.buffers})
