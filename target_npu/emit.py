"""Instruction stream of a conv / linear layer emitted by walking its scheduled, tensorized TIR.

:func:`walk_nest` reads the PrimFunc of :func:`target_npu.schedule.schedule_conv` into plain Python
(cached by the caller, weights never enter it): the output-tile loops (the For chain above the
first sequence) and, under them in program order, every block with the loops between the tile loops
and the block, its iter values as affine forms of those loops (``tvm.sym.detect_linear_equation``):

- intrinsic call sites (``ioso_npu_*`` externs): each operand's buffer region (min per dim, affine in
  the loops, and extent) from the block's match buffers;
- copy stages (``load_*`` / ``store_*`` blocks): destination and source buffer, the source index of
  every destination dim (affine in the block's iter vars) and the guard of a padded copy
  (``if_then_else(lo <= v < hi, ...)``) as bounds per destination dim;
- ``*_init`` blocks (the decomposed reduction init: the next MAC on that buffer overwrites).

:func:`emit` enumerates the output tiles in Python (the extents of the tile loops) and, per tile, runs
the body in order: a loop around copies and a call is a step loop (one pipeline step per iteration),
each copy becomes a LOAD / STORE whose DRAM box is the copy's region (clipped to what the clipped
consumers read; guard bounds on rows / columns become LOAD padding, other guard bounds clip the
consumers' loops) and whose on-chip address is a slot of a simple ``nbuf`` allocation per staged
buffer; each call becomes one GEMM / GROUP_SHIFT_ADD / NORM_ACT_QUANT whose loop fields are the
extents of the loops between the step and the call (clipped to the real output), whose strides are the
coefficients of those loops in the operand indices, checked against the instruction's address formula
on the allocated tiles. Dependency tokens: :class:`hw_model.builder.StepTokens`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.sym import detect_linear_equation

from hw_model.builder import BLOCK, ProgramBuilder, StepTokens
from hw_model.isa import mem_size

Aff = tuple[int, dict[str, int]]
"""Affine form: (constant, {loop or iter var name: coefficient})."""


class EmitError(ValueError):
    """The TIR does not have the shape the emitter maps onto instructions."""


def _vars(expr: Any) -> list[Any]:
    out: dict[str, Any] = {}
    tvm_ffi.structural_walk(expr, callbacks=[(tirx.Var, lambda v: out.setdefault(v.name, v))], order="pre")
    return list(out.values())


def linear(expr: Any) -> Aff:
    """``expr`` as an affine form of the vars in it (EmitError if it is not affine with int coefficients)."""
    if isinstance(expr, (int, tirx.IntImm)):
        return int(expr), {}
    vs = _vars(expr)
    coefs = detect_linear_equation(expr, vs)
    if len(coefs) != len(vs) + 1 or not all(isinstance(c, tirx.IntImm) for c in coefs):
        raise EmitError(f"index {expr} is not affine in {[v.name for v in vs]}")
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
    writes: str = ""  # init: buffer


@dataclass
class Nest:
    """The walked PrimFunc: tile loops, body (Blk or ("loop", name, extent, body)), buffer shapes."""

    tile_loops: list[tuple[str, int]]
    body: list[Any]
    shapes: dict[str, tuple[int, ...]]


def _guard(cond: Any, dims: dict[str, int]) -> dict[int, tuple[int | None, int | None]]:
    out: dict[int, list[int | None]] = {}

    def on_cmp(c: Any) -> None:
        a, b = c.a, c.b
        flip = isinstance(b, tirx.Var)
        var, num = (b, a) if flip else (a, b)
        if not isinstance(var, tirx.Var) or not isinstance(num, tirx.IntImm) or var.name not in dims:
            raise EmitError(f"copy guard term {c} is not <var> <cmp> <int>")
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
    tvm_ffi.structural_walk(blk.body, callbacks=[(tvm.ir.Call, lambda c: calls.append(c)
                                                  if c.op.name == "tirx.call_extern" else None)], order="pre")
    if calls and calls[0].args[0].value.startswith("ioso_npu_"):
        out.extern = calls[0].args[0].value
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
            raise EmitError(f"copy {blk.name_hint} does not write its iteration domain")
        out.dst = st.buffer.name
        out.dst_idx = [sub[iv.var.name] for iv in blk.iter_vars]
        val = st.value
        if isinstance(val, tvm.ir.Call) and val.op.name == "tirx.if_then_else":
            out.guard = _guard(val.args[0], dims)
            val = val.args[1]
        if not isinstance(val, tirx.BufferLoad):
            raise EmitError(f"copy {blk.name_hint} does not copy one buffer element")
        out.src = val.buffer.name
        ren = {v: (0, {f"d{j}": 1}) for v, j in dims.items()}
        out.src_idx = [compose(linear(i), ren) for i in val.indices]
        return out
    return None


def walk_nest(func: tirx.PrimFunc) -> Nest:
    """The walk described in the module docstring."""
    shapes = {b.name: tuple(int(x) for x in b.shape) for b in func.buffer_map.values()}

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
                for ab in stmt.block.alloc_buffers:
                    shapes[ab.name] = tuple(int(x) for x in ab.shape)
                return visit(stmt.block.body, loops)
            b = _block(stmt, loops)
            return [b] if b is not None else []
        if hasattr(stmt, "body"):
            return visit(stmt.body, loops)
        return []

    body = visit(func.body, [])
    tile: list[tuple[str, int]] = []
    while len(body) == 1 and isinstance(body[0], tuple):
        _, name, ext, body = body[0]
        tile.append((name, ext))
    strip = len(tile)
    for b in _blocks(body):
        b.loops = b.loops[strip:]
    return Nest(tile, body, shapes)


def _blocks(body: list[Any]) -> list[Blk]:
    out: list[Blk] = []
    for x in body:
        out += _blocks(x[3]) if isinstance(x, tuple) else [x]
    return out


def box(b: Blk, env: dict[str, int]) -> list[tuple[int, int]]:
    """(start, extent) per destination dim of a copy at ``env`` (the tile and step loops bound)."""
    exts = dict(b.loops)
    out = []
    for a in b.dst_idx:
        lo = at(a, env)
        out.append((lo, 1 + sum(c * (exts[v] - 1) for v, c in a[1].items() if v in exts)))
    return out


def src_box(b: Blk, dbox: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Image of a destination box in the source buffer's coordinates (coefficients are non-negative)."""
    out = []
    for const, co in b.src_idx:
        lo = const + sum(c * dbox[int(v[1:])][0] for v, c in co.items())
        hi = const + sum(c * (dbox[int(v[1:])][0] + dbox[int(v[1:])][1] - 1) for v, c in co.items())
        out.append((lo, hi - lo + 1))
    return out


