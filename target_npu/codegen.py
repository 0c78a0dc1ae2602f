"""NPU program of a layer from its scheduled, tensorized TIR: the walk and the entry points
(:func:`layer_program` for every layer; adds and pools in :mod:`target_npu.codegen_alu`).

:func:`lower_conv` schedules the layer (:func:`target_npu.schedule.schedule_conv`: one nest per output
tile; per ISG group the copy stages ``load_x_<j>`` / ``load_w_<j>`` of its input and weight tile, its MAC
stage and its shift-add step; the NORM constants' copies ``load_m`` / ``load_b``; NORM/ACT/QUANT and the
output copy ``store_out``; every compute stage tensorized), walks the PrimFunc once into plain Python
(:func:`walk_nest`, cached by layer shape, groups and knobs: weights never enter it) and hands the walk to
:func:`target_npu.emit.emit_conv`, which emits one instruction per intrinsic call site and step, and one
LOAD / STORE per copy stage and step.

:func:`walk_nest` returns the output-tile loops (the For chain above the first sequence) and, under them
in program order, every block with the loops between the tile loops and the block, each index as an affine
form of those loops (``tvm.sym.detect_linear_equation``):

- intrinsic call sites (``ioso_npu_*`` externs): each operand's buffer region (min per dim and extent)
  from the block's match buffers, and the block's ``ioso_npu.*`` annotations;
- copy stages (``load_*`` / ``store_*`` blocks): destination and source buffer, the source index per
  destination dim (affine in the destination dims) and the guard of a padded copy
  (``if_then_else(lo <= v < hi, ...)``) as bounds per destination dim;
- ``*_init`` blocks (the decomposed reduction init: the next MAC on that buffer overwrites).

:func:`read_layer` reads the knobs back from the walk (rows / output blocks per tile from the NORM
stage's indices, loop order from the tile loops, ``nbuf`` / ``cb_tile`` from the MAC annotations, the
shift-add sequence, the output dtype); :func:`lower_layer` checks them against the layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.sym import detect_linear_equation

from hw_model.config import NPUConfig
from hw_model.isa import Program
from hw_model.layer_specs import AddSpec, ConvSpec, LinearSpec, PoolSpec, Tiling
from hw_model.layers import build_conv, check_tiling, default_tiling, stored_layouts
from target_npu import intrinsics
from target_npu.schedule import (
    CB_TILE_ATTR,
    NBUF_ATTR,
    NotLowerable,
    group_segments,
    schedule_conv,
    single_unity,
    tile_domain,
    tiling_key,
)

Aff = tuple[int, dict[str, int]]
"""Affine form: (constant, {loop or iter var name: coefficient})."""


def _vars(expr: Any) -> list[Any]:
    out: dict[str, Any] = {}

    def on_var(v: Any) -> None:
        out.setdefault(v.name, v)
    tvm_ffi.structural_walk(expr, callbacks=[(tirx.Var, on_var)], order="pre")
    return list(out.values())


def linear(expr: Any) -> Aff:
    """``expr`` as an affine form of the vars in it (NotLowerable if it is not affine with int coefficients)."""
    if isinstance(expr, (int, tirx.IntImm)):
        return int(expr), {}
    vs = _vars(expr)
    coefs = detect_linear_equation(expr, vs)
    if len(coefs) != len(vs) + 1 or not all(isinstance(c, tirx.IntImm) for c in coefs):
        raise NotLowerable(f"index {expr} is not affine in {[v.name for v in vs]}")
    return int(coefs[-1]), {v.name: int(c) for v, c in zip(vs, coefs[:-1], strict=True) if int(c)}


def compose(a: Aff, sub: dict[str, Aff]) -> Aff:
    """Substitute ``sub`` (iter var -> affine form of loops) into ``a``."""
    const, out = a[0], {}
    for v, c in a[1].items():
        k, inner = sub[v] if v in sub else (0, {v: 1})
        const += c * k
        for lv, lc in inner.items():
            out[lv] = out.get(lv, 0) + c * lc
    return const, {k: v for k, v in out.items() if v}


def at(a: Aff, env: dict[str, int]) -> int:
    return a[0] + sum(c * env.get(v, 0) for v, c in a[1].items())


@dataclass
class Blk:
    """A block of the walked nest."""

    name: str
    loops: list[tuple[str, int]]  # loops between the tile loops and the block, outer to inner
    extern: str = ""  # intrinsic call site: extern symbol
    ops: dict[str, tuple[str, list[Aff], list[int]]] = field(default_factory=dict)  # param -> buf, mins, exts
    dst: str = ""  # copy: destination buffer
    dst_idx: list[Aff] = field(default_factory=list)  # copy: destination index per dim (affine in loops)
    src: str = ""  # copy: source buffer
    src_idx: list[Aff] = field(default_factory=list)  # copy: source index per dim (affine in dst dims "d<i>")
    guard: dict[int, tuple[int | None, int | None]] = field(default_factory=dict)  # dst dim -> [lo, hi)
    fill: float | None = None  # copy: the guard's else value (what a padded copy writes outside the bounds)
    writes: str = ""  # init: buffer
    attrs: dict[str, int] = field(default_factory=dict)  # ioso_npu.* block annotations
    step: int = 0  # how many of ``loops`` are step loops (shared with other blocks), the rest are its own


@dataclass
class Nest:
    """The walked PrimFunc: tile loops, body (Blk or ("loop", name, extent, body)), buffer shapes."""

    tile_loops: list[tuple[str, int]]
    body: list[Any]
    shapes: dict[str, tuple[int, ...]]
    params: set[str] = field(default_factory=set)
    prologue: list[Blk] = field(default_factory=list)  # blocks before the tile loops (run once)


def _guard(cond: Any, dims: dict[str, int]) -> dict[int, tuple[int | None, int | None]]:
    out: dict[int, list[int | None]] = {}

    def on_cmp(c: Any) -> None:
        a, b = c.a, c.b
        flip = isinstance(b, tirx.Var)
        var, num = (b, a) if flip else (a, b)
        if not isinstance(var, tirx.Var) or not isinstance(num, tirx.IntImm) or var.name not in dims:
            raise NotLowerable(f"copy guard term {c} is not <var> <cmp> <int>")
        op = type(c).__name__
        lo = (op in ("GE",) and not flip) or (op in ("LE",) and flip)
        hi_strict = (op == "LT" and not flip) or (op == "GT" and flip)
        hi_incl = (op == "LE" and not flip) or (op == "GE" and flip)
        lo_strict = (op == "GT" and not flip) or (op == "LT" and flip)
        b_ = out.setdefault(dims[var.name], [None, None])
        v = int(num)
        if lo or lo_strict:
            b_[0] = v + (1 if lo_strict else 0)
        elif hi_strict or hi_incl:
            b_[1] = v + (1 if hi_incl else 0)
    tvm_ffi.structural_walk(cond, callbacks=[(t, on_cmp) for t in (tirx.LT, tirx.LE, tirx.GT, tirx.GE)],
                            order="pre")
    return {k: (v[0], v[1]) for k, v in out.items()}


def _block(real: Any, loops: list[tuple[str, int]]) -> Blk | None:
    blk = real.block
    sub = {iv.var.name: linear(v) for iv, v in zip(blk.iter_vars, real.iter_values, strict=True)}
    out = Blk(blk.name_hint, list(loops))
    calls: list[Any] = []

    def on_call(c: Any) -> None:
        if c.op.name == "tirx.call_extern":
            calls.append(c)
    tvm_ffi.structural_walk(blk.body, callbacks=[(tvm.ir.Call, on_call)], order="pre")
    if calls and calls[0].args[0].value.startswith("ioso_npu_"):
        out.extern = calls[0].args[0].value
        out.attrs = {k: int(v) for k, v in blk.annotations.items() if k.startswith("ioso_npu.")}
        for mb in blk.match_buffers:
            reg = mb.source.region
            out.ops[mb.buffer.name] = (mb.source.source.name, [compose(linear(r.min), sub) for r in reg],
                                       [int(r.extent) for r in reg])
        return out
    if blk.name_hint.endswith("_init"):
        out.writes = blk.body.buffer.name
        return out
    if blk.name_hint.startswith(("load_", "store_")):
        st = blk.body
        dims = {iv.var.name: j for j, iv in enumerate(blk.iter_vars)}
        idx_names = [linear(i) for i in st.indices]
        if [a[1] for a in idx_names] != [{iv.var.name: 1} for iv in blk.iter_vars]:
            raise NotLowerable(f"copy {blk.name_hint} does not write its iteration domain")
        out.dst = st.buffer.name
        out.dst_idx = [sub[iv.var.name] for iv in blk.iter_vars]
        val = st.value
        if isinstance(val, tvm.ir.Call) and val.op.name.endswith("if_then_else"):
            out.guard = _guard(val.args[0], dims)
            if hasattr(val.args[2], "value"):
                out.fill = val.args[2].value
            val = val.args[1]
        if not hasattr(val, "indices") or not hasattr(val, "source"):
            raise NotLowerable(f"copy {blk.name_hint} does not copy one buffer element")
        out.src = val.source.name
        ren = {v: (0, {f"d{j}": 1}) for v, j in dims.items()}
        out.src_idx = [compose(linear(i), ren) for i in val.indices]
        return out
    return None


def walk_nest(func: tirx.PrimFunc) -> Nest:
    """The walk described in the module docstring."""
    shapes: dict[str, tuple[int, ...]] = {}

    def on_buf(b: Any) -> None:
        try:
            shapes.setdefault(b.name, tuple(int(x) for x in b.shape))
        except (AttributeError, TypeError):  # a plain Var, or a buffer with symbolic shape
            pass
    tvm_ffi.structural_walk(func.body, callbacks=[(tirx.Buffer, on_buf)], order="pre")
    allocs: set[str] = set()

    def visit(stmt: Any, loops: list[tuple[str, int]]) -> list[Any]:
        if isinstance(stmt, tirx.For):
            inner = visit(stmt.body, [*loops, (stmt.loop_var.name, int(stmt.extent))])
            blk_loops = all(isinstance(x, Blk) and len(x.loops) > len(loops) for x in inner)
            if blk_loops and len(inner) == 1:
                return inner  # the block's own loop: part of its loop fields
            return [("loop", stmt.loop_var.name, int(stmt.extent), inner)]
        if isinstance(stmt, tirx.SeqStmt):
            return [x for s in stmt.seq for x in visit(s, loops)]
        if isinstance(stmt, s_tir.SBlockRealize):
            if stmt.block.name_hint == "root":
                allocs.update(ab.name for ab in stmt.block.alloc_buffers)
                return visit(stmt.block.body, loops)
            b = _block(stmt, loops)
            return [b] if b is not None else []
        if hasattr(stmt, "body"):
            return visit(stmt.body, loops)
        return []

    body = visit(func.body, [])
    prologue: list[Blk] = []
    while len(body) > 1 and isinstance(body[0], Blk):
        prologue.append(body.pop(0))
    tile: list[tuple[str, int]] = []
    while len(body) == 1 and isinstance(body[0], tuple):
        _, name, ext, body = body[0]
        tile.append((name, ext))
    strip = len(tile)

    def mark(items: list[Any], depth: int) -> None:
        for x in items:
            if isinstance(x, tuple):
                mark(x[3], depth + 1)
            else:
                x.loops, x.step = x.loops[strip:], depth
    mark(body, 0)
    return Nest(tile, body, shapes, set(shapes) - allocs - {"A", "B", "C", "P", "M", "Bias", "L", "MA", "MB", "Z", "G"},
                prologue)


def blocks(body: list[Any]) -> list[Blk]:
    out: list[Blk] = []
    for x in body:
        out += blocks(x[3]) if isinstance(x, tuple) else [x]
    return out


def calls_of(nest: Nest, prefix: str) -> list[Blk]:
    """The intrinsic call sites whose extern starts with ``prefix``, in program order."""
    return [b for b in blocks(nest.body) if b.extern.startswith(prefix)]


def _tile_loop(nest: Nest, a: Aff) -> tuple[str, int]:
    """(name, coefficient) of the one tile loop an index moves with."""
    names = [n for n, _ in nest.tile_loops]
    found = [(v, c) for v, c in a[1].items() if v in names]
    if len(found) != 1:
        raise NotLowerable(f"output index {a} does not move with exactly one tile loop")
    return found[0]


@dataclass(frozen=True)
class LoweredLayer:
    """What the walk of one scheduled layer says the hardware runs."""

    nest: Nest
    tiling: Tiling
    shift_adds: tuple[tuple[int | str, bool], ...]  # (sign, init) per group in accumulation order; () = none;
    # ("ch", True): a depthwise conv's per-channel-sign step
    out_dtype: str

    def to_meta(self) -> dict[str, Any]:
        return {"tile_loops": [list(x) for x in self.nest.tile_loops],
                "stages": [{"block": b.name, "extern": b.extern or ("copy" if b.dst else "init"),
                            "loops": [list(x) for x in b.loops]} for b in blocks(self.nest.body)],
                "shift_adds": [list(x) for x in self.shift_adds]}


_SIGN_OF = {v: k for k, v in intrinsics.SIGNS.items()}


def read_layer(nest: Nest) -> LoweredLayer:
    """Tile geometry, shift-add sequence and output dtype read back from the walk (module docstring)."""
    norms = calls_of(nest, "ioso_npu_norm_act_quant_")
    macs = calls_of(nest, intrinsics.EXTERN) + calls_of(nest, intrinsics.DW_EXTERN)
    if len(norms) != 1 or not macs:
        raise ValueError(f"TIR lowering: expected MAC stages and one NORM/ACT/QUANT stage, got "
                         f"{[b.extern for b in blocks(nest.body) if b.extern]}")
    norm = norms[0]
    out = norm.ops["C"][1]
    (ly, rows), (lkb, ob) = _tile_loop(nest, out[1]), _tile_loop(nest, out[3])
    names = [n for n, _ in nest.tile_loops]
    order = "ob_outer" if names.index(lkb) < names.index(ly) else "sp_outer"
    tiling = Tiling(ob_tile=ob, rows=rows, cb_tile=macs[0].attrs[CB_TILE_ATTR], loop_order=order,
                    nbuf=macs[0].attrs[NBUF_ATTR])
    shift = []
    for b in calls_of(nest, "ioso_npu_shift_add_"):  # ioso_npu_shift_add_<sign>_<init|acc>_s<n>
        *_, sign, kind, _ = b.extern.split("_")
        shift.append(("ch", True) if kind == "ch" else (_SIGN_OF[sign], kind == "init"))  # ..._add_ch_s<n>
    return LoweredLayer(nest, tiling, tuple(shift), norm.extern.rsplit("_", 1)[1])


_CACHE: dict[tuple[Any, ...], LoweredLayer] = {}


def lower_layer(spec: ConvSpec, tiling: Tiling, cfg: NPUConfig, cp: int | None = None) -> LoweredLayer:
    """Schedule + tensorize + walk, cached; checks the walk against the layer (coverage, groups, dtype).
    ``cp``: stored channels of a depthwise conv's input (None: C padded to whole blocks)."""
    key = tiling_key(spec, tiling, cfg, cp)
    low = _CACHE.get(key)
    if low is not None:
        return low
    low = read_layer(walk_nest(schedule_conv(spec, tiling, cfg, cp).mod["main"]))
    d = tile_domain(spec, tiling, cfg, cp)
    dw = d["depthwise"]
    macs = calls_of(low.nest, intrinsics.DW_EXTERN if dw else intrinsics.EXTERN)
    tiles = int(np.prod([e for _, e in low.nest.tile_loops]))
    got = tiles * sum(int(np.prod([e for _, e in b.loops])) for b in macs)
    want = d["n"] * d["oh"] * d["ow"] * d["kb"] * (1 if dw else d["cb"]) * d["kh"] * d["kw"]
    want_gsa = () if single_unity(d, cfg) else (("ch", True),) if d.get("dw_isg") else tuple(
        (cfg.isg_group_signs[g], j == 0) for j, (g, *_r) in enumerate(d["segs"]))
    copies = {b.dst: b for b in blocks(low.nest.body) if b.dst}
    exts = [dict(copies[b.ops["A"][0]].loops[copies[b.ops["A"][0]].step:]) for b in macs]  # input tile
    cb_inner = [1 + sum(c * (x[v] - 1) for v, c in copies[b.ops["A"][0]].dst_idx[3][1].items() if v in x)
                for b, x in zip(macs, exts, strict=True)]
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
    in DRAM (None: channel order; a depthwise conv runs in it, the others gather from it when it differs).

    Raises :class:`target_npu.schedule.NotLowerable` for a nest the emitter cannot map, ``ValueError`` for a
    tiling that does not fit the on-chip memories."""
    from target_npu.emit import emit_conv

    conv = spec.as_conv() if isinstance(spec, LinearSpec) else spec
    if not isinstance(conv, ConvSpec):
        raise TypeError(f"lower_conv: spec must be a ConvSpec or LinearSpec, got {type(spec).__name__}")
    conv.check(cfg)
    tiling = default_tiling(conv, cfg) if tiling is None else tiling
    check_tiling(conv, tiling, cfg)
    cp = stored_layouts(in_slots, [conv.c])[0].size if conv.is_depthwise else None
    low = lower_layer(conv, tiling, cfg, cp)
    meta = {"macs": conv.macs(), "groups": len(group_segments(conv, cfg)), "tiling": tiling.to_dict()}
    prog = emit_conv(conv, low.nest, low.tiling.nbuf, cfg, in_slots, meta)
    prog.meta["tir"] = low.to_meta()
    if isinstance(spec, LinearSpec):
        prog.meta["layer"] = "linear"
    return prog


def conv_program(spec: ConvSpec | LinearSpec, tiling: Tiling | None, cfg: NPUConfig,
                 in_slots: list[np.ndarray] | None = None) -> Program:
    """The program the compiler runs for a conv / linear layer: :func:`lower_conv`, or the builder alone
    (``hw_model.layers.build_conv``) for a layer the TIR path raises ``NotLowerable`` on (none known)."""
    try:
        return lower_conv(spec, tiling, cfg, in_slots)
    except NotLowerable:
        conv = spec.as_conv() if isinstance(spec, LinearSpec) else spec
        return build_conv(conv, tiling, cfg, in_slots)


def layer_program(spec: ConvSpec | LinearSpec | AddSpec | PoolSpec, tiling: Tiling | None, cfg: NPUConfig,
                  in_slots: list[np.ndarray] | None = None) -> Program:
    """The NPU program of one layer, emitted from its scheduled, tensorized TIR: conv / linear through
    :func:`conv_program`, adds and pools through :mod:`target_npu.codegen_alu`. ``tiling`` None: the
    builder's default for the layer; ``in_slots``: the stored layout of each input (None: identity).

    Raises ``TypeError`` for another spec type, ``ValueError`` for a bad spec, layout or tiling, and
    :class:`target_npu.schedule.NotLowerable` for a nest the ALU emitter cannot map."""
    from target_npu.codegen_alu import lower_add, lower_pool

    if isinstance(spec, (ConvSpec, LinearSpec)):
        return conv_program(spec, tiling, cfg, in_slots)
    if isinstance(spec, PoolSpec):
        return lower_pool(spec, tiling, cfg, in_slots)
    if isinstance(spec, AddSpec):
        return lower_add(spec, tiling, cfg, in_slots)
    raise TypeError(f"layer_program: spec must be a ConvSpec, LinearSpec, AddSpec or PoolSpec, "
                    f"got {type(spec).__name__}")
