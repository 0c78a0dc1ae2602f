"""Test helpers shared by tests/ and benchmarks/: QDQ ONNX models in the format of docs/onnx_format.md,
built together with their integer reference (numpy + onnx only: no torch, no TVM).

:class:`QDQBuilder` appends layers to an ONNX graph and, alongside, records how
``hw_model.reference`` computes the same layer, so a test can compare a compiled model
with the numeric contract. Tensors are tracked as ``T`` (ONNX name of the dequantized
float tensor, integer tensor name, scale, zero point, clip bounds, dtype).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hw_model import reference as ref
from hw_model.config import DEFAULT_CONFIG, NPUConfig


def granular_groups(c: int, rng: np.random.Generator, cfg: NPUConfig = DEFAULT_CONFIG) -> np.ndarray:
    """A shuffled ISG group vector that meets the granularity rule (one remainder group at most)."""
    gran = cfg.granularity
    blocks = rng.integers(0, cfg.num_groups, c // gran)
    g = np.concatenate([np.repeat(blocks, gran), np.full(c % gran, rng.integers(0, cfg.num_groups))])
    return rng.permutation(g).astype(np.int64)


@dataclass
class T:
    """A quantized tensor of the graph under construction."""

    name: str            # ONNX name of the dequantized float tensor
    scale: float
    zp: int
    lo: int
    hi: int
    dtype: type
    shape: tuple[int, ...]


class QDQBuilder:
    """Append layers; ``model()`` gives the ONNX model, ``run_reference(x)`` the contract's output."""

    def __init__(self, shape: tuple[int, ...], rng: np.random.Generator, cfg: NPUConfig = DEFAULT_CONFIG,
                 abits: int = 8, signed: bool = True) -> None:
        self.rng, self.cfg, self.nodes, self.inits, self.layers = rng, cfg, [], [], {}
        self.shape = tuple(shape)
        self.steps: list[Callable[[dict], None]] = []
        self._n = 0
        self.input = self._quantizer("input", self.shape, abits, signed, None, scale=0.05)
        self.steps.insert(0, lambda env, t=self.input: env.__setitem__(
            t.name, ref.quantize(env["input"], t.scale, t.zp, t.lo, t.hi, t.dtype)))

    # ----------------------------------------------------------------- helpers
    def _uid(self, p: str) -> str:
        self._n += 1
        return f"{p}{self._n}"

    def _const(self, arr, p: str) -> str:
        name = self._uid(p)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def _quantizer(self, src: str, shape, bits: int, signed: bool, act: str | None,
                   scale: float | None = None, zp: int | None = None) -> T:
        s = np.float32(scale if scale is not None else self.rng.uniform(0.02, 0.2))
        if zp is None:
            zp = int(self.rng.integers(-3, 4)) if signed else int(self.rng.integers(0, 6))
        lo, hi = ref.clip_bounds(bits, signed, act, s, zp)
        dt = np.int8 if signed else np.uint8
        cur = src
        if (lo, hi) != ((-128, 127) if signed else (0, 255)):
            mn = self._const(np.float32(s * (lo - zp)), "cmin")
            mx = self._const(np.float32(s * (hi - zp)), "cmax")
            cur = self._uid("clipq")
            self.nodes.append(helper.make_node("Clip", [src, mn, mx], [cur]))
        sn, zn = self._const(s, "s"), self._const(np.array(zp, dt), "zp")
        q, dq = self._uid("q"), self._uid("dq")
        self.nodes += [helper.make_node("QuantizeLinear", [cur, sn, zn], [q]),
                       helper.make_node("DequantizeLinear", [q, sn, zn], [dq])]
        return T(dq, float(s), zp, lo, hi, dt, tuple(shape))

    # ------------------------------------------------------------------ layers
    def conv(self, x: T, k: int, kernel: int = 3, stride: int = 1, pad: int = 1, groups: int = 1,
             wbits: int = 8, abits: int = 8, act: str | None = "relu", isg: bool = True,
             oso: bool = True, signed_out: bool = False, group_vec: np.ndarray | None = None) -> T:
        """Conv (+ISG gamma, +bias, +OSO, +act) -> activation quantizer."""
        n, c, h, w = x.shape
        cg = c // groups
        qmax = 2 ** (wbits - 1) - 1
        wq = self.rng.integers(-qmax - 1, qmax + 1, (k, cg, kernel, kernel)).astype(np.int8)
        s_w = self.rng.uniform(0.5, 2.0, k).astype(np.float32) / np.float32(qmax * kernel * np.sqrt(cg))
        bias = self.rng.normal(0, 0.3, k).astype(np.float32)
        gvec = np.zeros(c, np.int64)
        if isg:
            gvec = granular_groups(c, self.rng, self.cfg) if group_vec is None else np.asarray(group_vec)
        name = self._uid("conv")
        inp = x.name
        if isg:
            gamma = np.asarray(self.cfg.group_factors, np.float32)[gvec].reshape(1, c, 1, 1)
            inp = self._uid("isg")
            self.nodes.append(helper.make_node("Mul", [x.name, self._const(gamma, "gamma")], [inp]))
        wn = self._uid("wdq")
        self.nodes.append(helper.make_node("DequantizeLinear", [self._const(wq, "wq"), self._const(s_w, "sw"),
                                                                self._const(np.zeros(k, np.int8), "wzp")],
                                           [wn], axis=0))
        oh = (h + 2 * pad - kernel) // stride + 1
        ow = (w + 2 * pad - kernel) // stride + 1
        self.nodes.append(helper.make_node("Conv", [inp, wn, self._const(bias, "b")], [name], name=name,
                                           kernel_shape=[kernel, kernel], strides=[stride, stride],
                                           pads=[pad] * 4, group=groups))
        cur, g, phi = name, None, None
        if oso:
            g = self.rng.uniform(0.8, 1.2, k).astype(np.float32)
            phi = self.rng.normal(0, 0.1, k).astype(np.float32)
            m1, a1 = self._uid("oso_m"), self._uid("oso_a")
            self.nodes += [helper.make_node("Mul", [cur, self._const(g.reshape(1, k, 1, 1), "g")], [m1]),
                           helper.make_node("Add", [m1, self._const(phi.reshape(1, k, 1, 1), "phi")], [a1])]
            cur = a1
        if act == "relu":
            self.nodes.append(helper.make_node("Relu", [cur], [cur + "_r"]))
            cur += "_r"
        elif act == "relu6":
            self.nodes.append(helper.make_node("Clip", [cur, self._const(np.float32(0), "z"),
                                                        self._const(np.float32(6), "six")], [cur + "_r6"]))
            cur += "_r6"
        out = self._quantizer(cur, (n, k, oh, ow), abits, signed_out, act)
        self.layers[name] = {"wbits": wbits, "abits_out": abits}
        m, b = ref.norm_constants(x.scale, s_w, out.scale, out.zp, bias, g, phi)
        args = dict(stride=(stride, stride), pads=(pad,) * 4, groups=groups, isg_groups=gvec, cfg=self.cfg)
        self.steps.append(lambda env: env.__setitem__(out.name, ref.conv2d(
            env[x.name], x.zp, wq, m, b, out.lo, out.hi, out.dtype, **args)))
        return out

    def linear(self, x: T, k: int, wbits: int = 8, abits: int = 8, isg: bool = True, oso: bool = True) -> T:
        """Flatten -> [Mul(gamma)] -> Gemm(transB=1) -> [OSO] -> activation quantizer (signed)."""
        n = x.shape[0]
        c = int(np.prod(x.shape[1:]))
        qmax = 2 ** (wbits - 1) - 1
        wq = self.rng.integers(-qmax - 1, qmax + 1, (k, c)).astype(np.int8)
        s_w = self.rng.uniform(0.5, 2.0, k).astype(np.float32) / np.float32(qmax * np.sqrt(c))
        bias = self.rng.normal(0, 0.3, k).astype(np.float32)
        gvec = granular_groups(c, self.rng, self.cfg) if isg else np.zeros(c, np.int64)
        name, fl = self._uid("gemm"), self._uid("flat")
        self.nodes.append(helper.make_node("Flatten", [x.name], [fl]))
        inp = fl
        if isg:
            inp = self._uid("isg")
            gamma = np.asarray(self.cfg.group_factors, np.float32)[gvec].reshape(1, c)
            self.nodes.append(helper.make_node("Mul", [fl, self._const(gamma, "gamma")], [inp]))
        wn = self._uid("wdq")
        self.nodes.append(helper.make_node("DequantizeLinear", [self._const(wq, "wq"), self._const(s_w, "sw"),
                                                                self._const(np.zeros(k, np.int8), "wzp")],
                                           [wn], axis=0))
        self.nodes.append(helper.make_node("Gemm", [inp, wn, self._const(bias, "b")], [name], name=name, transB=1))
        cur, g, phi = name, None, None
        if oso:
            g = self.rng.uniform(0.8, 1.2, k).astype(np.float32)
            phi = self.rng.normal(0, 0.1, k).astype(np.float32)
            m1, a1 = self._uid("oso_m"), self._uid("oso_a")
            self.nodes += [helper.make_node("Mul", [cur, self._const(g.reshape(1, k), "g")], [m1]),
                           helper.make_node("Add", [m1, self._const(phi.reshape(1, k), "phi")], [a1])]
            cur = a1
        out = self._quantizer(cur, (n, k), abits, True, None)
        self.layers[name] = {"wbits": wbits, "abits_out": abits}
        m, b = ref.norm_constants(x.scale, s_w, out.scale, out.zp, bias, g, phi)
        self.steps.append(lambda env: env.__setitem__(out.name, ref.linear(
            env[x.name].reshape(n, c), x.zp, wq, m, b, out.lo, out.hi, out.dtype, isg_groups=gvec, cfg=self.cfg)))
        return out

    def add(self, a: T, b: T, act: str | None = "relu", abits: int = 8) -> T:
        """Residual add (+relu) -> activation quantizer."""
        s = self._uid("add")
        self.nodes.append(helper.make_node("Add", [a.name, b.name], [s]))
        if act == "relu":
            self.nodes.append(helper.make_node("Relu", [s], [s + "_r"]))
            s += "_r"
        out = self._quantizer(s, a.shape, abits, False, act)
        ma, mb, bias = ref.add_constants(a.scale, b.scale, out.scale, out.zp)
        self.steps.append(lambda env: env.__setitem__(out.name, ref.add(
            env[a.name], a.zp, ma, env[b.name], b.zp, mb, bias, out.lo, out.hi, out.dtype)))
        return out

    def maxpool(self, x: T, kernel: int = 3, stride: int = 2, pad: int = 1) -> T:
        """MaxPool -> QuantizeLinear with the input's scale / zp."""
        n, c, h, w = x.shape
        mp, q, dq = self._uid("mp"), self._uid("q"), self._uid("dq")
        sn, zn = self._const(np.float32(x.scale), "s"), self._const(np.array(x.zp, x.dtype), "zp")
        self.nodes += [helper.make_node("MaxPool", [x.name], [mp], kernel_shape=[kernel] * 2,
                                        strides=[stride] * 2, pads=[pad] * 4),
                       helper.make_node("QuantizeLinear", [mp, sn, zn], [q]),
                       helper.make_node("DequantizeLinear", [q, sn, zn], [dq])]
        oh, ow = (h + 2 * pad - kernel) // stride + 1, (w + 2 * pad - kernel) // stride + 1
        out = T(dq, x.scale, x.zp, x.lo, x.hi, x.dtype, (n, c, oh, ow))
        self.steps.append(lambda env: env.__setitem__(out.name, ref.max_pool2d(
            env[x.name], (kernel,) * 2, (stride,) * 2, (pad,) * 4)))
        return out

    def gap(self, x: T, abits: int = 8) -> T:
        """GlobalAveragePool -> activation quantizer."""
        n, c, h, w = x.shape
        gp = self._uid("gap")
        self.nodes.append(helper.make_node("GlobalAveragePool", [x.name], [gp]))
        out = self._quantizer(gp, (n, c, 1, 1), abits, False, None)
        m, b = ref.avg_pool_constants(x.scale, out.scale, out.zp, h * w)
        self.steps.append(lambda env: env.__setitem__(out.name, ref.global_avg_pool(
            env[x.name], x.zp, m, b, out.lo, out.hi, out.dtype)))
        return out

    def avgpool(self, x: T, kernel: int = 2, stride: int = 2, abits: int = 8, signed: bool = False) -> T:
        """AveragePool (no padding) -> activation quantizer."""
        n, c, h, w = x.shape
        ap = self._uid("ap")
        self.nodes.append(helper.make_node("AveragePool", [x.name], [ap], kernel_shape=[kernel] * 2,
                                           strides=[stride] * 2))
        oh, ow = (h - kernel) // stride + 1, (w - kernel) // stride + 1
        out = self._quantizer(ap, (n, c, oh, ow), abits, signed, None)
        m, b = ref.avg_pool_constants(x.scale, out.scale, out.zp, kernel * kernel)
        self.steps.append(lambda env: env.__setitem__(out.name, ref.avg_pool2d(
            env[x.name], x.zp, (kernel,) * 2, (stride,) * 2, m, b, out.lo, out.hi, out.dtype)))
        return out

    def mean(self, x: T, abits: int = 8) -> T:
        """ReduceMean(axes=[2, 3], keepdims=0) (torch ``x.mean((2, 3))``) -> activation quantizer; (N, C)."""
        n, c, h, w = x.shape
        rm = self._uid("mean")
        self.nodes.append(helper.make_node("ReduceMean", [x.name], [rm], axes=[2, 3], keepdims=0))
        out = self._quantizer(rm, (n, c), abits, False, None)
        m, b = ref.avg_pool_constants(x.scale, out.scale, out.zp, h * w)
        self.steps.append(lambda env: env.__setitem__(out.name, ref.global_avg_pool(
            env[x.name], x.zp, m, b, out.lo, out.hi, out.dtype).reshape(n, c)))
        return out

    def relu(self, x: T, requantize: bool = True, abits: int = 8, signed: bool = True) -> T:
        """Relu between two quantizers (onnxruntime's int8-symmetric QDQ): with ``requantize`` a new scale and
        zero point (the contract's 1x1 average pool, m = s_in / s_out), else the input's (a clip)."""
        r = self._uid("relu")
        self.nodes.append(helper.make_node("Relu", [x.name], [r]))
        if requantize:
            out = self._quantizer(r, x.shape, abits, signed, "relu")
            m, b = ref.avg_pool_constants(x.scale, out.scale, out.zp, 1)
            self.steps.append(lambda env: env.__setitem__(out.name, ref.avg_pool2d(
                env[x.name], x.zp, (1, 1), (1, 1), m, b, out.lo, out.hi, out.dtype)))
            return out
        sn, zn = self._const(np.float32(x.scale), "s"), self._const(np.array(x.zp, x.dtype), "zp")
        q, dq = self._uid("q"), self._uid("dq")
        self.nodes += [helper.make_node("QuantizeLinear", [r, sn, zn], [q]),
                       helper.make_node("DequantizeLinear", [q, sn, zn], [dq])]
        lo = max(x.lo, x.zp)
        out = T(dq, x.scale, x.zp, lo, x.hi, x.dtype, x.shape)
        self.steps.append(lambda env: env.__setitem__(out.name, np.clip(env[x.name], lo, x.hi).astype(x.dtype)))
        return out

    def matmul(self, x: T, k: int, op: str = "MatMul", wbits: int = 8, per_channel: bool = True) -> T:
        """A (N, C) input times a constant (C, K) weight: ``MatMul`` or ``Gemm`` with transB=0 (+ bias for
        Gemm) -> activation quantizer (signed); weight scales per output column (axis 1) or per tensor."""
        n, c = x.shape
        qmax = 2 ** (wbits - 1) - 1
        wq = self.rng.integers(-qmax - 1, qmax + 1, (c, k)).astype(np.int8)
        s_w = (self.rng.uniform(0.5, 2.0, k if per_channel else 1) / (qmax * np.sqrt(c))).astype(np.float32)
        wn, name = self._uid("wdq"), self._uid(op.lower())
        zp_w = np.zeros(k if per_channel else (), np.int8)
        self.nodes.append(helper.make_node("DequantizeLinear", [self._const(wq, "wq"), self._const(
            s_w if per_channel else s_w[0], "sw"), self._const(zp_w, "wzp")], [wn], axis=1))
        bias = None
        if op == "Gemm":
            bias = self.rng.normal(0, 0.3, k).astype(np.float32)
            self.nodes.append(helper.make_node("Gemm", [x.name, wn, self._const(bias, "b")], [name], name=name))
        else:
            self.nodes.append(helper.make_node("MatMul", [x.name, wn], [name], name=name))
        out = self._quantizer(name, (n, k), 8, True, None)
        m, b = ref.norm_constants(x.scale, np.broadcast_to(s_w, (k,)).astype(np.float32), out.scale, out.zp,
                                  bias, None, None)
        self.steps.append(lambda env: env.__setitem__(out.name, ref.linear(
            env[x.name], x.zp, np.ascontiguousarray(wq.T), m, b, out.lo, out.hi, out.dtype, cfg=self.cfg)))
        return out

    def float_op(self, xs: list[T], op_type: str, out_shape: tuple[int, ...], consts: tuple = (),
                 abits: int = 8, **attrs) -> T:
        """Any ONNX op on dequantized inputs (plus constant inputs, ``None`` for an empty one) -> activation
        quantizer. It has no integer reference: compare with ``compile(..., offload=False)``."""
        y = self._uid(op_type.lower())
        ins = [t.name for t in xs] + ["" if v is None else self._const(v, "c") for v in consts]
        self.nodes.append(helper.make_node(op_type, ins, [y], **attrs))
        return self._quantizer(y, out_shape, abits, False, None)

    # ------------------------------------------------------------------ output
    def model(self, outputs: list[T]) -> onnx.ModelProto:
        """The ONNX model (opset 17) with the ``ioso_npu`` metadata; ``onnx.checker`` clean."""
        g = helper.make_graph(
            self.nodes, "qdq", [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(self.shape))],
            [helper.make_tensor_value_info(o.name, TensorProto.FLOAT, list(o.shape)) for o in outputs],
            self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        meta = {"format_version": 1, "isg_group_signs": list(self.cfg.isg_group_signs),
                "isg_shift": self.cfg.isg_shift, "granularity": self.cfg.granularity, "layers": self.layers}
        helper.set_model_props(m, {"ioso_npu": json.dumps(meta)})
        onnx.checker.check_model(m)
        return m

    def run_reference(self, x: np.ndarray, outputs: list[T]) -> list[np.ndarray]:
        """Float outputs ``s * (q - zp)`` (float32) computed with ``hw_model.reference``."""
        env = {"input": np.asarray(x, np.float32)}
        for step in self.steps:
            step(env)
        return [((env[o.name].astype(np.float32) - np.float32(o.zp)) * np.float32(o.scale)).astype(np.float32)
                for o in outputs]

    def run_reference_int(self, x: np.ndarray, outputs: list[T]) -> list[np.ndarray]:
        """Integer outputs of ``hw_model.reference``."""
        env = {"input": np.asarray(x, np.float32)}
        for step in self.steps:
            step(env)
        return [env[o.name] for o in outputs]


