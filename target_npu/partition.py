"""BYOC partition of the folded integer graph: FuseOpsByPattern -> MergeCompositeFunctions -> RunCodegen.

Flow (TVM 0.27):

1. :func:`markers_to_stubs`: every layer marker ``call_dps_packed("<prefix>.<i>", (*ins, const(i)))``
   of ``ioso_tvm.passes.fold_qdq`` becomes ``call_tir(ioso_npu_layer, (*ins, const(i)))`` on a stub
   PrimFunc. (``MergeCompositeFunctions`` of TVM 0.27 stops with "Do not have a default for
   relax.expr.ExternFunc" on a packed callee; a ``call_tir`` callee is a GlobalVar it handles.)
2. ``FuseOpsByPattern(pattern_table(ctx))`` (:mod:`target_npu.patterns`): each layer whose check
   passes becomes a ``Composite="ioso_npu.<op>"`` function.
3. ``MergeCompositeFunctions``: neighbouring composites become one ``Codegen="ioso_npu"`` function, an
   NPU region; each is renamed ``<prefix>.npu.r<k>`` (``global_symbol``) so that two compiled models
   never share a runtime function name.
4. ``RunCodegen`` calls the Python codegen registered as ``relax.ext.ioso_npu``: it reads each region
   (:func:`target_npu.regions.read_region`), registers its runtime function
   (:func:`target_npu.runtime.register_region`) and records it in ``ctx.regions``; the call in ``main``
   becomes ``call_dps_packed("<prefix>.npu.r<k>", ...)``.
5. :func:`stubs_to_markers`: the layers left outside every region (checks failed, input quantizer)
   become ``call_dps_packed("<prefix>.<i>", ...)`` again: the CPU function (``hw_model.reference``), and
   the stub PrimFunc is dropped.
"""
from __future__ import annotations

import logging
from typing import Any

import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.script import tirx as T

from target_npu.patterns import STUB, PartitionContext, pattern_table
from target_npu.regions import read_region

log = logging.getLogger("target_npu.partition")
_ACTIVE: list[PartitionContext] = []  # the context RunCodegen's codegen reads (set by partition)


@T.prim_func(private=True)
def _stub() -> None:
    T.evaluate(0)


def _is_call(e: Any, op: str) -> bool:
    return isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == op


def _out_sinfo(call: relax.Call) -> Any:
    return call.ty_args[0] if len(call.ty_args) == 1 else list(call.ty_args)


def markers_to_stubs(mod: tvm.IRModule, prefix: str) -> tvm.IRModule:
    """Step 1: layer markers of ``prefix`` -> ``call_tir`` of the stub PrimFunc."""

    @mutator
    class ToStub(PyExprMutator):
        gv: Any = None

        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            if _is_call(call, "relax.call_dps_packed") and isinstance(call.args[0], relax.ExternFunc) \
                    and str(call.args[0].global_symbol).startswith(prefix + "."):
                if self.gv is None:
                    self.gv = self.builder_.add_func(_stub, STUB)
                return relax.call_tir(self.gv, call.args[1], _out_sinfo(call))
            return call

    m = ToStub(mod)
    main = m.visit_expr(mod["main"])
    out = m.builder_.get()
    out["main"] = main
    return out


def stubs_to_markers(mod: tvm.IRModule, prefix: str, ctx: PartitionContext) -> tvm.IRModule:
    """Step 5: layer stubs left in ``main`` -> the CPU marker ``call_dps_packed("<prefix>.<i>", ...)``."""

    @mutator
    class ToMarker(PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            if _is_call(call, "relax.call_tir") and getattr(call.args[0], "name_hint", "") == STUB:
                idx, _ = ctx.layer_of(call)
                return relax.call_dps_packed(f"{prefix}.{idx}", call.args[1], _out_sinfo(call))
            return call

    main = ToMarker(mod).visit_expr(mod["main"])
    mod = tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv.name_hint not in (STUB, "main")},
                       attrs=mod.attrs)
    mod["main"] = main
    return mod


@tvm_ffi.register_global_func("relax.ext.ioso_npu", override=True)
def _codegen(functions: Any, options: Any, constant_names: Any) -> list[Any]:
    """Codegen of the NPU regions: read each one and register its runtime function under its symbol."""
    from target_npu import runtime

    if not _ACTIVE:
        raise RuntimeError("relax.ext.ioso_npu called outside target_npu.partition.partition")
    ctx = _ACTIVE[-1]
    programs = [ctx.programs.get(i) for i in range(len(ctx.layers))]
    for f in functions:
        region = read_region(f, str(f.attrs["global_symbol"]), lambda c: ctx.layer_of(c)[0])
        for i in region.layers:
            ctx.symbols[i] = region.symbol
        ctx.regions.append(region)
        runtime.register_region(region, ctx.layers, programs, ctx.config, ctx.profile)
    return []


def partition(mod: tvm.IRModule, ctx: PartitionContext, prefix: str) -> tvm.IRModule:
    """``mod`` with every layer passing its check inside an NPU region ``<prefix>.npu.r<k>``."""
    mod = markers_to_stubs(mod, prefix)
    mod = relax.transform.FuseOpsByPattern(pattern_table(ctx), bind_constants=True, annotate_codegen=False)(mod)
    mod = relax.transform.MergeCompositeFunctions()(mod)
    renamed = {}
    for gv in mod.get_global_vars():
        f = mod[gv]
        if isinstance(f, relax.Function) and f.attrs is not None and f.attrs.get("Codegen") == "ioso_npu":
            renamed[gv] = f.with_attr("global_symbol", f"{prefix}.npu.r{len(renamed)}")
    for gv, f in renamed.items():
        mod[gv] = f
    _ACTIVE.append(ctx)
    try:
        mod = relax.transform.RunCodegen()(mod)
    finally:
        _ACTIVE.pop()
    mod = stubs_to_markers(mod, prefix, ctx)
    for idx, why in sorted(ctx.rejected.items()):
        log.info("layer %s stays on the CPU: %s", ctx.layers[idx].name, why)
    log.info("NPU regions: %s", [len(r.steps) for r in ctx.regions])
    return mod
