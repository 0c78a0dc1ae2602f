"""BYOC partition of the folded integer graph: FuseOpsByPattern -> RunCodegen (``relax.ext.ioso_npu``).

Flow (TVM 0.27):

1. ``FuseOpsByPattern(pattern_table(ctx), annotate_codegen=True)``: each integer layer marker
   (see :mod:`target_npu.patterns`) whose check passes becomes a function with
   ``Codegen="ioso_npu"`` wrapping a ``Composite="ioso_npu.<op>"`` function.
2. Each codegen function is renamed ``<prefix>.npu.<layer index>`` (``global_symbol``) so that
   two compiled models never share a runtime function name.
3. ``RunCodegen`` calls the Python codegen registered as ``relax.ext.ioso_npu``, which builds the
   layer's NPU program (``target_npu.runtime``) and registers it as the global function of that
   symbol; the call in ``main`` becomes ``call_dps_packed("<prefix>.npu.<i>", ...)``.

``MergeCompositeFunctions`` is not run: in TVM 0.27 it stops with "Do not have a default for
relax.expr.ExternFunc" on the marker's callee, and a layer is the NPU's unit of work anyway
(each runtime call runs one layer program). Layers that fail a check keep their marker call,
i.e. the CPU function ``<prefix>.<i>`` (``hw_model.reference``).
"""
from __future__ import annotations

import logging
from typing import Any

import tvm
import tvm_ffi
from tvm import relax

from target_npu.patterns import PartitionContext, pattern_table

log = logging.getLogger("target_npu.partition")
_ACTIVE: list[PartitionContext] = []  # the context RunCodegen's codegen reads (set by partition)


def _layer_index(func: relax.Function, ctx: PartitionContext) -> int:
    found: list[int] = []

    def visit(e: Any) -> None:
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_dps_packed":
            found.append(ctx.layer_of(e)[0])

    relax.analysis.post_order_visit(func, visit)
    if len(found) != 1:
        raise ValueError(f"NPU function {func.attrs.get('global_symbol')} holds {len(found)} layers, expected 1")
    return found[0]


@tvm_ffi.register_global_func("relax.ext.ioso_npu", override=True)
def _codegen(functions: Any, options: Any, constant_names: Any) -> list[Any]:
    """Codegen of the offloaded functions: register each one's NPU program under its symbol."""
    from target_npu import runtime

    if not _ACTIVE:
        raise RuntimeError("relax.ext.ioso_npu called outside target_npu.partition.partition")
    ctx = _ACTIVE[-1]
    for f in functions:
        idx = _layer_index(f, ctx)
        sym = str(f.attrs["global_symbol"])
        ctx.symbols[idx] = sym
        runtime.register_layer(sym, ctx.layers[idx], ctx.config, ctx.profile, program=ctx.programs[idx])
    return []


def partition(mod: tvm.IRModule, ctx: PartitionContext, prefix: str) -> tvm.IRModule:
    """``mod`` with every layer passing its check offloaded to a ``<prefix>.npu.<i>`` call."""
    mod = relax.transform.FuseOpsByPattern(pattern_table(ctx), bind_constants=True, annotate_codegen=True)(mod)
    renamed = {}
    for gv in mod.get_global_vars():
        f = mod[gv]
        if isinstance(f, relax.Function) and f.attrs is not None and f.attrs.get("Codegen") == "ioso_npu":
            renamed[gv] = f.with_attr("global_symbol", f"{prefix}.npu.{_layer_index(f, ctx)}")
    for gv, f in renamed.items():
        mod[gv] = f
    _ACTIVE.append(ctx)
    try:
        mod = relax.transform.RunCodegen()(mod)
    finally:
        _ACTIVE.pop()
    for idx, why in sorted(ctx.rejected.items()):
        log.info("layer %s stays on the CPU: %s", ctx.layers[idx].name, why)
    return mod
