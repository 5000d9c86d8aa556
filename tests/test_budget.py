"""checkpoint=rampde_fx.Budget(n): at most n states kept whatever the number of steps, the
others recomputed by binomial checkpointing (revolve), with the gradients of checkpoint='steps'."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import rampde_fx
from field_models import AdjointODE
from rampde_fx.engine.schedule import (Thinning, fewest_recomputed_steps, fixed_grid_segments,
                                       recomputed_steps, revolve_steps)
from rampde_fx.tools.memory import saved_tensor_bytes

T = torch.tensor([0.0, 0.3, 1.0])


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))


class Velocity(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, t, y):
        return self.net(y)


class Dropped(nn.Module):
    """Draws a dropout mask at every evaluation."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 2))

    def forward(self, t, y):
        return self.net(y)


class Counting(nn.Module):
    """Changes a buffer in place at every evaluation, and reads it: a re-run step must find
    the value the forward step found."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, t, y):
        self.calls.add_(1)
        return self.net(y) * (1 + 0.01 * self.calls)


def solve_and_grads(func, checkpoint, *, seed=0, **kwargs):
    """Outputs, the gradients of a fixed loss for y0, t and func's parameters, and the stats."""
    torch.manual_seed(1)
    y0 = torch.randn(8, 2, requires_grad=True)
    t = T.clone().requires_grad_()
    torch.manual_seed(seed)
    with rampde_fx.collect_stats() as stats:
        out = rampde_fx.odeint(func, y0, t, checkpoint=checkpoint, **kwargs)
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
        grads = torch.autograd.grad(loss, [y0, t, *func.parameters()])
    return [out.detach(), *grads], stats[0]


def assert_same(got, want):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def rk4(steps: int, **options) -> dict:
    return {"method": "rk4", "options": {"step_size": 1 / steps, **options}}


# --- the schedule ----------------------------------------------------------------------------

@functools.cache
def fewest(steps: int, states: int, forward_free: bool) -> int:
    """Forward steps recomputed to reverse ``steps`` steps, minimised over every schedule by
    brute force: from a kept start with ``states`` states; or (``forward_free``) after a forward
    pass that kept what it liked on its way, as a fixed grid's backward pass starts."""
    if steps <= 1:
        return 0
    if states == 1:
        return steps * (steps - 1) // 2
    return min((0 if forward_free else middle) + fewest(steps - middle, states - 1, forward_free)
               + fewest(middle, states, False) for middle in range(1, steps))


def test_revolve_formula_is_the_brute_force_optimum():
    for states in range(1, 6):
        for steps in range(0, 45):
            assert revolve_steps(steps, states) == fewest(steps, states, False)
            segments = fixed_grid_segments(steps, states)
            assert len(segments) <= states
            assert [s.start for s in segments[:1]] == ([0] if steps else [])
            assert recomputed_steps(segments) == fewest_recomputed_steps(steps, states) \
                == fewest(steps, states, True)


def test_thinning_keeps_at_most_n_evenly_spaced_steps():
    for states in (1, 2, 5, 8):
        thinning = Thinning(states)
        for step in range(1000):
            thinning.add(step)
            assert len(thinning.kept) <= states
        assert thinning.kept == list(range(0, 1000, thinning.stride))


def test_budget_is_validated():
    with pytest.raises(ValueError, match="at least 1 state"):
        rampde_fx.Budget(0)
    with pytest.raises(TypeError, match="an int"):
        rampde_fx.Budget(2.0)
    with pytest.raises(TypeError, match="an int"):
        rampde_fx.Budget(True)
    with pytest.raises(ValueError, match=r"checkpoint must be one of .* or a rampde_fx.Budget"):
        rampde_fx.SolveConfig(checkpoint=64)
    config = rampde_fx.SolveConfig(dtype=torch.float16, checkpoint=rampde_fx.Budget(8))
    assert config.budget == 8 and config.dynamic_scaling
    assert rampde_fx.SolveConfig().budget is None


# --- memory --------------------------------------------------------------------------------

@pytest.mark.parametrize("steps,states", [(100, 1), (100, 4), (100, 16), (30, 64), (1000, 8),
                                          (1000, 64)])
