"""Operators of real CNNs: each runs on the NPU exactly (the contract, hw_model.reference) or falls back to
the CPU exactly (vs ``compile(..., offload=False)``) with a reason naming the op."""
from __future__ import annotations

import numpy as np
import pytest

import ioso_tvm
from ioso_tvm.testing import QDQBuilder


def _run(b: QDQBuilder, outs, seed: int = 0, reference: bool = True, **kw):
    """(compiled model, its outputs, the contract's outputs (None without ``reference``: a float op has none),
    the outputs compiled with offload=False)."""
    m = b.model(outs)
    cm = ioso_tvm.compile(m, **kw)
    x = (np.random.default_rng(seed).standard_normal(b.shape) * 2).astype(np.float32)
    got = cm.run(x)
    got = [got] if isinstance(got, np.ndarray) else list(got)
    off = ioso_tvm.compile(m, offload=False).run(x)
    off = [off] if isinstance(off, np.ndarray) else list(off)
    return cm, got, b.run_reference(x, outs) if reference else None, off


def _rows(cm, kind: str) -> list[dict]:
    return [r for r in cm.report()["layers"] if r["kind"] == kind]


def _assert_exact(got, want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype and np.array_equal(g, w)


@pytest.mark.parametrize("seed", range(6))
def test_average_pool_runs_on_the_npu_bit_exact(seed):
    """AveragePool (kernel / stride, no padding) between ISG convs: a layer avgpool<i> (kind gap) on the NPU,
    equal to hw_model.reference.avg_pool2d; the group permutation around it stays exact."""
    rng = np.random.default_rng(seed)
    c, hw = int(rng.choice([8, 16, 20, 32])), int(rng.integers(5, 10))
    b = QDQBuilder((1, c, hw, hw), rng, signed=bool(rng.integers(2)))
    x = b.conv(b.input, int(rng.choice([16, 32])), isg=True)
    kernel = int(rng.integers(1, 4))
    y = b.avgpool(x, kernel=kernel, stride=int(rng.integers(1, kernel + 1)), signed=bool(rng.integers(2)))
    y = b.conv(y, 16, kernel=1, pad=0, isg=True)
    cm, got, want, off = _run(b, [y], seed)
    _assert_exact(got, want)
    _assert_exact(got, off)
    rows = [r for r in _rows(cm, "gap") if r["name"].startswith("avgpool")]
    assert len(rows) == 1 and rows[0]["device"] == "npu", cm.report()["fallbacks"]
    assert not cm.report()["fallbacks"]


def test_padded_average_pool_falls_back_with_the_reason():
    rng = np.random.default_rng(1)
    b = QDQBuilder((1, 8, 6, 6), rng)
    x = b.conv(b.input, 8)
    y = b.float_op([x], "AveragePool", (1, 8, 3, 3), kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                   count_include_pad=1)
    cm, got, _, off = _run(b, [y], reference=False)
    _assert_exact(got, off)
    reasons = [f["reason"] for f in cm.report()["fallbacks"]]
    assert len(reasons) == 1 and "padded AveragePool" in reasons[0] and "pads [1, 1, 1, 1]" in reasons[0]


@pytest.mark.parametrize("seed", range(4))
def test_reduce_mean_keepdims_0_is_a_global_pool_with_a_2d_output(seed):
    """ReduceMean(axes=[2, 3], keepdims=0) (torch x.mean((2, 3))) folds as a gap whose output is (N, C),
    read by a Gemm in the same NPU region; exact."""
    rng = np.random.default_rng(seed)
    b = QDQBuilder((2, 8, 5, 5), rng)
    x = b.conv(b.input, int(rng.choice([16, 20, 32])), isg=True)
    g = b.mean(x)
    y = b.linear(g, int(rng.integers(2, 12)))
    cm, got, want, off = _run(b, [y, g], seed)
    _assert_exact(got, want)
    _assert_exact(got, off)
    assert got[1].shape == (2, x.shape[1])
    assert [r["device"] for r in _rows(cm, "gap")] == ["npu"] and not cm.report()["fallbacks"]
    assert len(cm.regions) == 1


@pytest.mark.parametrize("requantize", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_relu_between_two_quantizers(requantize, seed):
    """Q(Relu(DQ(x))) is a 1x1 average pool with m = s_in / s_out, b = zp_out (same quantizer in and out:
    m = 1, the clip itself). On the NPU, exact."""
    rng = np.random.default_rng(seed)
    b = QDQBuilder((1, 16, 4, 4), rng, signed=True)
    x = b.conv(b.input, 16, act=None, signed_out=True)
    y = b.relu(x, requantize=requantize, signed=bool(rng.integers(2)))
    y = b.conv(y, 8, kernel=1, pad=0)
    cm, got, want, off = _run(b, [y], seed)
    _assert_exact(got, want)
    _assert_exact(got, off)
    rows = _rows(cm, "gap")
    assert [r["device"] for r in rows] == ["npu"] and rows[0]["name"].startswith("avgpool")
    assert not cm.report()["fallbacks"]


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_matmul_and_gemm_trans_b_0_fold_as_linear(op, per_channel):
    """A constant (C, K) weight (MatMul, Gemm transB=0), per-column or per-tensor scales: a linear layer."""
    rng = np.random.default_rng(3)
    b = QDQBuilder((2, 16, 3, 3), rng)
    g = b.gap(b.conv(b.input, 24))
    flat = b.float_op([g], "Flatten", (2, 24))  # a requantizing flatten stays on the CPU; the MatMul reads it
    y = b.matmul(flat, 10, op=op, per_channel=per_channel)
    cm, got, _, off = _run(b, [y], reference=False)
    _assert_exact(got, off)
    rows = [r for r in cm.report()["layers"] if r["name"].startswith("linear")]
    assert [r["device"] for r in rows] == ["npu"]


def test_matmul_weight_layouts_are_exact_against_the_contract():
    rng = np.random.default_rng(5)
    b = QDQBuilder((3, 40), rng)
    y = b.matmul(b.input, 7, op="MatMul")
    cm, got, want, off = _run(b, [y])
    _assert_exact(got, want)
    _assert_exact(got, off)
    assert [r["device"] for r in cm.report()["layers"] if r["kind"] == "conv"] == ["npu"]


def _fallback_graph(op: str) -> tuple[QDQBuilder, list]:
    rng = np.random.default_rng(7)
    b = QDQBuilder((1, 8, 6, 6), rng)
    x = b.conv(b.input, 8, kernel=1, pad=0)
    s = x.shape
    if op == "Concat":
        z = b.conv(b.input, 8, kernel=1, pad=0)
        return b, [b.float_op([x, z], "Concat", (1, 16, 6, 6), axis=1)]
    if op == "Resize":
        return b, [b.float_op([x], "Resize", (1, 8, 12, 12), consts=(None, np.array([1, 1, 2, 2], np.float32)),
                              mode="nearest")]
    if op == "ResizeBilinear":
        return b, [b.float_op([x], "Resize", (1, 8, 12, 12), consts=(None, np.array([1, 1, 2, 2], np.float32)),
                              mode="linear")]
    if op == "SiLU":
        sg = b._uid("sig")
        b.nodes.append(__import__("onnx").helper.make_node("Sigmoid", [x.name], [sg]))
        from ioso_tvm.testing import T
        return b, [b.float_op([x, T(sg, 1.0, 0, 0, 0, np.float32, s)], "Mul", s)]
    if op == "DilatedConv":
        y = b.conv(x, 8, kernel=3, pad=2)
        for node in b.nodes:
            if node.op_type == "Conv" and node.name == y.name.replace("dq", "conv"):
                pass
        conv = [n for n in b.nodes if n.op_type == "Conv"][-1]
        conv.attribute.append(__import__("onnx").helper.make_attribute("dilations", [2, 2]))
        return b, [y]
    attrs = {"LeakyRelu": {"alpha": 0.1}}.get(op, {})
    return b, [b.float_op([x], op, s, **attrs)]


FALLBACKS = {"Concat": "Concat (axis 1) of 2 tensors", "Resize": "Resize / Upsample (nearest_neighbor",
             "ResizeBilinear": "Resize / Upsample (linear", "Sigmoid": "Sigmoid runs on the CPU",
             "HardSwish": "HardSwish (x * relu6(x + 3) / 6)", "SiLU": "SiLU (x * sigmoid(x))",
             "LeakyRelu": "LeakyReLU (alpha 0.1)", "DilatedConv": "dilated conv (dilation [2, 2])"}


@pytest.mark.parametrize("op", sorted(FALLBACKS))
def test_unsupported_operators_fall_back_exactly_with_a_reason_naming_them(op):
    b, outs = _fallback_graph(op)
    cm, got, _, off = _run(b, outs, reference=False)
    _assert_exact(got, off)
    reasons = [f["reason"] for f in cm.report()["fallbacks"]]
    assert len(reasons) == 1 and FALLBACKS[op] in reasons[0], reasons
    if op not in ("Concat", "Resize", "ResizeBilinear", "DilatedConv"):
        assert "lookup table" in reasons[0]  # the hardware extension that would run the activation
    assert all(r["device"] == "npu" for r in cm.report()["layers"] if r["kind"] != "input")


def test_a_max_pool_with_a_clip_is_not_offloaded():
    """The NPU's ALU_MAX applies no clip bounds: a max pool whose clip is narrower than its dtype is refused."""
    from hw_model.layer_specs import PoolSpec
    from target_npu.patterns import npu_limits

    assert npu_limits(PoolSpec("max", 1, 8, 4, 4, kernel=(2, 2), stride=(2, 2))) is None
    why = npu_limits(PoolSpec("max", 1, 8, 4, 4, kernel=(2, 2), stride=(2, 2), lo=0, hi=127))
    assert why is not None and "ALU_MAX does not clip" in why
