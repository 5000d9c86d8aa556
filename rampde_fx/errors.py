"""The exceptions and warnings rampde_fx raises, importable from every layer."""
from __future__ import annotations


class ConversionError(ValueError):
    """A model, or one of its ODE solves, cannot be converted."""


class CaptureWarning(UserWarning):
    """A velocity could not be captured as a graph, or its capture changes its behaviour."""


class ToleranceWarning(UserWarning):
    """rtol/atol ask for more accuracy than the velocity's low precision can deliver."""
