"""Unit tests of the graph passes, each on its own, on small graphs traced with make_fx: the
precision rewrite, the capture cleanups, the CPU tanh of the compiled steps, and the step
kernels' recomputation marks and CPU product decompositions."""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.fx as fx
import torch.nn.functional as F
from expecttest import TestCase
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils.checkpoint import CheckpointPolicy

from rampde_fx import runtime
from rampde_fx.capture.trace import TracingHooks
from rampde_fx.passes.cleanup import USER_DETACH, drop_autograd_detaches, with_readable_names
from rampde_fx.passes.cpu import (CPU_PRODUCTS, cpu_addmm, cpu_kernel_transform, cpu_mm,
                                  instance_norms_as_reductions, lower_for_cpu_kernels,
                                  tanh_for_cpu_kernels, use_cpu_tanh)
from rampde_fx.passes.precision import NodePrecision, rewrite_for_precision, written_arguments
from rampde_fx.passes.recompute import recompute_casts_of_lifted
from rampde_fx.policy import DEFAULT_POLICY, Precision

aten = torch.ops.aten
BF16_UNIT = 2.0 ** -8  # bfloat16's unit roundoff


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of ``a`` against ``b`` in the 2-norm, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def rewritten(fn, args, low_dtype=torch.bfloat16, policy=DEFAULT_POLICY, state=("y_1",)):
    """``fn`` traced with make_fx on ``args`` and rewritten; the original and the rewrite."""
    original = make_fx(fn)(*args)
    graph = rewrite_for_precision(original.graph, args, low_dtype, policy, set(state))
    return original, fx.GraphModule(original, graph)


def calls(gm: fx.GraphModule, *targets) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def casts(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "to"]


def float_inputs(node: fx.Node) -> list[fx.Node]:
    return [n for n in node.all_input_nodes
            if isinstance(n.meta["val"], torch.Tensor) and n.meta["val"].is_floating_point()]


def dtype_of(node: fx.Node) -> torch.dtype:
    return node.meta["val"].dtype


def spelled(node: fx.Node) -> str:
    """A node as the expression of its op over its input nodes: ``t(_to_copy(w_1))``."""
    if node.op == "placeholder":
        return node.name
    name = node.target.overloadpacket.__name__
    return f"{name}({', '.join(spelled(n) for n in node.all_input_nodes)})"


def mlp(t, y, w, b, v):
    """addmm, mm, a FULL exp and sum and softmax, FOLLOW ops after each, and the time."""
    h = torch.tanh(F.linear(y, w, b) * t)
    g = torch.softmax(h @ v, dim=-1) * 2
    return g + y.exp().sum(-1, keepdim=True) - h[:, :3]


def mlp_inputs():
    torch.manual_seed(0)
    return (torch.tensor(0.75), torch.randn(5, 3), torch.randn(4, 3) / 2, torch.randn(4),
            torch.randn(4, 3) / 2)


def conv(t, y, w, b, gamma, beta):
    """A convolution followed by a FULL group norm, with the time as an extra channel."""
    tt = t.expand(y.shape[0], 1, *y.shape[2:]) * 2 + t.sin()
    h = F.conv2d(torch.cat([tt, y], 1), w, b, padding=1)
    return torch.relu(F.group_norm(h, 2, gamma, beta))


def conv_inputs():
    torch.manual_seed(0)
    return (torch.tensor(0.5), torch.randn(2, 3, 5, 5), torch.randn(4, 4, 3, 3) / 4,
            torch.randn(4), torch.rand(4) + 0.5, torch.randn(4))


