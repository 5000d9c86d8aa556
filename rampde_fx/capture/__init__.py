"""Capture: ``func(t, y)`` as an aten-level graph, rewritten into a low-precision callable.

Capture traces ``func`` with ``make_fx`` on fake tensors. Tracing at the aten level, below
autograd, is what lets the velocities of real code become graphs: ``torch.autograd.grad`` inside
the velocity (exact-trace CNFs, Hutchinson estimators, Hamiltonian nets) is traced into its
backward ops, ``torch.func`` transforms are traced through, in-place writes into preallocated
tensors are plain aten ops, ``torch.tensor(t)`` is a copy of ``t``, and TorchScript helpers run
their ops through the dispatcher like any other code. The graph is what the precision policy is
written in (``addmm``, ``convolution``, ``group_norm``...), what :func:`rampde_fx.explain` prints,
and what dynamo and inductor compile later. torch.fx symbolic tracing stops at all of these;
dynamo guards Python branches but breaks on ``torch.autograd.grad``.

Inputs: the tensors of the module that owns the velocity (parameters, buffers and plain tensor
attributes, found by name) are placeholders of the graph, fetched live on every call: parameters
stay the user's float32 masters and re-assigned attributes are seen. Tensors reached otherwise
(closures) are graph constants that hold the live objects.

Python reads of the time's value (``int(t.item() * n)``, ``float(t)``) specialise the graph on
that value: the velocity keeps one graph per distinct time (a fixed grid has a few per step).
Python control flow on any other tensor value (the state's) cannot be a graph: the velocity then
falls back, with a :class:`CaptureWarning` giving the reason and the line, to running ``func``
eagerly under autocast in the low dtype, with the same float32 accumulation and adjoint.

Capture runs the velocity's Python code (once per graph, and once more to record what an eager
fallback reads), and undoes what that code changes in user state whether capture succeeds or
not: attributes of its modules (an ``nfe`` counter) and the contents of the lists, dicts and
sets its code reaches by name (``self.log.append(y)``, ``ts.append(t.item())`` on a closure or
global list), which would otherwise keep fake tensors. A graph does not repeat such updates
during solves: capture warns with a :class:`CaptureWarning` naming them.

Recomputation in the backward pass must reproduce the forward: buffers that the velocity mutates
(BatchNorm running statistics, counters kept in buffers) are mutated by forward evaluations
only (:meth:`GraphVelocity.recomputing` gives the graph copies), and :attr:`draws_random` tells
the solver to replay the RNG state of each step.

Modules: ``slots`` (a velocity's owner and the tensors it reads), ``side_effects`` (what its
Python changes, undone), ``trace`` (``make_fx`` tracing, fallback reasons), ``velocity`` (the
captured :class:`GraphVelocity` and the eager fallback) and ``cache`` (:func:`capture_velocity`).
"""
from .cache import capture_velocity
from .slots import describe, owner_module, velocity_owner
from .trace import State
from .velocity import EagerVelocity, GraphVelocity, Velocity

__all__ = ["EagerVelocity", "GraphVelocity", "State", "Velocity", "capture_velocity", "describe",
           "owner_module", "velocity_owner"]
