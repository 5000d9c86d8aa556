"""Binomial checkpointing: which step starts a bounded solve keeps, and what recomputing the
others costs (host integers only).

Reversing ``l`` steps from a kept start with ``s`` states at hand (the start's included) takes
at least

    F(l, s) = t * l - C(s + t, t - 1)     forward steps, t the least with C(s + t, s) >= l

(Griewank and Walther, "Algorithm 799: revolve", ACM TOMS 26(1), 2000: ``C(s + t, s)`` steps
are the most that ``s`` states reverse when no step runs forward more than ``t`` times), the
advances to the last step included. An optimal schedule keeps the state after ``m`` steps
(:func:`binomial_split`), reverses the steps after it with ``s - 1`` states and then those
before it with ``s``.

A fixed grid's forward pass takes every step before the backward pass starts, and keeps on its
way the states this schedule keeps first: the schedule of ``l + 1`` steps, whose last (virtual)
step the forward pass's end stands for. The backward pass then recomputes
``F(l + 1, n) - l`` steps (:func:`fewest_recomputed_steps`), the optimum for ``n`` states kept.
What it recomputes is a list of :class:`Segment`: the steps from each kept state to the next,
each reversed by the schedule with its own number of states (:func:`recomputed_steps`).

An adaptive solve does not know its number of steps while it runs: :class:`Thinning` keeps
every ``d``-th accepted step, doubling ``d`` (and dropping every other kept state) whenever
``n`` are kept, so between ``n / 2`` and ``n`` are kept, evenly spaced. Each segment between
them is reversed with the states the budget has left, ``n - kept + 1``.
"""
from __future__ import annotations

import math
from typing import NamedTuple


class Segment(NamedTuple):
    """Steps ``start`` to ``end - 1``, reversed from the kept state at ``start`` with ``states``
    states at hand (the start's included)."""

    start: int
    end: int
    states: int


def _capacity(states: int, repetitions: int) -> int:
    """``C(states + repetitions, states)``: the most steps ``states`` states reverse with no
    step run forward more than ``repetitions`` times (0 for negative repetitions)."""
    return math.comb(states + repetitions, states) if repetitions >= 0 else 0


def _repetitions(steps: int, states: int) -> int:
    """The least ``t`` with ``C(states + t, states) >= steps``."""
    t = 0
    while _capacity(states, t) < steps:
        t += 1
    return t


def revolve_steps(steps: int, states: int) -> int:
    """``F(steps, states)``: the fewest forward steps that reverse ``steps`` steps from a kept
    start with ``states`` states (see the module docstring)."""
    if steps <= 1:
        return 0
    t = _repetitions(steps, states)
    return t * steps - math.comb(states + t, t - 1)


def binomial_split(steps: int, states: int) -> int:
    """Where an optimal schedule keeps its next state: after this many of ``steps`` steps
    (``steps >= 2``, ``states >= 2``). The largest optimal choice: at most ``C(s + t - 1, s)``
    steps before it, which are then reversed with every step run at most ``t - 1`` more times,
    and at least ``C(s + t - 2, s - 1)`` after it."""
    t = _repetitions(steps, states)
    return max(1, min(_capacity(states, t - 1), steps - _capacity(states - 1, t - 1)))


def fixed_grid_segments(steps: int, states: int) -> list[Segment]:
    """The segments of a fixed grid of ``steps`` steps with ``states`` states: the states the
    optimal schedule of ``steps + 1`` steps keeps first (see the module docstring), each with
    the states at hand for the steps up to the next one."""
    segments, start, end = [], 0, steps + 1
    while end - start > 1 and states > 1:
        middle = start + binomial_split(end - start, states)
        segments.append(Segment(start, middle, states))
        start, states = middle, states - 1
    segments.append(Segment(start, steps, states))  # the virtual last step dropped
    return [segment for segment in segments if segment.start < steps]


def recomputed_steps(segments: list[Segment]) -> int:
    """The forward steps that the backward pass recomputes for ``segments``."""
    return sum(revolve_steps(end - start, states) for start, end, states in segments)


def fewest_recomputed_steps(steps: int, states: int) -> int:
    """Revolve's bound for a fixed grid: the fewest forward steps that any schedule keeping at
    most ``states`` states recomputes in the backward pass of ``steps`` steps."""
    return revolve_steps(steps + 1, states) - steps if steps else 0


class Thinning:
    """The accepted steps an adaptive solve keeps under a budget of ``states``: every
    ``stride``-th, the stride doubling whenever the budget is full."""

    def __init__(self, states: int) -> None:
        self.states = states
        self.stride = 1
        self.kept: list[int] = []

    def keeps(self, step: int) -> bool:
        """Whether the start of accepted step ``step`` is kept now (it may be dropped later)."""
        return step % self.stride == 0

    def add(self, step: int) -> list[int]:
        """Keep step ``step`` where the stride, doubled if the budget is full, says so;
        returns the steps dropped."""
        if not self.keeps(step):
            return []
        dropped = []
        if len(self.kept) == self.states:
            self.stride *= 2
            dropped = [k for k in self.kept if not self.keeps(k)]
            self.kept = [k for k in self.kept if self.keeps(k)]
        if self.keeps(step):
            self.kept.append(step)
        return dropped

    def segments(self, steps: int) -> list[Segment]:
        """The segments between the kept steps of a solve of ``steps`` steps."""
        ends = [*self.kept[1:], steps]
        at_hand = self.states - len(self.kept) + 1
        return [Segment(start, end, at_hand) for start, end in zip(self.kept, ends)]