class Recorder(fx.Interpreter):
    """Runs a graph module and keeps every node's value by name."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, object] = {}

    def run_node(self, node):
        self.values[node.name] = value = super().run_node(node)
        return value


class PrecisionRewrite(TestCase):
    def test_low_ops_get_low_inputs_and_full_ops_float32(self):
        """Every floating input of addmm, mm and convolution is bfloat16 (weights and bias
        included); every floating input of exp, sum, native_group_norm and _softmax is
        float32; their outputs have those dtypes too."""
        for fn, args in [(mlp, mlp_inputs()), (conv, conv_inputs())]:
            _, gm = rewritten(fn, args)
            low = calls(gm, aten.addmm.default, aten.mm.default, aten.convolution.default)
            full = calls(gm, aten.exp.default, aten.sum.dim_IntList, aten._softmax.default,
                         aten.native_group_norm.default)
            self.assertEqual(len(low), 2 if fn is mlp else 1)
            self.assertEqual(len(full), 3 if fn is mlp else 1)
            for node in low:
                self.assertEqual({dtype_of(n) for n in float_inputs(node)}, {torch.bfloat16})
                self.assertEqual(dtype_of(node), torch.bfloat16)
            for node in full:
                self.assertEqual({dtype_of(n) for n in float_inputs(node)}, {torch.float32})
                values = node.meta["val"]
                values = values if isinstance(values, tuple) else (values,)
                self.assertEqual({v.dtype for v in values}, {torch.float32})

    def test_follow_ops_follow_their_inputs(self):
        """A FOLLOW op with a bfloat16 input gets its other dimensioned floating inputs cast
        to bfloat16 and runs in bfloat16; a zero-dim float32 input (the time) is left to type
        promotion; a FOLLOW op of float32 inputs only (the weight's transpose, what follows a
        FULL op) stays float32."""
        _, gm = rewritten(mlp, mlp_inputs())
        (transpose,) = calls(gm, aten.t.default)
        self.assertEqual(transpose.args[0].name, "w_1")
        self.assertEqual(dtype_of(transpose), torch.float32)
        (scale_by_time,) = [n for n in calls(gm, aten.mul.Tensor) if "t_1" in map(str, n.args)]
        self.assertEqual(dtype_of(scale_by_time.args[0]), torch.bfloat16)
        self.assertEqual(dtype_of(scale_by_time), torch.bfloat16)
        (softmax_times_two,) = [n for n in calls(gm, aten.mul.Tensor) if n.args[1] == 2]
        self.assertEqual(dtype_of(softmax_times_two), torch.float32)
        # g (float32, after softmax) plus the float32 sum stays float32; subtracting a slice
        # of h (bfloat16) casts that sum down.
        (add,) = calls(gm, aten.add.Tensor)
        self.assertEqual(dtype_of(add), torch.float32)
        (sub,) = calls(gm, aten.sub.Tensor)
        self.assertEqual([n.name for n in sub.args], ["add_bf16", "slice_1"])
        self.assertEqual(dtype_of(sub.args[1]), torch.bfloat16)
        self.assertEqual(dtype_of(sub), torch.bfloat16)

    def test_state_enters_low_and_the_time_stays_float32_until_it_meets_it(self):
        """The state placeholder's only user is its cast to bfloat16, the one cast made for
        the state's entry; the other inputs enter as they are (the weights are cast where a
        LOW op reads them, the time is never cast). The nodes computed from the time alone
        stay float32, and the time channel is cast where it meets the state (the
        concatenation)."""
        _, gm = rewritten(conv, conv_inputs())
        placeholders = {n.name: n for n in gm.graph.find_nodes(op="placeholder")}
        (state_cast,) = placeholders["y_1"].users
        self.assertEqual((state_cast.op, state_cast.target, state_cast.args[1]),
                         ("call_method", "to", torch.bfloat16))
        self.assertEqual(state_cast.name, "y_1_bf16")
        entries = [n for n in casts(gm) if n.meta["rampde_precision"].reason
                   == "the state enters the velocity in low precision"]
        self.assertEqual(entries, [state_cast])
        self.assertFalse(any(u in casts(gm) for u in placeholders["t_1"].users))
        from_time = [calls(gm, aten.expand.default)[0], calls(gm, aten.sin.default)[0],
                     calls(gm, aten.mul.Tensor)[0], calls(gm, aten.add.Tensor)[0]]
        self.assertEqual({dtype_of(n) for n in from_time}, {torch.float32})
        (cat,) = calls(gm, aten.cat.default)
        self.assertEqual([n.name for n in cat.args[0]], ["add_bf16", "y_1_bf16"])
        self.assertEqual(dtype_of(cat), torch.bfloat16)

    def test_every_state_component_is_cast(self):
        """With a state of two components, both placeholders are cast to the low dtype."""
        args = (torch.tensor(0.0), torch.randn(3, 2), torch.randn(3, 2))
        _, gm = rewritten(lambda t, a, b: (a * b, a - b), args, state=("a_1", "b_1"))
        self.assertEqual(sorted(n.name for n in casts(gm)), ["a_1_bf16", "b_1_bf16"])
        for node in calls(gm, aten.mul.Tensor, aten.sub.Tensor):
            self.assertEqual([n.name for n in node.args], ["a_1_bf16", "b_1_bf16"])

    def test_casts_are_shared(self):
        """One cast node per (node, dtype): the weight read by two products, the state read
        by two products and a mul, its float32 copy read by two FULL ops."""
        def fn(t, y, w):
            return (y @ w) + ((y * 2) @ w) + (y @ w.t()) + y.exp() * y.sum()

        args = (torch.tensor(0.0), torch.randn(3, 3), torch.randn(3, 3))
        _, gm = rewritten(fn, args)
        keys = [(n.args[0], n.args[1]) for n in casts(gm)]
        self.assertEqual(len(keys), len(set(keys)))
        self.assertEqual(sorted(n.name for n in casts(gm)),
                         ["mul_1_bf16", "t_bf16", "w_1_bf16", "y_1_bf16", "y_1_bf16_fp32"])
        users = {n.name: {u.name for u in n.users} for n in casts(gm)}
        self.assertEqual(users["y_1_bf16"], {"mm", "mul", "mm_2", "y_1_bf16_fp32"})
        self.assertEqual(users["w_1_bf16"], {"mm", "mm_1"})
        self.assertEqual(users["y_1_bf16_fp32"], {"exp", "sum_1"})

    def test_written_arguments_are_never_cast(self):
        """An in-place op's written argument (a float32 buffer) is not replaced by a cast,
        whatever the op's class: the write lands in the tensor the graph reads later."""
        def fn(t, y, w):
            buffer = torch.zeros(4, 3)
            buffer.add_(y)
            total = torch.zeros(4, 3)
            total.copy_(torch.mm(y, w))
            return buffer * total

        torch.manual_seed(0)
        args = (torch.tensor(0.0), torch.rand(4, 3) + 0.5, torch.rand(3, 3) + 0.5)
        _, gm = rewritten(fn, args)
        for target in (aten.add_.Tensor, aten.copy_.default):
            (node,) = calls(gm, target)
            self.assertEqual(node.args[0].target, aten.zeros.default)
            self.assertEqual(dtype_of(node), torch.float32)
        self.assertExpectedInline(gm.code.strip(), """\
def forward(self, t_1, y_1, w_1):
    y_1_bf16 = y_1.to(torch.bfloat16);  y_1 = None
    zeros = torch.ops.aten.zeros.default([4, 3], device = device(type='cpu'), pin_memory = False)
    add_ = torch.ops.aten.add_.Tensor(zeros, y_1_bf16);  zeros = None
    zeros_1 = torch.ops.aten.zeros.default([4, 3], device = device(type='cpu'), pin_memory = False)
    w_1_bf16 = w_1.to(torch.bfloat16);  w_1 = None
    mm = torch.ops.aten.mm.default(y_1_bf16, w_1_bf16);  y_1_bf16 = w_1_bf16 = None
    copy_ = torch.ops.aten.copy_.default(zeros_1, mm);  zeros_1 = mm = None
    mul = torch.ops.aten.mul.Tensor(add_, copy_);  add_ = copy_ = None
    return mul""")
        # Positive operands: no cancellation, each entry within a few bfloat16 roundings.
        self.assertLess(rel_err(gm(*args), fn(*(x.double() for x in args))), 4 * BF16_UNIT)

    def test_written_arguments_reads_the_schema(self):
        """``written_arguments`` names the arguments an op's schema marks as written: ``self``
        of ``add_``, the ``out=`` keyword of ``mm.out``; none for functional ops, methods and
        placeholders."""
        def fn(y, w):
            out = torch.empty(2, 2)
            torch.mm(y, w, out=out)
            return y.add_(1.0) + out + y.to(torch.float64).float()

        gm = make_fx(fn)(torch.randn(2, 2), torch.randn(2, 2))
        (add_,) = calls(gm, aten.add_.Tensor)
        (mm_out,) = calls(gm, aten.mm.out)
        self.assertEqual(written_arguments(add_), [add_.args[0]])
        self.assertEqual(written_arguments(mm_out), [mm_out.kwargs["out"]])
        for node in gm.graph.nodes:
            if node not in (add_, mm_out):
                self.assertEqual(written_arguments(node), [], node.name)
        graph = fx.Graph()
        method = graph.call_method("add_", (graph.placeholder("x"), 1.0))
        self.assertEqual(written_arguments(method), [])

    def test_every_node_records_its_precision_and_its_dtype(self):
        """Every emitted node has a NodePrecision: None for casts and inputs, the policy's
        class for compute nodes; its recorded value has the dtype and shape the node has when
        the rewritten graph runs."""
        for fn, args in [(mlp, mlp_inputs()), (conv, conv_inputs())]:
            _, gm = rewritten(fn, args)
            recorder = Recorder(gm)
            recorder.run(*args)
            ran = recorder.values
            for node in gm.graph.nodes:
                if node.op == "output":
                    continue
                why = node.meta["rampde_precision"]
                self.assertIsInstance(why, NodePrecision)
                self.assertTrue(why.reason)
                if node.op == "call_function":
                    self.assertIs(why.precision, DEFAULT_POLICY.classify(node)[0])
                else:
                    self.assertIsNone(why.precision, node.name)
                for value, fake in zip(torch.utils._pytree.tree_leaves(ran[node.name]),
                                       torch.utils._pytree.tree_leaves(node.meta["val"])):
                    if isinstance(value, torch.Tensor):
                        self.assertEqual((value.dtype, value.shape), (fake.dtype, fake.shape))

    def test_bfloat16_rewrite_is_within_bfloat16_accuracy(self):
        """The rewritten graphs against the functions in float64: within a few units of
        bfloat16's roundoff (inputs rounded once, products accumulated in float32, a few
        bfloat16 roundings on the way)."""
        for fn, args in [(mlp, mlp_inputs()), (conv, conv_inputs())]:
            _, gm = rewritten(fn, args)
            got = gm(*args)
            self.assertEqual(got.dtype, torch.float32 if fn is conv else torch.bfloat16)
            exact = fn(*(x.double() for x in args))
            self.assertLess(rel_err(got, exact), 4 * BF16_UNIT)
            self.assertGreater(rel_err(got, exact), 0)

    def test_float32_low_dtype_changes_nothing(self):
        """With float32 as the low dtype there is nothing to cast: the rewrite emits no casts
        and computes bitwise what the traced graph computes."""
        for fn, args in [(mlp, mlp_inputs()), (conv, conv_inputs())]:
            original, gm = rewritten(fn, args, low_dtype=torch.float32)
            self.assertEqual(casts(gm), [])
            self.assertEqual([n.target for n in gm.graph.nodes],
                             [n.target for n in original.graph.nodes])
            self.assertTrue(torch.equal(gm(*args), original(*args)))

    def test_custom_policies(self):
        """``with_full_ops({"tanh"})`` runs tanh on a float32 copy of its bfloat16 input
        (the product after it still gets bfloat16); ``with_full_ops({"addmm"})`` runs the
        linear layer in float32 on the state cast up from bfloat16, where it entered; an
        override runs exp in bfloat16 and says so. Both stay within bfloat16 accuracy."""
        exact = mlp(*(x.double() for x in mlp_inputs()))
        _, gm = rewritten(mlp, mlp_inputs(), policy=DEFAULT_POLICY.with_full_ops({"tanh"}))
        (tanh,) = calls(gm, aten.tanh.default)
        self.assertEqual(tanh.args[0].name, "mul_fp32")
        self.assertEqual(dtype_of(tanh), torch.float32)
        (mm,) = calls(gm, aten.mm.default)
        self.assertEqual([n.name for n in mm.args], ["tanh_bf16", "v_1_bf16"])
        self.assertLess(rel_err(gm(*mlp_inputs()), exact), 4 * BF16_UNIT)

        policy = dataclasses.replace(
            DEFAULT_POLICY.with_full_ops({"addmm"}),
            override=lambda name, node: Precision.LOW if name == "exp" else None)
        _, gm = rewritten(mlp, mlp_inputs(), policy=policy)
        (addmm,) = calls(gm, aten.addmm.default)
        self.assertEqual([n.name for n in addmm.args], ["b_1", "y_1_bf16_fp32", "t"])
        self.assertEqual(dtype_of(addmm), torch.float32)
        (exp,) = calls(gm, aten.exp.default)
        self.assertEqual(exp.args[0].name, "y_1_bf16")
        self.assertEqual(exp.meta["rampde_precision"],
                         NodePrecision(Precision.LOW, "'exp', by policy override"))
        self.assertLess(rel_err(gm(*mlp_inputs()), exact), 4 * BF16_UNIT)


