"""``rampde_fx.check``: measured precision advice for a model, per solve and per operation.

:func:`check` runs a model on example inputs in float64 (the reference), as written, and
converted by :func:`rampde_fx.convert` to float32 and to each low dtype, and reports how far its
outputs and the gradients of a loss are from the reference, with the bytes kept for backward
and the time per call. It then measures which operations of the velocity graphs matter: the
gradient error with each op kept in float32, and a greedy search for a small set of ops whose
float32 evaluation brings the gradient error within a target. That set, added to the default
policy, is the suggested policy.

What the numbers mean:

* Errors are relative 2-norm errors of the whole model's floating outputs (as one vector) and of
  the gradients of the loss for all its parameters (as one vector). The reference is a float64
  copy of the model whose solves run as the converted ones are defined: ``torchdiffeq.odeint``
  as it is, ``odeint_adjoint`` differentiated through its steps (the converted solve is the
  discrete adjoint: the gradient of the discrete solve), ``rampde_fx.odeint`` with
  ``dtype=torch.float64``.
* The "as written" row is the model itself (float32, its solves as written: an
  ``odeint_adjoint`` there is torchdiffeq's continuous adjoint, whose gradient differs from the
  reference by the discretisation error).
* A model with solves in several modules gets a table with all of them converted, then one per
  module with only that module's solves converted and the others as written: the error, memory
  and time that module's solves add. Solves made by one module count as one (``filter_fn``
  chooses by module).
* "kept for backward" is :func:`rampde_fx.tools.memory.saved_tensor_bytes` of the whole model's
  forward; "per call" the median time of a forward and backward call.

Command line, with ``factory()`` returning ``(model, example_inputs)`` or
``(model, example_inputs, loss_fn)``::

    python -m rampde_fx.check module:factory [--dtypes bfloat16 float16] [--target 1e-2]

(the command line lives in :mod:`rampde_fx.check`).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import sys
import textwrap
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..api import odeint
from ..config import Budget
from ..engine.adams import LOW_PRECISION_ORDER, MAX_ORDER, bashforth
from ..interception import trampolines
from ..interception.convert import convert
from ..interception.sites import sites_of
from ..policy import DEFAULT_POLICY, PrecisionPolicy, op_name
from ..stats import VelocityKind
from .memory import saved_tensor_bytes

DEFAULT_TARGET = 1e-2
LOW_DTYPES = (torch.bfloat16, torch.float16)
_SLOW_SECONDS = 5.0  # with verbose=None, progress lines start once a check has run this long
_TIMING_SECONDS = 2.0  # timing a mode stops once its calls took this long (slow float16 on CPU)
_SEED = 0

# Ops that move or make values without computing on them: keeping one in float32 only changes
# the precision of the ops after it, which the search tries directly.
_DATA_MOVEMENT = frozenset({
    "view", "unsafe_view", "reshape", "t", "transpose", "permute", "expand", "slice", "select",
    "getitem", "unsqueeze", "squeeze", "clone", "contiguous", "detach", "alias", "cat", "stack",
    "split", "split_with_sizes", "unbind", "narrow", "flatten", "to", "copy", "lift_fresh_copy",
    "zeros_like", "ones_like", "full_like", "empty_like", "new_zeros", "new_ones", "new_full",
    "new_empty", "zeros", "ones", "full", "empty", "scalar_tensor",
})


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One way of running the model, measured against the float64 reference.

    Attributes:
        mode: ``'as written'`` (the model itself), or the dtype of the converted solves
            (``'float32'``, ``'bfloat16'``, ``'float16'``).
        output_error: relative error of all floating outputs, as one vector.
        gradient_error: relative error of the gradients of the loss for all parameters, as one
            vector; None for a model without parameters that require grad.
        worst_parameter: the parameter whose gradient has the largest error (None without
            parameters).
        worst_parameter_error: its part of ``gradient_error``: the norm of its gradient's error
            over the norm of the whole reference gradient.
        saved_bytes: bytes the forward keeps for backward; None where not measured.
        seconds: median time of a forward and backward call; None where not measured.
    """

    mode: str
    output_error: float
    gradient_error: float | None
    worst_parameter: str | None
    worst_parameter_error: float | None
    saved_bytes: int | None = None
    seconds: float | None = None

    @property
    def error(self) -> float:
        """What the target applies to: the gradient error (the output error without
        parameters)."""
        return self.output_error if self.gradient_error is None else self.gradient_error


