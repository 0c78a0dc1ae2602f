"""Fold ``dequantize -> op -> quantize`` chains of an imported QDQ model into integer NPU layers.

The ONNX frontend (TVM 0.27) imports the format of docs/onnx_format.md as float ops between
``relax.quantize`` / ``relax.dequantize``; a ``Clip`` becomes ``isnan/where`` plus
``call_tir(maximum|minimum)``. :func:`find_layers` reads every ``relax.quantize`` binding of
``main`` and walks its producers back to the previous quantized tensors, recovering the
integers and constants of the contract (``hw_model.reference``):

- conv: int8 weights (DQ initializer), ISG group per input channel (index of the ``Mul(gamma)``
  value in ``NPUConfig.group_factors``; any other value is a ValueError), NORM m/b from
  ``reference.norm_constants`` (same call and float32 inputs as deploy mode), clip lo/hi;
- Gemm (either ``transB``) and MatMul with a constant weight, (K, C) transposed or (C, K): a linear layer;
- add: ``reference.add_constants``; pools and activations between two quantizers: ``fold_ops``;
- the graph input's quantizer (a CPU step: ``reference.quantize``).

Representation: each recognised chain becomes a :class:`target_npu.layer.Layer` (its typed
``hw_model`` spec), and :func:`fold_qdq` replaces the layer's ``quantize`` by the layer's integer form
(``target_npu.integer_ops``: ``conv2d`` / ``matmul`` over int16 operands ``x - zp`` into int32, the ISG
shift-adds, NORM, round and clip), which ``target_npu.patterns`` matches; the input quantizer becomes
the CPU call ``R.call_dps_packed("<prefix>.<index>", x)`` (``hw_model.reference.quantize``). The float
ops it made dead are removed by ``DeadCodeElimination``.
A chain that is not recognised stays a float QDQ chain that
the Relax VM runs on the CPU (llvm); :func:`find_layers` returns it with the reason (naming the
op that is there), as it does a conv / Gemm whose int32 accumulator ``hw_model.reference.acc_overflow`` cannot
prove in range. Derived constants that overflow float32 are a ValueError naming the layer.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import tvm
from tvm import relax

from hw_model import reference as ref
from hw_model.config import NPUConfig
from hw_model.layer_specs import AddSpec, ConvSpec, LinearSpec, QuantizeSpec
from target_npu.integer_ops import emit_layer, rewrite_layers
from target_npu.layer import Layer
from target_npu.transform.fold_ops import fold_pool_or_activation, not_a_layer
from target_npu.transform.qdq_graph import Graph as _Graph
from target_npu.transform.qdq_graph import NotFoldable, int_bounds, make_layer
from target_npu.transform.qdq_graph import finite as _finite
from target_npu.transform.qdq_graph import is_op as _op

__all__ = ["MAX_KERNEL", "NotFoldable", "find_layers", "fold_qdq"]

MAX_KERNEL = 7
"""Largest conv kernel side offloaded. Chosen: covers 7x7 stems; larger kernels go to the CPU."""


def _isg_groups(gamma: np.ndarray, c: int, cfg: NPUConfig, name: str) -> np.ndarray:
    if np.size(gamma) != c:
        raise ValueError(f"layer {name}: ISG gamma has {np.size(gamma)} values for {c} input channels")
    try:
        return cfg.group_of_factor(gamma)
    except ValueError as e:
        raise ValueError(f"layer {name}: {e}") from None


def _affine(chain: list[tuple[str, np.ndarray]]) -> tuple[Any, Any, Any]:
    """(bias, oso_scale, oso_offset) of the ops between a conv / matmul and its quantizer."""
    chain = list(chain)
    bias = g = phi = None
    if [k for k, _ in chain[:1]] == ["relax.add"]:
        bias = chain.pop(0)[1]
    if [k for k, _ in chain] == ["relax.multiply", "relax.add"]:
        g, phi = chain[0][1], chain[1][1]
    elif chain:
        raise NotFoldable(f"unsupported ops between conv and quantizer: {[k for k, _ in chain]}")
    return bias, g, phi


def _weights(gr: _Graph, e: Any, name: str, wbits: dict[str, int],
             transposed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weights (K, ...), float32 scales (K,)) of a per-channel weight ``dequantize``; ``transposed``: a
    MatMul / Gemm(transB=0) weight stored (C, K), per-tensor or per output column (axis 1), returned as (K, C)."""
    wd = gr.prod(e)
    if not _op(wd, "relax.dequantize"):
        raise NotFoldable("weight is not a dequantized constant")
    w = gr.const(wd.args[0], "weight")
    s_w = gr.const(wd.args[1], "weight scale").astype(np.float32)
    if w.dtype != np.int8:
        raise NotFoldable(f"weights must be int8 (with zero point 0), got {w.dtype}")
    if np.any(gr.const(wd.args[2], "weight zp") != 0):
        raise NotFoldable("weight zero point is not 0 (the NPU's weights are symmetric)")
    if transposed:
        if w.ndim != 2:
            raise NotFoldable(f"matmul weight of shape {list(w.shape)} (a linear layer has a 2-D weight)")
        if s_w.size > 1 and int(wd.attrs.axis) % 2 != 1:
            raise NotFoldable("matmul weight (C, K) with one scale per input row (axis 0): the NPU scales per "
                              "output channel")
        w = np.ascontiguousarray(w.T)
    bits = wbits.get(name, wbits.get("*"))
    if bits is not None and (w.min() < -(2 ** (bits - 1)) or w.max() > 2 ** (bits - 1) - 1):
        raise ValueError(f"layer {name}: weights leave the declared {bits}-bit range")
    return w, np.broadcast_to(s_w.reshape(-1), (w.shape[0],))


