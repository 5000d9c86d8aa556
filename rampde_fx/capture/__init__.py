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

Inputs: the tensors the velocity reads by name are placeholders of the graph: the parameters,
buffers and tensor attributes of its modules (its owner, or the modules in its closure), and the
tensors in its closure cells (directly, or in a dict or list there). Each solve *binds* them
when it starts (``GraphVelocity.bound``): parameters stay the user's float32 masters, a tensor
assigned before a solve is the one it reads, and one assigned later changes neither it nor its
backward pass. Tensors reached otherwise (globals) are graph constants that hold the objects.

A graph is reused only while the Python state it was traced under holds (``guards``), by any
velocity of its kind (``slots.velocity_kind``): a lambda or a vector-field module made anew for
every call shares the graph of the equal one made before.

Python reads of values computed from the time, constants and tensors that want no gradient
(``int(t.item() * n)``, ``float(t)``, ``t > 0.5``, an index from ``bucketize(t, knots)``, the
time passed where a number is expected) specialise the graph on those values: the velocity
keeps one graph per distinct time (a fixed grid has a few per step). Python control flow on any
other tensor value (the state's) cannot be a graph: the velocity then falls back, with a
:class:`CaptureWarning` giving the reason and the line, to running ``func`` eagerly under
autocast in the low dtype, with the same float32 accumulation and adjoint.

Capture runs the velocity's Python code (once per graph, and once more to record what an eager
fallback reads), and undoes what that code changes in user state whether capture succeeds or
not: attributes of its modules (an ``nfe`` counter) and the contents of the lists, dicts and
sets its code reaches by name (``self.log.append(y)``, ``ts.append(t.item())`` on a closure or
global list), which would otherwise keep fake tensors. An integer attribute that the code
increments (an ``nfe`` counter) is advanced by each forward solve, by its evaluations; a graph
does not repeat other such updates during solves: capture warns with a :class:`CaptureWarning`
naming them.

Recomputation in the backward pass must reproduce the forward: buffers that the velocity mutates
(BatchNorm running statistics, counters kept in buffers) are mutated by forward evaluations
only (:meth:`GraphVelocity.recomputing` gives the graph copies), and :attr:`draws_random` tells
the solver to replay the RNG state of each step (``rng``; and of an adaptive step's first
stage, evaluated by the step before), with the states of the generators the velocity draws
from by name (:attr:`GraphVelocity.generators`).

Modules: ``slots`` (a velocity's owner, its kind, the tensors it reads and what its Python
reaches), ``side_effects`` (what its Python changes, undone), ``trace`` (``make_fx`` tracing,
fallback reasons), ``guards`` (the Python state a graph depends on), ``rng`` (generator states,
kept and replayed), ``velocity`` (the captured :class:`GraphVelocity` and the eager fallback)
and ``cache`` (:func:`capture_velocity`).
"""
from .cache import capture_velocity
from .rng import (RngState, before_each_evaluation, evaluating, evaluation_starts,
                  hidden_evaluations, replayed_rng, rng_state)
from .slots import describe, lifted_slots, owner_module, velocity_kind, velocity_owner
from .trace import State, is_random_op
from .velocity import EagerVelocity, GraphVelocity, Velocity, transformed_graph

__all__ = ["EagerVelocity", "GraphVelocity", "RngState", "State", "Velocity",
           "before_each_evaluation", "capture_velocity", "describe", "evaluating",
           "evaluation_starts", "hidden_evaluations", "is_random_op", "lifted_slots",
           "owner_module", "replayed_rng", "rng_state", "transformed_graph", "velocity_kind",
           "velocity_owner"]
