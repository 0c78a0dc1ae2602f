"""NPU program of a conv / linear layer generated from its scheduled, tensorized TIR.

:func:`lower_conv` schedules the layer (:func:`target_npu.schedule.schedule_conv`), then walks the
PrimFunc with ``tvm_ffi.structural_walk``: the loops (outer to inner, ``*_init`` loops of the
decomposed reduction left out), the ``ioso_npu_mac16x16`` calls of the tensorized MAC and the
``ioso_npu.nbuf`` annotation. From the loop nest it reads the tile geometry the hardware runs
(rows per tile = extent of ``y_1``, output blocks per tile = ``kb_1``, input blocks per tile =
``cb_1``, loop order = whether ``kb_0`` encloses ``y_0``) and checks that the MACs of the nest
(enclosing extents x 16 x 16 per call) cover the layer. The instructions are then emitted through
``hw_model.layers.build_conv`` with that geometry (Load/Gemm/GroupShiftAdd/NormActQuant/Store,
dependency tokens); the walk result is kept in ``Program.meta["tir"]``.

Lowered geometries are cached by (layer shape, knobs) (:func:`target_npu.schedule.tiling_key`):
the schedule runs once per distinct layer shape and tiling, weights do not enter the key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tvm
import tvm_ffi
from tvm import tirx

from hw_model.config import NPUConfig
from hw_model.isa import Program
from hw_model.layer_specs import ConvSpec, LinearSpec, Tiling
from hw_model.layers import build_conv, default_tiling
from target_npu import intrinsics
from target_npu.schedule import schedule_conv, tile_domain, tiling_key


@dataclass(frozen=True)
class LoopNest:
    """What the walk of a scheduled conv PrimFunc found."""

    loops: tuple[tuple[str, int], ...]  # (loop var name, extent), outer to inner, MAC nest only
    mac_calls: int  # call sites of the MAC extern
    mac_iterations: int  # product of the extents enclosing the MAC call
    nbuf: int

    def extent(self, name: str) -> int:
        for n, e in self.loops:
            if n == name:
                return e
        raise ValueError(f"loop {name!r} not in the scheduled conv (loops {[n for n, _ in self.loops]})")

    def tiling(self) -> Tiling:
        names = [n for n, _ in self.loops]
        order = "ob_outer" if names.index("kb_0") < names.index("y_0") else "sp_outer"
        return Tiling(ob_tile=self.extent("kb_1"), rows=self.extent("y_1"), cb_tile=self.extent("cb_1"),
                      loop_order=order, nbuf=self.nbuf)


def walk(func: tirx.PrimFunc) -> LoopNest:
    """Loops, MAC calls and buffer count of a PrimFunc scheduled by :func:`schedule_conv`."""
    loops: list[tuple[str, int]] = []
    calls: list[Any] = []
    nbuf: list[int] = []

    def on_for(f: Any) -> None:
        if not f.loop_var.name.endswith("_init"):
            loops.append((f.loop_var.name, int(f.extent)))

    def on_call(c: Any) -> None:
        if c.op.name == "tirx.call_extern" and c.args[0].value == intrinsics.EXTERN:
            calls.append(c)

    def on_block(b: Any) -> None:
        if "ioso_npu.nbuf" in b.annotations:
            nbuf.append(int(b.annotations["ioso_npu.nbuf"]))

    tvm_ffi.structural_walk(func.body, callbacks=[(tirx.For, on_for), (tvm.ir.Call, on_call),
                                                  (tvm.s_tir.SBlock, on_block)], order="pre")
    iters = 1
    for _, e in loops:
        iters *= e
    return LoopNest(tuple(loops), len(calls), iters, nbuf[0] if nbuf else 1)


_CACHE: dict[tuple[Any, ...], LoopNest] = {}


def lower_nest(spec: ConvSpec, tiling: Tiling) -> LoopNest:
    """Schedule + tensorize + walk, cached by (shape, knobs); checks the nest covers the layer."""
    key = tiling_key(spec, tiling)
    nest = _CACHE.get(key)
    if nest is None:
        nest = walk(schedule_conv(spec, tiling).mod["main"])
        d = tile_domain(spec, tiling)
        want = d["n"] * d["oh"] * d["ow"] * d["kb"] * d["cb"] * d["kh"] * d["kw"]
        if nest.mac_calls != 1 or nest.mac_iterations != want:
            raise ValueError(f"TIR lowering of {spec.__class__.__name__}: {nest.mac_calls} MAC call(s) over "
                             f"{nest.mac_iterations} iterations, expected 1 over {want}")
        _CACHE[key] = nest
    return nest


def lower_conv(spec: ConvSpec | LinearSpec, tiling: Tiling | None, cfg: NPUConfig) -> Program:
    """The NPU program of a dense conv / linear layer, its tile geometry read from the scheduled TIR."""
    conv = spec.as_conv() if isinstance(spec, LinearSpec) else spec
    if not isinstance(conv, ConvSpec):
        raise TypeError(f"lower_conv: spec must be a ConvSpec or LinearSpec, got {type(spec).__name__}")
    conv.check(cfg)
    tiling = default_tiling(conv, cfg) if tiling is None else tiling
    nest = lower_nest(conv, tiling)
    prog = build_conv(conv, nest.tiling(), cfg)
    prog.meta["tir"] = {"loops": [list(x) for x in nest.loops], "mac_calls": nest.mac_calls,
                        "mac_iterations": nest.mac_iterations}
    if isinstance(spec, LinearSpec):
        prog.meta["layer"] = "linear"
    return prog