def _norm(s_x: float, s_w: np.ndarray, s_out: float, zp_out: int, bias: Any, g: Any, phi: Any,
          name: str = "") -> tuple:
    with np.errstate(over="ignore", invalid="ignore"):
        m, b = ref.norm_constants(s_x, s_w, s_out, zp_out,
                                  None if bias is None else bias.reshape(-1).astype(np.float32),
                                  None if g is None else g.reshape(-1), None if phi is None else phi.reshape(-1))
    _finite(name, m=m, b=b)
    return m, b


def _linear(gr: _Graph, c: Any, chain: list, s_out: float, zp_out: int, cfg: NPUConfig, name: str,
            wbits: dict[str, int]) -> tuple[Any, LinearSpec]:
    """Gemm / MatMul with a constant weight, run as a 1x1 conv on the flattened input: ``matmul(x,
    permute_dims(DQ(w)))`` (Gemm transB=1, ``w`` (K, C)) or ``matmul(x, DQ(w))`` (Gemm transB=0 / MatMul,
    ``w`` (C, K))."""
    pt = gr.prod(c.args[1])
    if len(c.args[0].ty.shape) != 2:
        raise NotFoldable(f"MatMul of a {len(c.args[0].ty.shape)}-D tensor (a product over its last axis) is not "
                          f"a linear layer: the NPU's linear layer reads (N, C) rows")
    if _op(pt, "relax.permute_dims") and [int(v) for v in pt.attrs.axes] == [1, 0]:
        w, s_w = _weights(gr, pt.args[0], name, wbits)
    elif _op(pt, "relax.dequantize"):
        w, s_w = _weights(gr, pt, name, wbits, transposed=True)
    else:
        raise NotFoldable("matmul weight is neither a dequantized constant (C, K) nor its transpose: a product "
                          "of two activations is not an NPU layer")
    bias, g, phi = _affine(chain)
    inp, gamma = c.args[0], None
    m0 = gr.prod(inp)
    if _op(m0, "relax.multiply") and gr.is_const(m0.args[1]):
        gamma, inp = gr.const(m0.args[1], "gamma"), m0.args[0]
    r = gr.prod(inp)
    if _op(r, "relax.reshape"):
        inp = r.args[0]
    xq, s_x, zp_x = gr.dq(inp, "linear input")
    cin = int(np.prod([int(v) for v in list(xq.ty.shape)[1:]]))
    if w.ndim != 2 or w.shape[1] != cin:
        raise NotFoldable(f"linear weight {w.shape} does not match {cin} input features")
    gvec = np.zeros(cin, np.int64) if gamma is None else _isg_groups(gamma, cin, cfg, name)
    why = ref.acc_overflow(w[:, :, None, None], gvec, 1, str(xq.ty.dtype), zp_x, cfg)
    if why:
        raise NotFoldable(f"linear: {why}")
    m, b = _norm(s_x, s_w, s_out, zp_out, bias, g, phi, name)
    return xq, LinearSpec(int(xq.ty.shape[0]), cin, int(w.shape[0]), w, m, b, x_zp=zp_x,
                          in_dtype=str(xq.ty.dtype), isg_groups=gvec)


