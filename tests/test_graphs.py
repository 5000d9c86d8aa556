"""Golden tests of rewritten velocity graphs (accept new output with EXPECTTEST_ACCEPT=1)."""
from __future__ import annotations

import dataclasses

import torch
from expecttest import TestCase

import rampde_fx
from models import Hamiltonian, NormMLP, ODENetFunc, TimeMLP
from rampde_fx.capture import capture_velocity
from rampde_fx.tools.explain import precision_table


def lowered(func, *state, dtype=torch.bfloat16, policy=rampde_fx.DEFAULT_POLICY):
    velocity = capture_velocity(func, torch.tensor(0.0), state, len(state) > 1, dtype, policy)
    return velocity.graph_module


class RewrittenGraphs(TestCase):
    def test_mlp(self):
        gm = lowered(TimeMLP(), torch.randn(5, 3))
        self.assertExpectedInline(gm.code.strip(), """\
def forward(self, t, y, net_0_weight, net_0_bias, net_2_weight, net_2_bias):
    y_bf16 = y.to(torch.bfloat16);  y = None
    net_0_weight_t = torch.ops.aten.t.default(net_0_weight);  net_0_weight = None
    net_0_bias_bf16 = net_0_bias.to(torch.bfloat16);  net_0_bias = None
    net_0_weight_t_bf16 = net_0_weight_t.to(torch.bfloat16);  net_0_weight_t = None
    addmm = torch.ops.aten.addmm.default(net_0_bias_bf16, y_bf16, net_0_weight_t_bf16);  net_0_bias_bf16 = y_bf16 = net_0_weight_t_bf16 = None
    tanh = torch.ops.aten.tanh.default(addmm);  addmm = None
    net_2_weight_t = torch.ops.aten.t.default(net_2_weight);  net_2_weight = None
    net_2_bias_bf16 = net_2_bias.to(torch.bfloat16);  net_2_bias = None
    net_2_weight_t_bf16 = net_2_weight_t.to(torch.bfloat16);  net_2_weight_t = None
    addmm_1 = torch.ops.aten.addmm.default(net_2_bias_bf16, tanh, net_2_weight_t_bf16);  net_2_bias_bf16 = tanh = net_2_weight_t_bf16 = None
    cos = torch.ops.aten.cos.default(t);  t = None
    mul = torch.ops.aten.mul.Tensor(addmm_1, cos);  addmm_1 = cos = None
    return mul""")
        self.assertExpectedInline(precision_table(gm.graph), """\
y_bf16               bfloat16  the state enters the velocity in low precision
net_0_weight_t       float32   'transpose', which follows its inputs
net_0_bias_bf16      bfloat16  input of 'addmm', a matmul-class op
net_0_weight_t_bf16  bfloat16  input of 'addmm', a matmul-class op
addmm                bfloat16  'addmm', a matmul-class op
tanh                 bfloat16  'tanh', which follows its inputs
net_2_weight_t       float32   'transpose', which follows its inputs
net_2_bias_bf16      bfloat16  input of 'addmm', a matmul-class op
net_2_weight_t_bf16  bfloat16  input of 'addmm', a matmul-class op
addmm_1              bfloat16  'addmm', a matmul-class op
cos                  float32   'cos', which follows its inputs
mul                  bfloat16  'mul', which follows its inputs""")

    def test_conv_with_time_channel_and_group_norm(self):
        gm = lowered(ODENetFunc(), torch.randn(2, 4, 6, 6))
        self.assertExpectedInline(gm.code.strip(), """\
def forward(self, t, y, norm_weight, norm_bias, conv_conv_weight, conv_conv_bias):
    y_bf16 = y.to(torch.bfloat16);  y = None
    y_bf16_fp32 = y_bf16.to(torch.float32);  y_bf16 = None
    native_group_norm = torch.ops.aten.native_group_norm.default(y_bf16_fp32, norm_weight, norm_bias, 2, 4, 36, 2, 1e-05);  y_bf16_fp32 = norm_weight = norm_bias = None
    getitem = native_group_norm[0]
    getitem_1 = native_group_norm[1];  getitem_1 = None
    getitem_2 = native_group_norm[2];  native_group_norm = getitem_2 = None
    relu = torch.ops.aten.relu.default(getitem);  getitem = None
    slice_1 = torch.ops.aten.slice.Tensor(relu, 1, 0, 1)
    ones_like = torch.ops.aten.ones_like.default(slice_1, pin_memory = False);  slice_1 = None
    mul = torch.ops.aten.mul.Tensor(ones_like, t);  ones_like = t = None
    cat = torch.ops.aten.cat.default([mul, relu], 1);  mul = relu = None
    cat_bf16 = cat.to(torch.bfloat16);  cat = None
    conv_conv_weight_bf16 = conv_conv_weight.to(torch.bfloat16);  conv_conv_weight = None
    conv_conv_bias_bf16 = conv_conv_bias.to(torch.bfloat16);  conv_conv_bias = None
    convolution = torch.ops.aten.convolution.default(cat_bf16, conv_conv_weight_bf16, conv_conv_bias_bf16, [1, 1], [1, 1], [1, 1], False, [0, 0], 1);  cat_bf16 = conv_conv_weight_bf16 = conv_conv_bias_bf16 = None
    return convolution""")
        self.assertExpectedInline(precision_table(gm.graph), """\
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

    def test_layer_norm_softplus_mean(self):
        gm = lowered(NormMLP(), torch.randn(3, 4))
        self.assertExpectedInline(precision_table(gm.graph), """\
y_bf16             bfloat16                     the state enters the velocity in low precision
inp_weight_t       float32                      'transpose', which follows its inputs
inp_bias_bf16      bfloat16                     input of 'addmm', a matmul-class op
inp_weight_t_bf16  bfloat16                     input of 'addmm', a matmul-class op
addmm              bfloat16                     'addmm', a matmul-class op
addmm_fp32         float32                      input of 'softplus', a precision-sensitive op
softplus           float32                      'softplus', a precision-sensitive op
native_layer_norm  (float32, float32, float32)  'layer_norm', a precision-sensitive op
getitem            float32                      'getitem', which follows its inputs
getitem_1          float32                      'getitem', which follows its inputs
getitem_2          float32                      'getitem', which follows its inputs
out_weight_t       float32                      'transpose', which follows its inputs
out_bias_bf16      bfloat16                     input of 'addmm', a matmul-class op
getitem_bf16       bfloat16                     input of 'addmm', a matmul-class op
out_weight_t_bf16  bfloat16                     input of 'addmm', a matmul-class op
addmm_1            bfloat16                     'addmm', a matmul-class op
mean               float32                      'mean', a precision-sensitive op
mean_bf16          bfloat16                     input of 'sub', which follows its inputs, next to a bfloat16 input
sub                bfloat16                     'sub', which follows its inputs""")

    def test_tuple_state_in_float16(self):
        gm = lowered(Hamiltonian(), torch.randn(3, 2), torch.randn(3, 2), dtype=torch.float16)
        self.assertExpectedInline(gm.code.strip(), """\
def forward(self, t, y_0, y_1, kinetic_0_weight, kinetic_0_bias, kinetic_2_weight, kinetic_2_bias, potential_0_weight, potential_0_bias, potential_2_weight, potential_2_bias):
    y_0_fp16 = y_0.to(torch.float16);  y_0 = None
    y_1_fp16 = y_1.to(torch.float16);  y_1 = None
    kinetic_0_weight_t = torch.ops.aten.t.default(kinetic_0_weight);  kinetic_0_weight = None
    kinetic_0_bias_fp16 = kinetic_0_bias.to(torch.float16);  kinetic_0_bias = None
    kinetic_0_weight_t_fp16 = kinetic_0_weight_t.to(torch.float16);  kinetic_0_weight_t = None
    addmm = torch.ops.aten.addmm.default(kinetic_0_bias_fp16, y_1_fp16, kinetic_0_weight_t_fp16);  kinetic_0_bias_fp16 = y_1_fp16 = kinetic_0_weight_t_fp16 = None
    tanh = torch.ops.aten.tanh.default(addmm);  addmm = None
    kinetic_2_weight_t = torch.ops.aten.t.default(kinetic_2_weight);  kinetic_2_weight = None
    kinetic_2_bias_fp16 = kinetic_2_bias.to(torch.float16);  kinetic_2_bias = None
    kinetic_2_weight_t_fp16 = kinetic_2_weight_t.to(torch.float16);  kinetic_2_weight_t = None
    addmm_1 = torch.ops.aten.addmm.default(kinetic_2_bias_fp16, tanh, kinetic_2_weight_t_fp16);  kinetic_2_bias_fp16 = tanh = kinetic_2_weight_t_fp16 = None
    potential_0_weight_t = torch.ops.aten.t.default(potential_0_weight);  potential_0_weight = None
    potential_0_bias_fp16 = potential_0_bias.to(torch.float16);  potential_0_bias = None
    potential_0_weight_t_fp16 = potential_0_weight_t.to(torch.float16);  potential_0_weight_t = None
    addmm_2 = torch.ops.aten.addmm.default(potential_0_bias_fp16, y_0_fp16, potential_0_weight_t_fp16);  potential_0_bias_fp16 = y_0_fp16 = potential_0_weight_t_fp16 = None
    tanh_1 = torch.ops.aten.tanh.default(addmm_2);  addmm_2 = None
    potential_2_weight_t = torch.ops.aten.t.default(potential_2_weight);  potential_2_weight = None
    potential_2_bias_fp16 = potential_2_bias.to(torch.float16);  potential_2_bias = None
    potential_2_weight_t_fp16 = potential_2_weight_t.to(torch.float16);  potential_2_weight_t = None
    addmm_3 = torch.ops.aten.addmm.default(potential_2_bias_fp16, tanh_1, potential_2_weight_t_fp16);  potential_2_bias_fp16 = tanh_1 = potential_2_weight_t_fp16 = None
    neg = torch.ops.aten.neg.default(addmm_3);  addmm_3 = None
    return (addmm_1, neg)""")

    def test_policy_override_keeps_tanh_in_float32(self):
        policy = dataclasses.replace(rampde_fx.DEFAULT_POLICY,
                                     full_ops=rampde_fx.DEFAULT_POLICY.full_ops | {"tanh"})
        gm = lowered(TimeMLP(), torch.randn(5, 3), policy=policy)
        self.assertExpectedInline(precision_table(gm.graph), """\
y_bf16               bfloat16  the state enters the velocity in low precision
net_0_weight_t       float32   'transpose', which follows its inputs
net_0_bias_bf16      bfloat16  input of 'addmm', a matmul-class op
net_0_weight_t_bf16  bfloat16  input of 'addmm', a matmul-class op
addmm                bfloat16  'addmm', a matmul-class op
addmm_fp32           float32   input of 'tanh', a precision-sensitive op
tanh                 float32   'tanh', a precision-sensitive op
net_2_weight_t       float32   'transpose', which follows its inputs
net_2_bias_bf16      bfloat16  input of 'addmm', a matmul-class op
tanh_bf16            bfloat16  input of 'addmm', a matmul-class op
net_2_weight_t_bf16  bfloat16  input of 'addmm', a matmul-class op
addmm_1              bfloat16  'addmm', a matmul-class op
cos                  float32   'cos', which follows its inputs
mul                  bfloat16  'mul', which follows its inputs""")

    def test_float32_mode_adds_no_casts(self):
        func = ODENetFunc()
        velocity = capture_velocity(func, torch.tensor(0.0), (torch.randn(2, 4, 6, 6),), False,
                                    torch.float32, rampde_fx.DEFAULT_POLICY)
        self.assertEqual(velocity.graph_module.code, velocity.original_graph_module.code)
        self.assertNotIn(".to(", velocity.graph_module.code)
