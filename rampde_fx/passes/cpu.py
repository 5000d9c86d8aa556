"""CPU-specific lowering of the step kernels' graphs: a tanh and instance normalisations that
inductor vectorises, and matrix products traced as fused arithmetic (small), as float32
products of widened 16-bit operands (small 16-bit ones), or with the bias added by the reading
kernel (16-bit)."""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
from torch import Tensor

from .. import runtime


# tanh(x) = x P(x**2) / Q(x**2) for |x| <= 9 (beyond, tanh rounds to +-1 in float32): the
# coefficients of P and Q (lowest power first) minimise the relative error in least squares on
# 6000 Chebyshev points of [0, 9] (iteratively reweighted by 1/Q). Evaluated in float32, the
# quotient is within 3.4e-7 of tanh, relative and absolute (2 million points of [-12, 12],
# and down to 1e-30).
_TANH_NUMERATOR = (0.9999999925844746, 0.13385019856835062, 0.003500200324291781,
                   2.067963296403699e-05, 1.344235514956769e-08)
_TANH_DENOMINATOR = (1.0, 0.4671834103468682, 0.025894870866547032, 0.00032929472900161585,
                     7.814576766672048e-07)
_TANH_SATURATES = 9.0


def _polynomial(coefficients: tuple[float, ...], x: Tensor) -> Tensor:
    """``sum_i coefficients[i] * x**i`` by Horner's rule."""
    value = coefficients[-1] * x + coefficients[-2]
    for c in reversed(coefficients[:-2]):
        value = value * x + c
    return value


class _TanhForCPUKernels(torch.autograd.Function):
    """``tanh`` as a rational function (see ``_TANH_NUMERATOR``) computed in float32: products,
    sums and one division, which inductor vectorises on CPU (its own ``tanh`` runs at scalar
    speed there, and an ``exp`` form takes 1.5x as long); relative error below 1e-6, invisible
    after rounding to a 16-bit dtype. The backward is ``tanh``'s own, ``(1 - y**2) g`` from
    the rounded output, as in eager."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        x32 = x.float().clamp(-_TANH_SATURATES, _TANH_SATURATES)
        square = x32 * x32
        y = (x32 * _polynomial(_TANH_NUMERATOR, square)
             / _polynomial(_TANH_DENOMINATOR, square)).to(x.dtype)
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


aten = torch.ops.aten


def instance_norms_as_reductions(graph: torch.fx.Graph) -> torch.fx.Graph:
    """Every instance normalisation of ``graph`` without running statistics, as PyTorch
    decomposes it (a batch normalisation of the input viewed as one sample of ``N * C``
    channels, with the weight and bias repeated ``N`` times), becomes the same arithmetic on
    the input's own shape: mean and variance over the spatial dimensions. Inductor runs the
    16-bit kernels' convolutions channels-last on CPU, and the ``N * C`` view of a
    channels-last tensor leaves its reductions as scalar C++ (3-4x slower than the vectorised
    reductions of the same normalisation over the spatial dimensions)."""
    for norm in graph.find_nodes(op="call_function", target=aten.native_batch_norm.default):
        match = _instance_norm(norm)
        if match is None:
            continue
        x, cast, n, shape, weight, bias, output = match
        eps = norm.args[7]
        channels = [1, shape[1], *[1] * (len(shape) - 2)]
        with graph.inserting_before(norm):
            x = graph.call_method("to", (x, cast)) if cast is not None else x
            var_mean = graph.call_function(aten.var_mean.correction,
                                           (x, list(range(2, len(shape)))),
                                           {"correction": 0, "keepdim": True})
            var, mean = (graph.call_function(operator.getitem, (var_mean, i)) for i in (0, 1))
            rstd = graph.call_function(aten.rsqrt.default,
                                       (graph.call_function(aten.add.Tensor, (var, eps)),))
            y = graph.call_function(aten.mul.Tensor, (
                graph.call_function(aten.sub.Tensor, (x, mean)), rstd))
            for factor, op in ((weight, aten.mul.Tensor), (bias, aten.add.Tensor)):
                if factor is not None:
                    y = graph.call_function(op, (y, graph.call_function(
                        aten.view.default, (factor, channels))))
        output.replace_all_uses_with(y)
        erased: set[torch.fx.Node] = set()
        for node in [output, *norm.users, norm, *norm.args[:3]]:
            # The replaced nodes, then the view, cast and repeats that only they used.
            while isinstance(node, torch.fx.Node) and node not in erased and not node.users \
                    and node.op != "placeholder":
                source = node.args[0] if node.args else None
                graph.erase_node(node)
                erased.add(node)
                node = source
    return graph


def _instance_norm(norm: torch.fx.Node) -> tuple[Any, ...] | None:
    """The parts of an instance normalisation decomposed into ``norm`` (see
    :func:`instance_norms_as_reductions`): its input, the dtype it is cast to (or None), the
    batch size, the input's shape, the weight and bias (or None) and the node that gives the
    result in the input's shape; None where ``norm`` is not one."""
    source, weight, bias, running_mean, running_var, training = norm.args[:6]
    if running_mean is not None or running_var is not None or training is not True:
        return None
    cast = None
    if source.op == "call_method" and source.target == "to" and len(source.args) == 2 \
            and isinstance(source.args[1], torch.dtype) and not source.kwargs:
        source, cast = source.args[0], source.args[1]
    if source.target is not aten.view.default or len(source.users) != 1:
        return None
    x, flat = source.args
    outputs = {user.args[1]: user for user in norm.users if user.target is operator.getitem}
    if len(outputs) != len(norm.users) or outputs.get(1, norm).users or \
            outputs.get(2, norm).users or len(outputs.get(0, norm).users) != 1:
        return None
    (output,) = outputs[0].users
    if output.target is not aten.view.default or len(flat) < 3 or flat[0] != 1:
        return None
    shape = list(output.args[1])
    n = shape[0]
    if len(shape) != len(flat) or shape[2:] != list(flat[2:]) or n * shape[1] != flat[1]:
        return None
    parts = []
    for factor in (weight, bias):
        if factor is not None and (factor.target is not aten.repeat.default or
                                   list(factor.args[1]) != [n] or len(factor.users) != 1):
            return None
        parts.append(None if factor is None else factor.args[0])
    return x, cast, n, shape, *parts, output


