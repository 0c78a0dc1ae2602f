"""Fold ``dequantize -> op -> quantize`` chains of an imported QDQ model into integer NPU layers.

The ONNX frontend (TVM 0.27) imports the format of docs/onnx_format.md as float ops between
``relax.quantize`` / ``relax.dequantize``; a ``Clip`` becomes ``isnan/where`` plus
``call_tir(maximum|minimum)``. :func:`find_layers` reads every ``relax.quantize`` binding of
``main`` and walks its producers back to the previous quantized tensors, recovering the
integers and constants of the contract (``hw_model.reference``):

- conv: int8 weights (DQ initializer), ISG group per input channel (index of the ``Mul(gamma)``
  value in ``NPUConfig.group_factors``; any other value is a ValueError), NORM m/b from
  ``reference.norm_constants`` (same call and float32 inputs as deploy mode), clip lo/hi;
- add: ``reference.add_constants``; global average pool: ``reference.avg_pool_constants``;
- max pool: kernel/stride/pads (same scale and zero point in and out);
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
import math
from typing import Any

import numpy as np
import tvm
from tvm import relax

from hw_model import reference as ref
from hw_model.config import NPUConfig
from hw_model.layer_specs import AddSpec, ConvSpec, LinearSpec, PoolSpec, QuantizeSpec
from target_npu.integer_ops import emit_layer, rewrite_layers
from target_npu.layer import Layer

MAX_KERNEL = 7
"""Largest conv kernel side offloaded. Chosen: covers 7x7 stems; larger kernels go to the CPU."""


class NotFoldable(Exception):
    """A chain that stays on the CPU; the message says why."""


def _op(e: Any, name: str) -> bool:
    return isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == name


class _Graph:
    """Var -> bound value of ``main``'s bindings, with constant readers."""

    def __init__(self, func: relax.Function) -> None:
        self.bind = {b.var: b.value for blk in func.body.blocks for b in blk.bindings}
        self.params = set(func.params)

    def prod(self, e: Any) -> Any:
        while isinstance(e, relax.Var) and e in self.bind:
            e = self.bind[e]
        return e

    def const(self, e: Any, what: str) -> np.ndarray:
        e = self.prod(e)
        if _op(e, "relax.reshape"):
            return self.const(e.args[0], what)
        data = getattr(e, "value", None) if isinstance(e, tvm.ir.GenericConst) else None
        if data is None:
            raise NotFoldable(f"{what} is not a constant")
        return data.numpy()

    def is_const(self, e: Any) -> bool:
        try:
            self.const(e, "")
            return True
        except NotFoldable:
            return False

    def value(self, e: Any) -> np.ndarray | None:
        """A constant, or ``dequantize`` of an integer constant (a bias as DequantizeLinear(int32)) evaluated
        as ONNX does in float32; None for anything else."""
        d = self.prod(e)
        if _op(d, "relax.reshape"):
            return self.value(d.args[0])
        if not _op(d, "relax.dequantize"):
            return self.const(e, "") if self.is_const(e) else None
        if not all(self.is_const(a) for a in d.args[:3]):
            return None
        q, s, zp = (self.const(a, "") for a in d.args[:3])
        shape = [1] * q.ndim
        if s.size > 1:
            shape[int(d.attrs.axis) % q.ndim] = -1
        diff = (q.astype(np.int64) - zp.astype(np.int64).reshape(shape if zp.size > 1 else ())).astype(np.float32)
        return (diff * s.astype(np.float32).reshape(shape if s.size > 1 else ())).astype(np.float32)

    def dq(self, e: Any, what: str) -> tuple[Any, float, int]:
        """(integer var, scale, zp) of a per-tensor ``dequantize``."""
        d = self.prod(e)
        if not _op(d, "relax.dequantize"):
            raise NotFoldable(f"{what} is not a dequantized tensor")
        s, zp = self.const(d.args[1], "scale"), self.const(d.args[2], "zero point")
        if s.size != 1 or zp.size != 1:
            raise NotFoldable(f"{what} has a per-channel activation scale")
        return d.args[0], float(np.float32(s.reshape(()))), int(zp.reshape(()))

    def strip_clip(self, e: Any) -> tuple[Any, float, float]:
        """Peel relu / clip (maximum, minimum) ops: (inner expr, float lo, float hi)."""
        lo, hi = -math.inf, math.inf
        while True:
            c = self.prod(e)
            if _op(c, "relax.nn.relu"):
                lo, e = max(lo, 0.0), c.args[0]
            elif _op(c, "relax.call_tir") and isinstance(c.args[0], relax.GlobalVar) \
                    and c.args[0].name_hint.startswith(("maximum", "minimum")):
                x, bound = c.args[1].fields
                w = self.prod(bound)
                v = float(self.const(w.args[2] if _op(w, "relax.where") else bound, "clip bound").reshape(()))
                if c.args[0].name_hint.startswith("maximum"):
                    lo = max(lo, v)
                else:
                    hi = min(hi, v)
                e = x
            else:
                return e, lo, hi


