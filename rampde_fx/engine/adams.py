"""Adams multistep methods on fixed grids: torchdiffeq's ``explicit_adams`` (Adams-Bashforth)
and ``implicit_adams`` (Adams-Bashforth-Moulton; ``fixed_adams`` is another name for it).

A step from ``t_n`` evaluates ``f_n = f(t_n, y_n)`` (nudged as a Runge-Kutta step's first
stage) and puts it first in the history of the last ``max_order - 1`` derivatives. While the
history holds fewer than three, the step is torchdiffeq's ``rk4`` (Kutta's 3/8 rule) from
``f_n``. Otherwise it is the Adams-Bashforth step of the history's length ``k``,
``y_n + h sum_j b_j f_{n-j}``; ``implicit_adams`` then iterates the Adams-Moulton corrector
``y_n + h (m_0 f(t_{n+1}, y_{n+1}) + sum_j m_{j+1} f_{n-j})``, at most ``max_iters``
evaluations, until two iterates agree to rtol/atol. A step whose corrector does not converge
drops the oldest derivative from the history (with torchdiffeq's warning), so the order stays.

The discrete adjoint. A step is linear in the earlier derivatives it reads, so its checkpoint
holds its start ``y_n`` and their sums, ``sum_{j>=1} b_j f_{n-j}`` (and the corrector's
``sum_{j>=1} m_{j+1} f_{n-j}``). The backward pass recomputes ``f_n`` and the corrector
iterates from them, and hands the sums' cotangents back to the earlier steps' derivatives with
the same weights (:meth:`AdamsStepper.carried_cotangents`); walking the steps backwards, each
``f_n`` has its whole cotangent before its own step's vector-Jacobian product.
"""
from __future__ import annotations

import dataclasses
import functools
import operator
import warnings
from fractions import Fraction
from typing import Any, Sequence

import torch

from ..capture import State
from .arguments import per_component, real_number
from .step import Nudge, Stepper, weighted_sum

# The method names, and whether each corrects its steps (implicit).
ADAMS_METHODS = {"explicit_adams": False, "implicit_adams": True, "fixed_adams": True}
ADAMS_OPTIONS = ("max_order", "max_iters")

MIN_ORDER = 3  # the shortest history an Adams step reads; shorter ones step by rk4
MAX_ORDER = 12  # the largest max_order (torchdiffeq's)
DEFAULT_MAX_ITERS = 4
# The highest explicit order whose weights (magnitudes summing to 43) suit a low-precision
# velocity: order 11's sum to 591, and bf16 gradients came out 30 times less accurate.
LOW_PRECISION_ORDER = 7


def _integrated_lagrange_basis(nodes: tuple[int, ...]) -> tuple[Fraction, ...]:
    """The integral over ``[0, 1]`` of each Lagrange basis polynomial on ``nodes`` (times in
    steps from ``t_n``): the weight of the derivative at each node in the step's increment."""
    weights = []
    for j, node in enumerate(nodes):
        polynomial = [Fraction(1)]  # coefficients of s**0, s**1, ...
        for other in nodes[:j] + nodes[j + 1:]:
            scale = Fraction(1, node - other)
            shifted = [Fraction(0)] * (len(polynomial) + 1)
            for power, c in enumerate(polynomial):
                shifted[power] -= other * c * scale
                shifted[power + 1] += c * scale
            polynomial = shifted
        weights.append(sum(c / (power + 1) for power, c in enumerate(polynomial)))
    return tuple(weights)


@functools.cache
def bashforth(order: int) -> tuple[float, ...]:
    """The Adams-Bashforth weights of ``f_n, f_{n-1}, ...`` (``order`` of them)."""
    return tuple(map(float, _integrated_lagrange_basis(tuple(range(0, -order, -1)))))


@functools.cache
def moulton(order: int) -> tuple[float, ...]:
    """The Adams-Moulton weights of ``f_{n+1}, f_n, ...`` (``order`` of them)."""
    return tuple(map(float, _integrated_lagrange_basis(tuple(range(1, 1 - order, -1)))))


def adams_settings(method: str, options: dict[str, Any], rtol: Any, atol: Any,
                   is_tuple: bool, components: int) -> dict[str, Any]:
    """The :class:`AdamsStepper` fields of ``method`` from the solve's options and tolerances
    (which only the corrector reads), checked."""
    max_order = int(real_number("options['max_order']", options.get("max_order", MAX_ORDER),
                                sign="positive", whole=True))
    if not 2 <= max_order <= MAX_ORDER:
        raise ValueError(f"options['max_order'] must be from 2 to {MAX_ORDER} for {method!r}, "
                         f"got {max_order}")
    if max_order <= MIN_ORDER:
        warnings.warn(f"max_order is below {MIN_ORDER + 1}, so the solver reduces to `rk4`.",
                      stacklevel=5)
    max_iters = int(real_number("options['max_iters']",
                                options.get("max_iters", DEFAULT_MAX_ITERS), sign="positive",
                                whole=True))
    return dict(implicit=ADAMS_METHODS[method], max_order=max_order, max_iters=max_iters,
                rtol=per_component("rtol", rtol, is_tuple, components),
                atol=per_component("atol", atol, is_tuple, components))


