"""Captured velocities true to their Python: each solve binds the tensors its velocity reads,
graphs are reused only while the Python state they were traced under holds, velocities made per
call share one graph, counters advance. Every pattern in float32 mode against torchdiffeq, and
in bfloat16 against float64."""
from __future__ import annotations

import copy
import gc
import math
import warnings

import pytest
import torch
import torchdiffeq
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import rampde_fx
from models import rel_err
from rampde_fx.tools import debug

T = torch.linspace(0.0, 1.0, 3)
RK4 = {"method": "rk4", "options": {"step_size": 0.25}}
F32 = 2e-6  # float32 mode against torchdiffeq: float32 roundoff of a few steps
U_BF16 = 2.0 ** -8


def outputs_and_grads(model, x, params=None):
    """The model's output and the gradients of a fixed weighted sum of it for ``params``
    (default: the model's parameters) and the input."""
    x = x.detach().clone().requires_grad_()
    out = model(x)
    loss = (out * torch.linspace(-1.0, 1.0, out.numel()).view_as(out)).sum()
    inputs = [*(params if params is not None else model.parameters()), x]
    return [out.detach(), *torch.autograd.grad(loss, inputs)]


def assert_close_all(got, want, bound, what=""):
    """Each of ``got`` within ``bound`` of ``want`` relative to its norm (exactly zero where
    the reference is zero)."""
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if not w.any():
            assert not g.any(), (what, i)
        else:
            assert rel_err(g, w) < bound, (what, i, rel_err(g, w))


# --- velocities whose state changes between solves ------------------------------------------

class Scaled(nn.Module):
    """A velocity with a tensor attribute that the model sets before each solve (an ODE-RNN's
    step duration) and a float attribute (a gain)."""

    def __init__(self, dim=3):
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.scale = torch.ones(())
        self.gain = 1.0

    def forward(self, t, y):
        return torch.tanh(self.lin(y)) * self.scale * self.gain


class ODERNN(nn.Module):
    """Solves between observations; sets the velocity's step duration, a tensor that requires
    grad, before each solve."""

    def __init__(self, dim=3):
        super().__init__()
        self.func = Scaled(dim)
        self.durations = nn.Parameter(torch.tensor([0.5, 1.5, 1.0]))
        self.cell = nn.Linear(dim, dim)

    def forward(self, x):
        h = x
        for duration in self.durations:
            self.func.scale = duration
            h = torchdiffeq.odeint(self.func, h, T, **RK4)[-1]
            h = torch.tanh(self.cell(h))
        return h


def test_a_tensor_attribute_set_before_each_solve_is_bound_per_solve():
    """float32 mode equals torchdiffeq (outputs and every gradient) when the model assigns a
    tensor that requires grad to the velocity before each of its solves."""
    torch.manual_seed(0)
    model, x = ODERNN(), torch.randn(5, 3)
    converted = rampde_fx.convert(model, dtype=torch.float32)
    assert_close_all(outputs_and_grads(converted, x), outputs_and_grads(model, x), F32)


def test_the_backward_pass_reads_the_values_the_forward_used():
    """Assigning a velocity's attributes between forward and backward changes no gradient."""
    torch.manual_seed(0)
    func, y0 = Scaled(), torch.randn(4, 3)
    scale = torch.tensor(0.7, requires_grad=True)

    def solve(solver, **kwargs):
        func.scale = scale
        out = solver(func, y0, T, **RK4, **kwargs)
        func.scale = torch.tensor(-3.0, requires_grad=True)  # after the forward
        return torch.autograd.grad(out.square().sum(), [scale, *func.parameters()])

    assert_close_all(solve(rampde_fx.odeint, dtype=torch.float32), solve(torchdiffeq.odeint), F32)


GAIN = 1.0


