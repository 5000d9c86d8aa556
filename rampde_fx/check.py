"""The command line of :func:`rampde_fx.check`::

    python -m rampde_fx.check module:factory [--dtypes bfloat16 float16] [--target 1e-2]
                              [--repeats 3] [--quiet]

with ``factory()`` returning ``(model, example_inputs)`` or ``(model, example_inputs,
loss_fn)``.
"""
from __future__ import annotations

import argparse
import importlib
from typing import Any, Sequence

import torch

from .tools.check import DEFAULT_TARGET, LOW_DTYPES, check


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m rampde_fx.check module:factory``: print the check of the model that
    ``factory()`` makes."""
    parser = argparse.ArgumentParser(
        prog="python -m rampde_fx.check",
        description="Measured precision advice for a torchdiffeq model (rampde_fx.check).")
    parser.add_argument("factory", help="module:function; function() returns (model, "
                                        "example_inputs) or (model, example_inputs, loss_fn)")
    names = [str(d).replace("torch.", "") for d in LOW_DTYPES]
    parser.add_argument("--dtypes", nargs="+", default=names, choices=names)
    parser.add_argument("--target", type=float, default=DEFAULT_TARGET)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    module_name, _, attribute = args.factory.partition(":")
    if not module_name or not attribute:
        parser.error(f"factory must be module:function, got {args.factory!r}")
    factory: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        factory = getattr(factory, part)
    made = factory()
    if not isinstance(made, tuple) or len(made) not in (2, 3):
        parser.error(f"{args.factory}() must return (model, example_inputs) or (model, "
                     f"example_inputs, loss_fn), got {type(made).__qualname__}")
    model, example_inputs, *loss_fn = made
    report = check(model, example_inputs, loss_fn=loss_fn[0] if loss_fn else None,
                   dtypes=[getattr(torch, d) for d in args.dtypes], target=args.target,
                   repeats=args.repeats, verbose=False if args.quiet else None)
    print(report)


if __name__ == "__main__":
    main()
