"""Butcher tableaus of the explicit Runge-Kutta methods: data for one generic engine.

Embedded pairs (the adaptive methods) add the weights of their error estimate and of their dense
output at the step's midpoint; the coefficients are those of torchdiffeq 0.2.5, whose results
the float32 mode reproduces, and Tsitouras's published ones for tsit5 (which 0.2.5 lacks).
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge-Kutta method: stage ``i`` is evaluated at ``t + c[i] h`` on
    ``y + h * sum_j a[i][j] k_j`` (``j < i``), and the step is ``y + h * sum_i b[i] k_i``.

    An embedded pair also has ``error``, the weights of the local error estimate
    ``h * sum_i error[i] k_i`` (the difference of its two solutions), and ``mid``, the weights of
    the solution at the step's midpoint for its dense output. ``order`` is the order that
    torchdiffeq's step-size controller uses for the method.
    """

    name: str
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    order: int
    error: tuple[float, ...] | None = None
    mid: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        stages = len(self.c)
        if len(self.b) != stages or len(self.a) != stages or any(
                len(row) != i for i, row in enumerate(self.a)):
            raise ValueError(f"tableau {self.name}: a must be strictly lower triangular with "
                             f"{stages} rows, b and c of length {stages}")
        if (self.error is None) != (self.mid is None) or any(
                w is not None and len(w) != stages for w in (self.error, self.mid)):
            raise ValueError(f"tableau {self.name}: an embedded pair needs both error and mid "
                             f"weights, of length {stages}")

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        return self.error is not None

    @property
    def fsal(self) -> bool:
        """First same as last: the last stage is evaluated on the new solution, so it is the
        next step's first stage."""
        return self.c[-1] == 1.0 and self.b[-1] == 0.0 and self.a[-1] == self.b[:-1]


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


def continuous_weights(coefficients: tuple[tuple[float, ...], ...],
                       theta: float) -> tuple[float, ...]:
    """The weights ``b_i(theta) = sum_j coefficients[i][j] * theta**(j + 1)`` of a continuous
    extension, whose dense output is ``y0 + h * sum_i b_i(theta) k_i`` at ``t0 + theta h``."""
    return tuple(sum(r * theta ** (j + 1) for j, r in enumerate(row)) for row in coefficients)


# Tsitouras's 5(4) pair (Comput. Math. Appl. 62 (2011) 770-775), to double precision.
_TSIT5_B = (0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742,
            -3.290069515436081, 2.324710524099774)
# The embedded 4th-order weights b-hat: the error estimate is the 5th-order solution's difference
# from that solution.
_TSIT5_B_LOW = (0.09468075576583945, 0.009183565540343254, 0.4877705284247616,
                1.234297566930479, -2.7077123499835256, 1.866628418170587, 1 / 66)
TSIT5_INTERPOLANT: tuple[tuple[float, ...], ...] = (
    (1.0, -2.763706197274826, 2.9132554618219126, -1.0530884977290216),
    (0.0, 0.13169999999999998, -0.2234, 0.1017),
    (0.0, 3.9302962368947516, -5.941033872131505, 2.490627285651253),
    (0.0, -12.411077166933676, 30.33818863028232, -16.548102889244902),
    (0.0, 37.50931341651104, -88.1789048947664, 47.37952196281928),
    (0.0, -27.896526289197286, 65.09189467479366, -34.87065786149661),
    (0.0, 1.5, -4.0, 2.5))
"""Tsitouras's 4th-order continuous extension of tsit5: per stage, the coefficients of
``theta, theta**2, theta**3, theta**4`` in ``b_i(theta)`` (see :func:`continuous_weights`)."""

_DOPRI5_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_BOSH3_B = (2 / 9, 1 / 3, 4 / 9)
# Dormand and Prince's 8(7) pair, in the rational approximations of Prince and Dormand (1981).
_DOPRI8_A = (
    (),
    (1 / 18,),
    (1 / 48, 1 / 16),
    (1 / 32, 0.0, 3 / 32),
    (5 / 16, 0.0, -75 / 64, 75 / 64),
    (3 / 80, 0.0, 0.0, 3 / 16, 3 / 20),
    (29443841 / 614563906, 0.0, 0.0, 77736538 / 692538347, -28693883 / 1125000000,
     23124283 / 1800000000),
    (16016141 / 946692911, 0.0, 0.0, 61564180 / 158732637, 22789713 / 633445777,
     545815736 / 2771057229, -180193667 / 1043307555),
    (39632708 / 573591083, 0.0, 0.0, -433636366 / 683701615, -421739975 / 2616292301,
     100302831 / 723423059, 790204164 / 839813087, 800635310 / 3783071287),
    (246121993 / 1340847787, 0.0, 0.0, -37695042795 / 15268766246, -309121744 / 1061227803,
     -12992083 / 490766935, 6005943493 / 2108947869, 393006217 / 1396673457,
     123872331 / 1001029789),
    (-1028468189 / 846180014, 0.0, 0.0, 8478235783 / 508512852, 1311729495 / 1432422823,
     -10304129995 / 1701304382, -48777925059 / 3047939560, 15336726248 / 1032824649,
     -45442868181 / 3398467696, 3065993473 / 597172653),
    (185892177 / 718116043, 0.0, 0.0, -3185094517 / 667107341, -477755414 / 1098053517,
     -703635378 / 230739211, 5731566787 / 1027545527, 5232866602 / 850066563,
     -4093664535 / 808688257, 3962137247 / 1805957418, 65686358 / 487910083),
    (403863854 / 491063109, 0.0, 0.0, -5068492393 / 434740067, -411421997 / 543043805,
     652783627 / 914296604, 11173962825 / 925320556, -13158990841 / 6184727034,
     3936647629 / 1978049680, -160528059 / 685178525, 248638103 / 1413531060, 0.0),
)
_DOPRI8_B = (14005451 / 335480064, 0.0, 0.0, 0.0, 0.0, -59238493 / 1068277825,
             181606767 / 758867731, 561292985 / 797845732, -1041891430 / 1371343529,
             760417239 / 1151165299, 118820643 / 751138087, -528747749 / 2220607170, 1 / 4)
