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
        self.assertExpectedInline(rampde_fx.explain(converted), """rampde_fx: converted to bfloat16; no ODE solve has been met yet: call the module once""")
        run(converted, torch.randn(5, 3))
        self.assertExpectedInline(rampde_fx.explain(converted), """\
rampde_fx: 1 ODE solve(s) in bfloat16 met so far; everything outside them runs as written (float32)

solve 0: torchdiffeq.odeint in ODEBlock at 'block'
  velocity: block.odefunc
  dtype: bfloat16, scaling: auto, policy: default
  arguments: atol=0.001, method='rk4', options={'step_size': 0.25}, rtol=0.001
  last solve: rk4, 4 steps, 16 evaluations forward, 16 backward, adjoint scaling off
  velocity graph (node, dtype, why):
    y_bf16               bfloat16  the state enters the velocity in low precision
    net_0_weight_t       float32   'transpose', which follows its inputs
    net_0_bias_bf16      bfloat16  input of 'addmm', a matmul-class op
    net_0_weight_t_bf16  bfloat16  input of 'addmm', a matmul-class op
    addmm                bfloat16  'addmm', a matmul-class op
    tanh                 bfloat16  'tanh', which follows its inputs
    net_2_weight_t       float32   'transpose', which follows its inputs
    net_2_bias_bf16      bfloat16  input of 'addmm', a matmul-class op
    net_2_weight_t_bf16  bfloat16  input of 'addmm', a matmul-class op
    addmm_1              bfloat16  'addmm', a matmul-class op""")
        self.assertExpectedInline(rampde_fx.conversion_diff(converted), """\
# solve 0: torchdiffeq.odeint in ODEBlock at 'block', velocity block.odefunc
@@ -1,7 +1,12 @@
 def forward(self, t, y, net_0_weight, net_0_bias, net_2_weight, net_2_bias):
+    y_bf16 = y.to(torch.bfloat16);  y = None
     net_0_weight_t = torch.ops.aten.t.default(net_0_weight);  net_0_weight = None
-    addmm = torch.ops.aten.addmm.default(net_0_bias, y, net_0_weight_t);  net_0_bias = y = net_0_weight_t = None
+    net_0_bias_bf16 = net_0_bias.to(torch.bfloat16);  net_0_bias = None
+    net_0_weight_t_bf16 = net_0_weight_t.to(torch.bfloat16);  net_0_weight_t = None
+    addmm = torch.ops.aten.addmm.default(net_0_bias_bf16, y_bf16, net_0_weight_t_bf16);  net_0_bias_bf16 = y_bf16 = net_0_weight_t_bf16 = None
     tanh = torch.ops.aten.tanh.default(addmm);  addmm = None
     net_2_weight_t = torch.ops.aten.t.default(net_2_weight);  net_2_weight = None
-    addmm_1 = torch.ops.aten.addmm.default(net_2_bias, tanh, net_2_weight_t);  net_2_bias = tanh = net_2_weight_t = None
+    net_2_bias_bf16 = net_2_bias.to(torch.bfloat16);  net_2_bias = None
+    net_2_weight_t_bf16 = net_2_weight_t.to(torch.bfloat16);  net_2_weight_t = None
+    addmm_1 = torch.ops.aten.addmm.default(net_2_bias_bf16, tanh, net_2_weight_t_bf16);  net_2_bias_bf16 = tanh = net_2_weight_t_bf16 = None
     return addmm_1""")

    def test_odenet_classifier(self):
        converted = run(rampde_fx.convert(ODENetClassifier()), torch.randn(2, 1, 8, 8))
        self.assertExpectedInline(rampde_fx.explain(converted), """\
rampde_fx: 1 ODE solve(s) in bfloat16 met so far; everything outside them runs as written (float32)

solve 0: torchdiffeq.odeint in ODEBlock at 'block'
  velocity: block.odefunc
  dtype: bfloat16, scaling: auto, policy: default
  arguments: atol=0.001, method='rk4', options={'step_size': 0.25}, rtol=0.001
  last solve: rk4, 4 steps, 16 evaluations forward, 16 backward, adjoint scaling off
  velocity graph (node, dtype, why):
    y_bf16                 bfloat16                     the state enters the velocity in low precision
    y_bf16_fp32            float32                      input of 'group_norm', a precision-sensitive op
    native_group_norm      (float32, float32, float32)  'group_norm', a precision-sensitive op
    getitem                float32                      'getitem', which follows its inputs
    getitem_1              float32                      'getitem', which follows its inputs
    getitem_2              float32                      'getitem', which follows its inputs
    relu                   float32                      'relu', which follows its inputs
    slice_1                float32                      'slice', which follows its inputs
    ones_like              float32                      'ones_like', which follows its inputs
    mul                    float32                      'mul', which follows its inputs
    cat                    float32                      'cat', which follows its inputs
    cat_bf16               bfloat16                     input of 'convolution', a matmul-class op
    conv_conv_weight_bf16  bfloat16                     input of 'convolution', a matmul-class op
    conv_conv_bias_bf16    bfloat16                     input of 'convolution', a matmul-class op
    convolution            bfloat16                     'convolution', a matmul-class op""")

    def test_tuple_state_in_float16(self):
        converted = run(rampde_fx.convert(HamiltonianModel(), dtype=torch.float16),
                        torch.randn(3, 2), torch.randn(3, 2))
        self.assertExpectedInline(rampde_fx.explain(converted), """\
rampde_fx: 1 ODE solve(s) in float16 met so far; everything outside them runs as written (float32)

solve 0: torchdiffeq.odeint in HamiltonianModel at '<root>'
  velocity: dynamics
  dtype: float16, scaling: auto, policy: default
  arguments: method='midpoint', options={'step_size': 0.125}
  last solve: midpoint, 8 steps, 16 evaluations forward, 16 backward, adjoint scaling on
  velocity graph (node, dtype, why):
    y_0_fp16                   float16  the state enters the velocity in low precision
    y_1_fp16                   float16  the state enters the velocity in low precision
    kinetic_0_weight_t         float32  'transpose', which follows its inputs
    kinetic_0_bias_fp16        float16  input of 'addmm', a matmul-class op
    kinetic_0_weight_t_fp16    float16  input of 'addmm', a matmul-class op
    addmm                      float16  'addmm', a matmul-class op
    tanh                       float16  'tanh', which follows its inputs
    kinetic_2_weight_t         float32  'transpose', which follows its inputs
    kinetic_2_bias_fp16        float16  input of 'addmm', a matmul-class op
    kinetic_2_weight_t_fp16    float16  input of 'addmm', a matmul-class op
    addmm_1                    float16  'addmm', a matmul-class op
    potential_0_weight_t       float32  'transpose', which follows its inputs
    potential_0_bias_fp16      float16  input of 'addmm', a matmul-class op
    potential_0_weight_t_fp16  float16  input of 'addmm', a matmul-class op
    addmm_2                    float16  'addmm', a matmul-class op
    tanh_1                     float16  'tanh', which follows its inputs
    potential_2_weight_t       float32  'transpose', which follows its inputs
    potential_2_bias_fp16      float16  input of 'addmm', a matmul-class op
    potential_2_weight_t_fp16  float16  input of 'addmm', a matmul-class op
    addmm_3                    float16  'addmm', a matmul-class op
    neg                        float16  'neg', which follows its inputs""")
        self.assertExpectedInline(rampde_fx.conversion_diff(converted), """\
# solve 0: torchdiffeq.odeint in HamiltonianModel at '<root>', velocity dynamics
@@ -1,12 +1,22 @@
 def forward(self, t, y_0, y_1, kinetic_0_weight, kinetic_0_bias, kinetic_2_weight, kinetic_2_bias, potential_0_weight, potential_0_bias, potential_2_weight, potential_2_bias):
+    y_0_fp16 = y_0.to(torch.float16);  y_0 = None
+    y_1_fp16 = y_1.to(torch.float16);  y_1 = None
     kinetic_0_weight_t = torch.ops.aten.t.default(kinetic_0_weight);  kinetic_0_weight = None
-    addmm = torch.ops.aten.addmm.default(kinetic_0_bias, y_1, kinetic_0_weight_t);  kinetic_0_bias = y_1 = kinetic_0_weight_t = None
+    kinetic_0_bias_fp16 = kinetic_0_bias.to(torch.float16);  kinetic_0_bias = None
+    kinetic_0_weight_t_fp16 = kinetic_0_weight_t.to(torch.float16);  kinetic_0_weight_t = None
+    addmm = torch.ops.aten.addmm.default(kinetic_0_bias_fp16, y_1_fp16, kinetic_0_weight_t_fp16);  kinetic_0_bias_fp16 = y_1_fp16 = kinetic_0_weight_t_fp16 = None
     tanh = torch.ops.aten.tanh.default(addmm);  addmm = None
     kinetic_2_weight_t = torch.ops.aten.t.default(kinetic_2_weight);  kinetic_2_weight = None
-    addmm_1 = torch.ops.aten.addmm.default(kinetic_2_bias, tanh, kinetic_2_weight_t);  kinetic_2_bias = tanh = kinetic_2_weight_t = None
+    kinetic_2_bias_fp16 = kinetic_2_bias.to(torch.float16);  kinetic_2_bias = None
+    kinetic_2_weight_t_fp16 = kinetic_2_weight_t.to(torch.float16);  kinetic_2_weight_t = None
+    addmm_1 = torch.ops.aten.addmm.default(kinetic_2_bias_fp16, tanh, kinetic_2_weight_t_fp16);  kinetic_2_bias_fp16 = tanh = kinetic_2_weight_t_fp16 = None
     potential_0_weight_t = torch.ops.aten.t.default(potential_0_weight);  potential_0_weight = None
-    addmm_2 = torch.ops.aten.addmm.default(potential_0_bias, y_0, potential_0_weight_t);  potential_0_bias = y_0 = potential_0_weight_t = None
+    potential_0_bias_fp16 = potential_0_bias.to(torch.float16);  potential_0_bias = None
+    potential_0_weight_t_fp16 = potential_0_weight_t.to(torch.float16);  potential_0_weight_t = None
+    addmm_2 = torch.ops.aten.addmm.default(potential_0_bias_fp16, y_0_fp16, potential_0_weight_t_fp16);  potential_0_bias_fp16 = y_0_fp16 = potential_0_weight_t_fp16 = None
     tanh_1 = torch.ops.aten.tanh.default(addmm_2);  addmm_2 = None
     potential_2_weight_t = torch.ops.aten.t.default(potential_2_weight);  potential_2_weight = None
-    addmm_3 = torch.ops.aten.addmm.default(potential_2_bias, tanh_1, potential_2_weight_t);  potential_2_bias = tanh_1 = potential_2_weight_t = None
+    potential_2_bias_fp16 = potential_2_bias.to(torch.float16);  potential_2_bias = None
+    potential_2_weight_t_fp16 = potential_2_weight_t.to(torch.float16);  potential_2_weight_t = None
+    addmm_3 = torch.ops.aten.addmm.default(potential_2_bias_fp16, tanh_1, potential_2_weight_t_fp16);  potential_2_bias_fp16 = tanh_1 = potential_2_weight_t_fp16 = None
     neg = torch.ops.aten.neg.default(addmm_3);  addmm_3 = None""")

    def test_unconverted_module(self):
        self.assertExpectedInline(rampde_fx.explain(torch.nn.Linear(2, 2)), """Linear was not converted by rampde_fx.convert: everything runs as written""")