@dataclasses.dataclass(frozen=True)
class Scope:
    """The model measured with some of its solves converted.

    Attributes:
        title: which solves are converted.
        solves: one line per converted solve: solver, module, velocity, method and steps.
        measurements: ``'as written'``, ``'float32'``, then each low dtype checked.
    """

    title: str
    solves: tuple[str, ...]
    measurements: tuple[Measurement, ...]

    def measurement(self, mode: str) -> Measurement:
        """The measurement of ``mode`` (``'as written'``, ``'float32'``, ``'bfloat16'``...)."""
        return next(m for m in self.measurements if m.mode == mode)


@dataclasses.dataclass(frozen=True)
class OpSearch:
    """Which ops of the velocity graphs matter in one low dtype, with every solve converted.

    Attributes:
        dtype: the low dtype.
        default_error: the error (:attr:`Measurement.error`) with the default policy.
        alone: ``(op, error)`` with only that op kept in float32, for every computing op that
            runs in ``dtype``, lowest error first.
        floor: the error with all of those ops in float32 (what remains comes from the states
            and checkpoints stored in ``dtype``); None where the search did not need it.
        path: ``(op, error)`` for each op the greedy search added, in order, with the error
            after adding it.
        found: ops that bring the error within the target (empty when the default policy
            does); None when no set of ops does.
        found_error: the error with ``found`` in float32; None when nothing was found.
    """

    dtype: torch.dtype
    default_error: float
    alone: tuple[tuple[str, float], ...]
    floor: float | None
    path: tuple[tuple[str, float], ...]
    found: frozenset[str] | None
    found_error: float | None

    @property
    def lowest_error(self) -> float:
        """The lowest error measured in this dtype, with whatever ops in float32."""
        return min([self.default_error, *(e for _, e in (*self.alone, *self.path)),
                    *([] if self.floor is None else [self.floor])])


@dataclasses.dataclass(frozen=True)
class CheckReport:
    """What :func:`check` measured, and the dtype and policy it suggests.

    Attributes:
        model: the model's class name.
        loss: how the gradients were made.
        parameters: the number of parameters whose gradients are compared.
        target: the error (:attr:`Measurement.error`) the suggestion must stay within.
        scopes: all solves converted, then (with solves in several modules) each module's.
        searches: the op search of each low dtype searched, in the order of ``dtypes``; the
            search stops at the first dtype that meets the target.
        suggested_dtype: the first low dtype in ``dtypes`` that meets the target, with the
            default policy or with some ops in float32; float32 when none does.
        suggested_policy: the default policy, plus the ops found in float32.
        suggested_error: the measured error of the suggestion.
        notes: what else a reader should know (solves that run eagerly, ops that run in
            float32 for want of a low-precision kernel...).
        seconds: how long the check took.
        checkpoint: the ``checkpoint`` of the converted solves measured (and suggested).
    """

    model: str
    loss: str
    parameters: int
    target: float
    scopes: tuple[Scope, ...]
    searches: tuple[OpSearch, ...]
    suggested_dtype: torch.dtype
    suggested_policy: PrecisionPolicy
    suggested_error: float
    notes: tuple[str, ...]
    seconds: float
    checkpoint: str | Budget = "steps"

    def __str__(self) -> str:
        return self.format()

    def format(self, timings: bool = True) -> str:
        """The report as text; ``timings=False`` leaves out the bytes, times and the check's
        duration (what changes from run to run or with the solver's internals)."""
        what = "gradient error" if self.parameters else "output error"
        lines = [f"rampde_fx.check of {self.model}: {len(self.scopes[0].solves)} ODE solve(s); "
                 "relative errors against a float64 copy of the model",
                 "  output: all floating and complex outputs as one vector",
                 f"  gradient: of {self.loss}, all {self.parameters} parameters as one vector",
                 "  worst parameter: the one with the largest gradient error, and its part of "
                 "that error"]
        for scope in self.scopes:
            lines += ["", scope.title, *(f"  {solve}" for solve in scope.solves),
                      *_table(scope.measurements, timings)]
        for search in self.searches:
            lines += ["", *_search_lines(search, self.target, what)]
        lines += ["", *_suggestion_lines(self, what)]
        lines += [f"note: {note}" for note in self.notes]
        if timings:
            lines.append(f"checked in {self.seconds:.1f} s")
        return "\n".join(lines)