class CaptureCleanup(TestCase):
    def test_autograd_detaches_are_dropped(self):
        """A velocity that differentiates itself with create_graph=True: make_fx records
        detaches of the saved tanh output; they go, tanh_backward reads tanh itself, and the
        graph computes the same."""
        def fn(x):
            with torch.enable_grad():
                y = x.tanh()
                return torch.autograd.grad(y.sum(), x, create_graph=True)[0]

        x = torch.randn(5, requires_grad=True)
        with torch.enable_grad():
            gm = make_fx(fn, tracing_mode="fake")(x)
        self.assertGreater(len(calls(gm, aten.detach.default)), 0)
        before = gm(x)
        drop_autograd_detaches(gm.graph)
        gm.recompile()
        self.assertEqual(calls(gm, aten.detach.default), [])
        (backward,) = calls(gm, aten.tanh_backward.default)
        self.assertIs(backward.args[1].target, aten.tanh.default)
        self.assertTrue(torch.equal(gm(x), before))

    def test_user_detaches_are_kept(self):
        """Detaches that the user's code asks for are tagged while tracing and stay; the
        ones autograd records beside them go."""
        def fn(t, x):
            with TracingHooks(t, t, {}), torch.enable_grad():
                y = x.tanh()
                return y * y.detach()

        with torch.enable_grad():
            gm = make_fx(fn, tracing_mode="fake")(torch.tensor(0.0),
                                                 torch.randn(4, requires_grad=True))
        detaches = calls(gm, aten.detach.default)
        tagged = [n for n in detaches if n.meta.get(USER_DETACH)]
        self.assertEqual(len(tagged), 1)
        self.assertGreater(len(detaches), 1)
        drop_autograd_detaches(gm.graph)
        self.assertEqual(calls(gm, aten.detach.default), tagged)
        (mul,) = calls(gm, aten.mul.Tensor)
        self.assertEqual(mul.args[1], tagged[0])

    def test_hand_tagged_detach_is_kept(self):
        """On a graph built by hand: the untagged detach is replaced by its input in every
        use, the one tagged with USER_DETACH stays."""
        graph = fx.Graph()
        x = graph.placeholder("x")
        dropped = graph.call_function(aten.detach.default, (x,))
        kept = graph.call_function(aten.detach.default, (x,))
        kept.meta[USER_DETACH] = True
        graph.output(graph.call_function(aten.mul.Tensor, (dropped, kept)))
        drop_autograd_detaches(graph)
        (mul,) = [n for n in graph.nodes if n.target is aten.mul.Tensor]
        self.assertEqual(mul.args, (x, kept))
        self.assertEqual(len(graph.nodes), 4)

    def test_readable_names(self):
        """Placeholders get the given names (also ``t``, which make_fx gave to a transpose),
        their metadata is kept, a transpose of an input is named ``<input>_t``, other
        transposes are not, and the graph computes the same."""
        def fn(t, y, w):
            return F.linear(y, w) * t + (y * 2).t().sum()

        args = (torch.tensor(0.5), torch.randn(3, 3), torch.randn(4, 3))
        gm = make_fx(fn)(*args)
        graph = with_readable_names(gm.graph, ["t", "y", "net_0_weight"])
        readable = fx.GraphModule(gm, graph)
        placeholders = list(graph.find_nodes(op="placeholder"))
        self.assertEqual([n.name for n in placeholders], ["t", "y", "net_0_weight"])
        for old, new in zip(gm.graph.find_nodes(op="placeholder"), placeholders):
            self.assertIs(new.meta["val"], old.meta["val"])
        transposes = [n for n in graph.nodes if n.target is aten.t.default]
        self.assertEqual(transposes[0].name, "net_0_weight_t")
        self.assertEqual(len(transposes), 2)
        self.assertFalse(transposes[1].name.endswith("_t"))
        self.assertTrue(torch.equal(readable(*args), gm(*args)))


