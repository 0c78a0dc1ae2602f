"""Element-wise add and pooling layers as TIR, scheduled by ``Tiling`` (the ALU counterpart of
:mod:`target_npu.schedule`).

Layouts are blocked NHWC16c in the *stored* channel order (``cb`` = ``len(in_slots[0]) / 16`` blocks):
channels are independent in these layers, so they run in whatever order their input is stored.

:func:`pool_primfunc` (``PoolSpec`` kinds max / avg / global_avg):

- ``load_x``: the padded input tile ``(N, Hp, Wp, CBt, 16)`` from ``x`` ``(N, H, W, CB, 16)``; outside the
  image the guard's else value is the LOAD's pad value (the dtype minimum for max, the zero point else);
- ``alu_max`` (the pooled integers, tensorized with ``ioso_npu.max16``) or ``alu_sum`` (int32 window sums
  of ``x - zp``, ``ioso_npu.sum16``) then ``norm_act_quant`` with ``load_m`` / ``load_b`` of the NORM
  constants (``ioso_npu.norm_act_quant``);
- ``store_out`` to ``out`` ``(N, OH, OW, CB, 16)``.

:func:`add_primfunc` (``AddSpec``), pixels flattened (``P = N*H*W``):

- ``load_a`` / ``load_b``: ``(Pt, CB, 16)`` tiles of ``x`` and ``y`` (y in x's stored order: the emitter
  gathers it when it is stored in another), ``load_ma`` / ``load_mb`` / ``load_bias``: the ALU constants
  ``(CB, 16)`` float32, left at the root (loaded once);
- ``alu_add`` (``ioso_npu.alu_add``), ``store_out`` to ``out`` ``(P, CB, 16)``.

Output rows (pixels for add) and blocks are rounded up to whole tiles, as in the conv schedule; the
emitter clips the edge tiles. Knobs: ``rows`` output rows (pixels) per tile, ``ob_tile`` channel
blocks per pool tile, ``nbuf`` (block annotation ``ioso_npu.nbuf`` of the compute stage); the tile
loops are (n, row tile, block tile) for pools and (pixel tile) for adds, the builder's step order.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from tvm import te, tirx
from tvm.s_tir import Schedule

from hw_model.layer_specs import AddSpec, PoolSpec, Tiling, pool_geometry
from target_npu import intrinsics, intrinsics_alu
from target_npu.schedule import NBUF_ATTR, _loops_by_var

B = intrinsics.N


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def pool_domain(spec: PoolSpec, t: Tiling, cp: int) -> dict[str, Any]:
    """Extents of the tiled pool over ``cp`` stored channels (rounded up to whole tiles)."""
    oh, ow = pool_geometry(spec)
    nblk = cp // B
    rows, ob = min(t.rows, oh), min(t.ob_tile, nblk)
    (kh, kw), (sh, _sw), (pt, pl, pb, pr) = spec.window, spec.stride, spec.pads
    oht = _ceil(oh, rows) * rows
    return {"oh": oh, "ow": ow, "cb": nblk, "rows": rows, "ob": ob, "oht": oht, "cbt": _ceil(nblk, ob) * ob,
            "hp": max(spec.h + pt + pb, (oht - 1) * sh + kh), "wp": spec.w + pl + pr, "kh": kh, "kw": kw}


def pool_primfunc(spec: PoolSpec, t: Tiling, cp: int) -> tirx.PrimFunc:
    """The pool as a PrimFunc over ``cp`` stored channels (module docstring)."""
    d = pool_domain(spec, t, cp)
    (sh, sw), (pt, pl, _pb, _pr) = spec.stride, spec.pads
    is_max = spec.kind == "max"
    dt = spec.in_dtype
    x = te.placeholder((spec.n, spec.h, spec.w, d["cb"], B), dt, name="x")
    fill = int(np.iinfo(dt).min) if is_max else int(spec.x_zp)

    def load(n, y, xx, cb, c):  # noqa: ANN001, ANN202
        conds = [y >= pt, y < pt + spec.h, xx >= pl, xx < pl + spec.w, cb < d["cb"]]
        return tirx.if_then_else(tirx.all(*conds), x[n, y - pt, xx - pl, cb, c], tirx.const(fill, dt))
    xs = te.compute((spec.n, d["hp"], d["wp"], d["cbt"], B), load, name="load_x")
    shape = (spec.n, d["oht"], d["ow"], d["cbt"], B)
    r, s = te.reduce_axis((0, d["kh"]), "r"), te.reduce_axis((0, d["kw"]), "s")
    args: list[te.Tensor] = [x]
    if is_max:
        res = te.compute(shape, lambda n, y, xx, cb, c: te.max(xs[n, y * sh + r, xx * sw + s, cb, c], axis=[r, s]),
                         name="alu_max")
    else:
        zp = te.placeholder((1,), "int32", name="zp")
        acc = te.compute(shape, lambda n, y, xx, cb, c: te.sum(
            xs[n, y * sh + r, xx * sw + s, cb, c].astype("int32") - zp[0], axis=[r, s]), name="alu_sum")
        m = te.placeholder((d["cbt"], B), "float32", name="m")
        bias = te.placeholder((d["cbt"], B), "float32", name="b")
        ms = te.compute(m.shape, lambda cb, c: m[cb, c], name="load_m")
        bs = te.compute(m.shape, lambda cb, c: bias[cb, c], name="load_b")
        clip = te.placeholder((2,), "int32", name="clip")
        res = te.compute(shape, lambda n, y, xx, cb, c: te.max(te.min(tirx.nearbyint(
            acc[n, y, xx, cb, c].astype("float32") * ms[cb, c] + bs[cb, c]).astype("int32"), clip[1]),
            clip[0]).astype(spec.out_dtype), name="norm_act_quant")
        args += [zp, m, bias, clip]
    out = te.compute((spec.n, d["oh"], d["ow"], d["cb"], B), lambda *i: res(*i), name="store_out")
    return te.create_prim_func([*args, out])


def schedule_pool(spec: PoolSpec, t: Tiling, cp: int) -> Schedule:
    """Tiles (n, row tile, block tile); the window stage decomposed (init, taps) and tensorized per tap."""
    t.check()
    d = pool_domain(spec, t, cp)
    sch = Schedule(pool_primfunc(spec, t, cp))
    is_max = spec.kind == "max"
    last = sch.get_sblock("alu_max" if is_max else "norm_act_quant")
    n, y, x, cb, k = sch.get_loops(last)[:5]
    y_o, y_i = sch.split(y, [None, d["rows"]])
    cb_o, cb_i = sch.split(cb, [None, d["ob"]])
    sch.reorder(n, y_o, cb_o, y_i, x, cb_i, k)
    sch.reverse_compute_at(sch.get_sblock("store_out"), cb_o)
    win = last
    if not is_max:
        win = sch.get_sblock("alu_sum")
        sch.compute_at(win, cb_o)
        sch.compute_at(sch.get_sblock("load_m"), cb_o)
        sch.compute_at(sch.get_sblock("load_b"), cb_o)
        sch.tensorize(k, intrinsics.norm_name(spec.out_dtype))
    sch.compute_at(sch.get_sblock("load_x"), cb_o)
    lp = _loops_by_var(sch, win, 3)  # below (n, row tile, block tile); an extent-1 loop may be gone
    nest = [lp[v] for v in ("v_y", "v_xx", "v_cb", "v_r", "v_s", "v_c") if v in lp]
    sch.reorder(*nest)
    sch.decompose_reduction(win, nest[0])
    sch.tensorize(lp["v_c"], (intrinsics_alu.max_intrin if is_max else intrinsics_alu.sum_intrin)(spec.in_dtype))
    sch.annotate(sch.get_sblock(("alu_max" if is_max else "alu_sum") + "_update_o"), NBUF_ATTR, int(t.nbuf))
    return sch


def _copy_of(src: te.Tensor):  # noqa: ANN202
    return lambda j, c: src[j, c]


def add_primfunc(spec: AddSpec, t: Tiling, cp: int) -> tirx.PrimFunc:
    """The residual add as a PrimFunc over ``cp`` channels in x's stored order (module docstring)."""
    p = spec.n * spec.h * spec.w
    rows = min(t.rows, p)
    pt, cb = _ceil(p, rows) * rows, cp // B
    x = te.placeholder((p, cb, B), spec.a_dtype, name="x")
    y = te.placeholder((p, cb, B), spec.b_dtype, name="y")
    consts = [te.placeholder((cb, B), "float32", name=nm) for nm in ("ma", "mb", "bias")]
    zp = te.placeholder((2,), "int32", name="zp")
    clip = te.placeholder((2,), "int32", name="clip")

    def tile(src: te.Tensor, name: str) -> te.Tensor:
        return te.compute((pt, cb, B), lambda i, j, c: tirx.if_then_else(
            i < p, src[i, j, c], tirx.const(0, src.dtype)), name=name)
    xa, yb = tile(x, "load_a"), tile(y, "load_b")
    ma, mb, bias = (te.compute((cb, B), _copy_of(k), name=f"load_{k.name}") for k in consts)

    def body(i, j, c):  # noqa: ANN001, ANN202
        ta = (xa[i, j, c].astype("int32") - zp[0]).astype("float32") * ma[j, c]
        tb = (yb[i, j, c].astype("int32") - zp[1]).astype("float32") * mb[j, c]
        q = tirx.nearbyint(ta + tb + bias[j, c]).astype("int32")
        return te.max(te.min(q, clip[1]), clip[0]).astype(spec.out_dtype)
    res = te.compute((pt, cb, B), body, name="alu_add")
    out = te.compute((p, cb, B), lambda *i: res(*i), name="store_out")
    return te.create_prim_func([x, y, *consts, zp, clip, out])


def schedule_add(spec: AddSpec, t: Tiling, cp: int) -> Schedule:
    """One tile loop over pixel tiles; the ALU constants' copies stay at the root."""
    t.check()
    rows = min(t.rows, spec.n * spec.h * spec.w)
    sch = Schedule(add_primfunc(spec, t, cp))
    blk = sch.get_sblock("alu_add")
    i, _j, c = sch.get_loops(blk)
    i_o, _i_i = sch.split(i, [None, rows])
    sch.reverse_compute_at(sch.get_sblock("store_out"), i_o)
    sch.compute_at(sch.get_sblock("load_a"), i_o)
    sch.compute_at(sch.get_sblock("load_b"), i_o)
    sch.tensorize(c, intrinsics_alu.add_intrin(spec.a_dtype, spec.b_dtype, spec.out_dtype))
    sch.annotate(sch.get_sblock("alu_add_o"), NBUF_ATTR, int(t.nbuf))
    return sch