def check(
    model: torch.nn.Module,
    example_inputs: torch.Tensor | Sequence[Any],
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    dtypes: Sequence[torch.dtype] = LOW_DTYPES,
    target: float = DEFAULT_TARGET,
    repeats: int = 3,
    verbose: bool | None = None,
    checkpoint: str | Budget = "steps",
) -> CheckReport:
    """Measure how low precision changes ``model``'s outputs and gradients, and which
    operations of its velocities matter; suggest a dtype and a policy for
    :func:`rampde_fx.convert`.

    Args:
        model: a model that :func:`rampde_fx.convert` accepts. It is left as it is: the check
            runs copies (buffers included).
        example_inputs: the positional inputs of ``model`` (a tensor, or a sequence of them
            and other values); floating and complex tensors are cast to float64 and complex128
            for the reference.
        loss_fn: ``loss_fn(outputs) -> scalar`` whose gradients are compared; default: a fixed
            weighted sum of every element (real and imaginary part) of every floating or complex
            output.
        dtypes: the low dtypes to check, in the order of preference.
        target: the largest gradient error (output error for a model without parameters)
            the suggestion may have.
        repeats: forward and backward calls timed for each mode (the median is reported);
            fewer once they took two seconds.
        verbose: progress lines on stderr: True always, False never, None (default) once the
            check has run for a few seconds.
        checkpoint: the ``checkpoint`` of the converted solves (see :func:`rampde_fx.convert`):
            with a :class:`rampde_fx.Budget`, "kept for backward" is what the budget keeps.

    Returns:
        A :class:`CheckReport`; ``print(report)`` shows it, and
        ``rampde_fx.convert(model, dtype=report.suggested_dtype,
        policy=report.suggested_policy)`` applies its suggestion.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: an unknown dtype, a target that is not positive, ``repeats`` below 1, or
            a model that makes no ODE solve on ``example_inputs``.
        ConversionError: as :func:`rampde_fx.convert` raises it.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"rampde_fx.check takes an nn.Module, got {type(model).__qualname__}")
    dtypes = tuple(dtypes)
    if not dtypes or any(dtype not in LOW_DTYPES for dtype in dtypes):
        raise ValueError(f"rampde_fx.check: dtypes must be some of {LOW_DTYPES}, got {dtypes}")
    if not target > 0:
        raise ValueError(f"rampde_fx.check: target must be positive, got {target}")
    if repeats < 1:
        raise ValueError(f"rampde_fx.check: repeats must be at least 1, got {repeats}")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) \
        else tuple(example_inputs)
    checker = _Checker(model, inputs, loss_fn, repeats, _Progress(verbose), checkpoint)
    return checker.report(dtypes, target)


class _Progress:
    """Progress lines on stderr: always with verbose=True, never with False, and with None
    once the check has run for ``_SLOW_SECONDS``."""

    def __init__(self, verbose: bool | None) -> None:
        self.verbose = verbose
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        elapsed = self.elapsed()
        if self.verbose or (self.verbose is None and elapsed >= _SLOW_SECONDS):
            print(f"rampde_fx.check [{elapsed:5.1f} s] {message}", file=sys.stderr, flush=True)


class _Float64Solves:
    """Runs the float64 reference's solves as the converted solves are defined (a
    :mod:`rampde_fx.interception.trampolines` handler)."""

    def _rampde_intercept(self, source: str, args: tuple[Any, ...],
                          kwargs: dict[str, Any]) -> Any:
        solver = trampolines.original(source) if source.startswith("torchdiffeq.") else odeint
        if source == "torchdiffeq.odeint_adjoint":  # the gradient of the discrete solve
            solver = trampolines.original("torchdiffeq.odeint")
            kwargs = {k: v for k, v in kwargs.items() if not k.startswith("adjoint_")}
        elif source == "rampde_fx.odeint":
            kwargs = {**kwargs, "dtype": torch.float64}
        return trampolines.run_within(None, solver, *args, **kwargs)


def _weighted_sum(outputs: Any) -> torch.Tensor:
    """The default loss: every element of every floating output, weighted from -1 to 1."""
    values = [torch.view_as_real(o) if o.is_complex() else o for o in _inexact_leaves(outputs)]
    return sum((v * torch.linspace(-1, 1, v.numel(), dtype=v.dtype, device=v.device)
                .view_as(v)).sum() for v in values)


def _inexact_leaves(tree: Any) -> list[torch.Tensor]:
    """The floating and complex tensors of ``tree``."""
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)
            and (leaf.is_floating_point() or leaf.is_complex())]


def _relative(error: float, reference: float) -> float:
    if reference == 0.0:
        return 0.0 if error == 0.0 else math.inf
    return error / reference


def _norm(tensors: Iterable[torch.Tensor]) -> float:
    return math.sqrt(sum(t.detach().abs().double().square().sum().item() for t in tensors))


_Result = tuple[list[torch.Tensor], list[torch.Tensor]]


def _named_generators(model: torch.nn.Module) -> Iterator[tuple[str, torch.Generator]]:
    """The random generators that ``model``'s modules keep as attributes, by qualified name."""
    for prefix, module in model.named_modules():
        for key, value in vars(module).items():
            if isinstance(value, torch.Generator):
                yield f"{prefix}.{key}".lstrip("."), value


