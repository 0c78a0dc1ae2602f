"""Fold the pools and the activations between two quantizers; name the ops that stay on the CPU.

Chains ``Q(op(DQ(x)))`` whose ``op`` is no conv / Gemm / add (those are ``fold_qdq``'s):

- ``MaxPool`` (same scale and zero point in and out): ``PoolSpec("max")`` with the clip bounds;
- ``GlobalAveragePool``, ``ReduceMean`` over axes [2, 3] (``keepdims`` 1: output (N, C, 1, 1); 0: output
  (N, C), what ``torch`` ``x.mean((2, 3))`` exports) and an ``AveragePool`` whose kernel covers the whole
  unpadded input: ``PoolSpec("global_avg")``, constants ``reference.avg_pool_constants``;
- ``AveragePool`` (kernel / stride, no padding): ``PoolSpec("avg")`` (layer ``avgpool<i>``, kind ``gap``); padded or
  ``ceil_mode`` average pools stay on the CPU with the reason;
- an activation between two quantizers, ``Q(Relu(DQ(x)))`` or ``Q(Clip(DQ(x)))`` (onnxruntime's int8
  symmetric QDQ keeps a Relu of its own) or a bare requantizer ``Q(DQ(x))``: a 1x1 average pool
  (``PoolSpec("avg")``, ``m = s_in / s_out``, ``b = zp_out``: the contract's requantization; with the same
  quantizer in and out ``m = 1`` and the layer is exactly the clip). A 1x1 max pool would be the natural
  clip, but the NPU's ALU_MAX applies no clip bounds (``hw_model.functional``), so a max pool whose clip is
  narrower than its dtype stays on the CPU (``target_npu.patterns.npu_limits``).

:func:`not_a_layer` gives the reason for every other op under a quantizer, naming it (Concat, Resize,
Sigmoid, HardSwish, SiLU, LeakyReLU, ...) and, for activations, the hardware extension that would run it.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import tvm
from tvm import relax

from hw_model import reference as ref
from hw_model.layer_specs import PoolSpec
from target_npu.layer import Layer
from target_npu.transform.qdq_graph import Graph, NotFoldable, finite, is_op, make_layer

LUT = "a lookup table in the NPU's post stage (not in the baseline NPU) would run it"
"""The hardware extension named for activations the ACT stage (a clip) cannot do."""
AVG_KIND = "gap"
"""``Layer.kind`` of a windowed average pool (``PoolSpec(kind="avg")``, named ``avgpool<i>``). The kind ``gap``
(average pools) is one the group-permutation planner passes channel orders through
(``permute_groups.TRANSPARENT``); a kind of its own would need to be listed there too."""


def _window_sum_fits(kh: int, kw: int, zp: int, dtype: str, what: str) -> None:
    info = np.iinfo(np.dtype(dtype))
    if kh * kw * max(zp - int(info.min), int(info.max) - zp) > ref.INT32_MAX:
        raise NotFoldable(f"{what} over {kh}x{kw}: the int32 window sum could overflow")


def _avg_spec(kind: str, xq: Any, s: float, zp: int, s_out: float, zp_out: int, kernel: tuple[int, int],
              stride: tuple[int, int], clip: dict, name: str) -> PoolSpec:
    n, ch, h, w = (int(v) for v in xq.ty.shape)
    window = h * w if kind == "global_avg" else kernel[0] * kernel[1]
    _window_sum_fits(*((h, w) if kind == "global_avg" else kernel), zp, str(xq.ty.dtype), "average pool")
    with np.errstate(over="ignore"):
        m, b = ref.avg_pool_constants(s, s_out, zp_out, window)
    finite(name, m=m)
    return PoolSpec(kind, n, ch, h, w, kernel=kernel, stride=stride, x_zp=zp, m=float(m), b=float(b),
                    in_dtype=str(xq.ty.dtype), **clip)


def _mean(gr: Graph, c: Any, s_out: float, zp_out: int, clip: dict, idx: int, q: Any) -> Layer:
    """ReduceMean over H, W (keepdims 1 or 0) as a global average pool."""
    xq, s, zp = gr.dq(c.args[0], "average pool input")
    axes = sorted(int(v) % len(xq.ty.shape) for v in c.attrs.axis) if c.attrs.axis is not None else None
    if len(xq.ty.shape) != 4 or axes != [2, 3]:
        raise NotFoldable(f"ReduceMean over axes {axes} of a {len(xq.ty.shape)}-D tensor is not a global average "
                          f"pool (the NPU averages over H and W of an (N, C, H, W) tensor)")
    spec = _avg_spec("global_avg", xq, s, zp, s_out, zp_out, (1, 1), (1, 1), clip, f"gap{idx}")
    return make_layer("gap", f"gap{idx}", spec, [xq], q)


def _avg_pool(gr: Graph, c: Any, s_out: float, zp_out: int, clip: dict, idx: int, q: Any) -> Layer:
    """An ONNX AveragePool: global (kernel = input size) or windowed without padding."""
    xq, s, zp = gr.dq(c.args[0], "average pool input")
    a, hw = c.attrs, [int(v) for v in list(xq.ty.shape)[2:]]
    kernel, pads = [int(v) for v in a.pool_size], [int(v) for v in a.padding]
    stride = tuple(int(v) for v in a.strides)
    if a.layout != "NCHW" or [int(v) for v in a.dilation] != [1, 1]:
        raise NotFoldable(f"AveragePool with layout {a.layout}, dilation {[int(v) for v in a.dilation]}")
    if any(pads):
        raise NotFoldable(f"padded AveragePool (kernel {kernel}, pads {pads}, count_include_pad="
                          f"{bool(a.count_include_pad)}): the NPU's average pool takes no padding "
                          f"(hw_model.reference.avg_pool2d)")
    if a.ceil_mode and any((d - k) % st for d, k, st in zip(hw, kernel, stride)):
        raise NotFoldable(f"AveragePool with ceil_mode=1 (kernel {kernel}, stride {list(stride)} on a "
                          f"{hw[0]}x{hw[1]} input) averages partial windows, which the NPU does not")
    if kernel == hw:
        spec = _avg_spec("global_avg", xq, s, zp, s_out, zp_out, (1, 1), (1, 1), clip, f"gap{idx}")
        return make_layer("gap", f"gap{idx}", spec, [xq], q)
    spec = _avg_spec("avg", xq, s, zp, s_out, zp_out, tuple(kernel), stride, clip, f"avgpool{idx}")
    return make_layer(AVG_KIND, f"avgpool{idx}", spec, [xq], q)


def _max_pool(gr: Graph, c: Any, s_out: float, zp_out: int, clip: dict, idx: int, q: Any) -> Layer:
    xq, s, zp = gr.dq(c.args[0], "max pool input")
    a = c.attrs
    if (s, zp) != (s_out, zp_out):
        raise NotFoldable(f"max pool requantizes (scale/zero point {s}/{zp} in, {s_out}/{zp_out} out)")
    if a.ceil_mode or [int(v) for v in a.dilation] != [1, 1]:
        raise NotFoldable(f"max pool with ceil_mode={bool(a.ceil_mode)}, dilation {[int(v) for v in a.dilation]}")
    spec = PoolSpec("max", *(int(v) for v in xq.ty.shape), kernel=tuple(int(v) for v in a.pool_size),
                    stride=tuple(int(v) for v in a.strides), pads=tuple(int(v) for v in a.padding),
                    in_dtype=str(xq.ty.dtype), **clip)
    return make_layer("maxpool", f"maxpool{idx}", spec, [xq], q)


def _requant(gr: Graph, c: Any, s_out: float, zp_out: int, clip: dict, idx: int, q: Any) -> Layer:
    """``Q(act(DQ(x)))`` with ``act`` a clip / relu (or nothing): a 1x1 average pool, ``m = s_in / s_out``,
    ``b = zp_out`` (the same quantizer in and out gives ``m = 1`` exactly and ``b = zp``: the NORM output is
    ``x`` itself and the layer is the clip; a 1x1 max pool cannot be used, the NPU's ALU_MAX does not clip)."""
    xq, s, zp = gr.dq(c, "activation input")
    if gr.is_const(xq):
        raise NotFoldable("a quantizer of a dequantized constant is not an NPU layer")
    if len(xq.ty.shape) != 4:
        raise NotFoldable(f"activation / requantizer of a {len(xq.ty.shape)}-D tensor (the NPU's 1x1 pools "
                          f"take (N, C, H, W) tensors)")
    spec = _avg_spec("avg", xq, s, zp, s_out, zp_out, (1, 1), (1, 1), clip, f"avgpool{idx}")
    return make_layer(AVG_KIND, f"avgpool{idx}", spec, [xq], q)


def fold_pool_or_activation(gr: Graph, c: Any, s_out: float, zp_out: int, clip: dict, idx: int,
                            q: Any) -> Layer | None:
    """The layer of quantizer ``q`` whose producer (clip / relu peeled) is ``c``, if ``c`` is a pool or a
    dequantized tensor (an activation between quantizers); None for anything else; NotFoldable with the reason."""
    if is_op(c, "relax.nn.max_pool2d"):
        return _max_pool(gr, c, s_out, zp_out, clip, idx, q)
    if is_op(c, "relax.mean"):
        return _mean(gr, c, s_out, zp_out, clip, idx, q)
    if is_op(c, "relax.nn.avg_pool2d"):
        return _avg_pool(gr, c, s_out, zp_out, clip, idx, q)
    if is_op(c, "relax.dequantize"):
        return _requant(gr, c, s_out, zp_out, clip, idx, q)
    return None


def _sigmoid_of(gr: Graph, a: Any, b: Any) -> bool:
    """``b`` is sigmoid(x) and ``a`` is that x (SiLU = x * sigmoid(x))."""
    s = gr.prod(b)
    return is_op(s, "relax.sigmoid") and gr.prod(s.args[0]).same_as(gr.prod(a))


def _activation_reason(gr: Graph, c: Any) -> str | None:
    """The reason for an activation the ACT stage (a clip) cannot do, naming it; None if ``c`` is none."""
    if is_op(c, "relax.sigmoid"):
        return f"Sigmoid runs on the CPU: the NPU's ACT stage only clips (ReLU, ReLU6); {LUT}"
    if is_op(c, "relax.nn.leakyrelu"):
        return (f"LeakyReLU (alpha {float(c.attrs.alpha):g}) runs on the CPU: the NPU's ACT stage only clips; "
                f"{LUT}")
    if is_op(c, "relax.nn.silu"):
        return f"SiLU runs on the CPU: the NPU's ACT stage only clips; {LUT}"
    if is_op(c, "relax.multiply") and not gr.is_const(c.args[1]) and not gr.is_const(c.args[0]):
        a, b = c.args
        if _sigmoid_of(gr, a, b) or _sigmoid_of(gr, b, a):
            return f"SiLU (x * sigmoid(x)) runs on the CPU: the NPU's ACT stage only clips; {LUT}"
        for v in (a, b):
            d = gr.prod(v)
            if is_op(d, "relax.divide") and is_op(gr.prod(d.args[0]), "relax.clip"):
                return f"HardSwish (x * relu6(x + 3) / 6) runs on the CPU: the NPU's ACT stage only clips; {LUT}"
        return ("multiply of two tensors (a squeeze-excite scale or a gating) runs on the CPU: the NPU multiplies "
                "a tensor by per-channel constants only (NORM)")
    if is_op(c, "relax.clip") and is_op(gr.prod(c.args[0]), "relax.add"):
        return f"HardSigmoid (clip(alpha * x + beta, 0, 1)) runs on the CPU: the NPU's ACT stage only clips; {LUT}"
    return None


def not_a_layer(gr: Graph, c: Any) -> str:
    """The reason for a quantizer whose producer ``c`` is no NPU layer, naming the op that is there."""
    why = _activation_reason(gr, c)
    if why:
        return why
    if is_op(c, "relax.concat"):
        parts = gr.prod(c.args[0])
        count = len(parts.fields) if isinstance(parts, relax.Tuple) else "several"
        return (f"Concat (axis {int(c.attrs.axis)}) of {count} tensors runs on the CPU: no NPU layer writes its "
                f"inputs into slices of one buffer yet")
    if is_op(c, "relax.image.resize2d"):
        return (f"Resize / Upsample ({c.attrs.method}, {c.attrs.coordinate_transformation_mode}) runs on the CPU: "
                f"the NPU has no resampling instruction")
    if is_op(c, "relax.dequantize"):
        return "a quantized tensor times / plus a constant is not an NPU layer (conv, Gemm, add of two tensors, pools)"
    if is_op(c, "relax.add"):
        return "add of a quantized tensor and a float / constant tensor (the NPU adds two quantized tensors)"
    if is_op(c, "relax.call_tir") and isinstance(c.args[0], relax.GlobalVar):
        return f"{c.args[0].name_hint} before the quantizer is not an NPU layer (conv, Gemm, add, pools)"
    if isinstance(c, relax.Call) and isinstance(c.op, tvm.ir.Op):
        return f"{c.op.name.removeprefix('relax.')} before the quantizer is not an NPU layer (conv, Gemm, add, pools)"
    return "no conv2d / matmul under the activation quantizer"