def _step(v: float, s: float) -> int:
    """round(v / s) in float32, clamped to +-2^20 (a bound beyond float32 or far outside the dtype)."""
    with np.errstate(over="ignore"):
        return int(np.clip(np.rint(np.float32(v) / np.float32(s)), -(1 << 20), 1 << 20))


def _int_bounds(lo_f: float, hi_f: float, s: float, zp: int, dtype: str) -> tuple[int, int]:
    info = np.iinfo(np.dtype(dtype))
    lo, hi = int(info.min), int(info.max)
    if lo_f > -math.inf:
        lo = max(lo, _step(lo_f, s) + zp)
    if hi_f < math.inf:
        hi = min(hi, _step(hi_f, s) + zp)
    # an empty range (lo > hi: a clip bound rounds past the other) gives hi everywhere under the
    # contract's clip = min(max(t, lo), hi); lo = hi is the same function and a valid NPU clip
    return min(lo, hi), hi


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


def _weights(gr: _Graph, e: Any, name: str, wbits: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weights, float32 scales) of a per-channel weight ``dequantize``."""
    wd = gr.prod(e)
    if not _op(wd, "relax.dequantize"):
        raise NotFoldable("weight is not a dequantized constant")
    w = gr.const(wd.args[0], "weight")
    s_w = gr.const(wd.args[1], "weight scale").astype(np.float32)
    if w.dtype != np.int8:
        raise NotFoldable(f"weights must be int8 (with zero point 0), got {w.dtype}")
    if np.any(gr.const(wd.args[2], "weight zp") != 0):
        raise NotFoldable("weight zero point is not 0 (the NPU's weights are symmetric)")
    bits = wbits.get(name, wbits.get("*"))
    if bits is not None and (w.min() < -(2 ** (bits - 1)) or w.max() > 2 ** (bits - 1) - 1):
        raise ValueError(f"layer {name}: weights leave the declared {bits}-bit range")
    return w, np.broadcast_to(s_w.reshape(-1), (w.shape[0],))


def _finite(name: str, **consts: Any) -> None:
    """ValueError naming the layer when a float32 constant it derived from the file's scales is not finite."""
    for key, v in consts.items():
        a = np.asarray(v, np.float32)
        if not np.isfinite(a).all():
            raise ValueError(f"layer {name}: constant {key} = {a.reshape(-1)[~np.isfinite(a.reshape(-1))][0]} is "
                             f"not finite in float32 (a scale ratio or bias of the model overflows float32)")


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
    """Gemm (``matmul(x, permute_dims(DQ(w)))``), run as a 1x1 conv on the flattened input."""
    pt = gr.prod(c.args[1])
    if not _op(pt, "relax.permute_dims") or [int(v) for v in pt.attrs.axes] != [1, 0]:
        raise NotFoldable("matmul weight is not a transposed constant (Gemm transB=1)")
    w, s_w = _weights(gr, pt.args[0], name, wbits)
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
        raise NotFoldable(_not_a_layer(c))
    bias, g, phi = _affine(chain)
    a = c.attrs
    if a.data_layout != "NCHW" or a.kernel_layout != "OIHW":
        raise NotFoldable(f"conv layout {a.data_layout}/{a.kernel_layout}")
    dil = [int(v) for v in a.dilation]
    if dil != [1, 1]:
        raise NotFoldable(f"dilation {dil} (the NPU supports 1)")
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


def _not_a_layer(c: Any) -> str:
    """The reason for a quantizer whose producer is no NPU layer, naming the op that is there."""
    if _op(c, "relax.add"):
        return "add of a quantized tensor and a float / constant tensor (the NPU adds two quantized tensors)"
    if _op(c, "relax.call_tir") and isinstance(c.args[0], relax.GlobalVar):
        return f"{c.args[0].name_hint} before the quantizer is not an NPU layer (conv, Gemm, add, pools)"
    if _op(c, "relax.dequantize"):
        return "a quantized tensor times / plus a constant is not an NPU layer (conv, Gemm, add of two tensors, pools)"
    if isinstance(c, relax.Call) and isinstance(c.op, tvm.ir.Op):
        return f"{c.op.name.removeprefix('relax.')} before the quantizer is not an NPU layer (conv, Gemm, add, pools)"
    return "no conv2d / matmul under the activation quantizer"


