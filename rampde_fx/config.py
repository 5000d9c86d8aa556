"""``SolveConfig``: the precision settings of a solve, validated once and carried whole.

:func:`rampde_fx.convert`, its solve sites, the plan of every solve and the specs of compiled
solves all hold one ``SolveConfig``; the ``dtype``, ``scaling``, ``policy`` and ``checkpoint``
keywords of the public functions are shorthand for it. :class:`Budget` is the bounded form of
``checkpoint``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .policy import DEFAULT_POLICY, PrecisionPolicy

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
SCALING_MODES = ("auto", "dynamic", "none")
CHECKPOINT_MODES = ("steps", "stages")


@dataclasses.dataclass(frozen=True)
class Budget:
    """``checkpoint=Budget(n)``: keep at most ``n`` states for the backward pass, whatever the
    number of steps, and recompute the others from them (binomial checkpointing, Griewank's
    revolve).

    The states are kept in the state's own dtype (float32), so that the backward pass re-runs
    the forward steps exactly; each step's start is then rounded to the low dtype as
    ``checkpoint='steps'`` keeps it, and the gradients are those of ``checkpoint='steps'``.
    A fixed grid keeps the states that the optimal binomial schedule for its number of steps
    needs; an adaptive solve, whose number of steps is unknown while it runs, keeps evenly
    spaced accepted steps (halving them whenever ``n`` are kept) and recomputes between them
    by the same schedule. See :mod:`rampde_fx.engine.schedule` for the counts, and
    :mod:`rampde_fx.engine.checkpoints` for what else is kept (generator states and buffer
    values: with the kept states on a fixed grid, for every accepted step in an adaptive
    solve).

    Attributes:
        states: ``n``, the largest number of states kept, at least 1 (the initial state is one
            of them).

    Raises:
        TypeError: ``states`` is not an int.
        ValueError: ``states`` is below 1.
    """

    states: int

    def __post_init__(self) -> None:
        if not isinstance(self.states, int) or isinstance(self.states, bool):
            raise TypeError(f"rampde_fx.Budget takes the number of states to keep, an int, got "
                            f"{type(self.states).__qualname__}")
        if self.states < 1:
            raise ValueError(f"rampde_fx.Budget must keep at least 1 state (the initial one), "
                             f"got {self.states}")


@dataclasses.dataclass(frozen=True)
class SolveConfig:
    """How a solve runs in mixed precision.

    Attributes:
        dtype: the velocity's precision: torch.bfloat16 (default), torch.float16, or
            torch.float32 / torch.float64 for no low precision at all.
        scaling: adjoint scaling: 'auto' (dynamic for float16, none otherwise), 'dynamic' or
            'none'.
        policy: which ops run in ``dtype`` and which in float32; ``None`` stands for
            :data:`rampde_fx.DEFAULT_POLICY`.
        checkpoint: what the backward pass starts from: 'steps' (the state of each step, in
            ``dtype``; the backward pass recomputes each step), 'stages' (autograd keeps
            every stage's activations; no per-step adjoint scaling) or a :class:`Budget`
            (at most ``n`` states, in the state's dtype, whatever the number of steps; the
            backward pass recomputes the others, and its gradients are those of 'steps').
        compile_steps: run each step of a solve outside ``torch.compile`` as compiled kernels,
            one for the step and one for its adjoint (see :mod:`rampde_fx.compiled.kernels`),
            as a solve inside ``torch.compile`` always does. Compiling takes seconds per
            shape, once (inductor's on-disk cache keeps the kernels for later processes); then
            a step costs a kernel call instead of a Python call per op, the speed that small
            models, whose steps are launch-bound, need. Velocities that have no kernels run
            op by op, and :func:`rampde_fx.explain` says why.

    Raises:
        ValueError: an unsupported dtype, scaling or checkpoint, or checkpoint='stages' with
            dynamic scaling.
        TypeError: a policy that is not a :class:`rampde_fx.PrecisionPolicy`, or a
            ``compile_steps`` that is not a bool.
    """

    dtype: torch.dtype = torch.bfloat16
    scaling: str = "auto"
    policy: PrecisionPolicy = DEFAULT_POLICY
    checkpoint: str | Budget = "steps"
    compile_steps: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.compile_steps, bool):
            raise TypeError(f"compile_steps must be True or False, got {self.compile_steps!r}")
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be one of {[str(d) for d in SUPPORTED_DTYPES]}, got "
                             f"{self.dtype}")
        if self.scaling not in SCALING_MODES:
            raise ValueError(f"scaling must be one of {SCALING_MODES}, got {self.scaling!r}")
        if not isinstance(self.checkpoint, Budget) and self.checkpoint not in CHECKPOINT_MODES:
            raise ValueError(f"checkpoint must be one of {CHECKPOINT_MODES} or a "
                             f"rampde_fx.Budget(n), got {self.checkpoint!r}")
        if self.checkpoint == "stages" and self.dynamic_scaling:
            raise ValueError("checkpoint='stages' has no per-step adjoint scaling; use "
                             "checkpoint='steps' for float16, or pass scaling='none'")
        if self.policy is None:  # the public keywords' default
            object.__setattr__(self, "policy", DEFAULT_POLICY)
        elif not isinstance(self.policy, PrecisionPolicy):
            raise TypeError(f"policy must be a rampde_fx.PrecisionPolicy, got "
                            f"{type(self.policy).__qualname__}")

    @property
    def dynamic_scaling(self) -> bool:
        """Whether the backward pass scales its cotangents per step (see ``adjoint.scaling``)."""
        return self.scaling == "dynamic" or (self.scaling == "auto"
                                             and self.dtype == torch.float16)

    @property
    def keeps_stages(self) -> bool:
        """Whether autograd keeps every stage's activations (``checkpoint='stages'``)."""
        return self.checkpoint == "stages"

    @property
    def budget(self) -> int | None:
        """The largest number of states kept for the backward pass (``checkpoint=Budget(n)``);
        None where every step's state is kept."""
        return self.checkpoint.states if isinstance(self.checkpoint, Budget) else None


# The public functions' defaults of the settings keywords (None: the default policy).
KEYWORD_DEFAULTS: dict[str, Any] = {"dtype": torch.bfloat16, "scaling": "auto", "policy": None,
                                    "checkpoint": "steps", "compile_steps": False}


def resolve_config(config: SolveConfig | None, caller: str | None, **keywords: Any
                   ) -> SolveConfig:
    """``config``, or the one that the settings ``keywords`` of a public function give;
    ``config`` beside keywords that are not at their defaults is an error. ``caller`` prefixes
    error messages (``'rampde_fx.convert'``)."""
    prefix = f"{caller}: " if caller else ""
    if config is None:
        try:
            return SolveConfig(**keywords)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{prefix}{error}") from None
    given = [name for name, value in keywords.items() if value is not KEYWORD_DEFAULTS[name]]
    if given:
        raise ValueError(f"{prefix}pass either config or {given}, not both")
    if not isinstance(config, SolveConfig):
        raise TypeError(f"{prefix}config must be a rampde_fx.SolveConfig, got "
                        f"{type(config).__qualname__}")
    return config
