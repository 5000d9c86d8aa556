"""tsit5, Tsitouras's 5(4) pair: its order conditions and continuous extension, the float32 mode
against float64 on the same steps, 5th-order convergence, bfloat16 against float64 and a compiled
solve. (torchdiffeq 0.2.5 has no tsit5 to compare with; its rounding floor is tested with the
other methods' in test_adaptive.py.)"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import rampde_fx
from field_models import MLPFunc
from models import TimeMLP, rel_err
from rampde_fx.engine.interpolation import dense_output_coefficients
from rampde_fx.engine.tableaus import ADAPTIVE_TABLEAUS, TSIT5_INTERPOLANT, ButcherTableau, \
    continuous_weights
from test_adaptive import U_BF16, AcceptedSteps, T, errors_against_float64, solve_and_grad

TSIT5 = ADAPTIVE_TABLEAUS["tsit5"]


def rooted_trees(order: int) -> set[tuple]:
    """The rooted trees with ``order`` vertices, each the sorted tuple of its root's subtrees."""
    trees: set[tuple] = {()}
    for _ in range(order - 1):
        trees = {grown for tree in trees for grown in _grow(tree)}
    return trees


def _grow(tree: tuple):
    """The trees made from ``tree`` by one more leaf, anywhere."""
    yield tuple(sorted((*tree, ())))
    for i, child in enumerate(tree):
        for grown in _grow(child):
            yield tuple(sorted((*tree[:i], grown, *tree[i + 1:])))


def _size(tree: tuple) -> int:
    return 1 + sum(_size(child) for child in tree)


def density(tree: tuple) -> int:
    """gamma(tree): a method of order p has ``b . stage_weights(tree) = 1 / gamma`` for every
    tree of up to p vertices."""
    return _size(tree) * math.prod(density(child) for child in tree)


def stage_weights(tree: tuple, a: torch.Tensor) -> torch.Tensor:
    """The elementary weights of ``tree`` per stage: the product over the root's subtrees of
    ``a @ stage_weights(subtree)``."""
    return math.prod((a @ stage_weights(child, a) for child in tree),
                     start=torch.ones(len(a), dtype=a.dtype))


def matrix(tableau: ButcherTableau) -> torch.Tensor:
    return torch.tensor([[*row, *[0.0] * (tableau.stages - len(row))] for row in tableau.a],
                        dtype=torch.float64)


def order_defects(weights, a: torch.Tensor, order: int, theta: float = 1.0) -> list[float]:
    """``weights . stage_weights(tree) - theta**p / gamma(tree)`` for the trees of ``order``
    vertices: zero where ``weights`` have that order (a continuous extension at ``theta``)."""
    w = torch.tensor(weights, dtype=torch.float64)
    return [float(w @ stage_weights(tree, a)) - theta**order / density(tree)
            for tree in rooted_trees(order)]


