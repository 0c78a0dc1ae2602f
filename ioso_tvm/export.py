"""Export a calibrated :class:`~ioso_tvm.calib.QuantModel` to ONNX QDQ (format: ``docs/onnx_format.md``).

The graph is built node by node with ``onnx.helper`` from the quantized model's program, so
every value written is the float32 / integer value deploy mode uses (``QLayer.integer_params``,
``ActQuantizer.scale32``). The bytes depend only on the model's state (deterministic).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17  # docs/onnx_format.md: opset 17
IR_VERSION = 8  # the IR version that goes with opset 17 (onnx/docs/Versioning.md)


class _Builder:
    """Collects nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], out: str | None = None, name: str | None = None, **attrs) -> str:
        self.count += 1
        out = out or f"t{self.count}_{op}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name or f"{op}_{self.count}", **attrs))
        return out


def _act_quant(bld: _Builder, x: str, qp, tag: str, out: str) -> str:
    """[Clip(s*(lo-zp), s*(hi-zp))] -> QuantizeLinear -> DequantizeLinear; returns the DQ output name."""
    s = np.float32(qp.scale)
    zp_dtype = np.int8 if qp.signed else np.uint8
    full = (-128, 127) if qp.signed else (0, 255)
    if (qp.lo, qp.hi) != full:
        lo = bld.const(f"{tag}.clip_min", np.float32(s * np.float32(qp.lo - qp.zp)))
        hi = bld.const(f"{tag}.clip_max", np.float32(s * np.float32(qp.hi - qp.zp)))
        x = bld.node("Clip", [x, lo, hi], name=f"{tag}.clip")
    sc = bld.const(f"{tag}.scale", s)
    zp = bld.const(f"{tag}.zero_point", zp_dtype(qp.zp))
    q = bld.node("QuantizeLinear", [x, sc, zp], f"{tag}.q", name=f"{tag}.quantize")
    return bld.node("DequantizeLinear", [q, sc, zp], out, name=f"{tag}.dequantize")


def _layer(bld: _Builder, op, x: str, qout, cfg) -> str:
    """Conv / Gemm with ISG Mul, DQ weights, bias, OSO Mul/Add and the activation; returns pre-quant name."""
    p = op.integer_params()
    name = op.name
    conv = op.kind == "conv"
    shape_in = (1, -1, 1, 1) if conv else (1, -1)
    if np.any(p["isg_groups"] != 0):
        factors = np.asarray(cfg.group_factors, np.float32)
        gamma = factors[p["isg_groups"]].reshape(shape_in)
        x = bld.node("Mul", [x, bld.const(f"{name}.isg_gamma", gamma)], name=f"{name}.isg")
    k = p["w_int"].shape[0]
    wq = bld.const(f"{name}.weight_q", p["w_int"])
    ws = bld.const(f"{name}.weight_scale", p["s_w"])
    wz = bld.const(f"{name}.weight_zero_point", np.zeros(k, np.int8))
    w = bld.node("DequantizeLinear", [wq, ws, wz], f"{name}.weight", name=f"{name}.weight_dq", axis=0)
    b = bld.const(f"{name}.bias", p["bias"])
    if conv:
        ph, pw = op.padding
        y = bld.node("Conv", [x, w, b], name=name, strides=list(op.stride), pads=[ph, pw, ph, pw],
                     dilations=list(op.dilation), group=op.groups, kernel_shape=list(op.weight.shape[2:]))
    else:
        y = bld.node("Gemm", [x, w, b], name=name, transB=1)
    if not (np.all(p["oso_scale"] == 1) and np.all(p["oso_offset"] == 0)):
        shape_out = (1, k, 1, 1) if conv else (1, k)
        y = bld.node("Mul", [y, bld.const(f"{name}.oso_scale", p["oso_scale"].reshape(shape_out))],
                     name=f"{name}.oso_mul")
        y = bld.node("Add", [y, bld.const(f"{name}.oso_offset", p["oso_offset"].reshape(shape_out))],
                     name=f"{name}.oso_add")
    return _activation(bld, y, op.outq.act, name)


def _activation(bld: _Builder, y: str, act: str | None, name: str) -> str:
    if act == "relu":
        return bld.node("Relu", [y], name=f"{name}.relu")
    if act == "relu6":
        lo = bld.const(f"{name}.relu6_min", np.float32(0))
        hi = bld.const(f"{name}.relu6_max", np.float32(6))
        return bld.node("Clip", [y, lo, hi], name=f"{name}.relu6")
    return y