def src_point(b: Blk, point: list[int]) -> list[int]:
    return [const + sum(c * point[int(v[1:])] for v, c in co.items()) for const, co in b.src_idx]


def dense_strides(exts: list[int]) -> list[int]:
    out, s = [], 1
    for e in reversed(exts):
        out.append(s)
        s *= e
    return out[::-1]


def tiles(nest: Nest) -> list[dict[str, int]]:
    """Every output tile as the tile loops' values, in loop order."""
    names = [n for n, _ in nest.tile_loops]
    return [dict(zip(names, v, strict=True)) for v in itertools.product(*(range(e) for _, e in nest.tile_loops))]


def clip_exts(b: Blk, env: dict[str, int], bounds: list[tuple[Aff, int]]) -> dict[str, int]:
    """Extents of ``b``'s loops, each clipped so that every bounded index (affine form, exclusive upper
    bound) stays below its bound (the index at the loop's value with the other loops at 0)."""
    exts = dict(b.loops)
    for aff, hi in bounds:
        base = at(aff, env)
        for v, c in aff[1].items():
            if v in exts and c > 0 and v not in env:
                exts[v] = max(0, min(exts[v], (hi - 1 - base) // c + 1))
    return exts


def np_int(x: Any) -> int:
    return int(np.asarray(x).item())


def mem_check(mem: str, need: int, cfg: Any) -> None:
    if need > mem_size(mem, cfg):
        raise EmitError(f"staged buffers need {need} elements of {mem}, it holds {mem_size(mem, cfg)}")


__all__ = ["Blk", "Nest", "EmitError", "walk_nest", "tiles", "box", "src_box", "src_point", "clip_exts",
           "linear", "compose", "at", "dense_strides", "ProgramBuilder", "StepTokens", "BLOCK", "mem_check",
           "np_int"]
