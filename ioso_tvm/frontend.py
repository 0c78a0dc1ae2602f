"""ONNX import: load a model in the format of docs/onnx_format.md into Relax and read its IOSO metadata.

Every number read from the file is checked where it enters (:func:`check_numbers`,
:func:`ioso_metadata`): QuantizeLinear / DequantizeLinear scales (finite, > 0, scalar or 1-D,
one per channel of a constant input), zero points (dtype, shape, range of the stored values),
the constants of Conv / Gemm / MatMul / Mul / Add (finite) and Clip bounds (not NaN). Each
failure is one ValueError line naming the node, the input and the allowed range.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm.relax.frontend.onnx import from_onnx

from hw_model.config import NPUConfig

_NARROW = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8, TensorProto.INT16: np.int16,
           TensorProto.UINT16: np.uint16}
_FINITE_OPS = ("Conv", "Gemm", "MatMul", "Mul", "Add")
"""Ops whose constant float inputs (weights, bias, ISG gamma, OSO scale / offset) must be finite."""


def load_onnx(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as a ModelProto (from a path or as is); errors name the file."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, Path)):
        p = Path(model)
        if not p.is_file():
            raise FileNotFoundError(f"model file {str(p)!r} does not exist")
        try:
            return onnx.load(str(p))
        except Exception as e:  # onnx raises DecodeError and friends
            raise ValueError(f"model file {str(p)!r} is not a readable ONNX model ({e})") from None
    raise TypeError(f"model must be an ONNX path or onnx.ModelProto, got {type(model).__name__}")


def _array(t: TensorProto, where: str) -> np.ndarray:
    """A tensor's values; 8/16-bit integers stored as int32_data must lie in their dtype's range."""
    narrow = _NARROW.get(t.data_type)
    if narrow is not None and len(t.int32_data):
        raw, info = np.asarray(t.int32_data, np.int64), np.iinfo(narrow)
        if raw.min() < info.min or raw.max() > info.max:
            bad = int(raw[(raw < info.min) | (raw > info.max)][0])
            raise ValueError(f"{where} {t.name!r} holds {bad}, outside the {np.dtype(narrow).name} range "
                             f"{info.min}..{info.max}")
    try:
        return numpy_helper.to_array(t)
    except Exception as e:
        raise ValueError(f"{where} {t.name!r} cannot be read ({type(e).__name__}: {e})") from None


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs of ``graph`` by name."""
    out = {t.name: _array(t, "initializer") for t in graph.initializer}
    for node in graph.node:
        if node.op_type != "Constant" or not node.output:
            continue
        for a in node.attribute:
            if a.name == "value":
                out[node.output[0]] = _array(a.t, f"Constant node output {node.output[0]!r}:")
            elif a.name in ("value_float", "value_floats", "value_int", "value_ints"):
                dt = np.float32 if "float" in a.name else np.int64
                out[node.output[0]] = np.asarray(helper.get_attribute_value(a), dt)
    return out


def _desc(node: onnx.NodeProto, k: int) -> str:
    return f"ONNX node {node.op_type} {node.name!r}" if node.name else \
        f"ONNX node {node.op_type} #{k} (output {node.output[0]!r})"


def _first_bad(a: np.ndarray, bad: np.ndarray) -> str:
    at = tuple(int(i) for i in np.argwhere(bad)[0]) if a.ndim else ()
    return f"{a[at].item()!r}" + (f" at index {at}" if a.ndim else "")