def lower_for_cpu_kernels(graph: torch.fx.Graph) -> torch.fx.Graph:
    """:func:`use_cpu_tanh` and :func:`instance_norms_as_reductions`."""
    return instance_norms_as_reductions(use_cpu_tanh(graph))


def cpu_kernel_transform(dtype: torch.dtype, device: torch.device,
                     keeps_activations: bool) -> Callable[[torch.fx.Graph], torch.fx.Graph] | None:
    """On CPU a 16-bit velocity's kernels run :func:`lower_for_cpu_kernels`, unless the solve
    keeps its stage activations (checkpoint='stages'): its float32 internals would be kept
    too."""
    if device.type == "cpu" and dtype.itemsize == 2 and not keeps_activations:
        return lower_for_cpu_kernels
    return None


def _float32_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """``a @ b`` computed in float32 (or wider), or None where a library call in the operands'
    dtype is due: a product of at most ``settings.small_matmul`` multiply-adds as fused
    arithmetic; a 16-bit one of at most ``settings.widened_matmul`` (and at least 16 inner
    terms and 32 columns) as a float32 library product of its operands widened to float32
    (exactly: every 16-bit value is a float32 one), where the 16-bit library call's own cost
    outweighs the float32 arithmetic. A 16-bit library product accumulates in float32 too."""
    (m, k), n = a.shape, b.shape[1]
    multiply_adds = m * k * n
    if multiply_adds <= runtime.settings.small_matmul:
        wide = torch.promote_types(a.dtype, torch.float32)
        return (a.unsqueeze(2).to(wide) * b.unsqueeze(0).to(wide)).sum(1)
    if a.dtype.itemsize == 2 and k >= 16 and n >= 32 and \
            multiply_adds <= runtime.settings.widened_matmul:
        return torch.mm(a.float(), b.float())
    return None


def cpu_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | Any:
    if a.device.type != "cpu":
        return NotImplemented
    product = _float32_product(a, b)
    return NotImplemented if product is None else product.to(a.dtype)


def cpu_addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: Any = 1,
               alpha: Any = 1) -> torch.Tensor | Any:
    """A small product as fused arithmetic, a small 16-bit one as a float32 product of its
    widened operands: either with the bias added in float32, rounded once. A larger 16-bit
    one is a library ``mm`` whose bias the kernel that reads the product adds (CPU ``addmm``
    first copies the broadcast bias into its output, a pass over memory as long as a 16-bit
    product's own). That sum is written in float32, so that inductor does not match it back
    into an ``addmm``, and its product is rounded before the bias is added: a float16 product
    beyond 65504 is inf even where the biased sum would fit."""
    # Decide before computing: what a decomposition computes is traced, even when it then
    # hands the op back.
    if beta != 1 or alpha != 1 or a.device.type != "cpu":
        return NotImplemented
    product = _float32_product(a, b)
    if product is not None:
        return (product + bias.to(product.dtype)).to(a.dtype)
    if a.dtype.itemsize == 2:
        return (torch.mm(a, b).float() + bias.float()).to(a.dtype)
    return NotImplemented


CPU_PRODUCTS = {torch.ops.aten.mm.default: cpu_mm,
                 torch.ops.aten.addmm.default: cpu_addmm}