class _Checker:
    """Runs the model's copies and keeps what every measurement compares against."""

    def __init__(self, model: torch.nn.Module, inputs: tuple[Any, ...],
                 loss_fn: Callable[[Any], torch.Tensor] | None, repeats: int,
                 progress: _Progress, checkpoint: str | Budget) -> None:
        self.model_name = type(model).__qualname__
        self.work = copy.deepcopy(model)  # converted copies share its parameters and buffers
        self.inputs = inputs
        self.loss_fn = _weighted_sum if loss_fn is None else loss_fn
        self.loss = ("the default loss (a fixed weighted sum of the outputs)" if loss_fn is None
                     else "loss_fn")
        self.repeats = repeats
        self.progress = progress
        self.checkpoint = checkpoint
        self.names = [n for n, p in self.work.named_parameters() if p.requires_grad]
        self.buffers = [(b, b.detach().clone()) for b in self.work.buffers()]
        self.generators = {name: g.get_state() for name, g in _named_generators(self.work)}
        self.devices = sorted({p.device for p in self.work.parameters() if p.device.type == "cuda"},
                              key=str)
        self.converted_runs: dict[tuple[torch.dtype, frozenset[str], str | None],
                                  tuple[Measurement, torch.nn.Module]] = {}
        self.progress("running the float64 reference")
        trampolines.install()
        reference = copy.deepcopy(self.work).double()
        for tensor in (*reference.parameters(), *reference.buffers()):  # .double() skips them
            if tensor.is_complex():
                tensor.data = tensor.data.to(torch.complex128)
        reference_inputs = pytree.tree_map_only(
            torch.Tensor, lambda x: x.double() if x.is_floating_point() else
            x.to(torch.complex128) if x.is_complex() else x, inputs)
        self.reference = self._run(reference, reference_inputs, _Float64Solves())

    def _run(self, model: torch.nn.Module, inputs: tuple[Any, ...],
             handler: Any = None) -> _Result:
        """Floating outputs and parameter gradients (zeros for unused parameters) of one
        seeded call; the random state outside is left as it was."""
        parameters = dict(model.named_parameters())
        with torch.random.fork_rng(devices=self.devices):
            out = self._forward(model, inputs, handler)
            wanted = [parameters[n] for n in self.names]
            grads = (torch.autograd.grad(self.loss_fn(out), wanted, allow_unused=True)
                     if wanted else ())
        return ([o.detach() for o in _inexact_leaves(out)],
                [torch.zeros_like(p) if g is None else g for p, g in zip(wanted, grads)])

    def _errors(self, mode: str, result: _Result) -> Measurement:
        (outputs, grads), (ref_outputs, ref_grads) = result, self.reference
        output_error = _relative(_norm(o.to(r.dtype) - r for o, r in zip(outputs, ref_outputs)),
                                 _norm(ref_outputs))
        if not grads:
            return Measurement(mode, output_error, None, None, None)
        reference = _norm(ref_grads)
        parts = [_norm([g.to(r.dtype) - r]) for g, r in zip(grads, ref_grads)]
        worst = max(range(len(parts)), key=parts.__getitem__)
        return Measurement(mode, output_error,
                           _relative(math.sqrt(sum(p * p for p in parts)), reference),
                           self.names[worst], _relative(parts[worst], reference))

    def measure(self, model: torch.nn.Module, mode: str, *, timed: bool) -> Measurement:
        """Errors of ``model`` (the first call, which also captures the velocities) and, if
        ``timed``, bytes kept for backward and the median time of up to ``repeats`` calls."""
        measurement = self._errors(mode, self._run(model, self.inputs))
        if not timed:
            return measurement
        with torch.random.fork_rng(devices=self.devices):
            saved = saved_tensor_bytes(lambda: self._forward(model, self.inputs))
        seconds: list[float] = []
        while len(seconds) < self.repeats and sum(seconds) < _TIMING_SECONDS:
            start = time.perf_counter()
            self._run(model, self.inputs)
            for device in self.devices:
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - start)
        return dataclasses.replace(measurement, saved_bytes=saved,
                                   seconds=statistics.median(seconds))

    def _forward(self, model: torch.nn.Module, inputs: tuple[Any, ...],
                 handler: Any = None) -> Any:
        """One call from the saved buffers (BatchNorm statistics, counters kept in buffers)
        and seeded generators (dropout draws the same masks in every run; the generators that
        modules keep as attributes, copies of the model's, start from its state)."""
        with torch.no_grad():
            for buffer, saved in self.buffers:
                buffer.copy_(saved)
        torch.manual_seed(_SEED)
        for name, generator in _named_generators(model):
            if name in self.generators:
                generator.set_state(self.generators[name])
        if handler is None:
            return model(*inputs)
        return trampolines.run_within(handler, model, *inputs)

    def converted(self, dtype: torch.dtype, ops: Iterable[str] = (),
                  qualname: str | None = None, *, timed: bool = False
                  ) -> tuple[Measurement, torch.nn.Module]:
        """The model converted to ``dtype`` with ``ops`` in float32 (all solves, or only those
        of the module ``qualname``), and its measurement; the same conversion is measured once."""
        key = (dtype, frozenset(ops), qualname)
        if key not in self.converted_runs:
            where = "all solves" if qualname is None else f"solves at '{qualname or '<root>'}'"
            kept = f" with {_op_list(key[1])} in float32" if key[1] else ""
            self.progress(f"{_short(dtype)}{kept}, {where} converted")
            only = None if qualname is None else (lambda module, name: name == qualname)
            model = convert(self.work, dtype=dtype, policy=DEFAULT_POLICY.with_full_ops(key[1]),
                            checkpoint=self.checkpoint, filter_fn=only)
            self.converted_runs[key] = (self.measure(model, _short(dtype), timed=timed), model)
        return self.converted_runs[key]

    def report(self, dtypes: tuple[torch.dtype, ...], target: float) -> CheckReport:
        self.progress("running the model as written")
        as_written = self.measure(self.work, "as written", timed=True)
        modes = (torch.float32, *dtypes)
        everything = [self.converted(dtype, timed=True) for dtype in modes]
        sites = sites_of(everything[0][1])
        if not sites:
            raise ValueError(f"rampde_fx.check: {self.model_name} made no ODE solve on the "
                             "example inputs")
        steps = [{_short(dtype): sites_of(model)[i].last_stats.steps
                  for dtype, (_, model) in zip(modes, everything)} for i in range(len(sites))]
        qualnames = list(dict.fromkeys(site.module_name for site in sites))
        scopes = [Scope(f"all {len(sites)} solves converted" if len(qualnames) > 1 else
                        f"solves at '{qualnames[0] or '<root>'}' converted",
                        tuple(map(_describe, sites, steps)),
                        (as_written, *(m for m, _ in everything)))]
        if len(qualnames) > 1:
            scopes += [Scope(f"only the solves at '{qualname or '<root>'}' converted", (),
                             (as_written, *(self.converted(dtype, (), qualname, timed=True)[0]
                                            for dtype in modes)))
                       for qualname in qualnames]
        notes = [f"{site} runs eagerly under autocast "
                 f"({site.last_stats.fallback_reason}): the policy does not "
                 "apply to it and none of its ops is searched"
                 for site in sites if site.last_stats.velocity is VelocityKind.EAGER]
        notes += [f"in the {_short(dtype)} solves, {reason}, runs in float32"
                  for dtype, (_, model) in zip(modes, everything)
                  for reason in _without_low_kernel(model)]
        notes += [note for site in sites if (note := _adams_note(site))]
        float32 = everything[0][0]
        if float32.error > target:
            notes.append(f"the float32 mode is {float32.error:.1e} from float64, above the "
                         "target: that part of every error does not come from the precision")
        searches = []
        suggestion = (torch.float32, DEFAULT_POLICY, float32.error)
        for dtype in dtypes:
            search = self._search(dtype, target)
            searches.append(search)
            if search.found is not None:
                suggestion = (dtype, DEFAULT_POLICY.with_full_ops(search.found),
                              search.found_error)
                break
        return CheckReport(self.model_name, self.loss, len(self.names), target, tuple(scopes),
                           tuple(searches), *suggestion, tuple(notes), self.progress.elapsed(),
                           self.checkpoint)

    def _search(self, dtype: torch.dtype, target: float) -> OpSearch:
        """Which ops matter in ``dtype``: each alone in float32, then, where the default policy
        misses ``target``, a greedy search that tries matmul-class ops (the work that low
        precision speeds up) only when the other ops cannot reach the target."""
        def error(ops: Iterable[str]) -> float:
            return self.converted(dtype, ops)[0].error

        default, model = self.converted(dtype)
        candidates = _low_ops(model, dtype)
        alone = tuple(sorted(((op, error({op})) for op in candidates), key=lambda a: a[1]))
        if default.error <= target:
            return OpSearch(dtype, default.error, alone, None, (), frozenset(), default.error)
        elementwise = [op for op in candidates if op not in DEFAULT_POLICY.low_ops]
        floor = None
        pool = elementwise
        if not elementwise or error(elementwise) > target:
            floor = error(candidates) if candidates else default.error
            pool = candidates
        if floor is not None and floor > target:
            return OpSearch(dtype, default.error, alone, floor, (), None, None)
        chosen: list[str] = []
        path = []
        current = default.error
        while current > target:
            running_low = _low_ops(self.converted(dtype, chosen)[1], dtype)
            options = [op for op in pool if op in running_low and op not in chosen]
            if not options:
                return OpSearch(dtype, default.error, alone, floor, tuple(path), None, None)
            best = min(options, key=lambda op: error([*chosen, op]))
            chosen.append(best)
            current = error(chosen)
            path.append((best, current))
        for op in list(chosen[:-1]):  # drop ops the target holds without
            fewer = [o for o in chosen if o != op]
            if error(fewer) <= target:
                chosen = fewer
        return OpSearch(dtype, default.error, alone, floor, tuple(path), frozenset(chosen),
                        error(chosen))


