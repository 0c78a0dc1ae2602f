"""NPU program of a conv / linear layer generated from its scheduled, tensorized TIR.

:func:`lower_conv` schedules the layer (:func:`target_npu.schedule.schedule_conv`: one nest per
output tile holding the MAC stage of every ISG group, the group shift-add steps and NORM/ACT/QUANT,
each tensorized) and walks the PrimFunc. Every tensorized block becomes a :class:`Stage`: its
intrinsic (read from the extern call), the loops around it and which loops each block iter var
depends on. From the stages it reads what the hardware runs:

- the tile geometry: rows per tile and output blocks per tile = the inner loops of the
  NORM/ACT/QUANT stage's ``y`` and ``kb`` bindings; loop order = which outer loop comes first;
  input blocks per tile = the ``ioso_npu.cb_tile`` annotation of the MAC stages, checked against
  each group's inner input-block loop (a group's tile is the knob clipped to its size);
- the ISG accumulator sequence: the shift-add intrinsics in stage order give (sign, init) per
  group, checked against the contract order of the layer's groups;
- the output dtype of the NORM/ACT/QUANT intrinsic, checked against the layer.

It checks that the MAC calls cover the layer (loop extents x 16 x 16 per call), then emits the
instructions through ``hw_model.layers.build_conv`` with that geometry (Load / Gemm /
GroupShiftAdd / NormActQuant / Store and the dependency tokens), and checks the program against
the TIR: one NORM_ACT_QUANT per output tile and, per tile, the shift-add signs in the TIR's order.
The walk is kept in ``Program.meta["tir"]``. Walks are cached by (layer shape, groups, knobs):
weights do not enter the key.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
import tvm_ffi
from tvm import s_tir, tirx

from hw_model.config import NPUConfig
from hw_model.isa import Program
from hw_model.layer_specs import ConvSpec, LinearSpec, Tiling
from hw_model.layers import build_conv, check_tiling, default_tiling
from target_npu import intrinsics
from target_npu.emit import Nest, emit_conv, walk_nest
from target_npu.schedule import (
    CB_TILE_ATTR,
    NBUF_ATTR,
    NotLowerable,
    group_segments,
    schedule_conv,
    single_unity,
    tile_domain,
    tiling_key,
    var_names,
)


@dataclass(frozen=True)
class Stage:
    """One tensorized block of the walked PrimFunc."""

    block: str  # block name, e.g. "mac_0_update_o"
    extern: str  # extern symbol of its intrinsic
    loops: tuple[tuple[str, int], ...]  # enclosing loops (name, extent), outer to inner
    binds: tuple[tuple[str, tuple[str, ...]], ...]  # block iter var -> loop names it uses, outer to inner
    attrs: tuple[tuple[str, int], ...]

    def extent(self, loop: str) -> int:
        return dict(self.loops)[loop]

    def bound(self, var: str) -> tuple[str, ...]:
        return dict(self.binds).get(var, ())

    def calls(self) -> int:
        """How many times the intrinsic runs: product of the enclosing extents."""
        out = 1
        for _, e in self.loops:
            out *= e
        return out


def _extern_of(stmt: Any) -> str | None:
    """Symbol of the first NPU extern call in ``stmt`` (None if there is none)."""
    found: list[str] = []

    def on_call(c: Any) -> None:
        if c.op.name == "tirx.call_extern" and c.args[0].value.startswith("ioso_npu_"):
            found.append(c.args[0].value)

    tvm_ffi.structural_walk(stmt, callbacks=[(tvm.ir.Call, on_call)], order="pre")
    return found[0] if found else None


def walk(func: tirx.PrimFunc) -> list[Stage]:
    """The tensorized stages of a PrimFunc scheduled by :func:`schedule_conv`, in program order."""
    stages: list[Stage] = []

    def visit(stmt: Any, stack: list[tuple[str, int]]) -> None:
        if isinstance(stmt, tirx.For):
            visit(stmt.body, [*stack, (stmt.loop_var.name, int(stmt.extent))])
        elif isinstance(stmt, tirx.SeqStmt):
            for s in stmt.seq:
                visit(s, stack)
        elif isinstance(stmt, s_tir.SBlockRealize):
            blk = stmt.block
            ext = _extern_of(blk.body) if not isinstance(blk.body, (tirx.For, tirx.SeqStmt)) else None
            if ext is not None:
                loop_names = [n for n, _ in stack]
                binds = tuple((iv.var.name, tuple(n for n in loop_names if n in var_names(v)))
                              for iv, v in zip(blk.iter_vars, stmt.iter_values, strict=True))
                attrs = tuple((k, int(v)) for k, v in blk.annotations.items() if k.startswith("ioso_npu."))
                stages.append(Stage(blk.name_hint, ext, tuple(stack), binds, attrs))
            else:
                visit(blk.body, stack)
        elif hasattr(stmt, "body"):
            visit(stmt.body, stack)

    visit(func.body, [])
    return stages


@dataclass(frozen=True)
class LoweredLayer:
    """What the walk of one scheduled layer says the hardware runs."""

    stages: tuple[Stage, ...]
    tiling: Tiling
    shift_adds: tuple[tuple[int, bool], ...]  # (sign, init) per group in accumulation order; () = none
    out_dtype: str
    nest: Nest | None = None  # the walk the instructions are emitted from

    def to_meta(self) -> dict[str, Any]:
        return {"stages": [{"block": s.block, "extern": s.extern, "loops": [list(x) for x in s.loops]}
                           for s in self.stages], "shift_adds": [list(x) for x in self.shift_adds]}


_SIGN_OF = {v: k for k, v in intrinsics.SIGNS.items()}


def _segment(stage: Stage) -> int:
    """Group segment j of a ``mac_<j>_...`` / ``shift_add_<j>_...`` block."""
    return int(re.match(r"(?:mac|shift_add)_(\d+)_", stage.block).group(1))


def stages_of(stages: tuple[Stage, ...] | list[Stage], prefix: str) -> list[Stage]:
    """The stages whose intrinsic extern starts with ``prefix``, by group segment when they have one."""
    out = [s for s in stages if s.extern.startswith(prefix)]
    return out if prefix.startswith("ioso_npu_norm") else sorted(out, key=_segment)


def read_layer(stages: list[Stage]) -> LoweredLayer:
    """Tile geometry, shift-add sequence and output dtype from the walked stages (see module docstring)."""
    macs = stages_of(stages, intrinsics.EXTERN) + stages_of(stages, intrinsics.DW_EXTERN)
    gsas = stages_of(stages, "ioso_npu_shift_add_")
    norms = stages_of(stages, "ioso_npu_norm_act_quant_")
    if len(norms) != 1 or not macs:
        raise ValueError(f"TIR lowering: expected MAC stages and one NORM/ACT/QUANT stage, got "
                         f"{[s.extern for s in stages]}")
    norm = norms[0]
    y_loops, kb_loops = norm.bound("v_y_o"), norm.bound("v_kb_o")
    names = [n for n, _ in norm.loops]
    order = "ob_outer" if names.index(kb_loops[0]) < names.index(y_loops[0]) else "sp_outer"
    attrs = dict(macs[0].attrs)
    tiling = Tiling(ob_tile=norm.extent(kb_loops[-1]), rows=norm.extent(y_loops[-1]),
                    cb_tile=attrs[CB_TILE_ATTR], loop_order=order, nbuf=attrs[NBUF_ATTR])
    shift = []
    for s in gsas:  # ioso_npu_shift_add_<sign>_<init|acc>_s<n>
        *_, sign, kind, _ = s.extern.split("_")
        shift.append((_SIGN_OF[sign], kind == "init"))
    return LoweredLayer(tuple(stages), tiling, tuple(shift), norm.extern.rsplit("_", 1)[1])


_CACHE: dict[tuple[Any, ...], LoweredLayer] = {}


def lower_layer(spec: ConvSpec, tiling: Tiling, cfg: NPUConfig) -> LoweredLayer:
    """Schedule + tensorize + walk, cached; checks the walk against the layer (coverage, groups, dtype)."""
    key = tiling_key(spec, tiling, cfg)
    low = _CACHE.get(key)
    if low is not None:
        return low
    func = schedule_conv(spec, tiling, cfg).mod["main"]
    low = dataclasses.replace(read_layer(walk(func)), nest=walk_nest(func))
    d = tile_domain(spec, tiling, cfg)
    dw = d["depthwise"]
    macs = stages_of(low.stages, intrinsics.DW_EXTERN if dw else intrinsics.EXTERN)
    want = d["n"] * d["oh"] * d["ow"] * d["kb"] * (1 if dw else d["cb"]) * d["kh"] * d["kw"]
    got = sum(s.calls() for s in macs)
    want_gsa = () if single_unity(d, cfg) else tuple((cfg.isg_group_signs[g], j == 0)
                                                      for j, (g, *_r) in enumerate(d["segs"]))
    cb_inner = [s.extent(s.bound("v_cb_o")[-1]) if s.bound("v_cb_o") else 1 for s in macs]
    problems = []
    if got != want or len(macs) != len(d["segs"]):
        problems.append(f"{len(macs)} MAC stage(s) making {got} calls, expected {len(d['segs'])} making {want}")
    if not dw and cb_inner != [cbt for *_r, cbt in d["segs"]]:
        problems.append(f"input tiles per group {cb_inner}, expected {[cbt for *_r, cbt in d['segs']]}")
    if low.shift_adds != want_gsa:
        problems.append(f"shift-add sequence {low.shift_adds}, expected {want_gsa}")
    if low.out_dtype != spec.out_dtype:
        problems.append(f"output dtype {low.out_dtype}, expected {spec.out_dtype}")
    if problems:
        raise ValueError(f"TIR lowering of {spec.__class__.__name__}: " + "; ".join(problems))
    _CACHE[key] = low
    return low


def lower_conv(spec: ConvSpec | LinearSpec, tiling: Tiling | None, cfg: NPUConfig,
               in_slots: list[np.ndarray] | None = None) -> Program:
    """The NPU program of a conv (dense, grouped, depthwise) / linear layer, emitted by walking its scheduled,
    tensorized TIR (:func:`target_npu.emit.emit_conv`); ``in_slots``: the stored channel layout of the input
    in DRAM (None: channel order).

    Raises :class:`target_npu.schedule.NotLowerable` for a depthwise conv with scaled ISG groups, and
    ``ValueError`` for a tiling that does not fit the on-chip memories."""
    conv = spec.as_conv() if isinstance(spec, LinearSpec) else spec
    if not isinstance(conv, ConvSpec):
        raise TypeError(f"lower_conv: spec must be a ConvSpec or LinearSpec, got {type(spec).__name__}")
    conv.check(cfg)
    tiling = default_tiling(conv, cfg) if tiling is None else tiling
    check_tiling(conv, tiling, cfg)
    low = lower_layer(conv, tiling, cfg)
    meta = {"macs": conv.macs(), "groups": len(group_segments(conv, cfg)), "tiling": tiling.to_dict()}
    prog = emit_conv(conv, low.nest, low.tiling.nbuf, cfg, in_slots, meta)
    prog.meta["tir"] = low.to_meta()
    if isinstance(spec, LinearSpec):
        prog.meta["layer"] = "linear"
    return prog


def conv_program(spec: ConvSpec | LinearSpec, tiling: Tiling | None, cfg: NPUConfig,
                 in_slots: list[np.ndarray] | None = None) -> Program:
    """The program the compiler runs for a conv / linear layer: :func:`lower_conv`, or the builder alone
    (``hw_model.layers.build_conv``) for a layer the TIR path raises ``NotLowerable`` on."""
    try:
        return lower_conv(spec, tiling, cfg, in_slots)
    except NotLowerable:
        conv = spec.as_conv() if isinstance(spec, LinearSpec) else spec
        return build_conv(conv, tiling, cfg, in_slots)