def export_onnx(qmodel, path: str | Path | None, input_shape: tuple[int, ...] | None = None) -> onnx.ModelProto:
    """Write ``qmodel`` (a calibrated QuantModel with hardened groups) as ONNX QDQ to ``path``
    (``None``: do not write) and return the ModelProto. ``input_shape`` (N, C, H, W); default
    a symbolic batch ``N`` and the model's (C, H, W). Graph input ``input``, output ``output``."""
    from ioso_tvm.calib.deploy import qparams
    from ioso_tvm.calib.graph import QConcat
    from ioso_tvm.calib.qmodel import QuantModel
    from ioso_tvm.calib.qmodules import QAdd, QFlatten, QGlobalAvgPool, QInput, QLayer, QMaxPool

    if not isinstance(qmodel, QuantModel):
        raise TypeError(f"qmodel must be a QuantModel (from ioso_tvm.calibrate), got {type(qmodel).__name__}")
    if input_shape is None:
        dims: list = ["N", *qmodel.input_shape]
    else:
        if len(input_shape) != 1 + len(qmodel.input_shape) or tuple(input_shape[1:]) != qmodel.input_shape:
            raise ValueError(f"input_shape must be (N, {', '.join(map(str, qmodel.input_shape))}), got {input_shape}")
        dims = list(input_shape)
    cfg = qmodel.cfg
    bld = _Builder()
    fl: dict[str, str] = {}  # program tensor -> name of its dequantized float tensor
    qps: dict[str, object] = {}
    layers_meta: dict[str, dict] = {}
    for st in qmodel.program:
        op = qmodel.ops[st.op]
        out = "output" if st.out == qmodel.output else f"{st.out}.dq"
        tag = op.name
        if isinstance(op, QInput):
            qps[st.out] = qparams(op.outq)
            fl[st.out] = _act_quant(bld, "input", qps[st.out], tag, out)
        elif isinstance(op, QLayer):
            qps[st.out] = qparams(op.outq)
            y = _layer(bld, op, fl[st.inputs[0]], qps[st.out], cfg)
            fl[st.out] = _act_quant(bld, y, qps[st.out], f"{tag}.out", out)
            layers_meta[op.name] = {"wbits": op.wq.bits, "abits_out": op.outq.bits}
        elif isinstance(op, QAdd):
            qps[st.out] = qparams(op.outq)
            y = bld.node("Add", [fl[t] for t in st.inputs], name=tag)
            fl[st.out] = _act_quant(bld, _activation(bld, y, op.outq.act, tag), qps[st.out], f"{tag}.out", out)
        elif isinstance(op, QConcat):  # channel concat, requantized to its own scale
            qps[st.out] = qparams(op.outq)
            y = bld.node("Concat", [fl[t] for t in st.inputs], name=tag, axis=1)
            fl[st.out] = _act_quant(bld, _activation(bld, y, op.outq.act, tag), qps[st.out], f"{tag}.out", out)
        elif isinstance(op, QGlobalAvgPool):
            qps[st.out] = qparams(op.outq)
            y = bld.node("GlobalAveragePool", [fl[st.inputs[0]]], name=tag)
            fl[st.out] = _act_quant(bld, y, qps[st.out], f"{tag}.out", out)
        elif isinstance(op, QMaxPool):
            qp = qps[st.out] = qps[st.inputs[0]]
            ph, pw = op.padding
            y = bld.node("MaxPool", [fl[st.inputs[0]]], name=tag, kernel_shape=list(op.kernel),
                         strides=list(op.stride), pads=[ph, pw, ph, pw])
            sc = bld.const(f"{tag}.scale", np.float32(qp.scale))
            zp = bld.const(f"{tag}.zero_point", (np.int8 if qp.signed else np.uint8)(qp.zp))
            q = bld.node("QuantizeLinear", [y, sc, zp], f"{tag}.q", name=f"{tag}.quantize")
            fl[st.out] = bld.node("DequantizeLinear", [q, sc, zp], out, name=f"{tag}.dequantize")
        elif isinstance(op, QFlatten):
            qps[st.out] = qps[st.inputs[0]]
            fl[st.out] = bld.node("Flatten", [fl[st.inputs[0]]], out, name=tag, axis=1)
        else:
            raise TypeError(f"op {st.op!r} ({type(op).__name__}) cannot be exported")
    out_rank = 2 if fl[qmodel.output] == "output" and _is_2d(qmodel) else 4
    graph = helper.make_graph(
        bld.nodes, "ioso_npu",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [dims[0]] + [None] * (out_rank - 1))],
        initializer=bld.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="ioso_npu",
                              ir_version=IR_VERSION)
    meta = {"format_version": 1, "isg_group_signs": list(cfg.isg_group_signs), "isg_shift": cfg.isg_shift,
            "granularity": cfg.granularity, "layers": layers_meta}
    helper.set_model_props(model, {"ioso_npu": json.dumps(meta, sort_keys=True)})
    onnx.checker.check_model(model)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))
    return model


def _is_2d(qmodel) -> bool:
    """Whether the model output is (N, K) (ends in a linear layer or a flatten)."""
    last = qmodel.ops[qmodel.program[-1].op]
    return getattr(last, "kind", "") in ("linear", "flatten")