def _computing_nodes(converted: torch.nn.Module) -> Iterator[fx.Node]:
    """The op nodes of the velocity graphs of ``converted``'s last solves."""
    for site in sites_of(converted):
        graph = site.last_stats.graph if site.last_stats is not None else None
        if graph is not None:
            yield from (node for node in graph.graph.nodes if node.op == "call_function")


def _low_ops(converted: torch.nn.Module, dtype: torch.dtype) -> list[str]:
    """Sorted canonical names of the computing ops that produce ``dtype`` values in the
    velocity graphs of ``converted``'s last solves."""
    return sorted({op_name(node) for node in _computing_nodes(converted)
                   if _produces(node, dtype) and op_name(node) not in _DATA_MOVEMENT})


def _without_low_kernel(converted: torch.nn.Module) -> list[str]:
    """Why each op of the velocity graphs of ``converted``'s last solves that has no kernel
    for their low dtype runs in float32, once per op (``"'linalg_inv_ex', which has no
    bfloat16 kernel on cpu"``)."""
    return list(dict.fromkeys(node.meta["rampde_precision"].reason
                              for node in _computing_nodes(converted)
                              if node.meta["rampde_precision"].no_low_kernel))


def _produces(node: fx.Node, dtype: torch.dtype) -> bool:
    return any(isinstance(v, torch.Tensor) and v.dtype == dtype
               for v in pytree.tree_leaves(node.meta.get("val")))