class GlobalGain(nn.Module):
    """Reads a module-level global and picks its activation by an attribute."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.activation = torch.tanh

    def forward(self, t, y):
        return self.activation(self.lin(y)) * GAIN


class Holder(nn.Module):
    def __init__(self, func):
        super().__init__()
        self.func = func

    def forward(self, x):
        return torchdiffeq.odeint(self.func, x, T, **RK4)[-1]


def _change_gain(model):
    model.func.gain = -2.0


def _change_global(model):
    global GAIN
    GAIN = 0.5


def _change_activation(model):
    model.func.activation = torch.sin


def _add_hook(model):
    model.func.lin.register_forward_hook(lambda module, args, out: out * 3.0)


def _swap_submodule(model):
    torch.manual_seed(1)
    model.func.lin = nn.Linear(3, 3)


def _train_mode_flip(model):
    model.func.dropout_free = True  # a new attribute


@pytest.mark.parametrize("change", [_change_gain, _change_global, _change_activation, _add_hook,
                                    _swap_submodule, _train_mode_flip])
def test_python_state_changed_after_a_solve_is_followed(change):
    """A graph is reused only while the Python state it was traced under holds: a changed
    float attribute, global, activation, hook or swapped submodule is seen, as torchdiffeq
    sees it."""
    global GAIN
    GAIN = 1.0
    torch.manual_seed(0)
    model = Holder(GlobalGain() if change in (_change_global, _change_activation) else Scaled())
    x = torch.randn(4, 3)
    converted = rampde_fx.convert(model, dtype=torch.float32)
    converted(x)  # captured under the first state
    try:
        change(model)
        want = outputs_and_grads(model, x)
        got = outputs_and_grads(converted, x)
    finally:
        GAIN = 1.0
    assert_close_all(got, want, F32, change.__name__)


def test_removing_a_hook_is_followed():
    torch.manual_seed(0)
    model, x = Holder(Scaled()), torch.randn(4, 3)
    handle = model.func.register_forward_pre_hook(lambda module, args: (args[0], args[1] * 2))
    converted = rampde_fx.convert(model, dtype=torch.float32)
    assert_close_all(outputs_and_grads(converted, x), outputs_and_grads(model, x), F32)
    handle.remove()
    assert_close_all(outputs_and_grads(converted, x), outputs_and_grads(model, x), F32)


def test_a_changing_state_warns_past_the_capture_bound():
    """Past MAX_CAPTURES_PER_SIGNATURE states of one velocity's Python a warning says so, and
    results stay right."""
    from rampde_fx.capture.cache import MAX_CAPTURES_PER_SIGNATURE

    class Fresh(Scaled):  # a kind of velocity of its own: the cache holds only its captures
        pass

    torch.manual_seed(0)
    func, y0 = Fresh(), torch.randn(2, 3)
    with pytest.warns(rampde_fx.CaptureWarning, match="captured again for more than"):
        for gain in range(MAX_CAPTURES_PER_SIGNATURE + 2):
            func.gain = float(gain)
            got = rampde_fx.odeint(func, y0, T, dtype=torch.float32, **RK4)
            assert rel_err(got, torchdiffeq.odeint(func, y0, T, **RK4)) < F32
    assert len(debug.captured_velocities(func)) == MAX_CAPTURES_PER_SIGNATURE


# --- torch.func.functional_call and parametrizations ----------------------------------------

def test_functional_call_gradients_reach_the_given_tensors():
    """torch.func.functional_call on a converted model: the solve and its backward read the
    given tensors, which get torchdiffeq's gradients."""
    torch.manual_seed(0)
    model, x = ODERNN(), torch.randn(5, 3)
    converted = rampde_fx.convert(model, dtype=torch.float32)
    params = {name: p.detach().clone().mul(1.1).requires_grad_()
              for name, p in model.named_parameters()}

    def run(module):
        return outputs_and_grads(lambda z: torch.func.functional_call(module, params, (z,)), x,
                                 list(params.values()))

    assert_close_all(run(converted), run(model), F32)


class Lipschitz(nn.Module):
    def __init__(self, wrap):
        super().__init__()
        torch.manual_seed(0)
        self.lin = wrap(nn.Linear(3, 3))

    def forward(self, t, y):
        return -torch.tanh(self.lin(y))


