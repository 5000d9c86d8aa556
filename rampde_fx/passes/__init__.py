"""Graph passes over captured velocities and step kernels.

A pass takes an ``fx.Graph`` (and its parameters) and returns the graph it produced: the same
graph changed in place, or a new one. In the order they run:

- ``cleanup``: after tracing, drop autograd's own detaches and give inputs readable names;
- ``precision``: rewrite the graph under a :class:`rampde_fx.PrecisionPolicy` (casts to the low
  dtype and to float32), recording why each node runs in its dtype; ``kernel_support`` tells it
  which ops have no kernel for the low dtype (they run in float32);
- ``cpu``: for the compiled step kernels on CPU, a tanh that inductor vectorises and the
  product decompositions used while tracing the kernels;
- ``recompute``: tags on the kernels' casts of parameters for AOTAutograd to recompute.
"""
