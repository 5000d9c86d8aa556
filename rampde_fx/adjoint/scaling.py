"""Dynamic adjoint scaling: a power-of-two scale per backward step, kept on the device.

A step's vector-Jacobian product runs in the low dtype on the cotangent times ``S``; the results
are divided by ``S`` in float32 (exact, ``S`` is a power of two). ``S`` is chosen so that the
largest *scaled result* lands near ``2**target_log2``: from the fp32 adjoint's magnitude and
the gain (largest scaled result over largest scaled cotangent) observed on the previous step.
Growth is thus judged on the scaled values, not on the unscaled adjoint, so the scale does not
climb to the overflow edge. Overflows are flagged on the device; the caller decides on retries
with a constant number of host synchronisations.
"""
from __future__ import annotations

import torch

# fp16's largest value is 65504 < 2**16: aim the largest scaled result at 2**12, which leaves a
# factor 16 for step-to-step growth and stays far above the subnormal range (2**-24).
TARGET_LOG2 = 12.0
# Lowering of the target after an overflow.
RETRY_STEP_LOG2 = 4.0
# Keep S representable in float32 with room for the cotangent's own magnitude.
EXPONENT_LIMIT = 100.0


def largest_magnitude(tensors: list[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    """The largest absolute value among ``tensors`` as a float32 0-dim tensor (0 for none)."""
    values = [t.detach().abs().amax().float() for t in tensors if t is not None and t.numel()]
    if not values:
        return torch.zeros((), device=device)
    return torch.stack(values).amax()


class AdjointScaler:
    """Chooses the scale of each backward step and watches the scaled results for overflow."""

    def __init__(self, device: torch.device, target_log2: float = TARGET_LOG2) -> None:
        self.device = device
        self.target_log2 = target_log2
        self.gain_log2 = torch.zeros((), device=device)
        self.overflow = torch.zeros((), dtype=torch.bool, device=device)
        self.exponents: list[torch.Tensor] = []
        self._scaled_input_max = torch.zeros((), device=device)

    def scale_for(self, cotangents: list[torch.Tensor | None]) -> torch.Tensor:
        """The float32 power of two to multiply this step's cotangents by."""
        largest = largest_magnitude(cotangents, self.device)
        magnitude_log2 = torch.floor(torch.log2(torch.where(largest > 0, largest, 1.0)))
        exponent = torch.clamp(torch.round(self.target_log2 - self.gain_log2) - magnitude_log2,
                               -EXPONENT_LIMIT, EXPONENT_LIMIT)
        exponent = torch.where(largest > 0, exponent, 0.0)
        scale = torch.exp2(exponent)
        self.exponents.append(exponent)
        self._scaled_input_max = largest * scale
        return scale

    def observe(self, scaled_results: list[torch.Tensor | None]) -> torch.Tensor:
        """Record the step's scaled results; returns whether they overflowed (on the device)."""
        largest = largest_magnitude(scaled_results, self.device)
        finite = torch.isfinite(largest)
        usable = finite & (largest > 0) & (self._scaled_input_max > 0)
        gain = torch.log2(torch.where(usable, largest, 1.0)) - torch.log2(
            torch.where(usable, self._scaled_input_max, 1.0))
        self.gain_log2 = torch.where(usable, gain, self.gain_log2)
        self.overflow = self.overflow | ~finite
        return ~finite

    def assume_more_gain(self) -> None:
        """Before the gain has been observed, an overflow means it was underestimated: raise the
        estimate (the measured gain replaces it at the next finite step) and drop the failed
        step's exponent. The target stays, so later steps are not scaled too small."""
        self.gain_log2 = self.gain_log2 + RETRY_STEP_LOG2
        self.overflow.zero_()
        self.exponents.pop()
