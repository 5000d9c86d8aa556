"""Recompute tags for the step kernels' autograd: what AOTAutograd should redo rather than keep."""
from __future__ import annotations

import torch
from torch.utils.checkpoint import CheckpointPolicy


# Ops that only convert or view a tensor: cheap to redo in the backward pass.
_CASTS_AND_VIEWS = {torch.ops.aten._to_copy.default, torch.ops.aten.t.default,
                    torch.ops.aten.transpose.int, torch.ops.aten.permute.default,
                    torch.ops.aten.view.default, torch.ops.aten.unsqueeze.default,
                    torch.ops.aten.expand.default}


def recompute_casts_of_lifted(graph: torch.fx.Graph, n_lifted: int) -> torch.fx.Graph:
    """Marks the casts and views of the last ``n_lifted`` inputs (the velocity's parameters and
    buffers) for recomputation in the backward: autograd then keeps the tensors themselves,
    alive anyway, instead of a low-precision copy per step."""
    placeholders = graph.find_nodes(op="placeholder")
    of_lifted = set(placeholders[len(placeholders) - n_lifted:])
    for node in graph.nodes:
        if (node.op == "call_function" and node.target in _CASTS_AND_VIEWS
                and all(x in of_lifted for x in node.all_input_nodes)):
            node.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
            of_lifted.add(node)
    return graph