def _adams_note(site: Any) -> str | None:
    """For an explicit Adams solve of high order: its weights amplify the velocity's rounding
    (a corrected step ends with the Adams-Moulton weights, whose magnitudes sum to at most 30)."""
    options = site.call_arguments.get("options") or {}
    order = int(options.get("max_order", MAX_ORDER)) - 1
    if site.last_stats.method != "explicit_adams" or order <= LOW_PRECISION_ORDER:
        return None
    return (f"{site} steps with explicit_adams up to order {order}, whose weights sum to "
            f"{sum(map(abs, bashforth(order))):.0f} in magnitude and amplify the low precision's "
            f"rounding as much; options={{'max_order': {LOW_PRECISION_ORDER + 1}}} brings that "
            f"to {sum(map(abs, bashforth(LOW_PRECISION_ORDER))):.0f}")


def _describe(site: Any, steps: dict[str, int]) -> str:
    """A solve, with its steps in each mode (adaptive methods may take different ones)."""
    stats = site.last_stats
    how = "graph" if stats.graph is not None else "runs eagerly"
    counts = set(steps.values())
    taken = (f"{counts.pop()} steps" if len(counts) == 1
             else "steps " + ", ".join(f"{mode} {n}" for mode, n in steps.items()))
    return f"{site}, velocity {site.velocity} ({how}), {stats.method}, {taken}"


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _op_list(ops: Iterable[str]) -> str:
    return ", ".join(f"'{op}'" for op in sorted(ops))


