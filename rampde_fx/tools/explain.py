"""Readable reports of what a converted model's solves computed in which precision, and why."""
from __future__ import annotations

import difflib
from typing import Any

import torch
import torch.fx as fx

from ..engine.tableaus import ADAPTIVE_TABLEAUS
from ..passes.precision import NodePrecision
from ..policy import DEFAULT_POLICY
from ..stats import COMPILED, VelocityKind


def _dtype_of(node: fx.Node) -> str:
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return str(value.dtype).replace("torch.", "")
    if isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value):
        return "(" + ", ".join(str(v.dtype).replace("torch.", "") for v in value) + ")"
    return "-"


def precision_table(graph: fx.Graph) -> str:
    """One line per computing node: its name, the dtype it produces, and why.

    Attribute reads, inputs and the output are left out; casts are listed with their reason.
    """
    rows = []
    for node in graph.nodes:
        info: NodePrecision | None = node.meta.get("rampde_precision")
        if info is None or node.op in ("placeholder", "get_attr"):
            continue
        rows.append((node.name, _dtype_of(node), info.reason))
    width = max((len(name) for name, _, _ in rows), default=0)
    dtype_width = max((len(dtype) for _, dtype, _ in rows), default=0)
    return "\n".join(f"{name:<{width}}  {dtype:<{dtype_width}}  {reason}"
                     for name, dtype, reason in rows)


def graph_diff(before: str, after: str, context: int = 1) -> str:
    """Unified diff between two printed graphs (``GraphModule.code``), without file headers."""
    lines = difflib.unified_diff(before.strip().splitlines(), after.strip().splitlines(),
                                 lineterm="", n=context)
    return "\n".join(line for line in lines if not line.startswith(("---", "+++")))


_NOT_MET = "no ODE solve has been met yet: call the module once"


def conversion_diff(converted: Any) -> str:
    """For every solve that :func:`rampde_fx.convert` (or a :class:`rampde_fx.mixed_precision`
    scope) converted, in the order they were first
    met: the diff from its velocity's graph as captured to the graph that runs in low
    precision (casts added, ops changed), from the last solve of each."""
    record = getattr(converted, "_rampde_conversion", None)
    if record is None:
        raise ValueError(f"{type(converted).__qualname__} was not made by rampde_fx.convert")
    if not record.sites:
        return _NOT_MET
    parts = []
    for index, site in enumerate(record.sites):
        header = f"# solve {index}: {site}, velocity {site.velocity}"
        stats = site.last_stats
        if stats is None:
            parts.append(f"{header}: not run yet")
        elif stats.graph is None or stats.captured_code is None:
            parts.append(f"{header}: runs eagerly, no graph")
        else:
            parts.append(f"{header}\n{graph_diff(stats.captured_code, stats.graph.code)}")
    return "\n".join(parts)


def explain(converted: Any) -> str:
    """What ran in which precision, and why, for a module made by :func:`rampde_fx.convert`
    or a :class:`rampde_fx.mixed_precision` scope.

    For each converted solve, in the order they were first met: where it is, the solver call it
    replaced, method and options, precision and scaling, and, once it has run, its step counts
    and the velocity's graph with the dtype and reason of every node. The text is stable:
    suitable for golden tests.
    """
    record = getattr(converted, "_rampde_conversion", None)
    if record is None:
        return (f"{type(converted).__qualname__} was not converted by rampde_fx.convert: "
                "everything runs as written")
    dtype = _short(record.config.dtype)
    if not record.sites and not record.notes:
        return f"rampde_fx: converted to {dtype}; {_NOT_MET}"
    lines = [f"rampde_fx: {len(record.sites)} ODE solve(s) in {dtype} met so far; everything "
             "outside them runs as written (float32)"]
    lines += [f"note: {note}" for note in record.notes]
    for index, site in enumerate(record.sites):
        lines.append("")
        lines.append(f"solve {index}: {site}")
        config = site.config
        if site.source.endswith("odeint_adjoint"):
            kept = f"{dtype} checkpoints of every step" if config.budget is None else \
                f"at most {config.budget} states kept, the other steps recomputed"
            lines.append(f"  becomes the discrete adjoint, {kept}")
        if site.is_event_solve:
            through = ("with gradients through the event time by the implicit function theorem"
                       if site.source.endswith("odeint_event") else
                       "the event time a constant of its gradients, as in torchdiffeq.odeint "
                       "(odeint_event adds the gradient through it)")
            lines.append("  solves until event_fn changes sign (in float32 after each step, the "
                         f"event time bisected to atol), {through}")
        if site.dropped:
            lines.append(f"  arguments not passed on: {', '.join(site.dropped)}")
        lines.append(f"  velocity: {site.velocity}")
        checkpoint = "" if config.checkpoint == "steps" else f", checkpoint: {config.checkpoint!r}"
        lines.append(f"  dtype: {_short(config.dtype)}, scaling: {config.scaling}, "
                     f"policy: {'default' if config.policy == DEFAULT_POLICY else 'custom'}"
                     f"{checkpoint}")
        stats = site.last_stats
        if stats is None:
            lines.append("  not run yet: no call of this solve has completed")
            continue
        arguments = ", ".join(f"{k}={_shown(v)}" for k, v in sorted(site.call_arguments.items()))
        lines.append(f"  arguments: {arguments}")
        steps = f"{stats.steps} steps"
        if stats.method in ADAPTIVE_TABLEAUS:
            steps += (f" accepted, {stats.rejected_steps} rejected, "
                      f"{stats.tolerance_limited_steps} at the {_short(config.dtype)} rounding "
                      "floor")
        lines.append(f"  last solve: {stats.method}, {steps}, {stats.nfe_forward} evaluations "
                     f"forward, {stats.nfe_backward} backward, adjoint scaling "
                     f"{'on' if stats.scaling else 'off'}")
        if stats.step_kernels == COMPILED:
            lines.append("  steps: compiled kernels, one per step and one per step of the "
                         "backward pass")
        elif stats.step_kernels is not None:
            lines.append(f"  steps: op by op, without compiled kernels: {stats.step_kernels}")
        if stats.velocity is VelocityKind.EAGER:
            lines.append(f"  velocity runs eagerly ({stats.fallback_reason}) under "
                         f"autocast in {_short(config.dtype)}")
        else:
            lines.append("  velocity graph (node, dtype, why):")
            lines += [f"    {row}" for row in precision_table(stats.graph.graph).splitlines()]
    return "\n".join(lines)


def _shown(value: Any) -> str:
    """An argument as explain shows it: a function or module by its qualified name."""
    if callable(value) and not isinstance(value, torch.Tensor):
        return getattr(value, "__qualname__", type(value).__qualname__)
    return repr(value)


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