def random_graph(rng: np.random.Generator, max_layers: int = 5,
                 self_add: bool = False) -> tuple[QDQBuilder, list[T]]:
    """A random QDQ graph: conv / depthwise / grouped conv, residual add (fan-out), max pool,
    global average pool + linear; odd channel counts and sizes, bits 2-8, random ISG groups.
    ``self_add``: a quarter of the residual adds read the same tensor twice (``y + y``).
    Returns the builder and the graph outputs (one or two: a fan-out tensor may be an output)."""
    c, hw = int(rng.choice([1, 3, 8, 16, 20, 24, 32])), int(rng.integers(3, 10))
    b = QDQBuilder((1, c, hw, hw), rng, abits=int(rng.integers(2, 9)), signed=bool(rng.integers(2)))
    x, outs = b.input, []
    for _ in range(int(rng.integers(1, max_layers + 1))):
        bits = {"wbits": int(rng.integers(2, 9)), "abits": int(rng.integers(2, 9))}
        op = rng.choice(["conv", "conv", "depthwise", "residual", "maxpool"])
        cin, h = x.shape[1], x.shape[2]
        if op == "depthwise" and cin > 1:
            x = b.conv(x, cin, groups=cin, isg=False, act=rng.choice([None, "relu", "relu6"]), **bits)
        elif op == "residual":
            k = int(rng.choice([8, 16, 24]))
            y = b.conv(x, k, kernel=1, pad=0, **bits)
            z = b.conv(y, k, act=None, signed_out=True, **bits)
            if rng.integers(4) == 0:
                outs.append(y)  # fan-out to a graph output
            same = self_add and rng.integers(4) == 0
            x = b.add(y, y if same else z, act=rng.choice([None, "relu"]), abits=bits["abits"])
        elif op == "maxpool" and h >= 3:
            x = b.maxpool(x, kernel=int(rng.choice([2, 3])), stride=int(rng.choice([1, 2])), pad=0)
        else:
            kernel = int(rng.choice([1, 3, 5])) if h >= 5 else int(rng.choice([1, 3]))
            stride = int(rng.choice([1, 2])) if h >= 4 else 1
            x = b.conv(x, int(rng.choice([4, 16, 20, 32])), kernel=kernel, stride=stride, pad=kernel // 2,
                       act=rng.choice([None, "relu", "relu6"]), isg=bool(rng.integers(2)),
                       oso=bool(rng.integers(2)), signed_out=bool(rng.integers(2)), **bits)
    if rng.integers(2):
        x = b.linear(b.gap(x), int(rng.integers(2, 12)), wbits=int(rng.integers(2, 9)))
    return b, [*outs, x]