def test_bytes_kept_are_at_most_n_states(steps, states):
    func = Velocity(mlp())
    y0 = torch.randn(64, 2, requires_grad=True)
    kept = saved_tensor_bytes(lambda: rampde_fx.odeint(
        func, y0, T, checkpoint=rampde_fx.Budget(states), dtype=torch.float32, **rk4(steps)))
    grid_and_times = (steps + 1 + len(T)) * 4
    state = y0.numel() * 4  # float32: the state's own dtype
    assert kept - grid_and_times == len(fixed_grid_segments(steps, states)) * state
    assert kept - grid_and_times <= min(states, steps) * state


def test_budget_keeps_less_than_one_low_precision_state_per_step():
    func = Velocity(mlp())
    y0 = torch.randn(256, 2, requires_grad=True)

    def kept(checkpoint):
        return saved_tensor_bytes(lambda: rampde_fx.odeint(
            func, y0, T, checkpoint=checkpoint, **rk4(500)))

    per_step = kept("steps")
    assert per_step >= 500 * y0.numel() * 2
    assert kept(rampde_fx.Budget(16)) < per_step / 10


# --- gradients and recomputation ------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("states", [1, 3, 16])
def test_gradients_equal_checkpoint_per_step(dtype, states):
    func = Velocity(mlp())
    want, every = solve_and_grads(func, "steps", dtype=dtype, **rk4(60))
    got, budget = solve_and_grads(func, rampde_fx.Budget(states), dtype=dtype, **rk4(60))
    assert_same(got, want)
    # rk4: four evaluations per recomputed step, on top of those of 'steps'
    assert budget.nfe_backward - every.nfe_backward == \
        4 * fewest_recomputed_steps(60, states) * budget.backward_sweeps


@pytest.mark.parametrize("make", [Dropped, Counting])
@pytest.mark.parametrize("interp", ["linear", "cubic"])
def test_recomputed_steps_replay_draws_and_buffer_updates(make, interp):
    """The re-run steps draw the forward's numbers and find its buffer values, also for the
    steps whose start was not kept (cubic outputs evaluate the velocity once more)."""
    results = []
    for checkpoint in ("steps", rampde_fx.Budget(3)):
        func = make()
        got, _ = solve_and_grads(func, checkpoint, seed=7, **rk4(20, interp=interp))
        results.append((got, torch.get_rng_state()))
    (got, rng_after), (want, rng_want) = results[1], results[0]
    assert_same(got, want)
    assert torch.equal(rng_after, rng_want)  # the backward pass left the generators alone


class Oscillating(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, t, y):
        return 4 * torch.tanh(self.net(y)) * torch.cos(40 * t)


def test_adaptive_solve_with_a_budget():
    """dopri5 with rejected steps: the accepted steps kept evenly spaced, recomputed between."""
    func = Oscillating()
    options = {"method": "dopri5", "rtol": 1e-6, "atol": 1e-6, "dtype": torch.float32}
    state = 8 * 2 * 4
    want, every = solve_and_grads(func, "steps", **options)
    assert every.steps > 20 and every.rejected_steps > 0
    for states in (1, 4):
        got, budget = solve_and_grads(func, rampde_fx.Budget(states), **options)
        assert_same(got, want)
        thinning = Thinning(states)
        for step in range(budget.steps):
            thinning.add(step)
        assert budget.nfe_backward - every.nfe_backward == \
            7 * recomputed_steps(thinning.segments(budget.steps))
        y0 = torch.randn(8, 2, requires_grad=True)
        kept = saved_tensor_bytes(lambda: rampde_fx.odeint(
            func, y0, T, checkpoint=rampde_fx.Budget(states), **options))
        grid_and_times = (budget.steps + 1) * 8 + len(T) * 4  # the adaptive grid is float64
        assert kept - grid_and_times == len(thinning.kept) * state <= states * state


def test_second_derivatives_with_a_budget():
    """create_graph=True replays the solve, finding each step's draws from the kept ones."""
    def gradient_norm(checkpoint):
        func = Dropped()
        y0 = torch.randn(4, 2, requires_grad=True)
        torch.manual_seed(3)
        out = rampde_fx.odeint(func, y0, T, checkpoint=checkpoint, **rk4(10))
        (g,) = torch.autograd.grad(out.square().sum(), y0, create_graph=True)
        return torch.autograd.grad(g.square().sum(), [y0, *func.parameters()])

    assert_same(gradient_norm(rampde_fx.Budget(2)), gradient_norm("steps"))