def _affine_chain(gr: _Graph, body: Any) -> tuple[Any, list[tuple[str, np.ndarray]]]:
    """(the op under the constant add / multiply chain of ``body``, the chain's (op, constant) from the op up)."""
    chain = []
    c = gr.prod(body)
    while (_op(c, "relax.add") or _op(c, "relax.multiply")) and gr.value(c.args[1]) is not None:
        chain.append((c.op.name, gr.value(c.args[1])))
        c = gr.prod(c.args[0])
    return c, chain[::-1]


def _conv(gr: _Graph, body: Any, s_out: float, zp_out: int, cfg: NPUConfig, name: str,
          wbits: dict[str, int]) -> tuple[Any, ConvSpec | LinearSpec]:
    """(integer input, spec without clip / out dtype) of a conv or Gemm under a quantizer."""
    c, chain = _affine_chain(gr, body)
    if _op(c, "relax.matmul"):
        return _linear(gr, c, chain, s_out, zp_out, cfg, name, wbits)
    if not _op(c, "relax.nn.conv2d"):
        raise NotFoldable(not_a_layer(gr, c))
    bias, g, phi = _affine(chain)
    a = c.attrs
    if a.data_layout != "NCHW" or a.kernel_layout != "OIHW":
        raise NotFoldable(f"conv layout {a.data_layout}/{a.kernel_layout}")
    dil = [int(v) for v in a.dilation]
    if dil != [1, 1]:
        raise NotFoldable(f"dilated conv (dilation {dil}) runs on the CPU: the NPU conv folds dilation 1")
    inp, gamma = c.args[0], None
    m0 = gr.prod(inp)
    if _op(m0, "relax.multiply") and gr.is_const(m0.args[1]):
        gamma, inp = gr.const(m0.args[1], "gamma"), m0.args[0]
    p = gr.prod(inp)
    if _op(p, "relax.nn.pad") or (_op(p, "relax.call_tir") and p.args[0].name_hint.startswith("pad")):
        raise NotFoldable("conv input goes through a separate pad op (ONNX auto_pad=SAME_* on an input of "
                          "unknown size, or a Pad node): the NPU conv folds only the conv's own pads")
    xq, s_x, zp_x = gr.dq(inp, "conv input")
    w, s_w = _weights(gr, c.args[1], name, wbits)
    k, cg, kh, kw = w.shape
    if max(kh, kw) > MAX_KERNEL:
        raise NotFoldable(f"kernel {kh}x{kw} larger than {MAX_KERNEL}")
    cin = int(xq.ty.shape[1])
    gvec = np.zeros(cin, np.int64) if gamma is None else _isg_groups(gamma, cin, cfg, name)
    why = ref.acc_overflow(w, gvec, int(a.groups), str(xq.ty.dtype), zp_x, cfg)
    if why:
        raise NotFoldable(f"conv: {why}")
    m, b = _norm(s_x, s_w, s_out, zp_out, bias, g, phi, name)
    n, _, h, wd = (int(v) for v in xq.ty.shape)
    return xq, ConvSpec(n, cin, h, wd, k, w, m, b, stride=tuple(int(v) for v in a.strides),
                        pads=tuple(int(v) for v in a.padding), groups=int(a.groups), x_zp=zp_x,
                        in_dtype=str(xq.ty.dtype), isg_groups=gvec)