PARAMETRIZATIONS = {
    "spectral_norm": torch.nn.utils.spectral_norm,
    "parametrizations.spectral_norm": torch.nn.utils.parametrizations.spectral_norm,
    "parametrizations.weight_norm": torch.nn.utils.parametrizations.weight_norm,
    "parametrizations.orthogonal": torch.nn.utils.parametrizations.orthogonal,
}


@pytest.mark.parametrize("name", PARAMETRIZATIONS)
def test_parametrized_velocities_train(name):
    """Velocities under spectral_norm (both APIs), weight_norm and orthogonal: float32 mode
    equals torchdiffeq over two training steps, whose power iterations update buffers."""
    x = torch.randn(4, 3)

    def two_steps(make):
        model = make()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        results = []
        for _ in range(2):
            results += outputs_and_grads(model, x)
            optimizer.zero_grad()
            model(x).square().sum().backward()
            optimizer.step()
        return results

    want = two_steps(lambda: Holder(Lipschitz(PARAMETRIZATIONS[name])))
    got = two_steps(lambda: rampde_fx.convert(Holder(Lipschitz(PARAMETRIZATIONS[name])),
                                              dtype=torch.float32))
    assert_close_all(got, want, F32, name)


# --- velocities made per call ---------------------------------------------------------------

