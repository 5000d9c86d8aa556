"""Whether an aten op has kernels for a low dtype on a device, found by running it once.

Many ops have no bfloat16/float16 kernel: linear algebra (``linalg_inv_ex``,
``_linalg_solve_ex``, ``linalg_cholesky_ex``, ``_linalg_eigh``, ``_linalg_det``...), FFTs, some
special functions, and others that differ by device. Their meta functions do not always say so
(on CPU, ``_linalg_solve_ex`` and ``linalg_cholesky_ex`` pass on fake tensors and fail in the
kernel), and some have a forward kernel but no backward one (``special_i1``). So the op itself
is asked: it runs, forward and backward, on real stand-ins for its inputs on their device, once
with its low-precision inputs as they are and, where that fails, once with them in float32. It
rejects the low dtype when the float32 run gets further; a call that fails either way (a
stand-in the op cannot take) says nothing about the dtype, and the op is left as it was.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import _disable_current_modes

# (op, dtypes, the arguments with each tensor as its dtype, shape and device type) -> whether
# it runs in the low dtype. Sizes count: cuFFT's float16 transforms take powers of two only.
_RUNS_LOW: dict[tuple[Any, ...], bool] = {}


def runs_in_low_dtype(op: torch._ops.OpOverload, args: tuple[Any, ...],
                      kwargs: dict[str, Any], low_dtype: torch.dtype,
                      full_dtype: torch.dtype) -> bool:
    """Whether ``op`` runs, forward and backward, on arguments like ``args`` and ``kwargs``
    (fake tensors, some of them ``low_dtype``) as well as it does with their ``low_dtype``
    tensors in ``full_dtype``. The answer is cached per op and arguments (each tensor by its
    dtype, shape and device type).

    Ops that draw random numbers are not run (that would move the user's generators): they are
    taken to run in any floating dtype.
    """
    key = (op, low_dtype, full_dtype, repr(pytree.tree_map_only(
        torch.Tensor, lambda x: (x.dtype, tuple(x.shape), x.device.type), (args, kwargs))))
    if key not in _RUNS_LOW:
        if torch.Tag.nondeterministic_seeded in op.tags:
            _RUNS_LOW[key] = True
        else:
            as_is = _stages_run(op, args, kwargs, {})
            _RUNS_LOW[key] = as_is == 2 or \
                as_is >= _stages_run(op, args, kwargs, {low_dtype: full_dtype})
    return _RUNS_LOW[key]


def _stages_run(op: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any],
                dtypes: dict[torch.dtype, torch.dtype]) -> int:
    """How far ``op`` runs on real stand-ins for its fake tensor arguments, their dtypes mapped
    by ``dtypes``: 0 not at all, 1 forward only, 2 forward and backward."""
    leaves: list[torch.Tensor] = []

    def stand_in(value: torch.Tensor) -> torch.Tensor:
        x = _stand_in(value, dtypes.get(value.dtype, value.dtype))
        if not (x.is_floating_point() or x.is_complex()):
            return x
        leaves.append(x.requires_grad_())
        return x.clone()  # not a leaf: in-place ops may write to it

    # Real tensors with autograd, whatever modes the capture runs in. What the probe does is
    # not the user's: its warnings (deprecations, the op's advice), the tensors it saves for
    # backward (saved-tensor hooks measure memory), its ops (dispatch modes count them).
    with torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings(), \
            torch.autograd.graph.saved_tensors_hooks(_same, _same), _disable_current_modes():
        warnings.simplefilter("ignore")
        try:
            real_args, real_kwargs = pytree.tree_map_only(torch.Tensor, stand_in, (args, kwargs))
            out = op(*real_args, **real_kwargs)
        except Exception:  # noqa: BLE001 - any failure: the op does not run on these
            return 0
        outputs = [o for o in pytree.tree_leaves(out)
                   if isinstance(o, torch.Tensor) and o.requires_grad]
        try:
            if outputs:
                torch.autograd.grad(outputs, leaves, [torch.ones_like(o) for o in outputs],
                                    allow_unused=True)
        except Exception:  # noqa: BLE001 - as above, for the backward
            return 1
    return 2


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _stand_in(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A real tensor of ``value``'s shape and device in ``dtype`` that most ops accept:
    identity matrices in the last two dimensions of a floating tensor (invertible, positive
    definite: a factorisation succeeds), ones below two dimensions, zeros for integers and
    booleans (valid indices)."""
    if not (dtype.is_floating_point or dtype.is_complex):
        return torch.zeros(value.shape, dtype=dtype, device=value.device)
    if value.dim() < 2:
        return torch.ones(value.shape, dtype=dtype, device=value.device)
    eye = torch.eye(*value.shape[-2:], dtype=dtype, device=value.device)
    return eye.expand(value.shape).clone()
