"""Event solves: ``torchdiffeq.odeint_event`` and ``odeint(..., event_fn=...)`` in converted
models, ``rampde_fx.odeint_event`` and ``rampde_fx.odeint(..., event_fn=...)``: event times,
states and gradients (through the event time, by the implicit function theorem) against
torchdiffeq, float64 and finite differences; successive events; explain; torch.compile."""
from __future__ import annotations

import copy

import pytest
import torch
import torchdiffeq
from torch import nn

import rampde_fx
from models import TimeMLP, rel_err

U_BF16 = 2.0 ** -8  # unit roundoff
# Added to the height after a bounce, so that the next solve starts above the ground: the
# event state's height is 0 only to the bisection's tolerance (at most |v| * atol / 2).
LIFT = 1e-3
# Tolerances above float32's resolution (below it, the step sizes follow rounding noise).
SOLVES = {
    "dopri5": {"rtol": 1e-6, "atol": 1e-7},
    "rk4": {"method": "rk4", "options": {"step_size": 0.05}, "atol": 1e-7},
    "cubic": {"method": "midpoint", "options": {"step_size": 0.05, "interp": "cubic"},
              "atol": 1e-7},
    "explicit_adams": {"method": "explicit_adams", "options": {"step_size": 0.05}, "atol": 1e-7},
    "implicit_adams": {"method": "implicit_adams", "options": {"step_size": 0.05},
                       "rtol": 1e-5, "atol": 1e-7},
}
# float32 mode against torchdiffeq: (outputs, gradients). Fixed grids: float32's resolution of
# a step, whose ends are float32 times in both solvers (torchdiffeq's event steps add the exact
# step size to them, ours step between them: 2**-24 * t / step_size, up to 2e-6 here).
# Adaptive methods: both solvers choose the steps from error estimates near float32 rounding,
# and torchdiffeq's gradients also differentiate its step-size controller (as in
# tests/test_adaptive.py).
FP32_TOLERANCE = {"dopri5": (1e-5, 1e-4), "rk4": (5e-6, 5e-6), "cubic": (5e-6, 5e-6),
                  "explicit_adams": (5e-6, 5e-6), "implicit_adams": (5e-6, 5e-6)}


class BouncingBall(nn.Module):
    """A ball under gravity and quadratic drag, state (height, velocity): each flight is an
    ``odeint_event`` solve until the height reaches 0, the next starts from the event state with
    the velocity reflected and scaled by the restitution."""

    def __init__(self, bounces: int = 3, **solve_kwargs) -> None:
        super().__init__()
        self.gravity = nn.Parameter(torch.tensor(9.81))
        self.restitution = nn.Parameter(torch.tensor(0.8))
        self.drag = 0.1
        self.bounces = bounces
        self.solve_kwargs = solve_kwargs

    def velocity(self, t, state):
        h, v = state
        return v, -self.gravity - self.drag * v * v.abs()

    def hits_ground(self, t, state):
        return state[0]

    def forward(self, h0, v0):
        t0, state = torch.zeros((), dtype=h0.dtype), (h0, v0)
        times = []
        for _ in range(self.bounces):
            t0, solution = torchdiffeq.odeint_event(self.velocity, state, t0,
                                                    event_fn=self.hits_ground,
                                                    **self.solve_kwargs)
            h, v = (s[-1] for s in solution)
            state = (h + LIFT, -self.restitution * v)
            times.append(t0)
        return torch.stack(times), torch.stack(state)


def float64_reference(model):
    """The model in float64; an adaptive one with a far tighter tolerance, a fixed-grid one
    with the same steps."""
    reference = copy.deepcopy(model).double()
    if "method" not in model.solve_kwargs:
        reference.solve_kwargs = {"rtol": 1e-12, "atol": 1e-12}
    return reference


def bounce(model, h0=1.0, v0=0.5, dtype=torch.float32):
    """The event times, the final state, and the gradient of a loss of both with respect to
    ``h0``, ``v0``, gravity and restitution (one vector)."""
    h0 = torch.tensor(h0, dtype=dtype, requires_grad=True)
    v0 = torch.tensor(v0, dtype=dtype, requires_grad=True)
    times, state = model(h0, v0)
    loss = (times * torch.linspace(1, 2, len(times), dtype=dtype)).sum() + state.sum()
    grads = torch.autograd.grad(loss, [h0, v0, model.gravity, model.restitution])
    return [times, state, torch.stack(grads)]


