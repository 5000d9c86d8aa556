"""Velocities as real code writes them become graphs: autograd inside the velocity, torch.func,
in-place writes, tensors built from t, weights chosen by t's value, TorchScript helpers, dropout
and BatchNorm. Each is checked against torchdiffeq (float32 mode, ~1e-6) and float64 (bf16)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchdiffeq
from torch import nn

import rampde_fx
from rampde_fx.tools import debug
from field_models import ExactTraceCNF
from models import rel_err

U_BF16 = 2.0 ** -8
T = torch.tensor([0.0, 0.5, 1.0])
STEPS = {"method": "rk4", "options": {"step_size": 0.125}}


class Hutchinson(nn.Module):
    """Hutchinson's trace estimator with noise drawn once and kept on the module."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 8), nn.Softplus(), nn.Linear(8, 2))
        self.register_buffer("noise", torch.randn(5, 2))

    def forward(self, t, states):
        z, _ = states
        with torch.enable_grad():
            z.requires_grad_(True)
            dz = self.net(z)
            e_dz = torch.autograd.grad(dz, z, self.noise, create_graph=True)[0]
        return dz, -(e_dz * self.noise).sum(1, keepdim=True)


class HamiltonianNet(nn.Module):
    """dH/dx with create_graph, written into a preallocated output in place."""

    def __init__(self) -> None:
        super().__init__()
        self.energy = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, t, x):
        with torch.enable_grad():
            x = x.requires_grad_(True)
            grad = torch.autograd.grad(self.energy(x).sum(), x, create_graph=True)[0]
        out = torch.zeros_like(x)
        out[:, :2] = grad[:, 2:]
        out[:, 2:] = -grad[:, :2] * torch.tensor(t)
        return out


class PiecewiseWeights(nn.Module):
    """Weights chosen from a bank by the interval that t's value falls in."""

    def __init__(self, intervals: int = 4) -> None:
        super().__init__()
        self.bank = nn.Parameter(torch.randn(intervals, 3, 3) * 0.5)
        self.intervals = intervals

    def forward(self, t, y):
        k = min(int(t.item() * self.intervals), self.intervals - 1)
        return torch.tanh(y @ self.bank[k]) * t


with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated

    @torch.jit.script
    def _scripted_activation(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * 0.5 + x * x * 0.1


class ScriptedHelper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, t, y):
        return _scripted_activation(self.lin(y))


class JacobianPenalty(nn.Module):
    """A velocity that uses torch.func: the diagonal of its own Jacobian, per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def field(self, x):
        return torch.tanh(self.lin(x))

    def forward(self, t, y):
        jacobians = torch.func.vmap(torch.func.jacrev(self.field))(y)
        return self.field(y) - 0.1 * jacobians.diagonal(dim1=-2, dim2=-1)


class Dropped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3))

    def forward(self, t, y):
        return self.net(y)


class Normalised(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.BatchNorm1d(16), nn.Tanh(),
                                 nn.Linear(16, 3))

    def forward(self, t, y):
        return self.net(y)


def cnf_state():
    return torch.randn(5, 2), torch.zeros(5, 1)


# name: (velocity factory, initial state factory)
PATTERNS = {
    "exact_trace_cnf": (ExactTraceCNF, cnf_state),
    "hutchinson": (Hutchinson, cnf_state),
    "hamiltonian_inplace": (HamiltonianNet, lambda: torch.randn(5, 4)),
    "piecewise_weights": (PiecewiseWeights, lambda: torch.randn(5, 3)),
    "torchscript_helper": (ScriptedHelper, lambda: torch.randn(5, 3)),
    "torch_func": (JacobianPenalty, lambda: torch.randn(5, 3)),
}


def solve_and_grads(solver, func, y0, t, seed=None, **kwargs):
    """Outputs of a solve (rk4 unless ``kwargs`` say otherwise) and the gradients of a fixed
    loss for y0, t and func's parameters."""
    y0 = tuple(c.clone().requires_grad_() for c in y0) if isinstance(y0, tuple) \
        else y0.clone().requires_grad_()
    t = t.clone().requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    out = solver(func, y0, t, **{**STEPS, **kwargs})
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum()
               for o in outs)
    inputs = [*(y0 if isinstance(y0, tuple) else (y0,)), t, *func.parameters()]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)  # a last bias under d/dx
    return [*outs, *(torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs))]


