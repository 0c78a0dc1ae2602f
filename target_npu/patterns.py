"""Pattern table of the ioso_npu BYOC partition (style of ``tvm.relax.backend.*.patterns``).

Input: a Relax module after ``target_npu.transform.fold_qdq``, where every recognised layer is in its
integer form (``target_npu.integer_ops``: ``conv2d`` / ``matmul`` over int16 ``x - zp`` into int32, the
ISG shift-adds, NORM, round, clip, cast). One :class:`~tvm.relax.transform.FusionPattern` per layer
kind and number of ISG groups matches that form (``ioso_npu.conv2d``, ``ioso_npu.linear``,
``ioso_npu.add``, ``ioso_npu.max_pool2d``, ``ioso_npu.global_avg_pool``, ``ioso_npu.avg_pool2d``); its
``check`` finds the
:class:`target_npu.layer.Layer` bound to the matched output variable and enforces the NPU's limits
on its typed ``hw_model`` spec (:func:`npu_limits`):

- activation dtypes int8/uint8 in and out (``hw_model.layer_specs``), weights int8 within
  ``WEIGHT_BITS_MAX`` bits, kernel <= ``MAX_KERNEL``, stride <= ``MAX_STRIDE``, dilation 1,
  groups 1 or depthwise (others expanded by the builder), clip bounds inside the out dtype, a max pool
  without clip (ALU_MAX has none);
- the layer's ``hw_model`` spec accepts it and a tiling (the tuned one, else the default) fits the
  ``NPUConfig`` buffers. Checks are pure: no program is built here; the codegen builds and links.

A layer that fails a check is not offloaded: ``target_npu.partition`` replaces its integer form by a
packed call of the CPU function (``hw_model.reference``, exact) and :class:`PartitionContext` records
the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tvm.relax.transform import FusionPattern

from hw_model.config import NPUConfig
from hw_model.layer_specs import AddSpec, ConvSpec, LinearSpec, PoolSpec
from target_npu.integer_ops import patterns

KINDS = {"conv2d": "conv", "linear": "conv", "add": "add", "max_pool2d": "maxpool", "global_avg_pool": "gap",
         "avg_pool2d": "gap"}
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

    def index_of(self, var_name: str) -> int:
        """Index of the layer whose output is bound to ``var_name`` (-1: none)."""
        return next((i for i, ly in enumerate(self.layers) if ly.out_name == var_name and ly.kind != "input"), -1)

    def index_of_name(self, layer_name: str) -> int:
        """Index of the layer called ``layer_name``; ValueError if there is none."""
        for i, ly in enumerate(self.layers):
            if ly.name == layer_name:
                return i
        raise ValueError(f"no layer named {layer_name!r}")


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
    if isinstance(spec, PoolSpec) and spec.kind == "max" and (int(spec.lo), int(spec.hi)) != (info.min, info.max):
        return (f"max pool with clip [{spec.lo}, {spec.hi}] inside {spec.out_dtype}: the NPU's ALU_MAX does not clip "
                f"(a relu / clip between max pool and quantizer)")
    if isinstance(spec, PoolSpec) and max(spec.kernel) > MAX_KERNEL:
        return f"pool kernel {list(spec.kernel)} > {MAX_KERNEL}"
    return None


def _make_check(ctx: PartitionContext, composite: str) -> Any:
    from target_npu import runtime  # the bridge from a folded layer to its hw_model spec

    def check(pctx: Any) -> bool:
        root = pctx.annotated_expr["root"]
        var = pctx.value_to_bound_var.get(root)
        idx = -1 if var is None else ctx.index_of(var.name)
        if idx < 0:
            return False
        layer = ctx.layers[idx]
        if layer.kind != KINDS[composite] or (layer.kind == "conv" and layer.is_linear != (composite == "linear")):
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
    """The ``ioso_npu.<op>`` patterns of the integer forms (``target_npu.integer_ops``), each with its check."""
    return [FusionPattern(f"ioso_npu.{name}", pat, {"root": pat}, _make_check(ctx, name))
            for name in KINDS for pat in patterns(name, ctx.config)]