class CpuTanh(TestCase):
    def test_graph_pass_replaces_every_tanh(self):
        """``use_cpu_tanh`` retargets every aten.tanh node; the graph's values are within
        2e-6 relative of torch.tanh in float32 (plus torch.tanh's own ulp) near 0, far out
        (beyond the saturation at 9), at 0 (signed) and at +-inf, where they are exact."""
        def fn(x):
            return torch.tanh(x), torch.sigmoid(x), torch.tanh(2 * x)

        x = torch.cat([torch.linspace(-0.2, 0.2, 4001), torch.linspace(-20, 20, 4001),
                       torch.tensor([1e-30, -1e-38, 1e4])])
        gm = make_fx(fn)(x)
        use_cpu_tanh(gm.graph)
        gm.recompile()
        self.assertEqual(calls(gm, aten.tanh.default), [])
        self.assertEqual(len(calls(gm, tanh_for_cpu_kernels)), 2)
        self.assertEqual(len(calls(gm, aten.sigmoid.default)), 1)
        for got, reference in zip(gm(x), fn(x)):
            reference = reference.double()
            bound = (2e-6 + 2.0 ** -23) * reference.abs()
            self.assertTrue(((got.double() - reference).abs() <= bound).all())
        special = torch.tensor([0.0, -0.0, float("inf"), float("-inf")])
        got = gm(special)[0]
        self.assertTrue(torch.equal(got, torch.tensor([0.0, 0.0, 1.0, -1.0])))
        self.assertTrue(torch.equal(torch.signbit(got), torch.tensor([False, True, False, True])))

    def test_backward_is_one_minus_y_squared_times_g(self):
        """The backward through the rewritten graph is (1 - y**2) g, from the rounded output
        y, computed in float32: within float32's rounding of it for float32 inputs, and within
        one rounding of the 16-bit dtype for bfloat16 and float16 inputs."""
        torch.manual_seed(0)
        x = torch.cat([torch.randn(2000) * 3, torch.tensor([0.0, 0.01, -0.05, 30.0])])
        g = torch.randn_like(x)
        for dtype, unit in [(torch.float32, 2.0 ** -24), (torch.bfloat16, 2.0 ** -8),
                            (torch.float16, 2.0 ** -11)]:
            leaf = x.to(dtype).requires_grad_()
            gm = make_fx(torch.tanh)(leaf.detach())
            use_cpu_tanh(gm.graph)
            gm.recompile()
            y = gm(leaf)
            (grad,) = torch.autograd.grad(y, leaf, g.to(dtype))
            self.assertEqual(grad.dtype, dtype)
            exact = (1 - y.detach().double() ** 2) * g.to(dtype).double()
            error = (grad.double() - exact).abs()
            tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps / 2
            bound = unit * exact.abs() + 4 * 2.0 ** -24 * g.to(dtype).double().abs() + tiny
            self.assertTrue((error <= bound).all(), dtype)

    def test_every_16bit_value_within_one_rounding(self):
        """Over every finite bfloat16 and float16 input, the result is the exact tanh up to
        the dtype's unit roundoff plus the float32 formula's 2e-6: one rounding of a value
        that is already within 2e-6."""
        for dtype, unit in [(torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)]:
            bits = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16)
            x = bits.view(dtype)
            x = x[torch.isfinite(x)]
            exact = torch.tanh(x.double())
            got = tanh_for_cpu_kernels(x).double()
            tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps / 2
            self.assertTrue(((got - exact).abs() <= (unit + 2e-6) * exact.abs() + tiny).all())

    def testcpu_kernel_transform_only_for_16bit_cpu_without_kept_activations(self):
        """The CPU tanh applies to 16-bit dtypes on CPU unless the solve keeps its stage
        activations; float32, float64, other devices and kept activations get no transform."""
        cpu = torch.device("cpu")
        for dtype in (torch.bfloat16, torch.float16):
            self.assertIs(cpu_kernel_transform(dtype, cpu, False), lower_for_cpu_kernels)
            self.assertIsNone(cpu_kernel_transform(dtype, cpu, True))
            for other in (torch.device("cuda"), torch.device("meta")):
                self.assertIsNone(cpu_kernel_transform(dtype, other, False))
        for dtype in (torch.float32, torch.float64):
            self.assertIsNone(cpu_kernel_transform(dtype, cpu, False))