def _classify(gr: _Graph, q: Any, idx: int, cfg: NPUConfig, wbits: dict[str, int]) -> Layer:
    s_out = float(np.float32(gr.const(q.args[1], "output scale").reshape(())))
    zp_out = int(gr.const(q.args[2], "output zero point").reshape(()))
    dtype = str(q.ty.dtype)
    body, lo_f, hi_f = gr.strip_clip(q.args[0])
    lo, hi = int_bounds(lo_f, hi_f, s_out, zp_out, dtype)
    c = gr.prod(body)
    clip = {"lo": lo, "hi": hi, "out_dtype": dtype}
    if isinstance(body, relax.Var) and body in gr.params:
        return make_layer("input", f"quantize_{body.name}", QuantizeSpec(s_out, zp_out, **clip), [body], q)
    layer = fold_pool_or_activation(gr, c, s_out, zp_out, clip, idx, q)
    if layer is not None:
        return layer
    if _op(c, "relax.add") and _op(gr.prod(c.args[0]), "relax.dequantize") \
            and _op(gr.prod(c.args[1]), "relax.dequantize"):
        if gr.is_const(gr.prod(c.args[0]).args[0]) or gr.is_const(gr.prod(c.args[1]).args[0]):
            raise NotFoldable("add of a constant tensor (the NPU adds two activation tensors)")
        (aq, sa, za), (bq, sb, zb) = gr.dq(c.args[0], "add input"), gr.dq(c.args[1], "add input")
        if tuple(aq.ty.shape) != tuple(bq.ty.shape):
            raise NotFoldable("add with broadcasting")
        if len(aq.ty.shape) != 4:
            raise NotFoldable(f"add of {len(aq.ty.shape)}-D tensors (the NPU adds (N, C, H, W) tensors)")
        with np.errstate(over="ignore"):
            ma, mb, bias = ref.add_constants(sa, sb, s_out, zp_out)
        _finite(f"add{idx}", ma=ma, mb=mb)
        spec = AddSpec(*(int(v) for v in aq.ty.shape), za, zb, ma, mb, bias, a_dtype=str(aq.ty.dtype),
                       b_dtype=str(bq.ty.dtype), **clip)
        return make_layer("add", f"add{idx}", spec, [aq, bq], q)
    kind_name = f"linear{idx}" if _op(_affine_chain(gr, body)[0], "relax.matmul") else f"conv{idx}"
    xq, spec = _conv(gr, body, s_out, zp_out, cfg, kind_name, wbits)
    return make_layer("conv", kind_name, dataclasses.replace(spec, **clip), [xq], q)


def find_layers(mod: tvm.IRModule, cfg: NPUConfig, wbits: dict[str, int] | None = None
                ) -> tuple[list[Layer], list[tuple[str, str]]]:
    """Foldable layers of ``mod["main"]`` and the CPU fallbacks as (relax var name, reason)."""
    func = mod["main"]
    gr = _Graph(func)
    layers, fallbacks = [], []
    for var, val in gr.bind.items():
        if not _op(val, "relax.quantize"):
            continue
        try:
            layers.append(_classify(gr, val, len(layers), cfg, wbits or {}))
            layers[-1].out_name = var.name
        except NotFoldable as e:
            fallbacks.append((var.name, str(e)))
    return layers, fallbacks


def fold_qdq(mod: tvm.IRModule, layers: list[Layer], prefix: str, cfg: NPUConfig) -> tvm.IRModule:
    """``mod`` with each layer's ``quantize`` replaced by its integer form (``target_npu.integer_ops``), the
    input quantizers by the CPU call ``call_dps_packed("<prefix>.<i>", x)``; dead float ops removed."""

    def make(i: int, ly: Layer, ops: list[Any], emit: Any) -> relax.Expr:
        if ly.kind == "input":
            return relax.call_dps_packed(f"{prefix}.{i}", ops, relax.TensorType(ly.out_shape, ly.out_dtype))
        return emit_layer(emit, ly, ops, cfg)

    names = [ly.out_name for ly in layers]
    if len(set(names)) != len(names):
        raise ValueError("two folded layers bind the same output variable")
    return rewrite_layers(mod, layers, make, set(range(len(layers))))
