"""Cleanup of a freshly traced velocity graph: autograd's own detaches out, out= variants cut
off from autograd, readable names."""
from __future__ import annotations

import torch
import torch.fx as fx

# The meta key that tracing sets on the detaches user code asked for (``x.detach()``,
# ``torch.tensor(t)``): they stop gradients and must stay.
USER_DETACH = "rampde_user_detach"


def drop_autograd_detaches(graph: fx.Graph) -> fx.Graph:
    """Drops the detaches that make_fx records for every output autograd saves (a velocity that
    differentiates itself with create_graph=True needs them attached); keeps those tagged with
    :data:`USER_DETACH`."""
    for node in list(graph.nodes):
        if node.target is torch.ops.aten.detach.default and not node.meta.get(USER_DETACH):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    return graph


def with_readable_names(graph: fx.Graph, placeholder_names: list[str]) -> fx.Graph:
    """A copy of ``graph`` whose placeholders have the given names (the tracer reserved some
    of them for ops, such as ``t`` for transposes) and whose transposes of an input are
    named after it (``net_0_weight_t``)."""
    readable = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = list(graph.find_nodes(op="placeholder"))
    for node, name in zip(placeholders, placeholder_names):
        env[node] = readable.placeholder(name)
        env[node].meta = node.meta
    for node in graph.nodes:
        if node.op == "placeholder":
            continue
        env[node] = readable.node_copy(node, env.__getitem__)
        if node.target is torch.ops.aten.t.default and env[node.args[0]].op == "placeholder":
            env[node]._rename(f"{env[node.args[0]].name}_t")
    return readable


def detach_inputs_of_out_variants(graph: fx.Graph) -> fx.Graph:
    """Detaches the inputs of ops that write into an ``out=`` tensor. autograd cannot
    differentiate them, so the code that calls them runs them without grad (the power
    iteration of ``spectral_norm``, for one); the graph does not record grad mode, and the
    backward pass's recomputation runs it with grad on."""
    for node in list(graph.nodes):
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or \
                not any(argument.is_out for argument in schema.arguments):
            continue
        outs = {node.kwargs.get(a.name) for a in schema.arguments if a.is_out}
        for value in node.all_input_nodes:
            if value in outs:
                continue
            with graph.inserting_before(node):
                detached = graph.call_function(torch.ops.aten.detach.default, (value,))
            detached.meta = dict(value.meta)
            detached.meta[USER_DETACH] = True
            node.replace_input_with(value, detached)
    return graph
