"""rampde_fx: mixed-precision neural ODEs for PyTorch.

The velocity of an ODE solve is captured as an aten graph and evaluated in low precision under
an explicit :class:`PrecisionPolicy`; the solution and all gradients are accumulated in float32,
and the backward pass is a discrete adjoint over low-precision checkpoints with dynamic adjoint
scaling for float16.

The package is a pipeline, one subpackage per stage: ``interception`` (find a model's solves)
-> ``capture`` (the velocity as a graph) -> ``passes`` (graph rewrites: precision, CPU) ->
``engine`` (Runge-Kutta steps, controllers, the forward loop) -> ``adjoint`` (the backward
sweep) -> ``compiled`` (solves under torch.compile) -> ``tools`` (explain, check). Settings and
every piece of process-wide state live in :mod:`rampde_fx.runtime`.
"""
from .api import odeint, odeint_event
from .config import Budget, SolveConfig
from .engine.plan import METHODS
from .engine.tableaus import ADAPTIVE_TABLEAUS, FIXED_GRID_TABLEAUS, ButcherTableau
from .errors import CaptureWarning, ConversionError, ToleranceWarning
from .interception.convert import convert
from .policy import DEFAULT_POLICY, Precision, PrecisionPolicy
from .scope import mixed_precision
from .stats import SolveStats, VelocityKind, collect_stats
from .tools.check import CheckReport, check
from .tools.explain import conversion_diff, explain, graph_diff

__all__ = [
    "ADAPTIVE_TABLEAUS", "Budget", "ButcherTableau", "CaptureWarning", "CheckReport",
    "ConversionError",
    "DEFAULT_POLICY", "FIXED_GRID_TABLEAUS", "METHODS", "Precision", "PrecisionPolicy",
    "SolveConfig",
    "SolveStats", "ToleranceWarning", "VelocityKind", "check", "collect_stats",
    "conversion_diff", "convert", "explain", "graph_diff", "mixed_precision", "odeint",
    "odeint_event",
]
__version__ = "0.1.0"
