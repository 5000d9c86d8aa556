"""The discrete adjoint: per-step power-of-two scaling (``scaling``), the vector-Jacobian product
of a step (``vjp``), the backward sweep over the checkpoints (``sweep``) and the autograd
function that ties the forward loop to it (``function``).

Forward: the engine's loop keeps the state of every step start cast to the low dtype
(``steps x |y0| x 2`` bytes for bf16/fp16), or under ``checkpoint=Budget(n)`` at most ``n``
states, no stage activations; backward: the sweep recomputes each step from its start (see
``engine.checkpoints``).
"""
