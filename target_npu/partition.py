"""BYOC partition of the folded integer graph: FuseOpsByPattern -> MergeCompositeFunctions -> RunCodegen.

Flow (TVM 0.27), on a module whose layers are in their integer form (``target_npu.integer_ops``):

1. ``FuseOpsByPattern(pattern_table(ctx))`` (:mod:`target_npu.patterns`): each layer whose check
   passes becomes a ``Composite="ioso_npu.<op>"`` function.
2. ``MergeCompositeFunctions``: neighbouring composites become one ``Codegen="ioso_npu"`` function, an
   NPU region; each is renamed ``<prefix>.npu.r<k>`` (``global_symbol``) so that two compiled models
   never share a runtime function name.
3. ``RunCodegen`` calls the Python codegen registered as ``relax.ext.ioso_npu``: it reads each region
   (:func:`target_npu.regions.read_region`), links its layers into one instruction stream over one
   DRAM image (:func:`target_npu.link.link_region`), registers its runtime function
   (:func:`target_npu.runtime.register_region`) and records both in ``ctx.regions`` / ``ctx.streams``;
   the call in ``main`` becomes ``call_dps_packed("<prefix>.npu.r<k>", ...)``.
4. :func:`layers_to_cpu`: each layer left outside every region (a check failed) has its integer form
   replaced by ``call_dps_packed("<prefix>.<i>", ...)``: the contract's CPU function
   (``hw_model.reference``, ``target_npu.runtime.register_layer``).
5. :func:`region_boundaries`: around each region call, the layout changes between the host's NCHW
   tensors and the NPU's padded NHWC (permute_dims, pad, slice or take) become host graph ops.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.script import tirx as T

from target_npu.integer_ops import rewrite_layers
from target_npu.link import link_region
from target_npu.patterns import PartitionContext, pattern_table
from target_npu.regions import read_region

log = logging.getLogger("target_npu.partition")
_ACTIVE: list[PartitionContext] = []  # the context RunCodegen's codegen reads (set by partition)


def _is_call(e: Any, op: str) -> bool:
    return isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == op


def _out_sinfo(call: relax.Call) -> Any:
    return call.ty_args[0] if len(call.ty_args) == 1 else list(call.ty_args)


@T.prim_func(private=True)
def _stub() -> None:
    T.evaluate(0)


def _hide_packed_calls(mod: tvm.IRModule) -> tuple[tvm.IRModule, dict[str, str]]:
    """Each ``call_dps_packed`` of an extern function in ``main`` (the input quantizers) -> ``call_tir`` of a
    stub PrimFunc, because ``MergeCompositeFunctions`` of TVM 0.27 stops with "Do not have a default for
    relax.expr.ExternFunc"; returns the module and stub name -> extern symbol (:func:`_restore_packed_calls`)."""
    stubs: dict[str, str] = {}

    @mutator
    class Hide(PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102
            call = super().visit_call_(call)
            if _is_call(call, "relax.call_dps_packed") and isinstance(call.args[0], relax.ExternFunc):
                name = f"ioso_npu_packed_{len(stubs)}"
                stubs[name] = str(call.args[0].global_symbol)
                return relax.call_tir(self.builder_.add_func(_stub, name), call.args[1], _out_sinfo(call))
            return call

    m = Hide(mod)
    main = m.visit_expr(mod["main"])
    out = m.builder_.get()
    out["main"] = main
    return out, stubs


def _restore_packed_calls(mod: tvm.IRModule, stubs: dict[str, str]) -> tvm.IRModule:
    """Inverse of :func:`_hide_packed_calls`; the stub PrimFuncs are dropped."""

    @mutator
    class Restore(PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102
            call = super().visit_call_(call)
            name = getattr(call.args[0], "name_hint", "") if _is_call(call, "relax.call_tir") else ""
            if name in stubs:
                return relax.call_dps_packed(stubs[name], call.args[1], _out_sinfo(call))
            return call

    main = Restore(mod).visit_expr(mod["main"])
    mod = tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv.name_hint not in (*stubs, "main")},
                       attrs=mod.attrs)
    mod["main"] = main
    return mod


def layers_to_cpu(mod: tvm.IRModule, layers: list[Any], prefix: str, which: set[int]) -> tvm.IRModule:
    """Step 4: the integer form of each layer ``i in which`` -> ``call_dps_packed("<prefix>.<i>", operands)``."""

    def make(i: int, ly: Any, ops: list[Any], _emit: Any) -> relax.Expr:
        return relax.call_dps_packed(f"{prefix}.{i}", ops, relax.TensorType(ly.out_shape, ly.out_dtype))

    return rewrite_layers(mod, layers, make, which)