def dense_weights(tableau: ButcherTableau, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights of the stages in the engine's dense output at ``theta``, and in its slope:
    the dense output of a unit step from 0 whose stages are the unit vectors."""
    k = torch.eye(tableau.stages, dtype=torch.float64)
    b, mid = (torch.tensor(w, dtype=torch.float64) for w in (tableau.b, tableau.mid))
    coefficients = dense_output_coefficients(torch.zeros_like(b), b, mid, k[0], k[-1],
                                             torch.tensor(1.0, dtype=torch.float64))
    value = sum(c * theta**j for j, c in enumerate(coefficients))
    slope = sum(j * c * theta**(j - 1) for j, c in enumerate(coefficients) if j)
    return value, slope


def test_tableau_is_a_fifth_order_pair_with_a_fourth_order_estimate():
    """All 17 order conditions of order 5 hold for the step's weights, the 8 of order 4 for the
    embedded weights (b - error) and not those of order 5; the rows of a sum to c."""
    assert [len(rooted_trees(p)) for p in range(1, 6)] == [1, 1, 2, 4, 9]
    a = matrix(TSIT5)
    assert torch.allclose(a.sum(1), torch.tensor(TSIT5.c, dtype=torch.float64), atol=1e-15)
    assert TSIT5.fsal and TSIT5.adaptive and (TSIT5.stages, TSIT5.order) == (7, 5)
    for p in range(1, 6):
        assert max(map(abs, order_defects(TSIT5.b, a, p))) < 1e-13, p
    embedded = [b - e for b, e in zip(TSIT5.b, TSIT5.error)]
    for p in range(1, 5):
        assert max(map(abs, order_defects(embedded, a, p))) < 1e-13, p
    assert max(map(abs, order_defects(embedded, a, 5))) > 1e-4


def test_dense_output_is_tsitouras_interpolant():
    """Tsitouras's b_i(theta) vanish at 0, are b at 1 and have order 4 in between; the engine's
    dense output (the quartic through the step's ends and midpoint with the end slopes, as
    torchdiffeq's newest tsit5 builds it) has exactly these weights: its slopes at the ends are
    the first and last stages, as b_i'(0) and b_i'(1) are."""
    a = matrix(TSIT5)
    assert continuous_weights(TSIT5_INTERPOLANT, 0.0) == (0.0,) * 7
    assert max(abs(x - y) for x, y in zip(continuous_weights(TSIT5_INTERPOLANT, 1.0),
                                          TSIT5.b)) < 1e-14
    for theta in (0.2, 0.5, 0.7):
        published = continuous_weights(TSIT5_INTERPOLANT, theta)
        for p in range(1, 5):
            assert max(map(abs, order_defects(published, a, p, theta))) < 1e-13, (theta, p)
        value, _ = dense_weights(TSIT5, theta)
        assert torch.allclose(value, torch.tensor(published, dtype=torch.float64), atol=1e-13)
    assert torch.equal(torch.tensor(TSIT5.mid), torch.tensor(continuous_weights(
        TSIT5_INTERPOLANT, 0.5)))


def test_float32_mode_matches_float64_on_the_same_steps():
    """The float32 solve against a float64 solve of tsit5 forced onto its accepted steps: the
    outputs (three of them interpolated) and the gradients differ by float32 roundoff."""
    torch.manual_seed(0)
    func, y0 = TimeMLP(), torch.randn(8, 3)
    recorder = AcceptedSteps(func)
    with rampde_fx.collect_stats() as solves:
        ours = solve_and_grad(lambda f, y, t: rampde_fx.odeint(
            f, y, t, rtol=1e-5, atol=1e-6, method="tsit5", dtype=torch.float32), recorder, y0, T)
        # Tolerances that no step misses, a first step and growth that reach past every step:
        # the steps land on the recorded ends.
        reference = solve_and_grad(lambda f, y, t: rampde_fx.odeint(
            f, y, t, rtol=1e30, atol=1e30, method="tsit5", dtype=torch.float64,
            options={"step_t": torch.tensor(recorder.ends, dtype=torch.float64),
                     "first_step": 10.0, "ifactor": 1e6}),
            copy.deepcopy(func).double(), y0.double(), T.double())
    stats, reference_stats = solves
    assert (reference_stats.steps, reference_stats.rejected_steps) == (stats.steps, 0)
    assert stats.steps == len(recorder.ends) > 2
    # First same as last: two evaluations at the start (one chooses the first step), six per
    # attempt; the backward pass recomputes all seven stages of each step.
    assert stats.nfe_forward == 2 + 6 * (stats.steps + stats.rejected_steps)
    assert stats.nfe_backward == 7 * stats.steps
    out, y0_grad, t_grad, *param_grads = ours
    out_ref, y0_grad_ref, t_grad_ref, *param_grads_ref = reference
    # Measured: 1e-7 to 7e-7 over seeds; float32 roundoff accumulated over the steps.
    for got, want in zip([out, y0_grad, *param_grads], [out_ref, y0_grad_ref, *param_grads_ref]):
        assert got.dtype == torch.float32 and rel_err(got, want) < 2e-6
    # The time gradient is the dense output's slope, formed from differences of the states
    # (16 y_mid - 11 y0 - 5 y1, as torchdiffeq forms it): float32 rounds them by about
    # 32 u |y| / h, large against the slope where the velocity is small (cos t near t = 1.7).
    # Measured up to 3e-5 on the same steps (dopri5: 5e-5).
    assert rel_err(t_grad, t_grad_ref) < 1e-4


def rotation(t, y):
    return torch.stack([y[..., 1], -y[..., 0]], dim=-1)


def test_converges_at_fifth_order_at_steps_and_between():
    """y' = (y2, -y1) from (1, 0) in float64 with steps of fixed size h = 3/n: the error at the
    outputs, at step ends and at step midpoints (the dense output), falls by 3**5 as n triples."""
    t = torch.tensor([0.0, 0.5, 1.5, 2.5, 3.0], dtype=torch.float64)
    exact = torch.stack([torch.cos(t), -torch.sin(t)], dim=-1)
    errors = []
    for n in (9, 27, 81):
        h = 3.0 / n
        with rampde_fx.collect_stats() as solves:
            got = rampde_fx.odeint(rotation, torch.tensor([1.0, 0.0], dtype=torch.float64), t,
                                   method="tsit5", rtol=1e3, atol=1e3, dtype=torch.float64,
                                   options={"first_step": h, "max_step": h})
        assert (solves[0].steps, solves[0].rejected_steps) == (n, 0)
        errors.append((got - exact)[1:].norm(dim=-1))
    orders = [torch.log(coarse / fine) / math.log(3) for coarse, fine in zip(errors, errors[1:])]
    # Measured: 5.45 from 9 to 27 steps, 5.10 from 27 to 81 (approaching 5 from above).
    assert (orders[0] > 4.8).all() and (orders[0] < 5.8).all(), orders
    assert ((orders[1] - 5).abs() < 0.3).all(), orders


def rounding_gains() -> tuple[float, float]:
    """How much more tsit5's weights amplify the rounding of its stages than dopri5's: in the
    solution (sum |b_i|: 7.6 against 1.6) and in the dense output's slope, whose gradient is the
    time gradient (the largest sum |b_i'(theta)|: 27 against 3.7)."""
    dopri5 = ADAPTIVE_TABLEAUS["dopri5"]
    thetas = torch.linspace(0.0, 1.0, 101).tolist()

    def largest_slope_weights(tableau: ButcherTableau) -> float:
        return max(float(dense_weights(tableau, theta)[1].abs().sum()) for theta in thetas)

    return (sum(map(abs, TSIT5.b)) / sum(map(abs, dopri5.b)),
            largest_slope_weights(TSIT5) / largest_slope_weights(dopri5))


def test_bfloat16_against_float64():
    """The bfloat16 solve is as accurate as the float32 mode at the same tolerance up to
    test_low_precision_against_float64's bounds for dopri5 (a quarter of the unit roundoff for
    outputs, two for gradients) times tsit5's rounding gains over dopri5 (4.6 for the solution,
    7.2 for the time gradient: 1.2 u, 9.2 u and 14 u above it). Tsitouras's weights are
    large and cancel (b_5 = -3.29, b_6 = 2.32): dopri5's own bounds hold at this seed but not at
    every seed (measured over six seeds: outputs up to 0.27 u, gradients of y0 and the parameters
    up to 2.0 u, of the times up to 6.8 u, all above the float32 mode's errors)."""
    solution_gain, slope_gain = rounding_gains()
    torch.manual_seed(0)
    low, high = errors_against_float64(TimeMLP(dim=4, width=32), torch.randn(16, 4), T,
                                       torch.bfloat16, rtol=1e-3, atol=1e-3, method="tsit5")
    (out, y0_grad, t_grad, *param_grads), (out_floor, y0_floor, t_floor, *param_floors) = low, high
    assert out < out_floor + solution_gain * U_BF16 / 4
    for got, floor in zip([y0_grad, *param_grads], [y0_floor, *param_floors]):
        assert got < floor + solution_gain * 2 * U_BF16
    assert t_grad < t_floor + slope_gain * 2 * U_BF16


class Tsit5ODE(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.odefunc = MLPFunc()
        self.dtype = dtype

    def forward(self, x):
        t = torch.tensor([0.0, 0.4, 1.0])
        return rampde_fx.odeint(self.odefunc, x, t, method="tsit5", rtol=1e-3, atol=1e-3,
                                dtype=self.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_solve_equals_eager(cheap_steps, dtype):
    """One graph, and the eager solve: to float32 roundoff in float32; in bfloat16 the same
    steps and outputs, and gradients whose compiled backward kernels round the velocity's
    products differently, within bfloat16's rounding times tsit5's gain (measured: 5e-3, where
    dopri5's are within 2e-3)."""
    torch.manual_seed(0)
    model, x = Tsit5ODE(dtype), torch.randn(3, 4)
    explanation = torch._dynamo.explain(model)(x)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)
    compiled_model = torch.compile(model, fullgraph=True, backend="aot_eager")

    def outputs_and_grads(m):
        inputs = x.clone().requires_grad_()
        out = m(inputs)
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        return [out, *torch.autograd.grad((out * weights).sum(), [inputs, *m.parameters()])]

    with rampde_fx.collect_stats() as solves:
        compiled, eager = outputs_and_grads(compiled_model), outputs_and_grads(model)
    assert solves[0].steps == solves[1].steps
    bound = 2e-6 if dtype == torch.float32 else rounding_gains()[0] * 2.0**-8
    for got, want in zip(compiled, eager):
        assert rel_err(got, want) < bound