def make(name):
    torch.manual_seed(0)
    factory, state = PATTERNS[name]
    return factory(), state()


@pytest.mark.parametrize("name", PATTERNS)
def test_float32_mode_reproduces_torchdiffeq(name):
    func, y0 = make(name)
    with rampde_fx.collect_stats() as stats:
        got = solve_and_grads(rampde_fx.odeint, func, y0, T, dtype=torch.float32)
    assert stats[0].velocity is rampde_fx.VelocityKind.GRAPH
    want = solve_and_grads(torchdiffeq.odeint, func, y0, T)
    n_state = len(y0) if isinstance(y0, tuple) else 1
    time_grad = n_state * 2
    for i, (g, w) in enumerate(zip(got, want)):
        if i == time_grad:  # the sum of every stage's opposite contributions: an absolute bound
            assert (g - w).abs().max() < 1e-6
        else:
            assert rel_err(g, w) < 2e-6 if w.norm() > 0 else g.norm() == 0


@pytest.mark.parametrize("name", PATTERNS)
def test_bfloat16_against_float64(name):
    """Bound 4 unit roundoffs of bf16, as for whole models (test_convert): a velocity that
    differentiates itself adds its derivative's rounding. Measured: at most 1.4 (Hutchinson)."""
    func, y0 = make(name)
    reference = copy.deepcopy(func).double()
    want = solve_and_grads(torchdiffeq.odeint, reference,
                           tuple(c.double() for c in y0) if isinstance(y0, tuple) else y0.double(),
                           T.double())
    got = solve_and_grads(rampde_fx.odeint, func, y0, T)
    # The time gradient sums opposite contributions of every stage: leave it out of the bound.
    time_grad = 2 * (len(y0) if isinstance(y0, tuple) else 1)
    errors = [rel_err(g, w) for i, (g, w) in enumerate(zip(got, want))
              if i != time_grad and w.norm() > 0]
    assert max(errors) < 4 * U_BF16
    assert max(errors) > 1e-5  # bf16's error, not float32's: the low precision ran


def test_weights_chosen_by_time_get_one_graph_per_stage_time():
    func, y0 = make("piecewise_weights")
    # A class of its own: captures are cached per velocity class, and other tests solve with
    # this one.
    func.__class__ = type("Isolated", (type(func),), {})
    with rampde_fx.collect_stats():
        rampde_fx.odeint(func, y0, torch.tensor([0.0, 1.0]), method="rk4",
                         options={"step_size": 0.25})
    (velocity,) = debug.captured_velocities(func)
    times = velocity.graph_times()
    # rk4 (3/8 rule) evaluates at t0, t0 + h/3, t0 + 2h/3, t0 + h: 3 new times per step.
    assert velocity.time_indexed and len(times) == 3 * 4 + 1
    assert {round(k * 12) for k in times} == set(range(13))


class StateBranch(nn.Module):
    """Python control flow on the state's value: the one pattern that stays eager."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, t, y):
        if y.mean() > 0:
            return torch.tanh(self.lin(y))
        return torch.sin(self.lin(y))


class Network(nn.Module):
    """An ODE block between two layers: the solve's y0 requires grad."""

    def __init__(self, func: nn.Module) -> None:
        super().__init__()
        self.encoder = nn.Linear(3, 3)
        self.func = func
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        y = rampde_fx.odeint(self.func, self.encoder(x), T, **STEPS)
        return self.head(y[-1])