_DOPRI8_B_LOW = (13451932 / 455176623, 0.0, 0.0, 0.0, 0.0, -808719846 / 976000145,
                 1757004468 / 5645159321, 656045339 / 265891186, -3867574721 / 1518517206,
                 465885868 / 322736535, 53011238 / 667516719, 2 / 45, 0.0)

ADAPTIVE_TABLEAUS: dict[str, ButcherTableau] = {tab.name: tab for tab in (
    ButcherTableau(
        "dopri5", c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
        a=((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
           (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
           (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656), _DOPRI5_B),
        b=(*_DOPRI5_B, 0.0), order=5,
        error=(35 / 384 - 1951 / 21600, 0.0, 500 / 1113 - 22642 / 50085,
               125 / 192 - 451 / 720, -2187 / 6784 + 12231 / 42400, 11 / 84 - 649 / 6300,
               -1 / 60),
        # Shampine's midpoint weights for the 4th-order dense output.
        mid=(6025192743 / 30085553152 / 2, 0.0, 51252292925 / 65400821598 / 2,
             -2691868925 / 45128329728 / 2, 187940372067 / 1594534317056 / 2,
             -1776094331 / 19743644256 / 2, 11237099 / 235043384 / 2)),
    ButcherTableau(
        "bosh3", c=(0.0, 1 / 2, 3 / 4, 1.0), a=((), (1 / 2,), (0.0, 3 / 4), _BOSH3_B),
        b=(*_BOSH3_B, 0.0), order=3,
        error=(2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8),
        mid=(0.0, 0.5, 0.0, 0.0)),
    ButcherTableau(
        "fehlberg2", c=(0.0, 1 / 2, 1.0), a=((), (1 / 2,), (1 / 256, 255 / 256)),
        b=(1 / 512, 255 / 256, 1 / 512), order=2,
        error=(-1 / 512, 0.0, 1 / 512), mid=(0.0, 0.5, 0.0)),
    ButcherTableau(
        "adaptive_heun", c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5), order=2,
        error=(0.5, -0.5), mid=(0.5, 0.0)),
    ButcherTableau(
        "dopri8",
        c=(0.0, 1 / 18, 1 / 12, 1 / 8, 5 / 16, 3 / 8, 59 / 400, 93 / 200,
           5490023248 / 9719169821, 13 / 20, 1201146811 / 1299019798, 1.0, 1.0, 1.0),
        a=(*_DOPRI8_A, _DOPRI8_B), b=(*_DOPRI8_B, 0.0), order=8,
        error=(*(hi - lo for hi, lo in zip(_DOPRI8_B, _DOPRI8_B_LOW)), 0.0),
        # The dense output's weights at the midpoint (its interpolating polynomials at 1/2).
        mid=(0.04103130360739393, 0.0, 0.0, 0.0, 0.0, 0.05100562801991382, 0.2388930677412202,
             0.3096870143996103, -0.2172325471755352, 0.07833405679331928,
             -0.0018614369715579948, 0.007072844202678841, 0.00690847373200576,
             -0.013838404349047373)),
    # The step is the published 5th-order solution, first same as last (torchdiffeq's newest
    # tsit5 steps with b-hat instead, yet reuses the last stage, evaluated on the 5th-order
    # solution, as the next step's first). The dense output is torchdiffeq's: the quartic through
    # the step's ends and midpoint with the end slopes. Tsitouras's b_i(theta) are quartics whose
    # slopes at theta = 0 and 1 pick the first and the last stage, so that quartic is his
    # interpolant itself.
    ButcherTableau(
        "tsit5", c=(0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0),
        a=((), (0.161,), (-0.008480655492356989, 0.335480655492357),
           (2.8971530571054935, -6.359448489975075, 4.3622954328695815),
           (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
           (5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401,
            -0.028269050394068383), _TSIT5_B),
        b=(*_TSIT5_B, 0.0), order=5,
        error=tuple(hi - lo for hi, lo in zip((*_TSIT5_B, 0.0), _TSIT5_B_LOW)),
        mid=continuous_weights(TSIT5_INTERPOLANT, 0.5)),
)}

UNSUPPORTED_METHODS = ("scipy_solver",)
