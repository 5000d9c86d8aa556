"""Butcher tableaus of the explicit Runge-Kutta methods: data for one generic engine."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge-Kutta method: stage ``i`` is evaluated at ``t + c[i] h`` on
    ``y + h * sum_j a[i][j] k_j`` (``j < i``), and the step is ``y + h * sum_i b[i] k_i``."""

    name: str
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    order: int

    def __post_init__(self) -> None:
        stages = len(self.c)
        if len(self.b) != stages or len(self.a) != stages or any(
                len(row) != i for i, row in enumerate(self.a)):
            raise ValueError(f"tableau {self.name}: a must be strictly lower triangular with "
                             f"{stages} rows, b and c of length {stages}")

    @property
    def stages(self) -> int:
        return len(self.c)


FIXED_GRID_TABLEAUS: dict[str, ButcherTableau] = {tab.name: tab for tab in (
    ButcherTableau("euler", c=(0.0,), a=((),), b=(1.0,), order=1),
    ButcherTableau("midpoint", c=(0.0, 0.5), a=((), (0.5,)), b=(0.0, 1.0), order=2),
    ButcherTableau("heun2", c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5), order=2),
    # Ralston's second-order method (minimum error bound among two-stage methods).
    ButcherTableau("ralston", c=(0.0, 2 / 3), a=((), (2 / 3,)), b=(0.25, 0.75), order=2),
    ButcherTableau("heun3", c=(0.0, 1 / 3, 2 / 3), a=((), (1 / 3,), (0.0, 2 / 3)),
                   b=(0.25, 0.0, 0.75), order=3),
    # torchdiffeq's "rk4" is Kutta's 3/8 rule; the classic tableau is "rk4_classic".
    ButcherTableau("rk4", c=(0.0, 1 / 3, 2 / 3, 1.0),
                   a=((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
                   b=(0.125, 0.375, 0.375, 0.125), order=4),
    ButcherTableau("rk4_classic", c=(0.0, 0.5, 0.5, 1.0),
                   a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
                   b=(1 / 6, 1 / 3, 1 / 3, 1 / 6), order=4),
)}

# torchdiffeq methods that this package does not solve yet.
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
UNSUPPORTED_METHODS = ("explicit_adams", "implicit_adams", "fixed_adams", "scipy_solver")
