"""Checks shared by the validation of a solve's arguments (``plan``) and options (the
controllers): tensors must hold data, numbers must be numbers."""
from __future__ import annotations

import math
import numbers
from typing import Any, Literal

import torch


def require_data(name: str, x: torch.Tensor) -> None:
    """Refuse a tensor without data: a solve reads values on the host (its input checks, its
    grid, its step control), which a meta tensor does not have."""
    if x.device.type == "meta":
        raise ValueError(
            f"{name} is on the meta device, which holds no data; rampde_fx reads the values of "
            "a solve's inputs (its checks, time grid and step control). Pass real tensors: make "
            "them on 'cpu' or 'cuda' (a model built on meta: module.to_empty(device=...), then "
            "initialize it)")


def describe(value: Any) -> str:
    """``value`` for an error message: a tensor by its shape and dtype, else its repr and type."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{value!r} ({type(value).__name__})"


def real_number(name: str, value: Any, *,
                sign: Literal["any", "non-negative", "positive"] = "non-negative",
                finite: bool = True, whole: bool = False) -> float:
    """``value`` as a float, where it is a real number or a one-element real tensor (as
    torchdiffeq takes its options): a TypeError naming ``name`` otherwise (a bool, a string, a
    tensor of several elements); a ValueError where it is nan, has the wrong ``sign``, is
    infinite though it must be ``finite``, or is fractional though it must be ``whole``."""
    if isinstance(value, torch.Tensor):
        require_data(name, value)
        is_real = value.numel() == 1 and value.dtype != torch.bool and not value.is_complex()
    else:  # numbers.Real includes bool, which torch would take as 0 or 1
        is_real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not is_real:
        raise TypeError(f"{name} must be a real number, got {describe(value)}")
    number = float(value.item() if isinstance(value, torch.Tensor) else value)
    in_range = {"any": True, "non-negative": number >= 0, "positive": number > 0}[sign]
    if math.isnan(number) or not in_range or (finite and math.isinf(number)) or (
            whole and not number.is_integer()):
        kind = " ".join(word for word, wanted in (
            (sign, sign != "any"), ("finite", finite and not whole), ("whole", whole)) if wanted)
        raise ValueError(f"{name} must be a {kind} number, got {number:g}")
    return number


def per_component(name: str, value: Any, is_tuple: bool,
                  components: int) -> tuple[float, ...]:
    """A tolerance per state component: one number for all, or, as torchdiffeq takes them, a
    sequence (for a tuple state also a 1-D tensor) of one per component."""
    sequence = isinstance(value, (tuple, list)) or (
        is_tuple and isinstance(value, torch.Tensor) and value.dim() == 1)
    values = list(value) if sequence else [value] * components
    if len(values) != components:
        raise ValueError(f"{name} has {len(values)} entries for a state of {components} "
                         "components")
    if any(isinstance(v, torch.Tensor) and v.numel() > 1 for v in values):
        raise NotImplementedError(f"{name} has a tensor of several elements: rampde_fx takes "
                                  "one tolerance per state component, not one per element")
    return tuple(real_number(f"{name}[{i}]" if sequence else name, v)
                 for i, v in enumerate(values))