class Conditioned(nn.Module):
    """A velocity network with a condition, called as samplers call it."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, t, y, cond):
        return self.net(torch.cat([y, cond, t.expand(y.shape[0], 1)], dim=1))


class Wrapper(nn.Module):
    """A vector-field wrapper that libraries build inside their solve function."""

    def __init__(self, net, cond):
        super().__init__()
        self.net = net
        self.cond = cond

    def forward(self, t, y):
        return self.net(t, y, self.cond)


class Sampler(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.model = Conditioned()
        self.how = how

    def forward(self, x):
        cond = x[:, :1] * 2.0
        if self.how == "lambda":
            func = lambda t, y: self.model(t, y, cond)  # noqa: E731
        elif self.how == "closure":
            extras = {"cond": cond}

            def func(t, y):
                return self.model(t, y, **extras)
        else:
            func = Wrapper(self.model, cond)
        return torchdiffeq.odeint(func, x, T, **RK4)[-1]


@pytest.mark.parametrize("how", ["lambda", "closure", "module"])
def test_velocities_made_per_call_share_one_graph(how):
    """A lambda, a closure over a dict and a module built per call: float32 mode equals
    torchdiffeq on every call (the closed-over tensors bound per solve), with one capture and
    one solve site however many calls."""
    torch.manual_seed(0)
    model = Sampler(how)
    converted = rampde_fx.convert(model, dtype=torch.float32)
    for _ in range(3):
        x = torch.randn(4, 3)
        assert_close_all(outputs_and_grads(converted, x), outputs_and_grads(model, x), F32, how)
    assert len(debug.sites(converted)) == 1
    for _ in range(200):
        converted(torch.randn(4, 3))
    velocity_type = {"lambda": None, "closure": None, "module": Wrapper}[how]
    if velocity_type is not None:
        assert len(debug.captured_velocities(Wrapper(model.model, None))) == 1
    assert len(debug.sites(converted)) == 1


@pytest.mark.slow
def test_a_thousand_per_call_closures_keep_memory_flat():
    """1,000 solves with a lambda made per call: the captured velocities and the tensors alive
    stay flat (counted after collection; a leak of one object per call would add 1,000)."""
    from rampde_fx.capture import GraphVelocity

    torch.manual_seed(0)
    net = Conditioned()

    def solve():
        cond = torch.randn(4, 1)
        return rampde_fx.odeint(lambda t, y: net(t, y, cond), torch.randn(4, 3), T, **RK4)

    def alive():
        gc.collect()
        objects = gc.get_objects()
        return (sum(isinstance(o, GraphVelocity) for o in objects),
                sum(isinstance(o, torch.Tensor) for o in objects))

    for _ in range(10):
        solve()
    before = alive()
    for _ in range(1000):
        solve()
    velocities, tensors = alive()
    assert velocities <= before[0] and tensors < before[1] + 50, (before, (velocities, tensors))


# --- counters -------------------------------------------------------------------------------

class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.nfe = 0

    def forward(self, t, y):
        self.nfe += 1
        return torch.tanh(self.lin(y))


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_counters_advance_as_in_the_original(method):
    """An integer attribute the velocity increments per call advances by the evaluations of
    the forward solve, as it does under torchdiffeq (which, on a fixed grid, makes the same
    evaluations)."""
    torch.manual_seed(0)
    func, y0 = Counting(), torch.randn(4, 3)
    options = RK4 if method == "rk4" else {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5}
    with rampde_fx.collect_stats() as solves:
        rampde_fx.odeint(func, y0, T, dtype=torch.float32, **options)  # captures
        func.nfe = 0
        rampde_fx.odeint(func, y0, T, dtype=torch.float32, **options)
    assert func.nfe == solves[-1].nfe_forward > 0
    if method == "rk4":
        func.nfe = 0
        torchdiffeq.odeint(func, y0, T, **options)
        assert func.nfe == solves[-1].nfe_forward


# --- the float32 mode against torchdiffeq under random state changes ----------------------

class Generated(nn.Module):
    """A small velocity whose behaviour depends on its Python state."""

    def __init__(self, width, activation, gain, use_bias):
        super().__init__()
        self.inp = nn.Linear(3, width, bias=use_bias)
        self.out = nn.Linear(width, 3)
        self.activation = activation
        self.gain = gain
        self.shift = torch.zeros(3)

    def forward(self, t, y):
        return self.out(self.activation(self.inp(y))) * self.gain + self.shift


ACTIVATIONS = [torch.tanh, torch.sin, torch.nn.functional.softplus]
CHANGES = st.lists(st.sampled_from(["gain", "activation", "shift", "weight", "swap"]),
                   min_size=1, max_size=4)


@settings(max_examples=15, deadline=None)
@given(width=st.integers(2, 8), activation=st.sampled_from(ACTIVATIONS),
       gain=st.floats(-2.0, 2.0, allow_nan=False), use_bias=st.booleans(), changes=CHANGES,
       seed=st.integers(0, 2**16))
def test_random_state_changes_between_solves(width, activation, gain, use_bias, changes, seed):
    """Property: after any sequence of state changes between solves (a float gain, the
    activation, a tensor attribute, a parameter's value, a swapped submodule), float32 mode
    matches torchdiffeq on every solve, outputs and gradients: within F32, or (a gradient whose
    terms cancel) as close to float64 as torchdiffeq's own float32 one, within a factor 2."""
    warnings.filterwarnings("ignore", "captured again for more than", rampde_fx.CaptureWarning)
    torch.manual_seed(seed)
    func = Generated(width, activation, gain, use_bias)
    y0 = torch.randn(3, 3)
    for change in [None, *changes]:
        if change == "gain":
            func.gain = float(torch.randn(()))
        elif change == "activation":
            func.activation = ACTIVATIONS[int(torch.randint(3, ()))]
        elif change == "shift":
            func.shift = torch.randn(3, requires_grad=True)
        elif change == "weight":
            with torch.no_grad():
                func.inp.weight.mul_(-1.5)
        elif change == "swap":
            func.out = nn.Linear(width, 3)
        params = [*func.parameters(), *([func.shift] if func.shift.requires_grad else [])]

        def solve(solver, model=func, wanted=params, precision=torch.float32, **kwargs):
            out = solver(model, y0.to(precision), T.to(precision), **RK4, **kwargs)
            return [out.detach(), *torch.autograd.grad(out.square().sum(), wanted)]

        ours = solve(rampde_fx.odeint, dtype=torch.float32)
        theirs = solve(torchdiffeq.odeint)
        wide = copy.deepcopy(func).double()
        wide.shift = func.shift.detach().double().requires_grad_(func.shift.requires_grad)
        exact = solve(torchdiffeq.odeint, wide, [*wide.parameters(), *(
            [wide.shift] if wide.shift.requires_grad else [])], torch.float64)
        for i, (got, want, reference) in enumerate(zip(ours, theirs, exact, strict=True)):
            if not want.any():
                assert not got.any(), (change, i)
            else:
                assert rel_err(got, want) < F32 or \
                    rel_err(got, reference) < 2 * rel_err(want, reference), (change, i)


def test_bfloat16_per_solve_bindings_against_float64():
    """The ODE-RNN pattern in bfloat16: outputs and gradients within the project's bound of a
    float64 run of the original model."""
    torch.manual_seed(0)
    model, x = ODERNN(), torch.randn(5, 3)
    want = outputs_and_grads(copy.deepcopy(model).double(), x.double())
    got = outputs_and_grads(rampde_fx.convert(model), x)
    assert_close_all(got, want, 4 * U_BF16)


# --- values computed from the time --------------------------------------------------------

class Interpolated(nn.Module):
    """Reads coefficients at an index computed from the time by bucketize (how interpolated
    controls are read)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("knots", torch.linspace(0.0, 1.0, 5))
        self.coeffs = nn.Parameter(torch.randn(6, 3))
        self.lin = nn.Linear(3, 3)

    def forward(self, t, y):
        index = int(torch.bucketize(t, self.knots))
        return torch.tanh(self.lin(y)) * self.coeffs[index]


class PaddedWithTime(nn.Module):
    """Pads the state with the time (an OT-Flow potential)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, t, y):
        return torch.tanh(self.lin(torch.nn.functional.pad(y, (0, 1), value=t)))


