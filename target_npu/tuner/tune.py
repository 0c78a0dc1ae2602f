"""``tune_model``: tune every 2-D conv layer of an ONNX model and write JSON-lines records."""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference
from tqdm import tqdm

from hw_model.config import DEFAULT_CONFIG, NPUConfig

from .dispatch import make_executor
from .measure import Measurer, get_measure
from .records import config_hash, layer_key, load_records, make_record, save_records
from .search import make_tuner, tuner_name
from .space import ConvSpec, shape_key, shape_spec, tunable


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    g = model.graph
    out = {i.name: tuple(numpy_helper.to_array(i).shape) for i in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            out[vi.name] = tuple(d.dim_value for d in dims)
    return out


def _isg_groups(node: onnx.NodeProto, producers: dict, inits: dict, cfg: NPUConfig) -> np.ndarray | None:
    """ISG group per input channel from the ``Mul(gamma)`` feeding the Conv (docs/onnx_format.md), or None."""
    mul = producers.get(node.input[0])
    if mul is None or mul.op_type != "Mul":
        return None
    gamma = next((inits[i] for i in mul.input if i in inits), None)
    if gamma is None:
        return None
    try:
        return cfg.group_of_factor(gamma)
    except ValueError as e:
        raise ValueError(f"Conv node {node.name!r}: {e}") from None


def with_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph inputs have the static ``shapes`` (name -> dims); the inferred
    shapes inside the graph are dropped so that shape inference recomputes them. ValueError for an
    unknown input name or another rank."""
    model = copy.deepcopy(model)
    inputs = {i.name: i for i in model.graph.input}
    for name, dims in shapes.items():
        if name not in inputs:
            raise ValueError(f"input_shapes names unknown input {name!r}; the model's inputs are {sorted(inputs)}")
        tt = inputs[name].type.tensor_type
        if len(tt.shape.dim) != len(dims) or any(not isinstance(d, int) or d <= 0 for d in dims):
            raise ValueError(f"input_shapes[{name!r}] must be {len(tt.shape.dim)} positive ints, got {list(dims)}")
        for d, v in zip(tt.shape.dim, dims):
            d.Clear()
            d.dim_value = int(v)
    del model.graph.value_info[:]
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    return model


def conv_specs(model: str | Path | onnx.ModelProto, cfg: NPUConfig | None = None,
               input_shapes: dict[str, tuple[int, ...]] | None = None) -> list[ConvSpec]:
    """Distinct 2-D conv layers (dense, grouped, depthwise) of an ONNX model (plain or QDQ), in graph order, as
    shape-only ``hw_model`` ConvSpecs (zero weights) with the ISG group of each input channel read from
    the ``Mul(gamma)`` before the Conv (none: all in group 0). Distinct = another shape or group layout.

    ``input_shapes`` (name -> dims) fixes the graph inputs first (a dynamic batch, as ``tvmc tune
    --input-shapes``). Convs of unknown or non-2-D shape are skipped with a warning (they keep the
    default schedule).
    """
    if isinstance(model, (str, Path)):
        if not Path(model).is_file():
            raise ValueError(f"onnx model file not found: {model}")
        model = onnx.load(str(model))
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"model must be an ONNX path or ModelProto, got {type(model).__name__}")
    if input_shapes:
        model = with_input_shapes(model, input_shapes)
    model = shape_inference.infer_shapes(model)
    shapes = _shapes(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    cfg = DEFAULT_CONFIG if cfg is None else cfg
    specs: list[ConvSpec] = []
    seen: set[tuple] = set()
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        w = node.input[1]
        if w not in shapes and w in producers and producers[w].op_type == "DequantizeLinear":
            w = producers[w].input[0]
        x, ws = shapes.get(node.input[0]), shapes.get(w)
        a = {at.name: onnx.helper.get_attribute_value(at) for at in node.attribute}
        pads, strides = list(a.get("pads", [0, 0, 0, 0])), list(a.get("strides", [1, 1]))
        dil = list(a.get("dilations", [1, 1]))
        if x is None or ws is None or len(x) != 4 or len(ws) != 4 or len(pads) != 4:
            warnings.warn(f"Conv node {node.name!r}: unknown or non-2-D shapes, not tuned", stacklevel=2)
            continue
        try:
            # ONNX pads are (top, left, bottom, right) for 2-D: the hw_model order
            spec = shape_spec(x[1], ws[0], x[2], x[3], ws[2], ws[3], tuple(strides), tuple(pads),
                              int(a.get("group", 1)), n=x[0], dilation=tuple(dil))
        except ValueError as e:
            warnings.warn(f"Conv node {node.name!r}: {e}; not tuned", stacklevel=2)
            continue
        groups = _isg_groups(node, producers, inits, cfg)
        if groups is not None and groups.size == spec.c:
            spec.isg_groups = groups
        why = tunable(spec)
        if why is not None:
            warnings.warn(f"Conv node {node.name!r}: {why}", stacklevel=2)
            continue
        if shape_key(spec, cfg) not in seen:
            seen.add(shape_key(spec, cfg))
            specs.append(spec)
    return specs


def _check_output(output: str | Path, model: Any) -> None:
    """ValueError unless ``output`` can take the records without destroying the model."""
    out = Path(output)
    if isinstance(model, (str, Path)) and (out.resolve() == Path(model).resolve()
                                          or (out.exists() and Path(model).exists()
                                              and os.path.samefile(out, model))):
        raise ValueError(f"output {str(output)!r} is the model file {str(model)!r}; write the records elsewhere")
    if out.is_dir():
        raise ValueError(f"output {str(output)!r} is a directory; name a file")
    if not out.parent.is_dir():
        raise ValueError(f"output {str(output)!r}: the folder {str(out.parent)!r} does not exist")


def _warm_records(path: str | Path | None, cfg: NPUConfig) -> dict[str, list[dict[str, Any]]]:
    """Records of ``path`` for this NPUConfig (``config`` parsed to a Tiling), by layer key; bad records
    warn and are skipped (``load_records``)."""
    if path is None:
        return {}
    out: dict[str, list[dict[str, Any]]] = {}
    h = config_hash(cfg)
    for r in load_records(path):
        if r.get("npu_config_hash") == h:
            out.setdefault(r["layer_key"], []).append(r)
    return out


def tune_model(onnx_path_or_model: str | Path | onnx.ModelProto, trials: int, output: str | Path,
               cfg: NPUConfig | None = None, tuner: str = "xgb", jobs: int = 1, seed: int = 0,
               measure: str = "tir", progress: bool = True,
               input_shapes: dict[str, tuple[int, ...]] | None = None, warm_start: str | Path | None = None,
               early_stopping: int | None = None, executor: str = "serial",
               ray_address: str | None = None) -> list[dict[str, Any]]:
    """Tune each distinct conv layer with ``trials`` new measurements (per layer) and write all
    measured records to ``output`` (JSON lines, replaced atomically). Returns the records written.

    ``output`` is checked before tuning starts: not the model file, not a directory, in an
    existing folder. ``input_shapes``: static shapes of the graph inputs (see :func:`conv_specs`).

    ``measure``: "tir" (default: the compiler's program, TIR path, + cycle model) or "builder".
    ``executor`` (``target_npu.tuner.dispatch``): "serial" (this process, or ``jobs`` worker processes)
    or "ray" (Ray tasks: a local Ray with ``jobs`` CPUs, all when ``jobs`` is 1, or the cluster at
    ``ray_address``); the records are the same for every executor.
    ``warm_start``: records of an earlier run (this NPUConfig's are used): their measurements count as
    done, guide the search and are written to ``output`` with the new ones (``output`` may be that file).
    ``early_stopping``: stop a layer after that many measurements without a better schedule."""
    cfg = DEFAULT_CONFIG if cfg is None else cfg
    if not isinstance(cfg, NPUConfig):
        raise TypeError(f"cfg must be an NPUConfig, got {type(cfg).__name__}")
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValueError(f"jobs must be a positive int, got {jobs!r}")
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive int, got {trials!r}")
    tuner = tuner_name(tuner)
    _check_output(output, onnx_path_or_model)
    fn = get_measure(measure)
    warm = _warm_records(warm_start, cfg)
    specs = conv_specs(onnx_path_or_model, cfg, input_shapes)
    records: list[dict[str, Any]] = []
    bar = tqdm(specs, desc="tune layers", disable=not progress)
    pool = make_executor(executor, jobs, ray_address)  # one for all layers: each worker imports TVM once
    try:
        for spec in bar:
            key = layer_key(spec, cfg)
            try:
                t = make_tuner(tuner, spec, cfg, measurer=Measurer(spec, cfg, fn, jobs=jobs, pool=pool), seed=seed)
            except ValueError as e:
                warnings.warn(f"layer {key}: {e}; keeps the default schedule", stacklevel=2)
                continue
            old = [make_record(spec, r["config"], r["cycles"], cfg, r["tuner"]) for r in warm.get(key, [])]
            t.warm_start([r["config"] for r in warm.get(key, [])], [r["cycles"] for r in old])
            res = t.tune(trials, progress=progress, desc=key, early_stopping=early_stopping)
            if res.history:
                bar.set_postfix(layer=key, best_cycles=res.best[1])
            records += old + [make_record(spec, tiling, c, cfg, tuner) for tiling, c in res.history]
    finally:
        if pool is not None:
            pool.shutdown()
    save_records(output, records, append=False)
    return records
