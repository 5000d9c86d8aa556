"""Golden tests of explain() and conversion diffs (accept new output with EXPECTTEST_ACCEPT=1)."""
from __future__ import annotations

import torch
from expecttest import TestCase

import rampde_fx
from field_models import HamiltonianModel, MLPODE, ODENetClassifier


def run(converted, *inputs):
    out = converted(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    sum(o.sum() for o in outs).backward()
    return converted


class Explain(TestCase):
    def test_mlp_ode(self):
        converted = rampde_fx.convert(MLPODE())
        self.assertExpectedInline(rampde_fx.explain(converted), """\
rampde_fx: 1 ODE solve(s) in bfloat16; everything outside them runs as written (float32)

solve 0: torchdiffeq.odeint in ODEBlock at 'block'
  velocity: block.odefunc
  dtype: bfloat16, scaling: auto, policy: default
  not run yet: call the module once to capture the velocity""")
        run(converted, torch.randn(5, 3))
        self.assertExpectedInline(rampde_fx.explain(converted), """\
rampde_fx: 1 ODE solve(s) in bfloat16; everything outside them runs as written (float32)

solve 0: torchdiffeq.odeint in ODEBlock at 'block'
  velocity: block.odefunc
  dtype: bfloat16, scaling: auto, policy: default
  arguments: atol=0.001, method='rk4', options={'step_size': 0.25}, rtol=0.001
  last solve: rk4, 4 steps, 16 evaluations forward, 16 backward, adjoint scaling off
  velocity graph (node, dtype, why):
    y_bf16                      bfloat16  the state enters the velocity in low precision
    velocity_net_0_weight_bf16  bfloat16  input of 'linear', a matmul-class op
    velocity_net_0_bias_bf16    bfloat16  input of 'linear', a matmul-class op
    linear                      bfloat16  'linear', a matmul-class op
    tanh                        bfloat16  'tanh', which follows its inputs
    velocity_net_2_weight_bf16  bfloat16  input of 'linear', a matmul-class op
    velocity_net_2_bias_bf16    bfloat16  input of 'linear', a matmul-class op
    linear_1                    bfloat16  'linear', a matmul-class op""")
        self.assertExpectedInline(rampde_fx.conversion_diff(converted), """\
# <root>
@@ -5,4 +5,4 @@
     block_odefunc = self.block.odefunc
-    odeint = torchdiffeq__impl_odeint_odeint(block_odefunc, encoder, type_as, rtol = 0.001, atol = 0.001, method = 'rk4', options = {'step_size': 0.25});  block_odefunc = encoder = type_as = None
-    getitem = odeint[1];  odeint = None
+    rampde_solve_0 = self.rampde_solve_0(block_odefunc, encoder, type_as, rtol = 0.001, atol = 0.001, method = 'rk4', options = {'step_size': 0.25});  block_odefunc = encoder = type_as = None
+    getitem = rampde_solve_0[1];  rampde_solve_0 = None
     head = self.head(getitem);  getitem = None""")

    def test_odenet_classifier(self):
        converted = run(rampde_fx.convert(ODENetClassifier()), torch.randn(2, 1, 8, 8))
        self.assertExpectedInline(rampde_fx.explain(converted), """\
rampde_fx: 1 ODE solve(s) in bfloat16; everything outside them runs as written (float32)

solve 0: torchdiffeq.odeint in ODEBlock at 'block'
  velocity: block.odefunc
  dtype: bfloat16, scaling: auto, policy: default
  arguments: atol=0.001, method='rk4', options={'step_size': 0.25}, rtol=0.001
  last solve: rk4, 4 steps, 16 evaluations forward, 16 backward, adjoint scaling off
  velocity graph (node, dtype, why):
    y_bf16                          bfloat16  the state enters the velocity in low precision
    y_bf16_fp32                     float32   input of 'group_norm', a precision-sensitive op
    group_norm                      float32   'group_norm', a precision-sensitive op
    relu                            float32   'relu', which follows its inputs
    getitem                         float32   'getitem', which follows its inputs
    ones_like                       float32   'ones_like', which follows its inputs
    mul                             float32   'mul', which follows its inputs
    cat                             float32   'cat', which follows its inputs
    cat_bf16                        bfloat16  input of 'conv2d', a matmul-class op
    velocity_conv_conv_weight_bf16  bfloat16  input of 'conv2d', a matmul-class op
    velocity_conv_conv_bias_bf16    bfloat16  input of 'conv2d', a matmul-class op
    conv2d                          bfloat16  'conv2d', a matmul-class op""")

    def test_tuple_state_in_float16(self):
        converted = run(rampde_fx.convert(HamiltonianModel(), dtype=torch.float16),
                        torch.randn(3, 2), torch.randn(3, 2))
        self.assertExpectedInline(rampde_fx.explain(converted), """\
rampde_fx: 1 ODE solve(s) in float16; everything outside them runs as written (float32)

solve 0: torchdiffeq.odeint in HamiltonianModel at '<root>'
  velocity: dynamics
  dtype: float16, scaling: auto, policy: default
  arguments: method='midpoint', options={'step_size': 0.125}
  last solve: midpoint, 8 steps, 16 evaluations forward, 16 backward, adjoint scaling on
  velocity graph (node, dtype, why):
    getitem                           float32  'getitem', which follows its inputs
    getitem_fp16                      float16  the state enters the velocity in low precision
    getitem_1                         float32  'getitem', which follows its inputs
    getitem_1_fp16                    float16  the state enters the velocity in low precision
    velocity_kinetic_0_weight_fp16    float16  input of 'linear', a matmul-class op
    velocity_kinetic_0_bias_fp16      float16  input of 'linear', a matmul-class op
    linear                            float16  'linear', a matmul-class op
    tanh                              float16  'tanh', which follows its inputs
    velocity_kinetic_2_weight_fp16    float16  input of 'linear', a matmul-class op
    velocity_kinetic_2_bias_fp16      float16  input of 'linear', a matmul-class op
    linear_1                          float16  'linear', a matmul-class op
    velocity_potential_0_weight_fp16  float16  input of 'linear', a matmul-class op
    velocity_potential_0_bias_fp16    float16  input of 'linear', a matmul-class op
    linear_2                          float16  'linear', a matmul-class op
    tanh_1                            float16  'tanh', which follows its inputs
    velocity_potential_2_weight_fp16  float16  input of 'linear', a matmul-class op
    velocity_potential_2_bias_fp16    float16  input of 'linear', a matmul-class op
    linear_3                          float16  'linear', a matmul-class op
    neg                               float16  'neg', which follows its inputs""")
        self.assertExpectedInline(rampde_fx.conversion_diff(converted), """\
# <root>
@@ -3,5 +3,5 @@
     times = self.times
-    odeint = torchdiffeq__impl_odeint_odeint(dynamics, (q, p), times, method = 'midpoint', options = {'step_size': 0.125});  dynamics = q = p = times = None
-    getitem = odeint[0]
-    getitem_1 = odeint[1];  odeint = None
+    rampde_solve_0 = self.rampde_solve_0(dynamics, (q, p), times, method = 'midpoint', options = {'step_size': 0.125});  dynamics = q = p = times = None
+    getitem = rampde_solve_0[0]
+    getitem_1 = rampde_solve_0[1];  rampde_solve_0 = None
     getitem_2 = getitem[-1];  getitem = None""")

    def test_unconverted_module(self):
        self.assertExpectedInline(rampde_fx.explain(torch.nn.Linear(2, 2)), """Linear was not converted by rampde_fx.convert: everything runs as written""")
