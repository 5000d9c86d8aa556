"""Compiled solves: under ``torch.compile`` a solve is one opaque custom op (``op``), named by
the key of a registered spec (``registry``), whose steps run as two compiled kernels each
(``kernels``, the engine's ``StepExecutor``), given the random numbers their steps draw
(``draws``)."""