def test_state_dependent_branch_falls_back_trains_and_compiles():
    torch.manual_seed(0)
    model = Network(StateBranch())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.warns(rampde_fx.CaptureWarning,
                      match=r"Python control flow on the value of a tensor computed from the state "
                            r"or from tensors that require grad, "
                            r"at test_velocity_capture.py:\d+ in forward: if y.mean\(\) > 0:"):
        model(torch.randn(8, 3))
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = model(torch.randn(8, 3)).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(8, 3)
    eager_out = model(x)
    torch.testing.assert_close(compiled(x), eager_out)


def test_dropout_in_the_velocity_is_replayed_in_the_backward_pass():
    """The recomputed steps draw the forward's masks: float32-mode gradients match
    torchdiffeq's autograd through the same masks (same seed, same draw order)."""
    torch.manual_seed(0)
    func, y0 = Dropped(), torch.randn(5, 3)
    got = solve_and_grads(rampde_fx.odeint, func, y0, T, seed=7, dtype=torch.float32)
    want = solve_and_grads(torchdiffeq.odeint, func, y0, T, seed=7)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 2e-6
    func.eval()  # and in eval mode it is deterministic
    first = rampde_fx.odeint(func, y0, T, **STEPS)
    assert torch.equal(first, rampde_fx.odeint(func, y0, T, **STEPS))