class SwitchedByTime(nn.Module):
    """Branches on a comparison of the time with a constant."""

    def __init__(self):
        super().__init__()
        self.early, self.late = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, t, y):
        return torch.tanh(self.early(y) if t < 0.5 else self.late(y))


@pytest.mark.parametrize("make", [Interpolated, PaddedWithTime, SwitchedByTime])
def test_values_computed_from_the_time_are_specialised_not_eager(make):
    """Python reads of values computed from the time and buffers (an index from bucketize,
    the time where a number is expected, a comparison) give graphs per time value, as
    ``t.item()`` does: no fallback, and float32 mode equals torchdiffeq."""
    torch.manual_seed(0)
    func, y0 = make(), torch.randn(4, 3)
    params = list(func.parameters())

    def solve(solver, **kwargs):
        y = y0.clone().requires_grad_()
        out = solver(func, y, T, **RK4, **kwargs)
        return [out.detach(), *torch.autograd.grad(out.square().sum(), [*params, y])]

    with rampde_fx.collect_stats() as solves:  # CaptureWarning is an error in this suite
        got = solve(rampde_fx.odeint, dtype=torch.float32)
    assert solves[0].velocity is rampde_fx.VelocityKind.GRAPH
    assert_close_all(got, solve(torchdiffeq.odeint), F32, make.__name__)


def test_a_changed_buffer_read_as_a_number_captures_again():
    """A graph specialised on a buffer's value (knots read through bucketize) is not reused
    once the buffer holds other values."""
    torch.manual_seed(0)
    func, y0 = Interpolated(), torch.randn(4, 3)
    rampde_fx.odeint(func, y0, T, dtype=torch.float32, **RK4)
    func.knots = torch.linspace(0.0, 1.0, 5) ** 2
    got = rampde_fx.odeint(func, y0, T, dtype=torch.float32, **RK4)
    assert rel_err(got, torchdiffeq.odeint(func, y0, T, **RK4)) < F32


# --- torch.compile ----------------------------------------------------------------------------

