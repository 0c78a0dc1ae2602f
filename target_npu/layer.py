"""One folded integer layer of a model: its typed ``hw_model`` spec and where it sits in the graph.

``target_npu.transform.fold_qdq`` makes one :class:`Layer` per recognised QDQ chain; the partition checks
its spec, the codegen builds its program from the spec, and a layer left on the CPU runs the
contract (``hw_model.reference``) with the same spec. Kinds and specs:

========  ==============================================  ==========================
kind      spec                                            inputs
========  ==============================================  ==========================
conv      ``ConvSpec`` (dense, grouped, depthwise) or      1
          ``LinearSpec`` (Gemm; ``weight`` in the NCHW
          flatten order of a 4-D input)
add       ``AddSpec``                                     2
maxpool   ``PoolSpec(kind="max")`` (a 1x1 one: a clip        1
          between two equal quantizers)
gap       average pools: ``PoolSpec(kind="global_avg")``  1
          (output (N, C, 1, 1), or (N, C) for a
          ``ReduceMean`` with ``keepdims=0``) or
          ``PoolSpec(kind="avg")`` (layer ``avgpool<i>``,
          no padding; a 1x1 one: a requantizing
          activation)
input     ``QuantizeSpec`` (CPU side of the contract)     1 (float32)
========  ==============================================  ==========================

:func:`layer_record` / :func:`layer_from_record` turn a layer into JSON scalars plus numpy arrays
(the artifact's ``meta.json`` and ``constants.npz``) and back.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hw_model.layer_specs import AddSpec, ConvSpec, LinearSpec, PoolSpec, QuantizeSpec

SPECS = {cls.__name__: cls for cls in (ConvSpec, LinearSpec, AddSpec, PoolSpec, QuantizeSpec)}
KIND_SPECS = {"conv": (ConvSpec, LinearSpec), "add": (AddSpec,), "maxpool": (PoolSpec,), "gap": (PoolSpec,),
              "input": (QuantizeSpec,)}


@dataclass
class Layer:
    """A folded layer: ``spec`` is its typed ``hw_model`` description; shapes are logical (NCHW / (N, C))."""

    kind: str
    name: str
    spec: Any
    in_shapes: list[tuple[int, ...]]
    in_dtypes: list[str]
    out_shape: tuple[int, ...]
    out_dtype: str
    inputs: list[Any] = field(default_factory=list)  # Relax vars of the inputs (compile time only)
    quant: Any = None  # the relax.quantize call this layer replaces (compile time only)
    out_name: str = ""  # name of the Relax var holding the output
    source: str = ""  # the ONNX node the layer comes from (its torch module path for a torch export), if known

    def __post_init__(self) -> None:
        if self.kind not in KIND_SPECS or not isinstance(self.spec, KIND_SPECS[self.kind]):
            raise TypeError(f"layer {self.name}: kind {self.kind!r} with a {type(self.spec).__name__} spec")

    @property
    def in_shape(self) -> tuple[int, ...]:
        """Logical shape of the first input."""
        return self.in_shapes[0]

    @property
    def is_linear(self) -> bool:
        return isinstance(self.spec, LinearSpec)

    @property
    def isg_groups(self) -> np.ndarray | None:
        """ISG group per input channel of a conv / linear (logical channel order), else None."""
        if not isinstance(self.spec, (ConvSpec, LinearSpec)):
            return None
        g = self.spec.isg_groups
        return np.zeros(self.in_shape[1], np.int64) if g is None else np.asarray(g, np.int64)

    def macs(self) -> int:
        """Multiply-accumulates of one run (conv / linear; 0 otherwise)."""
        if isinstance(self.spec, LinearSpec):
            return int(self.spec.n * self.spec.c * self.spec.k)
        if isinstance(self.spec, ConvSpec):
            k, cg, kh, kw = np.shape(self.spec.weight)
            return int(np.prod(self.out_shape)) * cg * kh * kw
        return 0


def _json_value(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, tuple):
        return list(v)
    return v


def layer_record(layer: Layer) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(JSON-able description, arrays by spec field name) of ``layer`` (what the artifact stores)."""
    scalars, arrays = {}, {}
    for f in dataclasses.fields(layer.spec):
        v = getattr(layer.spec, f.name)
        if isinstance(v, np.ndarray):
            arrays[f.name] = v
        else:
            scalars[f.name] = _json_value(v)
    desc = {"kind": layer.kind, "name": layer.name, "spec_type": type(layer.spec).__name__, "spec": scalars,
            "in_shapes": [list(s) for s in layer.in_shapes], "in_dtypes": list(layer.in_dtypes),
            "out_shape": list(layer.out_shape), "out_dtype": layer.out_dtype, "source": layer.source}
    return desc, arrays


def layer_from_record(desc: dict[str, Any], arrays: dict[str, np.ndarray]) -> Layer:
    """Inverse of :func:`layer_record`; ValueError naming the layer on a malformed record."""
    name = desc.get("name", "?") if isinstance(desc, dict) else "?"
    try:
        cls = SPECS[desc["spec_type"]]
        values = {**desc["spec"], **arrays}
        names = {f.name for f in dataclasses.fields(cls)}
        if set(values) - names:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(set(values) - names)}")
        for f in ("stride", "pads", "dilation", "kernel"):
            if isinstance(values.get(f), list):
                values[f] = tuple(int(v) for v in values[f])
        spec = cls(**values)
        return Layer(str(desc["kind"]), str(desc["name"]), spec, [tuple(int(d) for d in s) for s in desc["in_shapes"]],
                     [str(d) for d in desc["in_dtypes"]], tuple(int(d) for d in desc["out_shape"]),
                     str(desc["out_dtype"]), source=str(desc.get("source", "")))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed layer record {name!r}: {e}") from None