def test_batch_norm_statistics_change_in_forward_evaluations_only():
    torch.manual_seed(0)
    func, y0 = Normalised(), torch.randn(5, 3)
    reference = copy.deepcopy(func)
    with rampde_fx.collect_stats() as stats:
        got = solve_and_grads(rampde_fx.odeint, func, y0, T, dtype=torch.float32)
    want = solve_and_grads(torchdiffeq.odeint, reference, y0, T)
    norm, norm_ref = func.net[1], reference.net[1]
    assert stats[0].nfe_backward > 0
    assert norm.num_batches_tracked.item() == stats[0].nfe_forward == \
        norm_ref.num_batches_tracked.item()
    torch.testing.assert_close(norm.running_mean, norm_ref.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(norm.running_var, norm_ref.running_var, rtol=1e-6, atol=1e-7)
    for g, w in zip(got, want):
        # the bias before the normalisation has a zero gradient: compare it absolutely
        torch.testing.assert_close(g, w, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name", PATTERNS)
def test_three_training_steps(name):
    func, y0 = make(name)
    optimizer = torch.optim.Adam(func.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in func.parameters()]
    used = []
    for _ in range(3):
        optimizer.zero_grad()
        out = rampde_fx.odeint(func, y0, T, **STEPS)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum(o[-1].square().mean() for o in outs)
        loss.backward()
        used = [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in func.parameters()]
        optimizer.step()
        assert torch.isfinite(loss)
    assert sum(used) >= len(used) - 1  # at most a last bias is not seen by a dH/dx velocity
    assert all(not torch.equal(b, p) for b, p, u in zip(before, func.parameters(), used) if u)


class Solved(nn.Module):
    def __init__(self, func: nn.Module, tuple_state: bool) -> None:
        super().__init__()
        self.func = func
        self.tuple_state = tuple_state

    def forward(self, x):
        y0 = (x, torch.zeros(x.shape[0], 1)) if self.tuple_state else x
        out = rampde_fx.odeint(self.func, y0, T, **STEPS)
        return out[0][-1] if self.tuple_state else out[-1]


@pytest.mark.slow
@pytest.mark.parametrize("name", PATTERNS)
def test_compiles_fullgraph(name, cheap_steps):
    func, y0 = make(name)
    model = Solved(func, isinstance(y0, tuple))
    x = (y0[0] if isinstance(y0, tuple) else y0).requires_grad_()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    (got_grad,) = torch.autograd.grad(got.sum(), x)
    want = model(x)
    (want_grad,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


class DroppedNoisy(Dropped):
    """Dropout, and noise added to the derivative: mild enough for an adaptive solve."""

    def __init__(self, p: float = 0.05) -> None:
        super().__init__()
        self.net[2].p = p

    def forward(self, t, y):
        return self.net(y) + 1e-3 * torch.randn_like(y)


ADAPTIVE = {"rtol": 1e-2, "atol": 1e-2, "options": {"first_step": 0.05}}


@pytest.mark.usefixtures("cheap_steps")
@pytest.mark.parametrize("method", ["dopri5", "bosh3", "tsit5", "dopri8", "adaptive_heun",
                                    "fehlberg2"])
@pytest.mark.parametrize("compile_steps", [False, True])
@pytest.mark.parametrize("checkpoint", ["steps", rampde_fx.Budget(2)])
def test_draws_in_adaptive_solves_are_replayed(method, compile_steps, checkpoint):
    """An adaptive step's first stage was evaluated by the step before (its last stage, or
    after it), or at the solve's start: its recomputation draws from that evaluation's
    generator state, its other stages from the step's own. Float32 gradients then equal those
    of autograd through the same forward (checkpoint='stages'), in float32 and in float64 (the
    same draws, the same steps), whose outputs are torchdiffeq's from the same seed where it
    has the method and takes the same steps (first same as last, dopri8; adaptive_heun and
    fehlberg2 evaluate the first stage where torchdiffeq reuses another). Drawing the first
    stage anew left the gradients up to 9e-2 off."""
    torch.manual_seed(0)
    func, y0 = DroppedNoisy(), torch.randn(5, 3)
    options = dict(method=method, **ADAPTIVE)
    with rampde_fx.collect_stats() as solves:
        got = solve_and_grads(rampde_fx.odeint, func, y0, T, seed=7, dtype=torch.float32,
                              compile_steps=compile_steps, checkpoint=checkpoint, **options)
        want64 = solve_and_grads(rampde_fx.odeint, copy.deepcopy(func).double(), y0.double(),
                                 T.double(), seed=7, dtype=torch.float64, checkpoint="stages",
                                 **options)
    want = solve_and_grads(rampde_fx.odeint, func, y0, T, seed=7, dtype=torch.float32,
                           checkpoint="stages", **options)
    assert solves[0].step_kernels == ("compiled" if compile_steps else None)
    assert solves[0].steps >= 3
    assert solves[1].steps == solves[0].steps
    for g, w in zip(got, want):  # kernels sum in another order: a bias gradient 3e-6 off
        assert rel_err(g, w) < 1e-5
    # float32 roundoff reaches the time gradient through every step time: 2.6e-5 with
    # dopri8's weights, as in torchdiffeq (2.9e-5 between its float32 and float64 solves)
    for i, (g, w) in enumerate(zip(got, want64)):
        assert rel_err(g, w) < (1e-4 if i == 2 else 1e-5)
    if method in ("dopri5", "bosh3", "dopri8"):
        torch.manual_seed(7)
        original = torchdiffeq.odeint(func, y0, T, **options)
        assert rel_err(got[0], original) < 2e-6


@pytest.mark.usefixtures("cheap_steps")
@pytest.mark.parametrize("compile_steps", [False, True])
def test_draws_of_the_first_step_are_replayed_past_the_initial_step_probe(compile_steps):
    """Without first_step, the velocity is evaluated twice before the first step (at the
    start, and where torchdiffeq's initial step size probes): the first step's first stage
    draws from the state before both, its other stages from the state after both."""
    torch.manual_seed(0)
    func, y0 = DroppedNoisy(), torch.randn(5, 3)
    options = dict(method="dopri5", rtol=1e-2, atol=1e-2, options=None)
    got = solve_and_grads(rampde_fx.odeint, func, y0, T, seed=7, dtype=torch.float32,
                          compile_steps=compile_steps, **options)
    want = solve_and_grads(rampde_fx.odeint, func, y0, T, seed=7, dtype=torch.float32,
                           checkpoint="stages", **options)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_a_solve_inside_the_velocity_leaves_the_replay_of_its_solve_alone(method):
    """A velocity that solves an ODE of its own (it runs eagerly): the inner solve's
    evaluations are not the outer step's, whose first stage and other stages still draw what
    the forward drew. Counted as the outer's, they left the gradients 0.2 off."""

    class SolvesInside(DroppedNoisy):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(3, 3)

        def forward(self, t, y):
            z = rampde_fx.odeint(lambda s, x: torch.tanh(self.inner(x)), y,
                                 torch.tensor([0.0, 0.1]), method="euler",
                                 options={"step_size": 0.05}, dtype=torch.float32)[-1]
            return super().forward(t, z)

    torch.manual_seed(0)
    func, y0 = SolvesInside(), torch.randn(5, 3)
    options = {**STEPS, "method": method, **(ADAPTIVE if method == "dopri5" else {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rampde_fx.CaptureWarning)
        got = solve_and_grads(rampde_fx.odeint, func, y0, T, seed=7, dtype=torch.float32,
                              **options)
        want = solve_and_grads(rampde_fx.odeint, func, y0, T, seed=7, dtype=torch.float32,
                               checkpoint="stages", **options)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
@pytest.mark.parametrize("checkpoint", ["steps", rampde_fx.Budget(2)])
def test_a_velocity_that_starts_drawing_during_the_solve_is_replayed(method, checkpoint):
    """Weights chosen by the time's value (a graph per time), noise only after t = 0.5: the
    graph that draws is captured during the solve, whose steps before it must have kept their
    generator states all the same. Before, the backward pass drew anew (1e-2 off)."""

    class NoisyLater(DroppedNoisy):  # a class per test: its graphs are captured here
        def forward(self, t, y):
            out = self.net(y)
            return out + 1e-3 * torch.randn_like(y) if t.item() > 0.5 else out

    torch.manual_seed(0)
    func, y0 = NoisyLater(0.0), torch.randn(5, 3)
    options = {**STEPS, "method": method, **(ADAPTIVE if method == "dopri5" else {})}
    got = solve_and_grads(rampde_fx.odeint, func, y0, T, seed=7, dtype=torch.float32,
                          checkpoint=checkpoint, **options)
    func.__class__ = type("NoisyLaterAgain", (NoisyLater,), {})  # captured anew
    want = solve_and_grads(rampde_fx.odeint, func, y0, T, seed=7, dtype=torch.float32,
                           checkpoint="stages", **options)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def test_a_velocity_with_graphs_per_time_that_never_draws_keeps_no_generator_states(
        monkeypatch):
    """The solve takes each step's generator state in case a graph captured during the solve
    draws (see above), and keeps none where none drew."""
    from rampde_fx.engine import integrate

    kept = []
    found = integrate.ContextRecorder.found
    monkeypatch.setattr(integrate.ContextRecorder, "found",
                        lambda self: kept.append(found(self)) or kept[-1])

    class ScaledLater(Dropped):
        def forward(self, t, y):
            return self.net(y) * (2.0 if t.item() > 0.5 else 1.0)

    func = ScaledLater().eval()
    solve_and_grads(rampde_fx.odeint, func, torch.randn(5, 3), T, dtype=torch.float32)
    assert kept == [{}]


@pytest.mark.usefixtures("cheap_steps")
@pytest.mark.parametrize("compile_steps", [False, True])
def test_draws_in_adaptive_bf16_solves_are_replayed(compile_steps):
    """bf16: the discrete adjoint from the low-precision checkpoints, against autograd through
    the same forward (checkpoint='stages'), differs by the checkpoints' rounding only."""
    torch.manual_seed(0)
    func, y0 = DroppedNoisy(0.2), torch.randn(5, 3)
    options = dict(method="dopri5", **ADAPTIVE)
    got = solve_and_grads(rampde_fx.odeint, func, y0, T, seed=7, compile_steps=compile_steps,
                          **options)
    want = solve_and_grads(rampde_fx.odeint, func, y0, T, seed=7, checkpoint="stages",
                           **options)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 2 * U_BF16