def test_compiled_solves_see_attributes_assigned_before_them(cheap_steps):
    """Under torch.compile the solve reads the tensors assigned to the velocity in the traced
    code before it (dynamo applies attribute assignments after its graph)."""
    torch.manual_seed(0)
    model, x = ODERNN(), torch.randn(5, 3)
    converted = rampde_fx.convert(model, dtype=torch.float32)
    compiled = torch.compile(converted, fullgraph=True, backend="aot_eager")
    assert_close_all(outputs_and_grads(compiled, x), outputs_and_grads(model, x), F32)


def test_twenty_instances_of_one_class_compile(cheap_steps):
    """Any number of converted instances of one class compile under dynamo's default
    configuration, each with its own result."""
    x = torch.randn(4, 3)
    for seed in range(20):
        torch.manual_seed(seed)
        model = Holder(Scaled())
        compiled = torch.compile(rampde_fx.convert(model, dtype=torch.float32), fullgraph=True,
                                 backend="aot_eager")
        assert rel_err(compiled(x), model(x)) < F32


class Bank(nn.Module):
    """Two layers whose weights are views of one parameter (a weight bank)."""

    def __init__(self):
        super().__init__()
        self.bank = nn.Parameter(torch.randn(2, 3, 3) * 0.3)
        self.register_buffer("first", self.bank[0], persistent=False)
        self.register_buffer("second", self.bank[1], persistent=False)

    def forward(self, t, y):
        return torch.tanh(y @ self.first) @ self.second


def test_views_of_one_parameter_raise_no_false_alarm(cheap_steps):
    """Buffers that are views of one parameter get their gradients under torch.compile, with
    no warning that they get none."""
    torch.manual_seed(0)
    func, y0 = Bank(), torch.randn(4, 3)
    solve = torch.compile(lambda y: rampde_fx.odeint(func, y, T, dtype=torch.float32, **RK4),
                          fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", rampde_fx.CaptureWarning)
        got = solve(y0)
        (grad,) = torch.autograd.grad(got.square().sum(), func.bank)
    want = torchdiffeq.odeint(func, y0, T, **RK4)
    (want_grad,) = torch.autograd.grad(want.square().sum(), func.bank)
    assert rel_err(got, want) < F32 and rel_err(grad, want_grad) < F32
    assert math.isfinite(grad.norm())


@pytest.mark.parametrize("how", ["lambda", "closure", "module"])
def test_compiled_velocities_made_per_call_run_between_graphs(how, cheap_steps):
    """Under torch.compile (default mode) a lambda, a closure over a dict or a module built
    per call in the model's code solves eagerly between two compiled graphs (dynamo cannot hand
    such a velocity to the solve op): float32 mode equals torchdiffeq on every call, outputs
    and gradients, with one solve site. With fullgraph=True, dynamo's error gives the reason
    and what to do."""
    torch.manual_seed(0)
    model = Sampler(how)
    converted = rampde_fx.convert(model, dtype=torch.float32)
    compiled = torch.compile(converted, backend="aot_eager")
    for _ in range(2):
        x = torch.randn(4, 3)
        assert_close_all(outputs_and_grads(compiled, x), outputs_and_grads(model, x), F32, how)
    assert len(debug.sites(converted)) == 1
    torch._dynamo.reset()
    with pytest.raises(Exception, match="set what changes per call as attributes"):
        torch.compile(converted, fullgraph=True, backend="aot_eager")(torch.randn(4, 3))


def test_spectral_norm_model_run_before_its_conversion():
    """The old spectral_norm API leaves the last computed weight in a tensor attribute, with
    the graph of the run that computed it: a converted solve of the same model does not read
    it, and sends it no gradient."""
    x = torch.randn(4, 3)
    twins = []
    for _ in range(2):
        torch.manual_seed(0)
        twins.append(Holder(Lipschitz(torch.nn.utils.spectral_norm)))
        outputs_and_grads(twins[-1], x)  # a first run, as torchdiffeq users make it
    reference, model = twins
    assert_close_all(outputs_and_grads(rampde_fx.convert(model, dtype=torch.float32), x),
                     outputs_and_grads(reference, x), F32)
