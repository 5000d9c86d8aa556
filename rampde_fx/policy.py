"""The precision policy: which velocity operations run in the low precision and which in float32.

A policy is plain data. Every operation of a captured velocity graph is looked up by a canonical
name (``linear``, ``conv2d``, ``matmul``, ``sum``, ``group_norm``...) and falls in one of three
classes:

* ``LOW``: matmul-class work, run in the solve's low dtype (its inputs, weights included, are cast);
* ``FULL``: precision-sensitive work (normalisations, softmax, reductions, exp/log), run in float32;
* ``FOLLOW``: everything else (elementwise ops, reshapes, concatenation): it runs in the low dtype
  as soon as one of its floating inputs is low precision, otherwise as it was. This keeps the time
  input in float32 until it meets the state, and casts a weight only where it meets an activation.

An op that would run in the low dtype but has no kernel for it on its device (linear algebra:
``inv``, ``solve``, ``cholesky``, ``eigh``, ``det``, ``slogdet``...; FFTs; whatever rejects the
dtype there) runs in float32 instead: the precision rewrite asks the op itself (see
:mod:`rampde_fx.passes.kernel_support`). Only a policy that names such an op ``LOW`` itself (in
``low_ops`` beyond the default's, or by ``override``) is refused, with a ``ConversionError``.

Override it with :func:`dataclasses.replace`, or keep ops in float32 with
:meth:`PrecisionPolicy.with_full_ops`, e.g. ``tanh``::

    policy = DEFAULT_POLICY.with_full_ops({"tanh"})
"""
from __future__ import annotations

import builtins
import dataclasses
import enum
import operator
from typing import Any, Callable, Iterable, NamedTuple

import torch


class Precision(enum.Enum):
    """How an operation of the velocity is evaluated."""

    LOW = "low"
    FULL = "full"
    FOLLOW = "follow"


_LOW_OPS = frozenset({
    "linear", "bilinear", "matmul", "mm", "bmm", "addmm", "addbmm", "baddbmm", "addmv", "mv",
    "einsum", "tensordot", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "convolution", "convolution_backward",
})

_FULL_OPS = frozenset({
    "group_norm", "layer_norm", "batch_norm", "instance_norm", "local_response_norm", "normalize",
    "rms_norm", "softmax", "log_softmax", "softmin", "logsumexp", "sum", "mean", "var", "std",
    "var_mean", "std_mean", "norm", "prod", "cumsum", "cumprod", "exp", "expm1", "log", "log1p",
    "log2", "log10", "pow", "softplus", "cross_entropy", "nll_loss", "mse_loss", "kl_div",
    "dist", "cdist", "group_norm_backward", "layer_norm_backward", "batch_norm_backward",
    "softmax_backward_data", "log_softmax_backward_data",
})


class Classification(NamedTuple):
    """How :meth:`PrecisionPolicy.classify` places an operation."""

    precision: Precision
    what: str  # the op and why it is in its class, as diagnostics show it
    explicit: bool  # chosen by the policy's override or by sets differing from the default's


@dataclasses.dataclass(frozen=True)
class PrecisionPolicy:
    """Which operations of a velocity run in the low dtype (``low_ops``) and which in float32
    (``full_ops``); all others follow their inputs.

    Attributes:
        low_ops: canonical op names evaluated in the solve's low dtype.
        full_ops: canonical op names evaluated in float32 (or the state's dtype if wider).
        override: optional ``fn(op_name, node) -> Precision | None``, consulted first for every
            operation of the graph; ``None`` falls back to the sets. ``node`` is the torch.fx node.
    """

    low_ops: frozenset[str] = _LOW_OPS
    full_ops: frozenset[str] = _FULL_OPS
    override: Callable[[str, torch.fx.Node], Precision | None] | None = None

    def __post_init__(self) -> None:
        both = set(self.low_ops) & set(self.full_ops)
        if both:
            raise ValueError(f"PrecisionPolicy: ops {sorted(both)} are in both low_ops and "
                             "full_ops")

    def classify(self, node: torch.fx.Node) -> Classification:
        """The precision class of a call node, what it is (``"'linear', a matmul-class
        op"``), as diagnostics show it, and whether the user chose it."""
        name = op_name(node)
        if self.override is not None:
            chosen = self.override(name, node)
            if chosen is not None:
                return Classification(chosen, f"'{name}', by policy override", True)
        if name in self.low_ops:
            return Classification(Precision.LOW, f"'{name}', a matmul-class op",
                                  name not in _LOW_OPS)
        if name in self.full_ops:
            return Classification(Precision.FULL, f"'{name}', a precision-sensitive op",
                                  name not in _FULL_OPS)
        return Classification(Precision.FOLLOW, f"'{name}', which follows its inputs",
                              name in _LOW_OPS | _FULL_OPS)

    def with_full_ops(self, ops: Iterable[str]) -> PrecisionPolicy:
        """This policy with the canonical op names ``ops`` evaluated in float32 (and removed
        from ``low_ops``)."""
        ops = frozenset(ops)
        return dataclasses.replace(self, low_ops=self.low_ops - ops, full_ops=self.full_ops | ops)


DEFAULT_POLICY = PrecisionPolicy()

# Python operators appear as call_function targets; give them the names of their torch twins.
_OPERATOR_NAMES: dict[Any, str] = {
    operator.matmul: "matmul", operator.add: "add", operator.sub: "sub", operator.mul: "mul",
    operator.truediv: "div", operator.floordiv: "floor_divide", operator.pow: "pow",
    operator.neg: "neg", operator.getitem: "getitem", builtins.getattr: "getattr",
}


# aten ops whose names say how they are implemented rather than what they compute.
_ATEN_ALIASES = {"batch_norm_legit": "batch_norm", "batch_norm_legit_no_training": "batch_norm",
                 "batch_norm_legit_functional": "batch_norm", "to_copy": "to", "t": "transpose"}


def op_name(node: torch.fx.Node) -> str:
    """Canonical name of a call node: ``aten.addmm``, ``F.linear`` and ``torch._C._nn.linear``
    are ``addmm`` and ``linear``; in-place and private variants share their op's name
    (``aten.add_`` is ``add``, ``aten._softmax`` is ``softmax``, ``aten.native_group_norm`` is
    ``group_norm``); ``x.sum()`` and ``torch.sum(x)`` are ``sum``."""
    if node.op == "call_method":
        return str(node.target).rstrip("_") if node.target not in ("__getitem__",) else "getitem"
    if node.op == "call_function":
        target = node.target
        if target in _OPERATOR_NAMES:
            return _OPERATOR_NAMES[target]
        if isinstance(target, torch._ops.OpOverload):
            name = target.overloadpacket.__name__.rstrip("_").lstrip("_")
            name = name.removeprefix("native_")
            return _ATEN_ALIASES.get(name, name)
        return getattr(target, "__name__", str(target)).rstrip("_")
    return str(node.target)