@pytest.mark.parametrize("solve", list(SOLVES))
def test_bouncing_ball_float32_matches_torchdiffeq(solve):
    """Three bounces in float32 mode: event times and states as torchdiffeq's (see
    FP32_TOLERANCE). Each bounce passes its rounding on to the next one's start (time and
    state) and the gradients compound it, in either solver: our gradients are as close to
    float64 as torchdiffeq's own float32 ones, within a factor 2 or that tolerance."""
    tolerance, _ = FP32_TOLERANCE[solve]
    model = BouncingBall(**SOLVES[solve])
    ours = bounce(rampde_fx.convert(model, dtype=torch.float32))
    theirs = bounce(model)
    exact = bounce(float64_reference(model), dtype=torch.float64)
    for got, want in zip(ours[:2], theirs[:2]):
        assert rel_err(got, want) < tolerance
    assert rel_err(ours[2], exact[2]) < 2 * rel_err(theirs[2], exact[2]) + tolerance


@pytest.mark.parametrize("solve", ["rk4", "cubic", "explicit_adams", "implicit_adams"])
def test_bouncing_ball_float64_mode_is_torchdiffeq(solve):
    """With no low precision, a fixed-grid event solve is torchdiffeq's, operation for
    operation: the same steps, bisection and implicit-function-theorem gradients, to float64
    roundoff. (An adaptive solve's gradients differ at its tolerance: torchdiffeq also
    differentiates its step-size controller.)"""
    model = BouncingBall(**SOLVES[solve]).double()
    ours = bounce(rampde_fx.convert(model, dtype=torch.float64), dtype=torch.float64)
    theirs = bounce(model, dtype=torch.float64)
    for got, want in zip(ours, theirs):
        assert rel_err(got, want) < 1e-12


@pytest.mark.filterwarnings("ignore::rampde_fx.ToleranceWarning")
@pytest.mark.parametrize("solve_kwargs", [{"rtol": 1e-5, "atol": 1e-6},
                                          {**SOLVES["rk4"], "atol": 1e-6}], ids=["dopri5", "rk4"])
@pytest.mark.parametrize("h0, v0", [(1.0, 0.5), (2.0, -1.0)])
def test_bouncing_ball_bfloat16_against_float64(solve_kwargs, h0, v0):
    """Each bf16 velocity evaluation is off by about one unit roundoff u (the rounded velocity
    and gravity; the drag in bf16), and the float32 accumulator keeps these from compounding
    within a flight: a flight's end is off by O(u) in its state, and its event time by that
    over the impact speed, O(u) again. Three flights add their errors, passed on through
    bounces that damp them (restitution < 1): event times, final state and the loss's gradient
    (as one vector; single components that nearly cancel over the bounces are less accurate)
    stay within 4u of float64. The reference: torchdiffeq in float64 with the same steps (rk4)
    or at a far tighter tolerance (dopri5)."""
    model = BouncingBall(**solve_kwargs)
    exact = bounce(float64_reference(model), h0, v0, dtype=torch.float64)
    low = bounce(rampde_fx.convert(model, dtype=torch.bfloat16), h0, v0)
    for got, want in zip(low, exact):
        assert got.dtype == torch.float32
        assert rel_err(got, want) < 4 * U_BF16
    if "method" in solve_kwargs:  # the low precision ran: float32 mode, same steps, is far closer
        fp32 = bounce(rampde_fx.convert(model, dtype=torch.float32), h0, v0)
        assert rel_err(fp32[2], exact[2]) < rel_err(low[2], exact[2]) / 10


@pytest.mark.filterwarnings("ignore::rampde_fx.ToleranceWarning")
def test_bouncing_ball_trains_in_bfloat16_as_in_float32():
    """Successive events train end to end: fitting gravity and restitution to another ball's
    bounce times, the converted bf16 ball takes the float32 torchdiffeq ball's Adam steps. Each
    step moves a parameter by about the learning rate, changed by the gradient's relative
    error (below 4u, test_bouncing_ball_bfloat16_against_float64): after ten steps the
    parameters agree to 10 * 0.05 * 4u / 0.7, 1e-2 relative."""
    solve_kwargs = {"rtol": 1e-4, "atol": 1e-5}
    with torch.no_grad():
        other = BouncingBall(**solve_kwargs)
        other.gravity.fill_(8.5)
        other.restitution.fill_(0.7)
        target, _ = other(torch.tensor(1.0), torch.tensor(0.5))

    def train(model):
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        losses = []
        for _ in range(10):
            times, _ = model(torch.tensor(1.0), torch.tensor(0.5))
            loss = (times - target).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses, torch.stack([p.detach() for p in model.parameters()])

    losses, parameters = train(rampde_fx.convert(BouncingBall(**solve_kwargs),
                                                 dtype=torch.bfloat16))
    _, reference_parameters = train(BouncingBall(**solve_kwargs))
    assert min(losses[-3:]) < losses[0] / 2
    assert ((parameters - reference_parameters).abs() / reference_parameters).max() < 1e-2


