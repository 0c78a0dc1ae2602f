"""Pattern table of the ioso_npu BYOC partition (style of ``tvm.relax.backend.*.patterns``).

Input: a Relax module after ``ioso_tvm.passes.fold_qdq`` and
:func:`target_npu.partition.markers_to_stubs`, where every recognised integer layer is one call
``R.call_tir(ioso_npu_layer, (*int_inputs, R.const(i, "int64")))`` (the index constant binds the
layer into its composite and keeps composites apart). Each
:class:`~tvm.relax.transform.FusionPattern` matches that call; its ``check`` turns the
:class:`ioso_tvm.passes.fold_qdq.Layer` behind the index into its typed ``hw_model`` spec
(``ConvSpec`` / ``LinearSpec`` / ``AddSpec`` / ``PoolSpec``, :func:`target_npu.runtime.to_spec`) and
enforces the NPU's limits on it (:func:`npu_limits`):

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
from hw_model.layer_specs import AddSpec, ConvSpec, LinearSpec, PoolSpec

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


def npu_limits(spec: Any) -> str | None:
    """Reason a layer (its typed ``hw_model.layer_specs`` spec) breaks a static NPU limit, or None."""
    if isinstance(spec, LinearSpec):
        weight = np.asarray(spec.weight)[:, :, None, None]
        spec = spec.as_conv()
    else:
        weight = np.asarray(getattr(spec, "weight", np.zeros((1, 1, 1, 1), np.int8)))
    ins = (spec.a_dtype, spec.b_dtype) if isinstance(spec, AddSpec) else (spec.in_dtype,)
    for i, dt in enumerate(ins):
        if dt not in ("int8", "uint8"):
            return f"input {i} dtype {dt} (the NPU reads int8/uint8)"
    if spec.out_dtype not in ("int8", "uint8"):
        return f"output dtype {spec.out_dtype} (the NPU writes int8/uint8)"
    info = np.iinfo(spec.out_dtype)
    if not info.min <= int(spec.lo) <= int(spec.hi) <= info.max:
        return f"clip [{spec.lo}, {spec.hi}] outside {spec.out_dtype}"
    if isinstance(spec, ConvSpec):
        lim = 2 ** (WEIGHT_BITS_MAX - 1)
        if weight.dtype != np.int8 or weight.min() < -lim or weight.max() > lim - 1:
            return f"weights {weight.dtype} beyond {WEIGHT_BITS_MAX} bits"
        if max(spec.kh, spec.kw) > MAX_KERNEL:
            return f"kernel {spec.kh}x{spec.kw} > {MAX_KERNEL}"
        if spec.groups not in (1, spec.c) and (spec.c % spec.groups or spec.c // spec.groups != weight.shape[1]):
            return f"groups {spec.groups} do not divide {spec.c} input channels"
    if isinstance(spec, (ConvSpec, PoolSpec)) and max(spec.stride) > MAX_STRIDE:
        return f"stride {list(spec.stride)} > {MAX_STRIDE}"
    if isinstance(spec, PoolSpec) and max(spec.kernel) > MAX_KERNEL:
        return f"pool kernel {list(spec.kernel)} > {MAX_KERNEL}"
    return None


def _make_check(ctx: PartitionContext, composite: str) -> Any:
    from target_npu import runtime  # the bridge from a folded layer to its hw_model spec

    def check(pctx: Any) -> bool:
        idx, layer = ctx.layer_of(pctx.annotated_expr["root"])
        want = KINDS[composite]
        is_linear = layer.kind == "conv" and len(layer.out_shape) == 2
        if layer.kind != want or (want == "conv" and is_linear != (composite == "linear")):
            return False
        try:
            why = npu_limits(runtime.to_spec(layer))
        except (KeyError, TypeError, ValueError) as e:
            why = f"not an NPU layer: {e}"
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