@tvm_ffi.register_global_func("relax.ext.ioso_npu", override=True)
def _codegen(functions: Any, options: Any, constant_names: Any) -> list[Any]:
    """Codegen of the NPU regions: read each one, link its layers into one stream (``target_npu.link``)
    and register its runtime function under its symbol."""
    from target_npu import runtime

    if not _ACTIVE:
        raise RuntimeError("relax.ext.ioso_npu called outside target_npu.partition.partition")
    ctx = _ACTIVE[-1]

    def build(i: int, in_slots: list[Any]) -> Any:
        tiling = ctx.tilings[i] if i < len(ctx.tilings) else None
        prog, why = runtime.make_program(ctx.layers[i], ctx.config, tiling, in_slots)
        if prog is None:
            raise ValueError(f"layer {ctx.layers[i].name} passed the NPU check but its program cannot be built: {why}")
        return prog

    for f in functions:
        region = read_region(f, str(f.attrs["global_symbol"]), ctx.index_of_name,
                             lambda i: len(ctx.layers[i].in_dtypes))
        for i in region.layers:
            ctx.symbols[i] = region.symbol
        stream = link_region(region, ctx.layers, build, ctx.config, reuse=ctx.memory_reuse)
        ctx.regions.append(region)
        ctx.streams.append(stream)
        runtime.register_region(stream, ctx.config, ctx.profile)
    return []


def _to_stored(bb: Any, x: relax.Expr, info: dict[str, Any]) -> relax.Expr:
    """Host graph op: logical (N, C, H, W) / (N, C) -> the NPU layout (N, H, W, Cpad) / (N, Cpad)."""
    shape, cp = list(info["shape"]), len(info["slots"])
    if len(shape) == 4:
        x = bb.emit(relax.op.permute_dims(x, [0, 2, 3, 1]))
    if cp != shape[1]:
        x = bb.emit(relax.op.nn.pad(x, [0, 0] * (len(shape) - 1) + [0, cp - shape[1]]))
    return x


def _from_stored(bb: Any, y: relax.Expr, info: dict[str, Any]) -> relax.Expr:
    """Host graph op: the NPU layout -> logical shape (a gather when the stored channel order is not
    the channel order, else a slice of the padding)."""
    shape, slots = list(info["shape"]), np.asarray(info["slots"], np.int64)
    axis = len(shape) - 1
    if not np.array_equal(slots[:shape[1]], np.arange(shape[1])):
        pos = np.empty(shape[1], np.int64)
        pos[slots[slots >= 0]] = np.flatnonzero(slots >= 0)
        y = bb.emit(relax.op.take(y, relax.const(pos.astype("int64")), axis=axis))
    elif len(slots) != shape[1]:
        y = bb.emit(relax.op.strided_slice(y, axes=[axis], begin=[0], end=[shape[1]]))
    if len(shape) == 4:
        y = bb.emit(relax.op.permute_dims(y, [0, 3, 1, 2]))
    return y


def region_boundaries(mod: tvm.IRModule, streams: dict[str, Any]) -> tvm.IRModule:
    """Every call of an NPU region in ``main`` takes and returns tensors in the NPU layout; the layout
    changes around it are host graph ops (permute_dims, pad, slice / take), compiled for the CPU."""
    from target_npu.runtime import stored_shape

    @mutator
    class Boundary(PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            sym = str(call.args[0].global_symbol) if _is_call(call, "relax.call_dps_packed") and \
                isinstance(call.args[0], relax.ExternFunc) else None
            if sym not in streams:
                return call
            meta = streams[sym].meta
            args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else [call.args[1]]
            new_args = [_to_stored(self.builder_, a, info) for a, info in zip(args, meta["inputs"].values())]
            sinfo = [relax.TensorType(stored_shape(o), o["dtype"]) for o in meta["outputs"]]
            res = self.builder_.emit(relax.call_dps_packed(call.args[0], relax.Tuple(new_args),
                                                           sinfo[0] if len(sinfo) == 1 else sinfo))
            if len(sinfo) == 1:
                return _from_stored(self.builder_, res, meta["outputs"][0])
            return relax.Tuple([_from_stored(self.builder_, self.builder_.emit(relax.TupleGetItem(res, k)), o)
                                for k, o in enumerate(meta["outputs"])])

    main = Boundary(mod).visit_expr(mod["main"])
    mod = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs)
    mod["main"] = main
    return mod


def partition(mod: tvm.IRModule, ctx: PartitionContext, prefix: str) -> tvm.IRModule:
    """``mod`` with every layer passing its check inside an NPU region ``<prefix>.npu.r<k>``."""
    mod, stubs = _hide_packed_calls(mod)
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
    mod = _restore_packed_calls(mod, stubs)
    on_cpu = {i for i, ly in enumerate(ctx.layers) if ly.kind != "input" and i not in ctx.symbols}
    for i in on_cpu:
        ctx.rejected.setdefault(i, "matched by no NPU pattern (its integer form was changed)")
    mod = layers_to_cpu(mod, ctx.layers, prefix, on_cpu)
    mod = region_boundaries(mod, {p.meta["symbol"]: p for p in ctx.streams})
    for idx, why in sorted(ctx.rejected.items()):
        log.info("layer %s stays on the CPU: %s", ctx.layers[idx].name, why)
    log.info("NPU regions: %s", [len(r.steps) for r in ctx.regions])
    return mod