def _global_pool(gr: _Graph, c: Any) -> tuple[Any, float, int]:
    """(integer input, scale, zp) of a global average pool: ``mean`` over H, W or an AveragePool whose
    kernel covers the whole unpadded input; any other average pool is a NotFoldable with the reason."""
    xq, s, zp = gr.dq(c.args[0], "average pool input")
    if _op(c, "relax.mean"):
        axes = sorted(int(v) for v in c.attrs.axis)
        if axes != [2, 3] or not c.attrs.keepdims:
            raise NotFoldable(f"mean over axes {axes} is not a global average pool")
        return xq, s, zp
    a, hw = c.attrs, [int(v) for v in list(xq.ty.shape)[2:]]
    kernel, pads = [int(v) for v in a.pool_size], [int(v) for v in a.padding]
    if kernel != hw or any(pads) or a.layout != "NCHW" or [int(v) for v in a.dilation] != [1, 1]:
        raise NotFoldable(f"AveragePool kernel {kernel}, pads {pads} on a {hw[0]}x{hw[1]} input: the NPU runs "
                          f"only global average pools (kernel = input size, no padding)")
    return xq, s, zp


def _layer(kind: str, name: str, spec: Any, inputs: list[Any], q: Any) -> Layer:
    return Layer(kind, name, spec, [tuple(int(d) for d in v.ty.shape) for v in inputs],
                 [str(v.ty.dtype) for v in inputs], tuple(int(v) for v in q.ty.shape), str(q.ty.dtype),
                 inputs=list(inputs), quant=q)


def _classify(gr: _Graph, q: Any, idx: int, cfg: NPUConfig, wbits: dict[str, int]) -> Layer:
    s_out = float(np.float32(gr.const(q.args[1], "output scale").reshape(())))
    zp_out = int(gr.const(q.args[2], "output zero point").reshape(()))
    dtype = str(q.ty.dtype)
    body, lo_f, hi_f = gr.strip_clip(q.args[0])
    lo, hi = _int_bounds(lo_f, hi_f, s_out, zp_out, dtype)
    c = gr.prod(body)
    clip = {"lo": lo, "hi": hi, "out_dtype": dtype}
    if isinstance(body, relax.Var) and body in gr.params:
        return _layer("input", f"quantize_{body.name}", QuantizeSpec(s_out, zp_out, **clip), [body], q)
    if _op(c, "relax.nn.max_pool2d"):
        xq, s, zp = gr.dq(c.args[0], "max pool input")
        a = c.attrs
        if (s, zp) != (s_out, zp_out):
            raise NotFoldable(f"max pool requantizes (scale/zero point {s}/{zp} in, {s_out}/{zp_out} out)")
        if a.ceil_mode or [int(v) for v in a.dilation] != [1, 1]:
            raise NotFoldable(f"max pool with ceil_mode={bool(a.ceil_mode)}, dilation {[int(v) for v in a.dilation]}")
        spec = PoolSpec("max", *(int(v) for v in xq.ty.shape), kernel=tuple(int(v) for v in a.pool_size),
                        stride=tuple(int(v) for v in a.strides), pads=tuple(int(v) for v in a.padding),
                        in_dtype=str(xq.ty.dtype), **clip)
        return _layer("maxpool", f"maxpool{idx}", spec, [xq], q)
    if _op(c, "relax.mean") or _op(c, "relax.nn.avg_pool2d"):
        xq, s, zp = _global_pool(gr, c)
        n, ch, h, w = (int(v) for v in xq.ty.shape)
        info = np.iinfo(np.dtype(str(xq.ty.dtype)))
        if h * w * max(zp - int(info.min), int(info.max) - zp) > ref.INT32_MAX:
            raise NotFoldable(f"global average pool over {h}x{w}: the int32 window sum could overflow")
        with np.errstate(over="ignore"):
            m, b = ref.avg_pool_constants(s, s_out, zp_out, h * w)
        _finite(f"gap{idx}", m=m)
        spec = PoolSpec("global_avg", n, ch, h, w, x_zp=zp, m=float(m), b=float(b),
                        in_dtype=str(xq.ty.dtype), **clip)
        return _layer("gap", f"gap{idx}", spec, [xq], q)
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
        return _layer("add", f"add{idx}", spec, [aq, bq], q)
    kind_name = f"linear{idx}" if _op(_affine_chain(gr, body)[0], "relax.matmul") else f"conv{idx}"
    xq, spec = _conv(gr, body, s_out, zp_out, cfg, kind_name, wbits)
    return _layer("conv", kind_name, dataclasses.replace(spec, **clip), [xq], q)


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
