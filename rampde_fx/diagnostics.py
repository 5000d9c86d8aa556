"""Readable reports of what a rewritten velocity computes in which precision."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx

from .precision_pass import NodePrecision


def _dtype_of(node: fx.Node) -> str:
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return str(value.dtype).replace("torch.", "")
    if isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value):
        return "(" + ", ".join(str(v.dtype).replace("torch.", "") for v in value) + ")"
    return "-"


def precision_table(graph: fx.Graph) -> str:
    """One line per computing node: its name, the dtype it produces, and why.

    Attribute reads, inputs and the output are left out; casts are listed with their reason.
    """
    rows = []
    for node in graph.nodes:
        info: NodePrecision | None = node.meta.get("rampde_precision")
        if info is None or node.op in ("placeholder", "get_attr"):
            continue
        rows.append((node.name, _dtype_of(node), info.reason))
    width = max((len(name) for name, _, _ in rows), default=0)
    dtype_width = max((len(dtype) for _, dtype, _ in rows), default=0)
    return "\n".join(f"{name:<{width}}  {dtype:<{dtype_width}}  {reason}"
                     for name, dtype, reason in rows)


def saved_tensor_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs.

    Measured with ``torch.autograd.graph.saved_tensors_hooks``; a storage saved several times
    (or through several views) counts once.
    """
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())
