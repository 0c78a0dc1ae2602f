"""Pattern table of the ioso_npu BYOC partition (style of ``tvm.relax.backend.*.patterns``).

Input: a Relax module after ``ioso_tvm.passes.fold_qdq`` and
:func:`target_npu.partition.markers_to_stubs`, where every recognised integer layer is one call
``R.call_tir(ioso_npu_layer, (*int_inputs, R.const(i, "int64")))`` (the index constant binds the
layer into its composite and keeps composites apart). Each
:class:`~tvm.relax.transform.FusionPattern` matches that call; its ``check`` reads the
:class:`ioso_tvm.passes.fold_qdq.Layer` behind the index and enforces the NPU's limits:

- activation dtypes int8/uint8 in and out (``hw_model.layer_specs``), weights int8 within
  ``WEIGHT_BITS_MAX`` bits, kernel <= ``MAX_KERNEL``, stride <= ``MAX_STRIDE``, dilation 1,
  groups 1 or depthwise (others expanded by the builder), clip bounds inside the out dtype;
- the layer's ``hw_model`` spec accepts it and a tiling (the tuned one, else the default) fits the
  ``NPUConfig`` buffers. Checks are pure: no program is built here; the codegen builds and links.

A call that fails a check is not offloaded: it becomes a packed call of the CPU function
(``hw_model.reference``, exact) and :class:`PartitionContext` records the op and the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tvm import relax
from tvm.relax.dpl import is_gv, is_op, wildcard
from tvm.relax.transform import FusionPattern

from hw_model.config import NPUConfig

STUB = "ioso_npu_layer"
"""The stub PrimFunc a layer call targets during the partition (``target_npu.partition.markers_to_stubs``)."""
KINDS = {"conv2d": "conv", "linear": "conv", "add": "add", "max_pool2d": "maxpool", "global_avg_pool": "gap"}
"""Composite name suffix -> ``Layer.kind``."""
WEIGHT_BITS_MAX = 8
"""Weight precision of the 16x16 MAC array (int8 x int8 -> int32; hw_model/config.py)."""
MAX_KERNEL = 7
"""Largest kernel side offloaded. Chosen: covers 7x7 stems (same limit as fold_qdq)."""
MAX_STRIDE = 4
"""Largest conv/pool stride offloaded. Chosen: the strides of the supported CNNs (1, 2, 4 for patchify)."""


@dataclass
class PartitionContext:
    """The layers being partitioned, the reasons of rejected ones, the regions and their linked streams."""

    layers: list[Any]
    config: NPUConfig
    tilings: list[Any] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    symbols: dict[int, str] = field(default_factory=dict)
    regions: list[Any] = field(default_factory=list)
    streams: list[Any] = field(default_factory=list)  # one linked hw_model Program per region
    profile: Any = None
    memory_reuse: bool = True

    def layer_of(self, call: relax.Call) -> tuple[int, Any]:
        """(index, layer) of a marker call (its last argument is the index constant)."""
        args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else [call.args[1]]
        idx = int(args[-1].value.numpy()) if hasattr(args[-1], "value") else -1
        if not 0 <= idx < len(self.layers):
            raise ValueError(f"marker call {call.args[0]} carries no valid layer index")
        return idx, self.layers[idx]


def _limits(layer: Any, composite: str) -> str | None:
    """Reason ``layer`` breaks a static NPU limit, or None."""
    c = layer.consts
    for i, dt in enumerate(c.get("in_dtypes", [])):
        if dt not in ("int8", "uint8"):
            return f"input {i} dtype {dt} (the NPU reads int8/uint8)"
    if layer.out_dtype not in ("int8", "uint8"):
        return f"output dtype {layer.out_dtype} (the NPU writes int8/uint8)"
    info = np.iinfo(layer.out_dtype)
    if not info.min <= int(c["lo"]) <= int(c["hi"]) <= info.max:
        return f"clip [{c['lo']}, {c['hi']}] outside {layer.out_dtype}"
    if layer.kind == "conv":
        w = np.asarray(c["w"])
        lim = 2 ** (WEIGHT_BITS_MAX - 1)
        if w.dtype != np.int8 or w.min() < -lim or w.max() > lim - 1:
            return f"weights {w.dtype} beyond {WEIGHT_BITS_MAX} bits"
        k, cg, kh, kw = w.shape
        if max(kh, kw) > MAX_KERNEL:
            return f"kernel {kh}x{kw} > {MAX_KERNEL}"
        cin = int(np.prod(c["in_shape"][1:])) if composite == "linear" else int(c["in_shape"][1])
        g = int(c["groups"])
        if g not in (1, cin) and cin // g != cg:
            return f"groups {g} do not divide {cin} input channels"
    if layer.kind in ("conv", "maxpool") and max(int(s) for s in c["stride"]) > MAX_STRIDE:
        return f"stride {list(c['stride'])} > {MAX_STRIDE}"
    if layer.kind == "maxpool" and max(int(s) for s in c["kernel"]) > MAX_KERNEL:
        return f"pool kernel {list(c['kernel'])} > {MAX_KERNEL}"
    return None


def _make_check(ctx: PartitionContext, composite: str) -> Any:
    from target_npu import runtime  # the program builder bridge to hw_model

    def check(pctx: Any) -> bool:
        idx, layer = ctx.layer_of(pctx.annotated_expr["root"])
        want = KINDS[composite]
        is_linear = layer.kind == "conv" and len(layer.out_shape) == 2
        if layer.kind != want or (want == "conv" and is_linear != (composite == "linear")):
            return False
        why = _limits(layer, composite)
        if why is None:
            why = runtime.check_layer(layer, ctx.config, ctx.tilings[idx] if idx < len(ctx.tilings) else None)
        if why is not None:
            ctx.rejected[idx] = why
            return False
        ctx.rejected.pop(idx, None)
        return True

    return check


def pattern_table(ctx: PartitionContext) -> list[FusionPattern]:
    """One ``ioso_npu.<op>`` pattern per NPU layer kind, each with its limit check."""
    out = []
    for name in KINDS:
        root = is_op("relax.call_tir")(is_gv(STUB), wildcard())
        out.append(FusionPattern(f"ioso_npu.{name}", root, {"root": root}, _make_check(ctx, name)))
    return out