def _size(n: int) -> str:
    return f"{n / 2**10:.1f} KiB" if n < 2**20 else f"{n / 2**20:.2f} MiB"


def _table(measurements: Sequence[Measurement], timings: bool) -> list[str]:
    header = ["mode", "output", "gradient", "worst parameter"]
    if timings:
        header += ["kept for backward", "per call"]
    rows = [header]
    for m in measurements:
        row = [m.mode, f"{m.output_error:.1e}",
               "-" if m.gradient_error is None else f"{m.gradient_error:.1e}",
               "-" if m.worst_parameter is None
               else f"{m.worst_parameter} {m.worst_parameter_error:.1e}"]
        if timings:
            row += [_size(m.saved_bytes), f"{m.seconds * 1e3:.1f} ms"]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in rows]


def _prose(*lines: str) -> list[str]:
    """Each line wrapped at 100 columns, continued two columns deeper than it starts."""
    return [wrapped for line in lines for wrapped in textwrap.wrap(
        line, width=100, subsequent_indent=" " * (len(line) - len(line.lstrip()) + 2))]


def _search_lines(search: OpSearch, target: float, what: str) -> list[str]:
    dtype = _short(search.dtype)
    if not search.alone:
        return _prose(f"{dtype}: {what} {search.default_error:.1e}; no op of the velocity "
                      f"graphs runs in {dtype}")
    lines = [f"{dtype}: {what} {search.default_error:.1e} with the default policy; with one "
             "op in float32:",
             "  " + ", ".join(f"{op} {error:.1e}" for op, error in search.alone)]
    if search.path:
        lines.append("  greedy search (matmul-class ops only if the others fall short): "
                     + ", ".join(f"+{op} {error:.1e}" for op, error in search.path))
    if search.floor is not None:
        lines.append(f"  every op above in float32: {search.floor:.1e}")
    if search.found is None:
        lines.append(f"  no set of ops reaches the target {target:.1e}: with every op in "
                     f"float32, the velocity still gets its state rounded to {dtype}, and the "
                     f"backward pass recomputes the steps from {dtype} checkpoints")
    elif search.found:
        lines.append(f"  within the target {target:.1e} with {_op_list(search.found)} in "
                     f"float32: {search.found_error:.1e}")
    return _prose(*lines)


