"""Conv / linear layers as TIR: a blocked NHWC16c PrimFunc scheduled with the ``Tiling`` knobs.

:func:`conv_primfunc` describes the MAC part of a conv in TE: data ``(N, Hp, Wp, CB, 16)`` int8
(pre-padded, channels in 16-blocks innermost), kernel ``(KB, CB, KH, KW, 16c, 16k)`` int8, output
``(N, OHt, OW, KB, 16)`` int32. The output rows, output blocks and input blocks are rounded up to
whole tiles (the builder clips the edge tiles), so every split is exact and tensorize sees no
predicate. :func:`schedule_conv` applies the knobs of ``hw_model.layer_specs.Tiling``:

- ``rows`` output rows per tile, ``ob_tile`` output blocks, ``cb_tile`` input blocks;
- ``loop_order`` ``ob_outer`` (n, kb_o, oh_o, cb_o, ...) or ``sp_outer`` (n, oh_o, kb_o, cb_o, ...);
- ``nbuf`` recorded as the block annotation ``ioso_npu.nbuf``;

then ``decompose_reduction`` and ``tensorize`` of the (16 out x 16 in) pixel MAC with
``ioso_npu.mac16x16`` (:mod:`target_npu.intrinsics`). Dense convs only (groups == 1, linear as 1x1).
"""
from __future__ import annotations

from typing import Any

import tvm
from tvm import te
from tvm.s_tir import Schedule

from hw_model.layer_specs import ConvSpec, Tiling, conv_geometry
from target_npu import intrinsics

B = intrinsics.N


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def tile_domain(spec: ConvSpec, t: Tiling) -> dict[str, int]:
    """Loop extents of the tiled conv: output rows/blocks/input blocks rounded up to whole tiles."""
    oh, ow, kb, cb = conv_geometry(spec)
    rows, ob, cbt = min(t.rows, oh), min(t.ob_tile, kb), min(t.cb_tile, cb)
    return {"n": spec.n, "oh": _ceil(oh, rows) * rows, "ow": ow, "kb": _ceil(kb, ob) * ob,
            "cb": _ceil(cb, cbt) * cbt, "rows": rows, "ob": ob, "cbt": cbt, "kh": spec.kh, "kw": spec.kw}


def conv_primfunc(spec: ConvSpec, t: Tiling) -> tvm.tirx.PrimFunc:
    """The MAC loop nest of ``spec`` as a PrimFunc (see the module docstring for the layout)."""
    if spec.groups != 1:
        raise ValueError(f"conv_primfunc: groups={spec.groups}; only dense convs are lowered through TIR")
    d = tile_domain(spec, t)
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    hp = (d["oh"] - 1) * sh + dh * (spec.kh - 1) + 1
    wp = (d["ow"] - 1) * sw + dw * (spec.kw - 1) + 1
    data = te.placeholder((d["n"], hp, wp, d["cb"], B), "int8", name="data")
    ker = te.placeholder((d["kb"], d["cb"], spec.kh, spec.kw, B, B), "int8", name="ker")
    cb = te.reduce_axis((0, d["cb"]), "cb")
    r = te.reduce_axis((0, spec.kh), "r")
    s = te.reduce_axis((0, spec.kw), "s")
    ci = te.reduce_axis((0, B), "ci")
    out = te.compute((d["n"], d["oh"], d["ow"], d["kb"], B), lambda n, y, x, kb, k: te.sum(
        data[n, y * sh + r * dh, x * sw + s * dw, cb, ci].astype("int32")
        * ker[kb, cb, r, s, ci, k].astype("int32"), axis=[cb, r, s, ci]), name="mac")
    return te.create_prim_func([data, ker, out])


def schedule_conv(spec: ConvSpec, t: Tiling) -> Schedule:
    """Split/reorder by the knobs, decompose the reduction and tensorize the pixel MAC."""
    t.check()
    d = tile_domain(spec, t)
    sch = Schedule(conv_primfunc(spec, t))
    blk = sch.get_sblock("mac")
    n, y, x, kb, k, cb, r, s, ci = sch.get_loops(blk)
    y_o, y_i = sch.split(y, [None, d["rows"]])
    kb_o, kb_i = sch.split(kb, [None, d["ob"]])
    cb_o, cb_i = sch.split(cb, [None, d["cbt"]])
    outer = [n, kb_o, y_o, cb_o] if t.loop_order == "ob_outer" else [n, y_o, kb_o, cb_o]
    sch.reorder(*outer, y_i, x, kb_i, cb_i, r, s, k, ci)
    sch.decompose_reduction(blk, cb_o)
    sch.tensorize(k, intrinsics.MAC)
    sch.annotate(sch.get_sblock("mac_update_o"), "ioso_npu.nbuf", int(t.nbuf))
    return sch


def tiling_key(spec: ConvSpec, t: Tiling) -> tuple[Any, ...]:
    """Cache key of a lowered layer: its shape and the knobs (not the weights)."""
    return (spec.n, spec.c, spec.h, spec.w, spec.k, spec.kh, spec.kw, tuple(spec.stride), tuple(spec.pads),
            tuple(spec.dilation), spec.groups, tuple(sorted(t.to_dict().items())))