@dataclasses.dataclass
class AdamsStepper(Stepper):
    """The steps of an Adams method (see the module docstring); ``tableau`` is ``rk4``, the
    method of the first steps.

    A solve records, per step, the length of the history it read and its corrector
    evaluations; a step taken again (a budget's re-run from :meth:`resume`, a replay after
    :meth:`rewind`) reads them instead of deciding anew, so that it repeats the forward's step.

    Attributes:
        implicit: whether the Adams-Moulton corrector runs.
        max_order: one more than the longest history.
        max_iters: the most corrector evaluations per step.
        rtol, atol: per state component, the corrector's convergence tolerances.
        lengths: per step of the last solve, the length of the history it read (its own
            derivative included).
        corrections: per step of the last solve, its corrector evaluations.
    """

    implicit: bool = False
    max_order: int = MAX_ORDER
    max_iters: int = DEFAULT_MAX_ITERS
    rtol: tuple[float, ...] = ()
    atol: tuple[float, ...] = ()
    lengths: list[int] = dataclasses.field(default_factory=list)
    corrections: list[int] = dataclasses.field(default_factory=list)

    multistep = True

    def __post_init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.rewind()
        self.lengths, self.corrections = [], []

    def rewind(self) -> None:
        self._history: list[State] = []  # the earlier derivatives, newest first
        self._step = 0  # the index of the next step

    @property
    def checkpoint_width(self) -> int:
        return 3 if self.implicit else 2

    @property
    def resume_width(self) -> int:
        return self.max_order - 1

    def order_of(self, step: int) -> int:
        """The order of step ``step`` of the last solve: the length of the history it read, or
        0 for an rk4 step."""
        length = self.lengths[step]
        return length if length >= MIN_ORDER else 0

    def checkpoint_of(self, y: State) -> State:
        """At the next step's start: the start and the sums of the earlier derivatives the
        step reads (zeros for an rk4 step)."""
        order = min(len(self._history) + 1, self.max_order - 1)
        if order < MIN_ORDER:
            return (*y, *(torch.zeros_like(c) for c in y * (self.checkpoint_width - 1)))
        sums = _sums(bashforth(order)[1:], self._history)
        if self.implicit:
            sums += _sums(moulton(order + 1)[2:], self._history)
        return (*y, *sums)

    def resume_point(self, y: State) -> State:
        """At the next step's start: the start and the earlier derivatives that the steps from
        here read (at most ``max_order - 2``), padded with zeros to a fixed number."""
        earlier = self._history[:self.max_order - 2]
        padding = [tuple(torch.zeros_like(c) for c in y)] * (self.max_order - 2 - len(earlier))
        return tuple(c for derivatives in (y, *earlier, *padding) for c in derivatives)

    def resume(self, step: int, kept: State) -> State:
        """Continue the last solve at step ``step`` from its :meth:`resume_point`; returns the
        step's start."""
        n = len(kept) // self.resume_width
        self._history = [tuple(kept[i:i + n]) for i in range(n, len(kept), n)][
            :self.lengths[step] - 1]
        self._step = step
        return tuple(kept[:n])

    def step(self, t0: torch.Tensor, t1: torch.Tensor, y: State, first: State | None = None,
             start_nudge: Nudge | None = None) -> tuple[State, list[State]]:
        """The next step of the solve: from its history, which it updates; returns the new
        state and ``[f_n]`` (cubic interpolation's slope at the start). The increments are
        summed in torchdiffeq's order, so that float32 solves round as its do."""
        f0 = self.derivative(t0, y, self.start_nudge if start_nudge is None else start_nudge)
        self.evaluations += 1
        history = [f0, *self._history][:self.max_order - 1]
        step, self._step = self._step, self._step + 1
        recorded = step < len(self.lengths)
        if not recorded:
            self.lengths.append(len(history))
        order = self.order_of(step)
        if order == 0:
            if not recorded:
                self.corrections.append(0)
            y1, stages = self._rk4_step(t0, t1, y, f0)
        else:
            dt = t1 - t0
            predicted = tuple(functools.reduce(operator.add, (
                _times(dt, b) * f[c] for b, f in zip(bashforth(order), history)))
                for c in range(len(y)))
            delta = (tuple(dt * d for d in _sums(moulton(order + 1)[1:], history))
                     if self.implicit else None)
            y1, corrections, converged = self._adams_step(
                t0, t1, y, order, predicted, delta, self.corrections[step] if recorded else None)
            stages = [f0]
            if not recorded:
                self.corrections.append(corrections)
                if not converged:
                    warnings.warn("Functional iteration did not converge. Solution may be "
                                  "incorrect.", stacklevel=5)
                    history = history[:-1]  # drops the oldest
        if recorded and step + 1 < len(self.lengths):  # as the forward's history went on
            history = history[:self.lengths[step + 1] - 1]
        self._history = history
        return y1, stages

    def take_step(self, t0: torch.Tensor, t1: torch.Tensor, y: State, first: State | None = None,
                  start_nudge: Nudge | None = None, stages_read: bool = True
                  ) -> tuple[State, list[State]]:
        return self.step(t0, t1, y, first, start_nudge)  # counts its own evaluations

    def recompute(self, step: int, t0: torch.Tensor, t1: torch.Tensor, y: State, sums: State,
                  start_nudge: Nudge | None) -> tuple[State, list[State]]:
        """Step ``step`` of the last solve again, from its checkpoint (its start ``y`` and the
        sums of the earlier derivatives it read), with as many corrector evaluations as it
        took; returns the new state and ``[f_n]``."""
        f0 = self.derivative(t0, y, self.start_nudge if start_nudge is None else start_nudge)
        self.evaluations += 1
        order = self.order_of(step)
        if order == 0:
            return self._rk4_step(t0, t1, y, f0)
        dt, n = t1 - t0, len(y)
        predicted = tuple(_times(dt, bashforth(order)[0]) * f + dt * s
                          for f, s in zip(f0, sums[:n]))
        delta = (tuple(dt * (moulton(order + 1)[1] * f + s) for f, s in zip(f0, sums[n:]))
                 if self.implicit else None)
        y1, _, _ = self._adams_step(t0, t1, y, order, predicted, delta, self.corrections[step])
        return y1, [f0]

    def carried_cotangents(self, step: int, cotangents: Sequence[torch.Tensor]
                           ) -> list[tuple[int, State]]:
        """The cotangents of the earlier derivatives that step ``step`` read, as ``(m,
        cotangent of f_m)``, from those of its checkpoint's sums."""
        order = self.order_of(step)
        if order == 0:
            return []
        n = len(cotangents) // (self.checkpoint_width - 1)
        weights = [bashforth(order)[1:]] + ([moulton(order + 1)[2:]] if self.implicit else [])
        return [(step - j, tuple(weighted_sum([w[j - 1] for w in weights], cotangents[c::n])
                                 for c in range(n)))
                for j in range(1, order)]

    def _rk4_step(self, t0: torch.Tensor, t1: torch.Tensor, y: State,
                  f0: State) -> tuple[State, list[State]]:
        self.evaluations += self.tableau.stages - 1
        return super().step(t0, t1, y, first=f0)

    def _adams_step(self, t0: torch.Tensor, t1: torch.Tensor, y: State, order: int,
                    predicted: State, delta: State | None, corrections: int | None
                    ) -> tuple[State, int, bool]:
        """The new state of the Adams step of history length ``order`` from the
        Adams-Bashforth increment ``predicted`` and, for the
        corrector, the increment ``delta`` of the derivatives at and before the start; returns
        it, the corrector's evaluations and whether it converged. The corrector runs
        ``corrections`` times, or (None) until it converges, at most ``max_iters`` times."""
        dy, done, converged = predicted, 0, delta is None
        while delta is not None and done < (
                self.max_iters if corrections is None else corrections):
            previous = dy
            f1 = self.derivative(t1, tuple(a + d for a, d in zip(y, dy)), self.end_nudge)
            dy = tuple(_times(t1 - t0, moulton(order + 1)[0]) * f + d
                       for f, d in zip(f1, delta))
            done += 1
            if corrections is None and self._agree(previous, dy):
                converged = True
                break
        self.evaluations += done
        return tuple(a + d for a, d in zip(y, dy)), done, converged

    def _agree(self, previous: State, current: State) -> bool:
        """Whether two corrector increments agree to rtol/atol in every element (a host
        synchronisation)."""
        ratios = [((a - b).abs() / (atol + rtol * torch.maximum(a.abs(), b.abs()))).max()
                  for a, b, rtol, atol in zip(previous, current, self.rtol, self.atol)
                  if a.numel()]
        return not ratios or bool(torch.stack(ratios).max() < 1)


def _sums(weights: Sequence[float], derivatives: list[State]) -> State:
    """``sum_j weights[j] * derivatives[j]`` per component, in order."""
    return tuple(weighted_sum(weights, [f[c] for f in derivatives])
                 for c in range(len(derivatives[0])))


def _times(dt: torch.Tensor, weight: float) -> torch.Tensor:
    """``dt * weight`` in float64, as torchdiffeq forms a step's weights (a derivative times
    it rounds the product to the derivative's dtype)."""
    return dt.to(torch.float64) * weight
