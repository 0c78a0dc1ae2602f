"""``tune_model``: tune every offloadable conv layer of an ONNX model and write JSON-lines records."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper, shape_inference
from tqdm import tqdm

from hw_model.config import DEFAULT_CONFIG, NPUConfig

from .measure import Measurer, default_backend, get_measure
from .records import layer_key, make_record, save_records
from .search import make_tuner
from .space import ConvSpec


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    g = model.graph
    out = {i.name: tuple(numpy_helper.to_array(i).shape) for i in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            out[vi.name] = tuple(d.dim_value for d in dims)
    return out


def conv_specs(model: str | Path | onnx.ModelProto) -> list[ConvSpec]:
    """Distinct dense 2-D conv layers of an ONNX model (plain or QDQ), in graph order.

    Convs with grouped channels, asymmetric pads/strides or unknown shapes are skipped with a warning
    (they keep the default schedule).
    """
    if isinstance(model, (str, Path)):
        if not Path(model).is_file():
            raise ValueError(f"onnx model file not found: {model}")
        model = onnx.load(str(model))
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"model must be an ONNX path or ModelProto, got {type(model).__name__}")
    model = shape_inference.infer_shapes(model)
    shapes = _shapes(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    specs: list[ConvSpec] = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        w = node.input[1]
        if w not in shapes and w in producers and producers[w].op_type == "DequantizeLinear":
            w = producers[w].input[0]
        x, ws = shapes.get(node.input[0]), shapes.get(w)
        a = {at.name: onnx.helper.get_attribute_value(at) for at in node.attribute}
        pads, strides = list(a.get("pads", [0, 0, 0, 0])), list(a.get("strides", [1, 1]))
        if x is None or ws is None or len(x) != 4 or len(ws) != 4:
            warnings.warn(f"Conv node {node.name!r}: unknown or non-2-D shapes, not tuned", stacklevel=2)
            continue
        if a.get("group", 1) != 1 or len(set(pads)) != 1 or len(set(strides)) != 1:
            warnings.warn(f"Conv node {node.name!r}: grouped or asymmetric conv, not tuned", stacklevel=2)
            continue
        spec = ConvSpec(in_ch=x[1], out_ch=ws[0], in_h=x[2], in_w=x[3], kh=ws[2], kw=ws[3],
                        stride=strides[0], pad=pads[0])
        if spec not in specs:
            specs.append(spec)
    return specs


def tune_model(onnx_path_or_model: str | Path | onnx.ModelProto, trials: int, output: str | Path,
               cfg: NPUConfig | None = None, tuner: str = "xgb", jobs: int = 1, seed: int = 0,
               measure: str | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Tune each distinct conv layer with ``trials`` measurements (per layer) and write all
    measured records to ``output`` (JSON lines, overwritten). Returns the records written.

    ``measure``: "builder" (real program + cycle model, the default when present) or "estimate"."""
    cfg = DEFAULT_CONFIG if cfg is None else cfg
    if not isinstance(cfg, NPUConfig):
        raise TypeError(f"cfg must be an NPUConfig, got {type(cfg).__name__}")
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive int, got {trials!r}")
    fn = get_measure(default_backend() if measure is None else measure)
    specs = conv_specs(onnx_path_or_model)
    records: list[dict[str, Any]] = []
    bar = tqdm(specs, desc="tune layers", disable=not progress)
    for spec in bar:
        key = layer_key(spec, cfg)
        try:
            t = make_tuner(tuner, spec, cfg, measurer=Measurer(spec, cfg, fn, jobs=jobs), seed=seed)
        except ValueError as e:
            warnings.warn(f"layer {key}: {e}; keeps the default schedule", stacklevel=2)
            continue
        res = t.tune(trials, progress=progress, desc=key)
        bar.set_postfix(layer=key, best_cycles=res.best[1])
        records += [make_record(key, tiling, c, cfg, tuner) for tiling, c in res.history]
    save_records(output, records, append=False)
    return records