class InstanceNormReductions(TestCase):
    """``instance_norms_as_reductions`` on graphs traced from ``F.instance_norm``."""

    @staticmethod
    def _traced(fn, *args):
        return make_fx(fn)(*args)

    def test_instance_norms_become_reductions_over_the_spatial_dimensions(self):
        """With and without affine parameters, on 1-D, 2-D and 3-D inputs, in float32 and
        through a cast from bf16 (as the precision rewrite leaves them): no batch norm is left,
        and the result equals the original's to float32 roundoff against float64, values and
        gradients."""
        torch.manual_seed(0)
        for shape in ((3, 5, 7), (2, 4, 6, 5), (2, 3, 4, 3, 5)):
            for affine in (False, True):
                for dtype in (torch.float32, torch.bfloat16):
                    x = torch.randn(shape).to(dtype)
                    weight, bias = torch.randn(shape[1]), torch.randn(shape[1])

                    def norm(x, weight, bias):
                        wide = torch.promote_types(x.dtype, torch.float32)
                        return F.instance_norm(x.to(wide), weight=weight if affine else None,
                                               bias=bias if affine else None, eps=1e-3)

                    gm = self._traced(norm, x, weight, bias)
                    instance_norms_as_reductions(gm.graph)
                    gm.recompile()
                    self.assertFalse(any("batch_norm" in str(n.target) for n in gm.graph.nodes))
                    inputs = [x, weight.requires_grad_(), bias.requires_grad_()]
                    got = gm(*inputs)
                    want = norm(x.double(), weight.double(), bias.double())
                    self.assertLess(((got - want).norm() / want.norm()).item(), 1e-6)
                    if affine:
                        for g, w in zip(torch.autograd.grad(got.square().sum(), inputs[1:]),
                                        torch.autograd.grad(want.square().sum(), inputs[1:])):
                            self.assertLess(((g - w).norm() / w.norm()).item(), 1e-5)

    def test_other_normalisations_are_left_alone(self):
        """Batch norm in training, and instance norm with running statistics (which updates
        them), keep their graphs."""
        x = torch.randn(4, 3, 5, 5)
        mean, var = torch.zeros(3), torch.ones(3)
        for fn in (lambda x: F.batch_norm(x, None, None, training=True),
                   lambda x: F.instance_norm(x, mean, var, use_input_stats=True)):
            gm = self._traced(fn, x)
            before = gm.code
            instance_norms_as_reductions(gm.graph)
            gm.recompile()
            self.assertEqual(gm.code, before)