def _check_qdq(node: onnx.NodeProto, where: str, consts: dict[str, np.ndarray]) -> None:
    s_name = node.input[1] if len(node.input) > 1 else ""
    s = consts.get(s_name)
    if s is None:
        return  # a computed scale: the layer stays on the CPU (fold_qdq says why)
    if not np.issubdtype(s.dtype, np.floating):
        raise ValueError(f"{where}: scale {s_name!r} must be a float tensor, got {s.dtype}")
    if s.ndim > 1:
        raise ValueError(f"{where}: scale {s_name!r} must be a scalar or 1-D (per axis), got shape {list(s.shape)}")
    bad = ~np.isfinite(s) | (s <= 0)
    if bad.any():
        raise ValueError(f"{where}: scale {s_name!r} must be finite and > 0, got {_first_bad(s, bad)}")
    x = consts.get(node.input[0])
    if x is not None and s.size > 1:
        axis = next((int(a.i) for a in node.attribute if a.name == "axis"), 1)
        if not -x.ndim <= axis < x.ndim or x.shape[axis] != s.size:
            raise ValueError(f"{where}: {s.size} scales in {s_name!r} for axis {axis} of {node.input[0]!r} "
                             f"(shape {list(x.shape)}); one scale per channel of that axis is needed")
    z_name = node.input[2] if len(node.input) > 2 else ""
    zp = consts.get(z_name)
    if zp is not None:
        allowed = ("int8", "uint8", "int32") if node.op_type == "DequantizeLinear" else ("int8", "uint8")
        if zp.dtype.name not in allowed:
            raise ValueError(f"{where}: zero point {z_name!r} must be {'/'.join(allowed)}, got {zp.dtype}")
        if zp.shape != s.shape:
            raise ValueError(f"{where}: zero point {z_name!r} has shape {list(zp.shape)}, its scale {s_name!r} "
                             f"{list(s.shape)} (they must match)")


def check_numbers(model: onnx.ModelProto) -> None:
    """ValueError (one line naming the node and input) on a bad number in ``model``'s constants."""
    consts = _constants(model.graph)
    for k, node in enumerate(model.graph.node):
        where = _desc(node, k)
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            _check_qdq(node, where, consts)
        elif node.op_type in _FINITE_OPS or node.op_type == "Clip":
            for i, name in enumerate(node.input):
                a = consts.get(name)
                if a is None or not np.issubdtype(a.dtype, np.floating):
                    continue
                bad = np.isnan(a) if node.op_type == "Clip" else ~np.isfinite(a)
                if bad.any():
                    what = "a Clip bound" if node.op_type == "Clip" else f"input {i}"
                    raise ValueError(f"{where}: {what} {name!r} holds {_first_bad(a, bad)}; it must be "
                                     f"{'a number (not NaN)' if node.op_type == 'Clip' else 'finite'}")


def _int(meta: dict[str, Any], key: str, lo: int, hi: int, where: str = "") -> int | None:
    v = meta.get(key)
    if v is not None and (type(v) is not int or not lo <= v <= hi):
        raise ValueError(f"metadata_props['ioso_npu']{where}: {key} must be an int in {lo}..{hi}, got {v!r}")
    return v


def ioso_metadata(model: onnx.ModelProto, cfg: NPUConfig) -> dict[str, Any]:
    """The ``ioso_npu`` metadata JSON ({} for plain QDQ files), checked against ``cfg`` and the graph."""
    props = {p.key: p.value for p in model.metadata_props}
    if "ioso_npu" not in props:
        return {}
    try:
        meta = json.loads(props["ioso_npu"])
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"metadata_props['ioso_npu'] is not JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"metadata_props['ioso_npu'] must be a JSON object, got a JSON {type(meta).__name__}")
    if type(meta.get("format_version")) is not int or meta["format_version"] != 1:
        raise ValueError(f"metadata_props['ioso_npu']: format_version {meta.get('format_version')!r} unsupported (1)")
    signs = meta.get("isg_group_signs")
    if signs is not None and (not isinstance(signs, list) or any(type(s) is not int for s in signs)):
        raise ValueError(f"metadata_props['ioso_npu']: isg_group_signs must be a list of ints, got {signs!r}")
    _int(meta, "isg_shift", 1, 31)
    _int(meta, "granularity", 1, 1 << 16)
    for key, want in (("isg_group_signs", list(cfg.isg_group_signs)), ("isg_shift", cfg.isg_shift),
                      ("granularity", cfg.granularity)):
        if key in meta and meta[key] != want:
            raise ValueError(f"model metadata {key}={meta[key]!r} does not match NPUConfig.{key}={want!r}")
    layers = meta.get("layers", {})
    if not isinstance(layers, dict):
        raise ValueError(f"metadata_props['ioso_npu']: layers must be an object, got {layers!r:.80}")
    nodes = {n.name for n in model.graph.node}
    for name, ly in layers.items():
        if not isinstance(ly, dict):
            raise ValueError(f"metadata_props['ioso_npu']: layers[{name!r}] must be an object, got {ly!r:.80}")
        if name not in nodes:
            raise ValueError(f"metadata_props['ioso_npu']: layers[{name!r}] names no node of the graph")
        for key in ("wbits", "abits_out"):
            _int(ly, key, 2, 8, f" layers[{name!r}]")
    return meta


