"""Golden tests of rewritten velocity graphs (accept new output with EXPECTTEST_ACCEPT=1)."""
from __future__ import annotations

import dataclasses

import torch
from expecttest import TestCase

import rampde_fx
from models import Hamiltonian, NormMLP, ODENetFunc, TimeMLP
from rampde_fx.capture import capture_velocity
from rampde_fx.diagnostics import precision_table


def lowered(func, *state, dtype=torch.bfloat16, policy=rampde_fx.DEFAULT_POLICY):
    velocity = capture_velocity(func, torch.tensor(0.0), state, len(state) > 1, dtype, policy)
    return velocity.graph_module


class RewrittenGraphs(TestCase):
    def test_mlp(self):
        gm = lowered(TimeMLP(), torch.randn(5, 3))
        self.assertExpectedInline(gm.code.strip(), """\
def forward(self, t, y):
    y_bf16 = y.to(torch.bfloat16);  y = None
    velocity_net_0_weight = getattr(self.velocity.net, "0").weight
    velocity_net_0_bias = getattr(self.velocity.net, "0").bias
    velocity_net_0_weight_bf16 = velocity_net_0_weight.to(torch.bfloat16);  velocity_net_0_weight = None
    velocity_net_0_bias_bf16 = velocity_net_0_bias.to(torch.bfloat16);  velocity_net_0_bias = None
    linear = torch._C._nn.linear(y_bf16, velocity_net_0_weight_bf16, velocity_net_0_bias_bf16);  y_bf16 = velocity_net_0_weight_bf16 = velocity_net_0_bias_bf16 = None
    tanh = torch.tanh(linear);  linear = None
    velocity_net_2_weight = getattr(self.velocity.net, "2").weight
    velocity_net_2_bias = getattr(self.velocity.net, "2").bias
    velocity_net_2_weight_bf16 = velocity_net_2_weight.to(torch.bfloat16);  velocity_net_2_weight = None
    velocity_net_2_bias_bf16 = velocity_net_2_bias.to(torch.bfloat16);  velocity_net_2_bias = None
    linear_1 = torch._C._nn.linear(tanh, velocity_net_2_weight_bf16, velocity_net_2_bias_bf16);  tanh = velocity_net_2_weight_bf16 = velocity_net_2_bias_bf16 = None
    cos = torch.cos(t);  t = None
    mul = linear_1 * cos;  linear_1 = cos = None
    return mul""")
        self.assertExpectedInline(precision_table(gm.graph), """\
y_bf16                      bfloat16  the state enters the velocity in low precision
velocity_net_0_weight_bf16  bfloat16  input of 'linear', a matmul-class op
velocity_net_0_bias_bf16    bfloat16  input of 'linear', a matmul-class op
linear                      bfloat16  'linear', a matmul-class op
tanh                        bfloat16  'tanh', which follows its inputs
velocity_net_2_weight_bf16  bfloat16  input of 'linear', a matmul-class op
velocity_net_2_bias_bf16    bfloat16  input of 'linear', a matmul-class op
linear_1                    bfloat16  'linear', a matmul-class op
cos                         float32   'cos', which follows its inputs
mul                         bfloat16  'mul', which follows its inputs""")

    def test_conv_with_time_channel_and_group_norm(self):
        gm = lowered(ODENetFunc(), torch.randn(2, 4, 6, 6))
        self.assertExpectedInline(gm.code.strip(), """\
def forward(self, t, y):
    y_bf16 = y.to(torch.bfloat16);  y = None
    velocity_norm_weight = self.velocity.norm.weight
    velocity_norm_bias = self.velocity.norm.bias
    y_bf16_fp32 = y_bf16.to(torch.float32);  y_bf16 = None
    group_norm = torch.nn.functional.group_norm(y_bf16_fp32, 2, weight = velocity_norm_weight, bias = velocity_norm_bias, eps = 1e-05);  y_bf16_fp32 = velocity_norm_weight = velocity_norm_bias = None
    relu = torch.relu(group_norm);  group_norm = None
    getitem = relu[(slice(None, None, None), slice(None, 1, None), slice(None, None, None), slice(None, None, None))]
    ones_like = torch.ones_like(getitem);  getitem = None
    mul = ones_like * t;  ones_like = t = None
    cat = torch.cat([mul, relu], 1);  mul = relu = None
    velocity_conv_conv_weight = self.velocity.conv.conv.weight
    velocity_conv_conv_bias = self.velocity.conv.conv.bias
    cat_bf16 = cat.to(torch.bfloat16);  cat = None
    velocity_conv_conv_weight_bf16 = velocity_conv_conv_weight.to(torch.bfloat16);  velocity_conv_conv_weight = None
    velocity_conv_conv_bias_bf16 = velocity_conv_conv_bias.to(torch.bfloat16);  velocity_conv_conv_bias = None
    conv2d = torch.conv2d(cat_bf16, velocity_conv_conv_weight_bf16, velocity_conv_conv_bias_bf16, (1, 1), (1, 1), (1, 1), 1);  cat_bf16 = velocity_conv_conv_weight_bf16 = velocity_conv_conv_bias_bf16 = None
    return conv2d""")
        self.assertExpectedInline(precision_table(gm.graph), """\
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

    def test_layer_norm_softplus_mean(self):
        gm = lowered(NormMLP(), torch.randn(3, 4))
        self.assertExpectedInline(precision_table(gm.graph), """\
y_bf16                    bfloat16  the state enters the velocity in low precision
velocity_inp_weight_bf16  bfloat16  input of 'linear', a matmul-class op
velocity_inp_bias_bf16    bfloat16  input of 'linear', a matmul-class op
linear                    bfloat16  'linear', a matmul-class op
linear_fp32               float32   input of 'softplus', a precision-sensitive op
softplus                  float32   'softplus', a precision-sensitive op
layer_norm                float32   'layer_norm', a precision-sensitive op
layer_norm_bf16           bfloat16  input of 'linear', a matmul-class op
velocity_out_weight_bf16  bfloat16  input of 'linear', a matmul-class op
velocity_out_bias_bf16    bfloat16  input of 'linear', a matmul-class op
linear_1                  bfloat16  'linear', a matmul-class op
mean                      float32   'mean', a precision-sensitive op
mean_bf16                 bfloat16  input of 'sub', which follows its inputs, next to a bfloat16 input
sub                       bfloat16  'sub', which follows its inputs""")

    def test_tuple_state_in_float16(self):
        gm = lowered(Hamiltonian(), torch.randn(3, 2), torch.randn(3, 2), dtype=torch.float16)
        self.assertExpectedInline(gm.code.strip(), """\
def forward(self, t, y):
    getitem = y[0]
    getitem_fp16 = getitem.to(torch.float16);  getitem = None
    getitem_1 = y[1];  y = None
    getitem_1_fp16 = getitem_1.to(torch.float16);  getitem_1 = None
    velocity_kinetic_0_weight = getattr(self.velocity.kinetic, "0").weight
    velocity_kinetic_0_bias = getattr(self.velocity.kinetic, "0").bias
    velocity_kinetic_0_weight_fp16 = velocity_kinetic_0_weight.to(torch.float16);  velocity_kinetic_0_weight = None
    velocity_kinetic_0_bias_fp16 = velocity_kinetic_0_bias.to(torch.float16);  velocity_kinetic_0_bias = None
    linear = torch._C._nn.linear(getitem_1_fp16, velocity_kinetic_0_weight_fp16, velocity_kinetic_0_bias_fp16);  getitem_1_fp16 = velocity_kinetic_0_weight_fp16 = velocity_kinetic_0_bias_fp16 = None
    tanh = torch.tanh(linear);  linear = None
    velocity_kinetic_2_weight = getattr(self.velocity.kinetic, "2").weight
    velocity_kinetic_2_bias = getattr(self.velocity.kinetic, "2").bias
    velocity_kinetic_2_weight_fp16 = velocity_kinetic_2_weight.to(torch.float16);  velocity_kinetic_2_weight = None
    velocity_kinetic_2_bias_fp16 = velocity_kinetic_2_bias.to(torch.float16);  velocity_kinetic_2_bias = None
    linear_1 = torch._C._nn.linear(tanh, velocity_kinetic_2_weight_fp16, velocity_kinetic_2_bias_fp16);  tanh = velocity_kinetic_2_weight_fp16 = velocity_kinetic_2_bias_fp16 = None
    velocity_potential_0_weight = getattr(self.velocity.potential, "0").weight
    velocity_potential_0_bias = getattr(self.velocity.potential, "0").bias
    velocity_potential_0_weight_fp16 = velocity_potential_0_weight.to(torch.float16);  velocity_potential_0_weight = None
    velocity_potential_0_bias_fp16 = velocity_potential_0_bias.to(torch.float16);  velocity_potential_0_bias = None
    linear_2 = torch._C._nn.linear(getitem_fp16, velocity_potential_0_weight_fp16, velocity_potential_0_bias_fp16);  getitem_fp16 = velocity_potential_0_weight_fp16 = velocity_potential_0_bias_fp16 = None
    tanh_1 = torch.tanh(linear_2);  linear_2 = None
    velocity_potential_2_weight = getattr(self.velocity.potential, "2").weight
    velocity_potential_2_bias = getattr(self.velocity.potential, "2").bias
    velocity_potential_2_weight_fp16 = velocity_potential_2_weight.to(torch.float16);  velocity_potential_2_weight = None
    velocity_potential_2_bias_fp16 = velocity_potential_2_bias.to(torch.float16);  velocity_potential_2_bias = None
    linear_3 = torch._C._nn.linear(tanh_1, velocity_potential_2_weight_fp16, velocity_potential_2_bias_fp16);  tanh_1 = velocity_potential_2_weight_fp16 = velocity_potential_2_bias_fp16 = None
    neg = -linear_3;  linear_3 = None
    return (linear_1, neg)""")

    def test_policy_override_keeps_tanh_in_float32(self):
        policy = dataclasses.replace(rampde_fx.DEFAULT_POLICY,
                                     full_ops=rampde_fx.DEFAULT_POLICY.full_ops | {"tanh"})
        gm = lowered(TimeMLP(), torch.randn(5, 3), policy=policy)
        self.assertExpectedInline(precision_table(gm.graph), """\
y_bf16                      bfloat16  the state enters the velocity in low precision
velocity_net_0_weight_bf16  bfloat16  input of 'linear', a matmul-class op
velocity_net_0_bias_bf16    bfloat16  input of 'linear', a matmul-class op
linear                      bfloat16  'linear', a matmul-class op
linear_fp32                 float32   input of 'tanh', a precision-sensitive op
tanh                        float32   'tanh', a precision-sensitive op
tanh_bf16                   bfloat16  input of 'linear', a matmul-class op
velocity_net_2_weight_bf16  bfloat16  input of 'linear', a matmul-class op
velocity_net_2_bias_bf16    bfloat16  input of 'linear', a matmul-class op
linear_1                    bfloat16  'linear', a matmul-class op
cos                         float32   'cos', which follows its inputs
mul                         bfloat16  'mul', which follows its inputs""")

    def test_float32_mode_adds_no_casts(self):
        func = ODENetFunc()
        velocity = capture_velocity(func, torch.tensor(0.0), (torch.randn(2, 4, 6, 6),), False,
                                    torch.float32, rampde_fx.DEFAULT_POLICY)
        self.assertEqual(velocity.graph_module.code, velocity.original_graph_module.code)
        self.assertNotIn(".to(", velocity.graph_module.code)