class StepKernelPasses(TestCase):
    def test_recompute_marks_only_casts_and_views_of_lifted_inputs(self):
        """Casts and views of the last n_lifted placeholders, and views of those, are marked
        PREFER_RECOMPUTE; casts of the state, ops that compute (w * 2) and what reads them,
        and ops mixing lifted and other inputs are not; n_lifted=0 marks nothing."""
        def fn(t, y, w, b, s):
            h = F.linear(y.to(torch.bfloat16), w.to(torch.bfloat16), b.to(torch.bfloat16))
            h = h * (w * 2).to(torch.bfloat16).t()[:1]
            return h + s.unsqueeze(0).expand(4, 3) + y * w.t()[0]

        args = (torch.tensor(0.5), torch.randn(4, 3), torch.randn(3, 3), torch.randn(3),
                torch.randn(3))
        gm = make_fx(fn)(*args)
        recompute_casts_of_lifted(gm.graph, 0)
        self.assertFalse(any("recompute" in n.meta for n in gm.graph.nodes))
        recompute_casts_of_lifted(gm.graph, 3)
        marked = {n.name: n.meta["recompute"] for n in gm.graph.nodes if "recompute" in n.meta}
        self.assertEqual(set(marked.values()), {CheckpointPolicy.PREFER_RECOMPUTE})
        self.assertEqual({spelled(n) for n in gm.graph.nodes if "recompute" in n.meta},
                         {"_to_copy(w_1)", "_to_copy(b_1)", "t(_to_copy(w_1))", "t(w_1)",
                          "unsqueeze(s_1)", "expand(unsqueeze(s_1))"})

    def test_small_products_become_float32_arithmetic(self):
        """Traced with the CPU decompositions, a small mm and addmm in bfloat16 hold no library
        product: operands widened to float32, multiplied, summed (and the bias added) in
        float32, rounded once. Every entry is within bfloat16's rounding of the float64
        product of the same operands, plus float32 summation error."""
        torch.manual_seed(0)
        a, b, bias = (x.bfloat16() for x in (torch.randn(16, 16), torch.randn(16, 4),
                                                 torch.randn(4)))
        for fn, args, exact in [
                (torch.mm, (a, b), a.double() @ b.double()),
                (torch.addmm, (bias, a, b), bias.double() + a.double() @ b.double())]:
            gm = make_fx(fn, decomposition_table=CPU_PRODUCTS)(*args)
            self.assertEqual(calls(gm, aten.mm.default, aten.addmm.default), [])
            (total,) = calls(gm, aten.sum.dim_IntList)
            self.assertEqual(dtype_of(total), torch.float32)
            got = gm(*args)
            self.assertEqual(got.dtype, torch.bfloat16)
            magnitude = a.double().abs() @ b.double().abs() + (bias.double().abs() if fn
                                                                is torch.addmm else 0)
            bound = BF16_UNIT * exact.abs() + 2.0 ** -16 * magnitude
            self.assertTrue(((got.double() - exact).abs() <= bound).all())
            self.assertTrue(torch.equal(got, (cpu_mm if fn is torch.mm else cpu_addmm)(*args)))

    def test_products_up_to_the_threshold_are_decomposed(self):
        """mm of exactly settings.small_matmul multiply-adds is arithmetic; one more column is not;
        float32 operands are summed in float32 too."""
        torch.manual_seed(0)
        side = round(runtime.settings.small_matmul ** (1 / 3))
        self.assertEqual(side ** 3, runtime.settings.small_matmul)
        a = torch.randn(side, side)
        self.assertIsInstance(cpu_mm(a, torch.randn(side, side)), torch.Tensor)
        self.assertIs(cpu_mm(a, torch.randn(side, side + 1)), NotImplemented)
        self.assertIs(cpu_addmm(torch.randn(side + 1), a, torch.randn(side, side + 1)),
                      NotImplemented)
        exact = a.double() @ a.double()
        got = cpu_mm(a, a)
        self.assertEqual(got.dtype, torch.float32)
        self.assertLess(rel_err(got, exact), 1e-6)

    def test_decompositions_hand_back_what_they_do_not_cover(self):
        """beta or alpha other than 1 and non-CPU operands return NotImplemented, before
        computing anything: the traced graph keeps the single addmm."""
        a, b, bias = torch.randn(4, 5), torch.randn(5, 3), torch.randn(3)
        for scales in ({"beta": 2}, {"alpha": 0.5}, {"beta": 0, "alpha": 1}):
            self.assertIs(cpu_addmm(bias, a, b, **scales), NotImplemented)
            gm = make_fx(functools.partial(torch.addmm, **scales),
                         decomposition_table=CPU_PRODUCTS)(bias, a, b)
            self.assertEqual([n.target for n in gm.graph.nodes if n.op == "call_function"],
                             [aten.addmm.default])
        meta = [x.to("meta") for x in (bias, a, b)]
        self.assertIs(cpu_addmm(*meta), NotImplemented)
        self.assertIs(cpu_mm(*meta[1:]), NotImplemented)

    def test_small_16bit_products_become_widened_float32_products(self):
        """A 16-bit mm or addmm of at most settings.widened_matmul multiply-adds (at least 16
        inner terms, 32 columns) is a float32 library mm of its operands widened to float32,
        rounded once: exactly the float32 product of the 16-bit values, within the 16-bit
        dtype's rounding of the float64 product plus float32 summation error."""
        torch.manual_seed(0)
        for dtype, unit in [(torch.bfloat16, BF16_UNIT), (torch.float16, 2.0 ** -11)]:
            a, b, bias = (x.to(dtype) for x in (torch.randn(64, 64), torch.randn(64, 128),
                                                torch.randn(128)))
            for fn, args in [(torch.mm, (a, b)), (torch.addmm, (bias, a, b))]:
                gm = make_fx(fn, decomposition_table=CPU_PRODUCTS)(*args)
                self.assertEqual(calls(gm, aten.addmm.default), [])
                (mm,) = calls(gm, aten.mm.default)
                self.assertEqual([dtype_of(n) for n in (*mm.args, mm)], [torch.float32] * 3)
                got = gm(*args)
                self.assertEqual(got.dtype, dtype)
                wide = a.float() @ b.float() + (bias.float() if fn is torch.addmm else 0)
                self.assertTrue(torch.equal(got, wide.to(dtype)))
                exact = a.double() @ b.double() + (bias.double() if fn is torch.addmm else 0)
                magnitude = a.double().abs() @ b.double().abs()
                bound = unit * exact.abs() + 2.0 ** -18 * magnitude
                self.assertTrue(((got.double() - exact).abs() <= bound).all())

    def test_widened_products_up_to_the_threshold(self):
        """Exactly settings.widened_matmul multiply-adds are widened; one more column, fewer
        than 16 inner terms or 32 columns, float32 operands or widened_matmul=0 keep the
        product as it is (a library call in its own dtype)."""
        def product_dtype(a, b):
            gm = make_fx(torch.mm, decomposition_table=CPU_PRODUCTS)(a, b)
            (mm,) = calls(gm, aten.mm.default)
            return dtype_of(mm)

        limit = runtime.settings.widened_matmul
        self.assertEqual(limit, 2**19)
        low = functools.partial(torch.randn, dtype=torch.bfloat16)
        self.assertEqual(product_dtype(low(128, 64), low(64, 64)), torch.float32)
        for a, b in [(low(128, 64), low(64, 65)), (low(4096, 8), low(8, 64)),
                     (low(256, 64), low(64, 16)), (torch.randn(64, 64), torch.randn(64, 64))]:
            self.assertEqual(product_dtype(a, b), a.dtype)
        with runtime.patch(widened_matmul=0):
            self.assertEqual(product_dtype(low(64, 64), low(64, 64)), torch.bfloat16)

    def test_large_16bit_addmm_adds_its_bias_in_float32(self):
        """Above both thresholds a bfloat16 addmm becomes a bfloat16 library mm whose result
        and bias are added in float32, then rounded; a float32 one stays an addmm."""
        a, b, bias = torch.randn(64, 128), torch.randn(128, 128), torch.randn(128)
        low = [x.bfloat16() for x in (bias, a, b)]
        gm = make_fx(torch.addmm, decomposition_table=CPU_PRODUCTS)(*low)
        self.assertEqual(calls(gm, aten.addmm.default), [])
        (mm,) = calls(gm, aten.mm.default)
        self.assertEqual(dtype_of(mm), torch.bfloat16)
        (add,) = calls(gm, aten.add.Tensor)
        self.assertEqual([dtype_of(n) for n in (*add.args, add)], [torch.float32] * 3)
        self.assertEqual(gm(*low).dtype, torch.bfloat16)
        self.assertIs(cpu_addmm(bias, a, b), NotImplemented)
        self.assertIs(cpu_mm(a, b), NotImplemented)