def _suggestion_lines(report: CheckReport, what: str) -> list[str]:
    """Why the suggestion, and the code that applies it (not wrapped)."""
    dtype = _short(report.suggested_dtype)
    extra = sorted(report.suggested_policy.full_ops - DEFAULT_POLICY.full_ops)
    if report.suggested_dtype == torch.float32:
        best = ", ".join(f"{_short(s.dtype)} {s.lowest_error:.1e}" for s in report.searches)
        why = (f"suggested: float32 ({what} {report.suggested_error:.1e}): no low dtype "
               f"checked keeps the {what} within {report.target:.1e} (lowest measured: {best})")
        code = "mp = rampde_fx.convert(model, dtype=torch.float32)"
    elif extra:
        default = next(s.default_error for s in report.searches
                       if s.dtype == report.suggested_dtype)
        why = (f"suggested: {dtype} with {_op_list(extra)} in float32: {what} "
               f"{report.suggested_error:.1e} against {default:.1e} with the default policy "
               f"(target {report.target:.1e})")
        code = (f"mp = rampde_fx.convert(model, dtype=torch.{dtype}, "
                f"policy=rampde_fx.DEFAULT_POLICY.with_full_ops({{{_op_list(extra)}}}))")
    else:
        why = (f"suggested: {dtype} with the default policy: {what} "
               f"{report.suggested_error:.1e}, within the target {report.target:.1e}")
        code = f"mp = rampde_fx.convert(model, dtype=torch.{dtype})"
    if report.checkpoint != "steps":
        checkpoint = report.checkpoint
        given = f"rampde_fx.Budget({checkpoint.states})" if isinstance(checkpoint, Budget) \
            else repr(checkpoint)
        code = f"{code[:-1]}, checkpoint={given})"
    return [*_prose(why), f"  {code}"]