class Level(nn.Module):
    """An event function with a parameter of its own: the height crosses ``level``."""

    def __init__(self, level: float) -> None:
        super().__init__()
        self.level = nn.Parameter(torch.tensor(level))

    def forward(self, t, state):
        return state[..., 0] - self.level


class Fall(nn.Module):
    """One flight of the ball, as a tensor state ``[h, v]``."""

    def __init__(self) -> None:
        super().__init__()
        self.gravity = nn.Parameter(torch.tensor(9.81))

    def forward(self, t, y):
        h, v = y.unbind(-1)
        return torch.stack([v, -self.gravity - 0.1 * v * v.abs()], -1)


def floor(t, y):
    return y[0]


# Event functions of the time and the state that change sign about 0.5 from t = 0, in either
# direction of time.
EVENT_FUNCTIONS = {
    "one output": lambda t, y: t.abs() - 0.5 + 0.1 * torch.tanh(y.sum()),
    # the first of the two outputs to change sign is the event (here the second)
    "two outputs": lambda t, y: torch.stack([t.abs() - 0.5 + 0.1 * torch.tanh(y.sum()),
                                             0.45 - t.abs() + 0.05 * torch.tanh(y[0])]),
}


@pytest.mark.parametrize("reverse_time", [False, True])
@pytest.mark.parametrize("event", list(EVENT_FUNCTIONS))
@pytest.mark.parametrize("solve", list(SOLVES))
def test_odeint_event_float32_matches_torchdiffeq(solve, event, reverse_time):
    """One event of a time-dependent velocity, forward or backward in time: the event time,
    the state and the gradients of both (for y0, t0 and the velocity's parameters, through the
    event time) as torchdiffeq's (see FP32_TOLERANCE)."""
    torch.manual_seed(0)
    func, event_fn = TimeMLP(), EVENT_FUNCTIONS[event]
    y0 = torch.randn(3, requires_grad=True)
    t0 = torch.tensor(0.0, requires_grad=True)
    inputs = [y0, t0, *func.parameters()]
    outputs_tolerance, gradients_tolerance = FP32_TOLERANCE[solve]
    ours = rampde_fx.odeint_event(func, y0, t0, event_fn=event_fn, reverse_time=reverse_time,
                                  dtype=torch.float32, **SOLVES[solve])
    theirs = torchdiffeq.odeint_event(func, y0, t0, event_fn=event_fn,
                                      reverse_time=reverse_time, **SOLVES[solve])
    assert (ours[0] < 0) == reverse_time
    assert ours[1].shape == theirs[1].shape == (2, 3)
    for got, want in zip(ours, theirs):
        assert rel_err(got, want) < outputs_tolerance
    for loss in (lambda r: r[0], lambda r: r[1][-1].sum()):
        got = torch.autograd.grad(loss(ours), inputs, retain_graph=True)
        want = torch.autograd.grad(loss(theirs), inputs, retain_graph=True)
        assert rel_err(torch.cat([g.reshape(-1) for g in got]),
                       torch.cat([w.reshape(-1) for w in want])) < gradients_tolerance


def _event_time(func, event_fn, y0, t0, **kwargs):
    return rampde_fx.odeint_event(func, y0, t0, event_fn=event_fn, dtype=torch.float64,
                                  rtol=1e-12, atol=1e-12, **kwargs)[0]


