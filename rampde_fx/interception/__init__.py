"""Interception: where a model's ODE solves are found at run time.

``convert`` makes the converted module, whose forward runs the model's own code while the
``trampolines`` of torchdiffeq's solver functions hand each solve to it; ``sites`` keeps the
solves met (one :class:`~rampde_fx.interception.sites.SolveSite` each) and runs them with the
conversion's :class:`rampde_fx.SolveConfig`.
"""
