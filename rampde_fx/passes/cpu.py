"""CPU-specific lowering of the step kernels' graphs: a tanh that inductor vectorises, and
matrix products traced as fused arithmetic (small) or with the bias added by the reading
kernel (16-bit)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .. import runtime


class _TanhForCPUKernels(torch.autograd.Function):
    """``tanh`` from ``exp``, which inductor vectorises on CPU (its own ``tanh`` runs at scalar
    speed there, 2x slower), computed in float32: the odd Taylor polynomial below 1/16, where
    the exponential form would cancel, ``2 / (1 + exp(-2x)) - 1`` above; relative error below
    2e-6, invisible after rounding to a 16-bit dtype. The backward is ``tanh``'s own,
    ``(1 - y**2) g`` from the rounded output, as in eager."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        x32 = x.float()
        square = x32 * x32
        near_zero = x32 * (1 + square * (-1 / 3 + square * (2 / 15)))
        far = 2 / (1 + torch.exp(-2 * x32)) - 1
        y = torch.where(x32.abs() < 0.0625, near_zero, far).to(x.dtype)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        y32 = y.float()
        return (grad.float() * (1 - y32 * y32)).to(grad.dtype)


def tanh_for_cpu_kernels(x: Tensor) -> Tensor:
    """See :class:`_TanhForCPUKernels`."""
    return _TanhForCPUKernels.apply(x)


def use_cpu_tanh(graph: torch.fx.Graph) -> torch.fx.Graph:
    """Every ``aten.tanh`` of ``graph`` becomes :func:`tanh_for_cpu_kernels`."""
    for node in graph.find_nodes(op="call_function", target=torch.ops.aten.tanh.default):
        node.target = tanh_for_cpu_kernels
    return graph


def cpu_kernel_transform(dtype: torch.dtype, device: torch.device,
                     keeps_activations: bool) -> Callable[[torch.fx.Graph], torch.fx.Graph] | None:
    """On CPU a 16-bit velocity gets :func:`tanh_for_cpu_kernels`, unless the solve keeps its
    stage activations (checkpoint='stages'): its float32 internals would be kept too."""
    if device.type == "cpu" and dtype.itemsize == 2 and not keeps_activations:
        return use_cpu_tanh
    return None


def _small_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """``a @ b`` accumulated in float32 (or wider), or None where a library call is due."""
    multiply_adds = a.shape[0] * a.shape[1] * b.shape[1]
    if a.device.type != "cpu" or multiply_adds > runtime.settings.small_matmul:
        return None
    wide = torch.promote_types(a.dtype, torch.float32)
    return (a.unsqueeze(2).to(wide) * b.unsqueeze(0).to(wide)).sum(1)


def cpu_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | Any:
    product = _small_product(a, b)
    return NotImplemented if product is None else product.to(a.dtype)


def cpu_addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: Any = 1,
               alpha: Any = 1) -> torch.Tensor | Any:
    """A small product as fused arithmetic; a larger 16-bit one as a library ``mm`` whose bias
    is added by the kernel that reads the product (CPU ``addmm`` first copies the broadcast
    bias into its output, a pass over memory as long as a 16-bit product's own). The sum is
    written in float32, so that inductor does not match it back into an ``addmm``. The product
    is rounded before the bias is added: a float16 product beyond 65504 is inf even where the
    biased sum would fit."""
    # Decide before computing: what a decomposition computes is traced, even when it then
    # hands the op back.
    if beta != 1 or alpha != 1 or a.device.type != "cpu":
        return NotImplemented
    product = _small_product(a, b)
    if product is not None:
        return (product + bias.to(product.dtype)).to(a.dtype)
    if a.dtype.itemsize == 2:
        return (torch.mm(a, b).float() + bias.float()).to(a.dtype)
    return NotImplemented


CPU_PRODUCTS = {torch.ops.aten.mm.default: cpu_mm,
                 torch.ops.aten.addmm.default: cpu_addmm}
