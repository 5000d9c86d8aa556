"""Rewrite a captured velocity graph so that it runs under a :class:`PrecisionPolicy`.

The pass walks the traced graph once, in order, and builds a new graph. Each node is evaluated on
fake tensors as it is emitted, so every decision is made on the dtype that the node *will* have in
the rewritten graph (user casts such as ``x.float()`` or ``t.type_as(y)`` are respected as
written). Casts are ``.to(dtype)`` nodes, named after what they cast (``y_bf16``), and each
emitted node records why it runs in its precision in ``node.meta["rampde_precision"]``.

Rules (``L`` is the low dtype, ``F`` the full dtype: float32, or wider if ``L`` is wider):

* the state enters in ``L`` (the scheme evaluates ``f(t, Y)`` on ``Y`` cast to ``L``);
* the time input is left as it is;
* ``LOW`` ops get every floating input cast to ``L`` (weights included: the cast is a node in
  the graph, so autograd delivers float32 gradients to the user's own Parameters);
* ``FULL`` ops get their 16-bit floating inputs cast to ``F``;
* ``FOLLOW`` ops: when a floating input is in ``L``, the other floating inputs with dimensions are
  cast to ``L``; zero-dim inputs (the time, Python-like scalars) are left to type promotion;
* an op that would run in ``L`` by these rules but has no kernel for ``L`` on its device (linear
  algebra, FFTs...: :mod:`.kernel_support` runs it to find out) is a ``FULL`` op, and its reason
  says why; where the user's own policy makes it ``LOW``, the rewrite raises ``ConversionError``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import _pytree as pytree

from ..errors import ConversionError
from ..policy import Precision, PrecisionPolicy, op_name
from .kernel_support import runs_in_low_dtype

_SHORT_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                torch.float64: "fp64"}


@dataclasses.dataclass(frozen=True)
class NodePrecision:
    """Why a node of the rewritten graph runs in the dtype it has."""

    precision: Precision | None  # None for casts, inputs and non-compute nodes
    reason: str
    no_low_kernel: bool = False  # float32 because its op has no kernel for the low dtype


def full_dtype_for(low_dtype: torch.dtype) -> torch.dtype:
    """The dtype that precision-sensitive ops use next to ``low_dtype``."""
    return torch.promote_types(low_dtype, torch.float32)


def _long_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _is_float_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def rewrite_for_precision(
    graph: fx.Graph,
    example_inputs: Sequence[torch.Tensor],
    low_dtype: torch.dtype,
    policy: PrecisionPolicy,
    state_placeholders: set[str],
) -> fx.Graph:
    """Return a new graph of ``graph`` with the casts that ``policy`` asks for.

    Args:
        graph: the captured velocity's graph (its owning module holds the attributes it
            reads); placeholders ``(t, *state, *tensors)``.
        example_inputs: real tensors for the placeholders, in order; only their metadata is
            used.
        low_dtype: the dtype of ``LOW`` ops and of the state inside the velocity.
        policy: classifies each call node.
        state_placeholders: names of the placeholders holding the state's components.
    """
    graph_module = graph.owning_module
    full_dtype = full_dtype_for(low_dtype)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    new_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    fake: dict[fx.Node, Any] = {}
    casts: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}
    inputs = dict(zip((n.target for n in graph.find_nodes(op="placeholder")),
                      example_inputs))

    def record(node: fx.Node, value: Any, precision: Precision | None, reason: str,
               no_low_kernel: bool = False) -> fx.Node:
        fake[node] = value
        node.meta["val"] = value
        node.meta["rampde_precision"] = NodePrecision(precision, reason, no_low_kernel)
        return node

    def cast(node: fx.Node, dtype: torch.dtype, reason: str) -> fx.Node:
        value = fake[node]
        if not _is_float_tensor(value) or value.dtype == dtype:
            return node
        if (node, dtype) not in casts:
            name = f"{node.name}_{_SHORT_NAMES.get(dtype, str(dtype).split('.')[-1])}"
            cast_node = new_graph.create_node("call_method", "to", (node, dtype), name=name)
            with mode:
                casts[node, dtype] = record(cast_node, value.to(dtype), None, reason)
        return casts[node, dtype]

    def inputs_of(node: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), found.append)
        return [env[n] for n in found]

    def rejecting_device(node: fx.Node, dtypes: dict[fx.Node, torch.dtype]) -> str | None:
        """The device type where ``node``'s op, its inputs cast to ``dtypes``, would run in
        the low dtype but has no kernel for it; None where it has or needs none."""
        if low_dtype == full_dtype or not isinstance(node.target, torch._ops.OpOverload):
            return None
        with mode:
            values = {n: fake[n].to(dtypes[n]) if n in dtypes else fake[n]
                      for n in inputs_of(node)}
        low = [v for v in values.values() if isinstance(v, torch.Tensor) and v.dtype == low_dtype]
        if not low:
            return None
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: values[env[n]])
        if runs_in_low_dtype(node.target, args, kwargs, low_dtype, full_dtype):
            return None
        return low[0].device.type

    for node in graph.nodes:
        if node.op == "output":
            new_graph.output(fx.node.map_arg(node.args[0], env.__getitem__))
            continue
        if node.op in ("placeholder", "get_attr"):
            new_node = new_graph.node_copy(node, env.__getitem__)
            if node.op == "placeholder":
                value = pytree.tree_map_only(torch.Tensor, mode.from_tensor, inputs[node.target])
                why = "solver input"
            else:
                value = fetch_attr(graph_module, node.target)
                value = mode.from_tensor(value) if isinstance(value, torch.Tensor) else value
                why = "attribute of the velocity"
            record(new_node, value, None, why)
        else:
            precision, what, explicit = policy.classify(node)
            written = {env[n] for n in written_arguments(node)}  # never replaced by a cast
            floats = [n for n in inputs_of(node) if _is_float_tensor(fake[n]) and n not in written]
            widened = {n: full_dtype for n in floats
                       if fake[n].dtype.itemsize < full_dtype.itemsize}
            dtypes: dict[fx.Node, torch.dtype] = {}  # the inputs to cast, and to what
            why = f"input of {what}"
            if precision is Precision.LOW:
                dtypes = {n: low_dtype for n in floats}
            elif precision is Precision.FULL:
                dtypes = widened
            elif any(fake[n].dtype == low_dtype for n in floats):
                dtypes = {n: low_dtype for n in floats if fake[n].dim() > 0}
                why = f"input of {what}, next to a {_long_name(low_dtype)} input"
            device = rejecting_device(node, dtypes)
            if device is not None:  # run it in float32, unless the user asked for low
                name, low_name = op_name(node), _long_name(low_dtype)
                if precision is Precision.LOW and explicit:
                    raise ConversionError(
                        f"rampde_fx: the precision policy runs '{name}' in {low_name}, but "
                        f"the op has no {low_name} kernel on {device}; left out of low_ops "
                        "and the override, it runs in float32")
                precision, what = Precision.FULL, f"'{name}', which has no {low_name} kernel " \
                    f"on {device}"
                dtypes, why = widened, f"input of {what}"
            replace = {n: cast(n, dtype, why) for n, dtype in dtypes.items()}
            new_node = new_graph.node_copy(node, lambda n: replace.get(env[n], env[n]))
            with mode:
                value = _run_on_fake(graph_module, new_node, fake)
            if isinstance(value, torch.Tensor) and value.is_complex() and low_dtype != full_dtype \
                    and device is None:
                what = f"{what}; complex values keep their dtype"
            record(new_node, value, precision, what, no_low_kernel=device is not None)
        env[node] = new_node
        if node.op == "placeholder" and node.target in state_placeholders:
            env[node] = cast(new_node, low_dtype, "the state enters the velocity in low precision")
    new_graph.lint()
    return new_graph


def written_arguments(node: fx.Node) -> list[fx.Node]:
    """The arguments that ``node`` writes to in place (its op's schema marks them mutable)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return []
    values = list(node.args) + [node.kwargs.get(a.name) for a in schema.arguments[len(node.args):]]
    return [value for argument, value in zip(schema.arguments, values)
            if argument.alias_info is not None and argument.alias_info.is_write
            and isinstance(value, fx.Node)]


def fetch_attr(module: torch.nn.Module, target: str) -> Any:
    """The object at a dotted ``get_attr``/``call_module`` target of ``module``."""
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _run_on_fake(root: torch.nn.Module, node: fx.Node, fake: dict[fx.Node, Any]) -> Any:
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), fake.__getitem__)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        self_value, *rest = args
        return getattr(self_value, node.target)(*rest, **kwargs)
    if node.op == "call_module":
        return root.get_submodule(node.target)(*args, **kwargs)
    raise AssertionError(f"unexpected node kind {node.op}")