@pytest.mark.slow
def test_ten_thousand_steps_with_64_states():
    func = Velocity(mlp())
    y0 = torch.randn(16, 2, requires_grad=True)
    t = torch.tensor([0.0, 1.0])
    options = {"dtype": torch.float32, **rk4(10_000)}
    kept = saved_tensor_bytes(lambda: rampde_fx.odeint(
        func, y0, t, checkpoint=rampde_fx.Budget(64), **options))
    assert kept - (10_001 + 2) * 4 <= 64 * y0.numel() * 4
    with rampde_fx.collect_stats() as stats:
        out = rampde_fx.odeint(func, y0, t, checkpoint=rampde_fx.Budget(64), **options)
        out[-1].sum().backward()
    # the revolve bound: F(10001, 64) - 10000 = 17792 recomputed steps, met exactly
    assert stats[0].nfe_backward == 4 * (10_000 + fewest_recomputed_steps(10_000, 64)) \
        == 4 * (10_000 + 17_792)


# --- compiled solves, explain, check --------------------------------------------------------

class Solved(nn.Module):
    """A budget made in the compiled code itself."""

    def __init__(self) -> None:
        super().__init__()
        self.func = Velocity(mlp())

    def forward(self, y):
        return rampde_fx.odeint(self.func, y, T, checkpoint=rampde_fx.Budget(4), **rk4(40))


@pytest.mark.parametrize("fullgraph", [True, False])
def test_compiled_budget_equals_eager(cheap_steps, fullgraph):
    model = Solved()
    y0 = torch.randn(8, 2)

    def outputs_and_grads(run):
        y = y0.clone().requires_grad_()
        with rampde_fx.collect_stats() as stats:
            out = run(y)
            grads = torch.autograd.grad(out.square().sum(), [y, *model.parameters()])
        return [out.detach(), *grads], stats[-1]

    compiled = torch.compile(model, fullgraph=fullgraph, backend="aot_eager")
    got, compiled_stats = outputs_and_grads(compiled)
    want, eager_stats = outputs_and_grads(model)
    assert_same(got, want)
    assert compiled_stats.nfe_backward == eager_stats.nfe_backward == \
        4 * (40 + fewest_recomputed_steps(40, 4))
    held = saved_tensor_bytes(lambda: compiled(y0.clone().requires_grad_()))
    assert held < 4 * y0.numel() * 4 + 2048  # 4 float32 states, the inputs and parameters


@pytest.mark.filterwarnings("ignore:.*passes adjoint_method:RuntimeWarning")
def test_explain_reports_the_budget():
    torch.manual_seed(0)
    model = rampde_fx.convert(AdjointODE(), checkpoint=rampde_fx.Budget(2))
    model(torch.randn(3, 4)).sum().backward()
    text = rampde_fx.explain(model)
    assert "becomes the discrete adjoint, at most 2 states kept, the other steps recomputed" \
        in text
    assert "dtype: bfloat16, scaling: auto, policy: default, checkpoint: Budget(states=2)" \
        in text
    # 4 rk4 steps: 4 x 4 evaluations, and F(5, 2) - 4 = 2 steps recomputed
    assert "16 evaluations forward, 24 backward" in text


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.func = Velocity(mlp())

    def forward(self, x):
        return rampde_fx.odeint(self.func, x, T, **rk4(20))[-1]


def test_check_measures_the_budget():
    report = rampde_fx.check(Block(), torch.randn(8, 2), dtypes=[torch.bfloat16], repeats=1,
                             verbose=False, checkpoint=rampde_fx.Budget(3))
    assert report.checkpoint == rampde_fx.Budget(3)
    every = rampde_fx.check(Block(), torch.randn(8, 2), dtypes=[torch.bfloat16], repeats=1,
                            verbose=False)
    scope, every_scope = report.scopes[0], every.scopes[0]
    for mode in ("float32", "bfloat16"):  # the same gradients, less memory
        assert scope.measurement(mode).error == every_scope.measurement(mode).error
        assert scope.measurement(mode).saved_bytes < every_scope.measurement(mode).saved_bytes
    assert "checkpoint=rampde_fx.Budget(3))" in str(report)