def explicit_auto_pad(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every Conv ``auto_pad=SAME_UPPER/SAME_LOWER`` written as explicit ``pads`` (ONNX
    semantics: the odd pixel at the end / the start), where shape inference knows the input size; a copy
    when anything changes. The NPU folds explicit pads into the conv; TVM would emit a separate pad."""
    same = [k for k, n in enumerate(model.graph.node) if n.op_type == "Conv" and any(
        a.name == "auto_pad" and a.s in (b"SAME_UPPER", b"SAME_LOWER") for a in n.attribute)]
    if not same:
        return model
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return model  # fold_qdq names the separate pad as the reason
    g = inferred.graph
    shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
              for vi in (*g.value_info, *g.input, *g.output)}
    shapes.update({t.name: list(t.dims) for t in g.initializer})
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for k in same:
        node = out.graph.node[k]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        x, w = shapes.get(node.input[0]), shapes.get(node.input[1])
        kernel = attrs.get("kernel_shape") or (w[2:] if w else None)
        if not x or len(x) != 4 or None in x[2:] or not kernel or None in kernel:
            continue
        strides, dil = attrs.get("strides", [1, 1]), attrs.get("dilations", [1, 1])
        begin, end = [], []
        for i in range(2):
            size = x[2 + i]
            total = max((-(-size // strides[i]) - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - size, 0)
            lo, hi = total // 2, total - total // 2
            begin.append(lo if attrs["auto_pad"] == b"SAME_UPPER" else hi)
            end.append(total - begin[-1])
        kept = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute("pads", begin + end)])
    return out


def import_onnx(model: str | Path | onnx.ModelProto, cfg: NPUConfig,
                input_shapes: dict[str, list[int]] | None = None) -> tuple[tvm.IRModule, dict[str, Any]]:
    """(Relax module with constants inlined, IOSO metadata) of an ONNX model."""
    proto = load_onnx(model)
    meta = ioso_metadata(proto, cfg)
    check_numbers(proto)
    proto = explicit_auto_pad(proto)
    try:
        mod = from_onnx(proto, shape_dict=input_shapes, keep_params_in_input=False)
    except Exception as e:
        raise ValueError(f"ONNX import failed: {type(e).__name__}: {str(e).splitlines()[-1][:300]}") from None
    return mod, meta


_THROUGH = ("Relu", "Clip", "Mul", "Add", "Div", "Identity", "Reshape", "Flatten", "Max", "Min")
"""Element-wise / shape ops between a layer's main op and its output quantizer (bias, OSO, activation)."""
_MAIN = ("Conv", "Gemm", "MatMul", "Add", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean")


def quantizer_sources(model: onnx.ModelProto) -> list[str]:
    """For each QuantizeLinear of an activation (not of a constant), in graph order, the name of the node
    that computes the quantized value: the Conv / Gemm / Add / pool under its bias, OSO and activation ops
    (the graph input's name for the input quantizer). torch.onnx names nodes by module path
    (``/layer1/layer1.0/conv1/Conv``), so these name the torch modules too."""
    graph = model.graph
    consts = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in graph.node for o in n.output}
    out = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in consts:
            continue
        src, name = producer.get(node.input[0]), node.input[0]
        while src is not None and src.op_type not in _MAIN and src.op_type in _THROUGH:
            nxt = next((i for i in src.input if i not in consts), None)
            if nxt is None or producer.get(nxt) is None or producer[nxt].op_type == "DequantizeLinear":
                break
            src = producer[nxt]
        if src is not None:
            name = src.name or src.output[0]
        out.append(name)
    return out
