"""The vector-Jacobian product of a step map, shared by the eager sweep, the compiled backward
kernels and the compiled solve op."""
from __future__ import annotations

from typing import Sequence

import torch


def vector_jacobian_product(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
                            cotangents: Sequence[torch.Tensor],
                            scale: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The gradients for ``inputs`` of ``sum_i <cotangents[i] * scale, outputs[i]>`` (None for
    inputs the outputs do not reach); outputs that do not require grad are left out, and with
    none left (a constant output, a velocity whose read tensors are all frozen) every gradient
    is None."""
    seeds = cotangents if scale is None else [c * scale for c in cotangents]
    live = [(out, seed) for out, seed in zip(outputs, seeds) if out.requires_grad]
    if not live or not inputs:
        return [None] * len(inputs)
    return list(torch.autograd.grad([o for o, _ in live], inputs, [s for _, s in live],
                                    allow_unused=True))