@pytest.mark.parametrize("reverse_time", [False, True])
def test_event_time_gradients_against_finite_differences(reverse_time):
    """In float64 mode, the event time's gradients for y0, t0, the velocity's parameter and
    the event function's own parameter equal float64 central differences of the event time
    (step 1e-4: truncation about 1e-9; the adaptive steps, chosen anew for every shifted
    input, move the event time by about their tolerance 1e-12, 1e-8 over the step).
    torchdiffeq gives the event function's parameter no gradient."""
    func, event_fn = Fall().double(), Level(0.3).double()
    y0 = torch.tensor([1.0, 0.5 if not reverse_time else -0.5], dtype=torch.float64,
                      requires_grad=True)
    t0 = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    inputs = [y0, t0, func.gravity, event_fn.level]
    event_t = _event_time(func, event_fn, y0, t0, reverse_time=reverse_time)
    grads = torch.cat([g.reshape(-1) for g in torch.autograd.grad(event_t, inputs)])
    step, differences = 1e-4, []
    with torch.no_grad():
        for x in inputs:
            for i in range(x.numel()):
                shifted = []
                for sign in (1.0, -1.0):
                    x.view(-1)[i] += sign * step
                    shifted.append(_event_time(func, event_fn, y0, t0,
                                               reverse_time=reverse_time))
                    x.view(-1)[i] -= sign * step
                differences.append((shifted[0] - shifted[1]) / (2 * step))
    assert rel_err(grads, torch.stack(differences)) < 1e-6
    theirs = torchdiffeq.odeint_event(func, y0, t0, event_fn=event_fn, reverse_time=reverse_time,
                                      rtol=1e-12, atol=1e-12)[0]
    assert torch.autograd.grad(theirs, event_fn.level, allow_unused=True)[0] is None


@pytest.mark.parametrize("solve", ["dopri5", "cubic"])
def test_odeint_with_event_fn_returns_as_torchdiffeq(solve):
    """rampde_fx.odeint(..., event_fn=...) is torchdiffeq's odeint with event_fn: the event
    time (a constant for autograd) and the solution at t[0] and the event time, whose
    gradients hold the event time fixed; so torchdiffeq's own odeint_event can wrap it."""
    func, solve_kwargs = Fall(), SOLVES[solve]
    outputs_tolerance, gradients_tolerance = FP32_TOLERANCE[solve]
    y0 = torch.tensor([1.0, 0.5], requires_grad=True)
    t = torch.tensor([0.0, 1.0])
    event_fn = floor
    event_t, solution = rampde_fx.odeint(func, y0, t, event_fn=event_fn, dtype=torch.float32,
                                         **solve_kwargs)
    want_t, want = torchdiffeq.odeint(func, y0, t, event_fn=event_fn, **solve_kwargs)
    assert not event_t.requires_grad and event_t.dtype == t.dtype and event_t.dim() == 0
    assert rel_err(event_t, want_t) < outputs_tolerance
    assert rel_err(solution, want) < outputs_tolerance
    got = torch.autograd.grad(solution[-1].sum(), [y0, func.gravity])
    expected = torch.autograd.grad(want[-1].sum(), [y0, func.gravity])
    for g, w in zip(got, expected):
        assert rel_err(g, w) < gradients_tolerance
    wrapped = torchdiffeq.odeint_event(func, y0, t[0], event_fn=event_fn,
                                       odeint_interface=rampde_fx.odeint, dtype=torch.float32,
                                       **solve_kwargs)
    native = torchdiffeq.odeint_event(func, y0, t[0], event_fn=event_fn, **solve_kwargs)
    for got, want in zip(torch.autograd.grad(wrapped[0], [y0, func.gravity]),
                         torch.autograd.grad(native[0], [y0, func.gravity])):
        assert rel_err(got, want) < gradients_tolerance


class EventSolves(nn.Module):
    """Event solves as models write them: odeint_event under an alias from a helper, with
    odeint_adjoint as its interface; odeint with event_fn on a tuple state; rampde_fx.odeint
    with event_fn (in float32 in the original model, for the comparison)."""

    def __init__(self) -> None:
        super().__init__()
        self.fall = Fall()
        self.level = Level(0.3)

    def velocity(self, t, state):
        return tuple(self.fall(t, torch.stack(state, -1)).unbind(-1))

    def collision(self, y0):
        return find_event(self.fall, y0, torch.tensor(0.0), event_fn=self.level,
                          odeint_interface=torchdiffeq.odeint_adjoint, method="rk4",
                          options={"step_size": 0.02, "interp": "cubic"}, atol=1e-7,
                          adjoint_params=tuple(self.parameters()))

    def forward(self, y0):
        event_t, solution = self.collision(y0)
        t = torch.stack([event_t, event_t + 1])
        second_t, (h, v) = torchdiffeq.odeint(self.velocity, tuple(solution[-1].unbind(-1)), t,
                                              event_fn=lambda t, s: s[0] + 0.5, method="rk4",
                                              options={"step_size": 0.02}, atol=1e-7)
        third_t, rest = rampde_fx.odeint(self.fall, solution[-1], t,
                                         event_fn=lambda t, y: y[..., 0] + 1.0, rtol=1e-6,
                                         atol=1e-7, dtype=torch.float32)
        return torch.stack([event_t, second_t, third_t]), h, v, rest


