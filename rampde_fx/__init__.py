"""rampde_fx: mixed-precision neural ODEs for PyTorch.

The velocity of an ODE solve is captured as a torch.fx graph and evaluated in low precision
under an explicit :class:`PrecisionPolicy`; the solution and all gradients are accumulated in
float32, and the backward pass is a discrete adjoint over low-precision checkpoints with dynamic
adjoint scaling for float16.
"""
from .adaptive import ToleranceWarning
from .capture import CaptureWarning
from .check import CheckReport, check
from .convert import convert
from .diagnostics import conversion_diff, explain, graph_diff
from .odeint import odeint
from .policy import DEFAULT_POLICY, Precision, PrecisionPolicy
from .sites import ConversionError
from .stats import SolveStats, collect_stats
from .tableaus import ADAPTIVE_TABLEAUS, FIXED_GRID_TABLEAUS, ButcherTableau

__all__ = [
    "ADAPTIVE_TABLEAUS", "ButcherTableau", "CaptureWarning", "CheckReport", "ConversionError",
    "DEFAULT_POLICY", "FIXED_GRID_TABLEAUS", "Precision", "PrecisionPolicy", "SolveStats",
    "ToleranceWarning", "check", "collect_stats", "conversion_diff", "convert", "explain",
    "graph_diff", "odeint",
]
__version__ = "0.1.0"
