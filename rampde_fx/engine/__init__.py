"""The solver engine: explicit Runge-Kutta steps over Butcher tableaus, the Adams multistep
methods, step controllers, and the one forward loop.

Modules, from data to loop: ``tableaus`` (the methods), ``interpolation`` and ``grid`` (time grids,
internal time, output placement), ``step`` (the mixed-precision RK step, and the
:class:`~rampde_fx.engine.step.StepExecutor` interface through which compiled kernels run steps),
``adams`` (the Adams methods: a stepper with a history), ``callbacks`` (torchdiffeq's step
callbacks), ``controllers`` (where to step: a fixed grid, or adaptive control with its measured
rounding floor), ``arguments`` (checks of numbers and tensors that ``plan`` and the controllers
share), ``plan`` (a validated solve: :func:`~rampde_fx.engine.plan.prepare_solve`), ``schedule``
(binomial checkpointing: which step starts a ``Budget`` keeps), ``checkpoints`` (what a solve keeps
for its backward pass, and every step's start rebuilt from it) and ``integrate`` (the forward loop).
The engine knows nothing of the compiler stack.
"""