find_event = torchdiffeq.odeint_event


def test_event_solves_in_a_converted_model_and_explain():
    """All three kinds of event solves convert; in float32 mode each computes what the
    original computes, with its gradients (torchdiffeq's odeint_adjoint differentiates by its
    continuous adjoint, another solve, whose error at these steps is about 1e-5), and the
    event function's own parameter gets one; explain lists them with what their event times'
    gradients are."""
    torch.manual_seed(0)
    model = EventSolves()
    converted = rampde_fx.convert(model, dtype=torch.float32)
    y0 = torch.tensor([1.0, 0.5], requires_grad=True)
    ours, theirs = converted(y0), model(y0)
    for got, want in zip(ours, theirs):
        assert rel_err(got, want) < 2e-6
    weights = [torch.randn_like(x) for x in theirs]
    inputs = [y0, model.fall.gravity, model.level.level]
    *got, level_grad = torch.autograd.grad(ours, inputs, weights)
    *want, no_grad = torch.autograd.grad(theirs, inputs, weights)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-4
    assert no_grad == 0 and level_grad != 0  # torchdiffeq's odeint_event gives the level none
    text = rampde_fx.explain(converted)
    assert "solve 0: torchdiffeq.odeint_event in EventSolves at '<root>'" in text
    assert "event_fn=Level" in text and "odeint_interface=odeint_adjoint" in text
    assert "with gradients through the event time by the implicit function theorem" in text
    assert "solve 1: torchdiffeq.odeint in EventSolves" in text
    assert "solve 2: rampde_fx.odeint in EventSolves" in text
    assert text.count("the event time a constant of its gradients") == 2


@pytest.mark.filterwarnings("ignore::rampde_fx.ToleranceWarning")
def test_compiled_event_solves_equal_eager(cheap_steps):
    """Under torch.compile(fullgraph=True) the three-bounce bf16 ball (velocity and event
    function methods of the model) is one graph: each event solve is one op, and the gradient
    through its event time is traced around it. Event times, state and gradients are the eager
    ones."""
    model = BouncingBall(rtol=1e-5, atol=1e-6)
    converted = rampde_fx.convert(model, dtype=torch.bfloat16)
    eager = bounce(converted)
    explanation = torch._dynamo.explain(converted)(torch.tensor(1.0), torch.tensor(0.5))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)
    compiled = bounce(torch.compile(converted, fullgraph=True, backend="aot_eager"))
    for got, want in zip(compiled, eager):
        assert rel_err(got, want) < 1e-6


def test_compiled_event_function_made_per_call_runs_between_graphs(fresh_dynamo):
    """An event function made inside the compiled code (a lambda) cannot reach the solve op:
    the solve runs eagerly between two graphs, with the eager result, and fullgraph=True gets
    dynamo's error with the reason."""
    func = Fall()
    h0 = torch.tensor([1.0, 0.0], requires_grad=True)

    def flight(h0):
        t, solution = rampde_fx.odeint_event(func, h0, torch.tensor(0.0),
                                             event_fn=lambda t, y: y[0], method="rk4",
                                             options={"step_size": 0.05}, atol=1e-7)
        return t, solution[-1]

    eager = flight(h0)
    for got, want in zip(torch.compile(flight, backend="aot_eager")(h0), eager):
        assert rel_err(got, want) < 1e-7
    torch._dynamo.reset()  # else the frame compiled above runs as it was
    with pytest.raises(Exception, match=r"or event function\) is made inside the compiled"):
        torch.compile(flight, fullgraph=True, backend="aot_eager")(h0)


def test_event_at_the_start_and_refusals():
    func, y0 = Fall(), torch.tensor([0.0, 1.0])
    event_t, solution = rampde_fx.odeint(func, y0, torch.tensor([0.5, 1.0]),
                                         event_fn=floor, dtype=torch.float32)
    assert event_t.item() == 0.5 and torch.equal(solution, torch.stack([y0, y0]))
    with pytest.raises(ValueError, match=r"needs options\['step_size'\]"):
        rampde_fx.odeint(func, y0, torch.tensor([0.0, 1.0]), event_fn=floor, method="rk4")
    with pytest.raises(ValueError, match="odeint_interface must be"):
        rampde_fx.odeint_event(func, y0, torch.tensor(0.0), event_fn=floor,
                               odeint_interface=lambda *args, **kwargs: None)
