"""The random numbers of a step kernel, drawn outside it.

A compiled kernel that drew its own random numbers would draw them from inductor's generator,
which the backward kernel cannot replay, and which differs from the eager draws of the same
solve run op by op. So a kernel does not draw: each random op its step runs (dropout's
``bernoulli_``, ``randn_like``) reads instead the next of the values it is given
(:func:`reading_draws`), and the caller draws those values before each call
(:meth:`DrawPlan.draw`) with the same ops, on blank tensors of the same layout, in the order
the step runs them. Under the generator state the forward step drew from (which the backward
pass replays) the backward kernel is given the forward kernel's numbers, and an eager solve's
numbers are those of its op-by-op steps. The plan knows which calls each velocity evaluation
makes, and marks where each evaluation's draws start as the engine marks an evaluation
(``capture.evaluation_starts``): an adaptive step's recomputation draws its first stage's
numbers from another generator state than the rest.

That needs draws that do not depend on the values the step computes: an op whose only tensor
input is the one it takes its layout from, or fills in place (``rand_like``, ``bernoulli_``
with a number for its probability, ``normal_``). A random op that reads values
(``bernoulli`` of a tensor of probabilities, ``multinomial``) keeps the velocity's steps op by
op (:func:`undrawable_op`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ..capture import before_each_evaluation, evaluation_starts, is_random_op
from ..passes.precision import fetch_attr

aten = torch.ops.aten

# Random ops whose draws depend only on the layout of their first tensor (or of none).
_LAYOUT_ONLY = {aten.rand_like, aten.randn_like, aten.randint_like, aten.bernoulli_,
                aten.bernoulli, aten.normal_, aten.uniform_, aten.exponential_,
                aten.geometric_, aten.cauchy_, aten.log_normal_, aten.random_, aten.rand,
                aten.randn, aten.randint, aten.randperm, aten.normal}
# Their overloads whose first tensor gives values: bernoulli(p), normal(mean, std).
_FIRST_READ = {aten.bernoulli.default, aten.normal.Tensor_float, aten.normal.Tensor_Tensor}


def _reads_values(op: torch._ops.OpOverload, args: Sequence[Any],
                  kwargs: dict[str, Any]) -> bool:
    """Whether the draws of ``op`` on these arguments depend on the values of a tensor."""
    if op.overloadpacket not in _LAYOUT_ONLY or op in _FIRST_READ:
        return True
    tensors = [x for x in pytree.tree_leaves((args, kwargs)) if _is_tensor_like(x)]
    return len(tensors) > (1 if args and _is_tensor_like(args[0]) else 0)


def _is_tensor_like(x: Any) -> bool:
    return isinstance(x, (torch.Tensor, torch.fx.Node))


def undrawable_op(module: torch.fx.GraphModule) -> str | None:
    """The name of the first random op of ``module``'s graph whose draws depend on values the
    graph computes; None where there is none."""
    for node in module.graph.nodes:
        if node.op == "call_function" and is_random_op(node.target):
            args, kwargs = torch.fx.node.map_arg(  # constants (a generator) as themselves
                (node.args, node.kwargs),
                lambda arg: fetch_attr(module, arg.target) if arg.op == "get_attr" else arg)
            if _reads_values(node.target, args, kwargs):
                return node.target.name()
    return None


@dataclasses.dataclass(frozen=True)
class _Blank:
    """A tensor argument of a random op, of which the op reads only the layout."""
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def make(self) -> torch.Tensor:
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device)


@dataclasses.dataclass(frozen=True)
class DrawPlan:
    """The random ops a kernel's step runs, in order, with their arguments (tensors as
    :class:`_Blank`), the layouts of their results, and for each velocity evaluation of the
    step, in order, the index of its first call (its calls run up to the next one's)."""
    calls: tuple[tuple[torch._ops.OpOverload, Any, Any], ...] = ()
    results: tuple[_Blank, ...] = ()
    first_calls: tuple[int, ...] = ()

    def examples(self) -> list[torch.Tensor]:
        """Tensors laid out as the draws (not drawn: for tracing)."""
        return [result.make() for result in self.results]

    def draw(self) -> list[torch.Tensor]:
        """The numbers the step would draw now, from the generators as they are, with the
        start of each evaluation's draws marked."""
        drawn = []
        starts = list(self.first_calls)
        for i, (op, args, kwargs) in enumerate(self.calls):
            while starts and starts[0] == i:
                evaluation_starts()
                starts.pop(0)
            args, kwargs = pytree.tree_map_only(_Blank, _Blank.make, (args, kwargs))
            drawn.append(op(*args, **kwargs))
        for _ in starts:  # evaluations that draw nothing, after the last draw
            evaluation_starts()
        return drawn


def _blank(x: torch.Tensor) -> _Blank:
    return _Blank(tuple(x.shape), tuple(x.stride()), x.dtype, x.device)


class _Recording(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, Any, Any]] = []
        self.results: list[_Blank] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if is_random_op(func):
            if _reads_values(func, args, kwargs):
                raise RuntimeError(f"rampde_fx: the random op {func.name()} draws numbers that "
                                   "depend on values the step computes, so the step cannot run "
                                   "as a compiled kernel; solve with compile_steps=False, "
                                   "outside torch.compile")
            self.calls.append((func, *pytree.tree_map_only(torch.Tensor, _blank,
                                                            (args, kwargs))))
            result = func(*args, **kwargs)
            self.results.append(_blank(result))
            return result
        return func(*args, **kwargs)


def draw_plan(function: Callable[..., Any], inputs: Sequence[torch.Tensor]) -> DrawPlan:
    """The random ops ``function`` runs on inputs like ``inputs`` (run on fake copies), and
    where each of its velocity evaluations starts among them."""
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [fake_mode.from_tensor(x) for x in inputs]
    first_calls: list[int] = []
    with fake_mode, _Recording() as recording, \
            before_each_evaluation(lambda i: first_calls.append(len(recording.calls))):
        function(*fakes)
    return DrawPlan(tuple(recording.calls), tuple(recording.results), tuple(first_calls))


class _Reading(TorchDispatchMode):
    def __init__(self, values: Iterator[torch.Tensor]) -> None:
        super().__init__()
        self.values = values

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if not is_random_op(func):
            return func(*args, **(kwargs or {}))
        value = next(self.values)
        if func._schema.is_mutable:  # bernoulli_, normal_: fill the tensor given
            return args[0].copy_(value)
        return value


def reading_draws(function: Callable[..., Any], count: int) -> Callable[..., Any]:
    """``function`` taking first the ``count`` numbers its random ops draw, which they read
    in turn instead of drawing."""
    def with_draws(*inputs: torch.Tensor) -> Any:
        with _Reading(iter(inputs[:count])):
            return function(*inputs[count:])
    return with_draws
