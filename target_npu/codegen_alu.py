"""NPU programs of element-wise adds and pools from their scheduled, tensorized TIR.

:func:`lower_pool` / :func:`lower_add` schedule the layer (:mod:`target_npu.schedule_alu`), walk the
PrimFunc once (:func:`target_npu.codegen.walk_nest`, cached by shape, stored width and knobs: the
constants never enter it), bind its arguments to DRAM regions and hand the walk to
:class:`target_npu.emit_alu.AluEmitter`. The DRAM regions, their order and the constants' packing are
``hw_model.layers_alu``'s (``build_pool`` / ``build_add``), so a program can be compared with the builder's
instruction for instruction; ``meta`` has the builder's keys plus ``tir`` (tile loops and stages).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from hw_model.builder import BLOCK, ProgramBuilder
from hw_model.config import NPUConfig
from hw_model.isa import Program
from hw_model.layer_specs import AddSpec, PoolSpec, Tiling, pool_geometry
from hw_model.layers import check_tiling, default_tiling, stored_layouts
from hw_model.layers_alu import add_regions
from target_npu.codegen import Nest, blocks, walk_nest
from target_npu.emit_alu import AluEmitter
from target_npu.emit_boxes import Binding, dense_strides
from target_npu.schedule_alu import schedule_add, schedule_pool

_CACHE: dict[tuple[Any, ...], Nest] = {}


def _walk(key: tuple[Any, ...], make: Any) -> Nest:
    nest = _CACHE.get(key)
    if nest is None:
        nest = _CACHE[key] = walk_nest(make().mod["main"])
    return nest


def tir_meta(nest: Nest) -> dict[str, Any]:
    """What the walk says the hardware runs (the conv path's ``LoweredLayer.to_meta`` keys)."""
    return {"tile_loops": [list(x) for x in nest.tile_loops],
            "stages": [{"block": b.name, "extern": b.extern or ("copy" if b.dst else "init"),
                        "loops": [list(x) for x in b.loops]} for b in nest.prologue + blocks(nest.body)],
            "shift_adds": []}


def _prep(spec: Any, tiling: Tiling | None, cfg: NPUConfig, in_slots: list | None, n_in: int):
    spec.check()
    slots = stored_layouts(in_slots, [spec.c] * n_in)
    tiling = default_tiling(spec, cfg, slots[:1]) if tiling is None else tiling
    check_tiling(spec, tiling, cfg, slots[:1])
    return slots, tiling


def lower_pool(spec: PoolSpec, tiling: Tiling | None, cfg: NPUConfig, in_slots: list | None = None) -> Program:
    """Max / average / global average pool, DRAM regions x -> out in the stored layout ``in_slots[0]``."""
    if not isinstance(spec, PoolSpec):
        raise TypeError(f"lower_pool: spec must be a PoolSpec, got {type(spec).__name__}")
    (slots,), tiling = _prep(spec, tiling, cfg, in_slots, 1)
    cp = slots.size
    key = ("pool", spec.kind, spec.n, spec.h, spec.w, tuple(spec.window), tuple(spec.stride), tuple(spec.pads),
           spec.in_dtype, spec.out_dtype, spec.x_zp if spec.kind != "max" else 0, cp,
           tuple(sorted(tiling.to_dict().items())))
    nest = _walk(key, lambda: schedule_pool(spec, tiling, cp))
    oh, ow = pool_geometry(spec)
    is_max = spec.kind == "max"
    b = ProgramBuilder(cfg)
    b.alloc("x", spec.in_dtype, spec.n * spec.h * spec.w * cp, "input")
    b.alloc("out", spec.out_dtype, spec.n * oh * ow * cp, "output")
    binds = {"x": Binding("x", 0, dense_strides(list(nest.shapes["x"]))),
             "store_out": Binding("out", 0, dense_strides(list(nest.shapes["store_out"])))}
    if not is_max:
        b.const("norm", np.concatenate([np.full(cp, spec.m, np.float32), np.full(cp, spec.b, np.float32)]),
                "float32")
        binds.update(m=Binding("norm", 0, [BLOCK, 1]), b=Binding("norm", cp, [BLOCK, 1]))
    AluEmitter(nest, b, binds, tiling.nbuf, {"zp": spec.x_zp, "lo": spec.lo, "hi": spec.hi, "stride": spec.stride},
               False).emit()
    meta = {"layer": f"{spec.kind}_pool", "inputs": {"x": {"shape": [spec.n, spec.c, spec.h, spec.w],
                                                           "slots": slots.tolist(), "dtype": spec.in_dtype}},
            "output": {"region": "out", "shape": [spec.n, spec.c, oh, ow], "slots": slots.tolist(),
                       "dtype": spec.out_dtype}, "macs": 0, "groups": 0, "tiling": tiling.to_dict(),
            "gathered_loads": 0, "tir": tir_meta(nest)}
    return b.finish(meta)


def lower_add(spec: AddSpec, tiling: Tiling | None, cfg: NPUConfig, in_slots: list | None = None) -> Program:
    """Residual add, DRAM regions x, y -> out; the output keeps x's stored layout, y is gathered into it
    (``gather_y``) when stored in another."""
    if not isinstance(spec, AddSpec):
        raise TypeError(f"lower_add: spec must be an AddSpec, got {type(spec).__name__}")
    (slots, slots_y), tiling = _prep(spec, tiling, cfg, in_slots, 2)
    gathered = not np.array_equal(slots, slots_y)
    cp, cpy = slots.size, slots_y.size
    total = spec.n * spec.h * spec.w
    key = ("add", total, spec.a_dtype, spec.b_dtype, spec.out_dtype, cp, tuple(sorted(tiling.to_dict().items())))
    nest = _walk(key, lambda: schedule_add(spec, tiling, cp))
    b = add_regions(spec, slots, slots_y, cfg)
    dense = dense_strides(list(nest.shapes["x"]))
    binds = {"x": Binding("x", 0, dense), "store_out": Binding("out", 0, dense),
             "y": Binding("y", 0, [cpy, BLOCK, 1], "gather_y", 2) if gathered else Binding("y", 0, dense),
             **{nm: Binding("alu", j * cp, [BLOCK, 1]) for j, nm in enumerate(("ma", "mb", "bias"))}}
    AluEmitter(nest, b, binds, tiling.nbuf, {"a_zp": spec.a_zp, "b_zp": spec.b_zp, "lo": spec.lo, "hi": spec.hi},
               True).emit()
    shape = [spec.n, spec.c, spec.h, spec.w]
    meta = {"layer": "add", "inputs": {"x": {"shape": shape, "slots": slots.tolist(), "dtype": spec.a_dtype},
                                       "y": {"shape": shape, "slots": slots_y.tolist(), "dtype": spec.b_dtype}},
            "output": {"region": "out", "shape": shape, "slots": slots.tolist(), "dtype": spec.out_dtype},
            "macs": 0, "groups": 0, "tiling": tiling.to_dict(),
            "gathered_loads": sum(bool(getattr(i, "gather", "")) for i in b.instrs), "tir": tir_meta(nest)}
    return b.finish(meta)
