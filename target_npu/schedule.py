"""Conv / linear layers as TIR: the whole layer (MAC, ISG shift-add, NORM/ACT/QUANT), scheduled by ``Tiling``.

:func:`conv_primfunc` writes the layer in TE, blocked NHWC16c, in the contract's order:

- ``mac_<j>`` for each ISG group segment j (contract order: scaled groups first, then unity; see
  ``hw_model.layers.group_order_blocks``): the group's partial sum D1 ``(N, OHt, OW, KBt, 16)`` int32
  over its own input blocks, from data ``(N, Hp, Wp, CBt, 16)`` int8 (pre-padded) and kernel
  ``(KBt, CBt, KH, KW, 16c, 16k)`` int8;
- ``shift_add_<j>``: D2 = shift(D1 of group j) (+ D2 of the groups before), the ISG accumulator step
  (absent when the layer has a single unity group: its MACs write D2 directly, as on the hardware);
- ``norm_act_quant``: the output ``(N, OHt, OW, KBt, 16)`` int8/uint8 from D2, ``m``/``b`` (KBt, 16)
  float32 and ``clip`` = (lo, hi) int32.

Output rows and blocks are rounded up to whole tiles, and each group's input blocks to whole input
tiles (the builder clips the edge tiles and packs a group's tail with the next group's head in one
input tile), so every split is exact and tensorize sees no predicate. :func:`schedule_conv` applies
the knobs of ``hw_model.layer_specs.Tiling`` to every stage: ``rows`` output rows and ``ob_tile``
output blocks per tile, ``cb_tile`` input blocks per MAC tile, ``loop_order`` (``ob_outer``: n, kb_0,
y_0, ...; ``sp_outer``: n, y_0, kb_0, ...), ``nbuf`` and ``cb_tile`` as annotations; then it
decomposes the MAC reductions and tensorizes each stage with its intrinsic
(:mod:`target_npu.intrinsics`). Dense and grouped convs (grouped: block-diagonal weights, as the
builder runs them) use the 16x16 MAC; a linear layer is a 1x1 conv. A depthwise conv has one stage
``mac_0`` (kernel ``(KBt, KH, KW, 16)``, input blocks = output blocks) tensorized with
``ioso_npu.dwmac16``, over the channels in their stored order (``cp``); with scaled ISG groups its D2 is
``shift_add_0`` = ``D1 + g * (D1 >> n)`` with ``g`` (KBt, 16) the sign of each channel's group, tensorized
with ``ioso_npu.shift_add_ch`` (:mod:`target_npu.intrinsics_alu`).
"""
from __future__ import annotations

from typing import Any

import tvm_ffi
from tvm import te, tirx
from tvm.s_tir import Schedule

from hw_model.builder import channel_slots
from hw_model.config import DEFAULT_CONFIG, NPUConfig
from hw_model.layer_specs import ConvSpec, Tiling, conv_geometry
from hw_model.layers import group_order_blocks
from target_npu import intrinsics, intrinsics_alu

B = intrinsics.N
NBUF_ATTR = "ioso_npu.nbuf"
"""Block annotation of the MAC stages: the ``nbuf`` knob (buffers per on-chip tile)."""
CB_TILE_ATTR = "ioso_npu.cb_tile"
"""Block annotation of the MAC stages: the ``cb_tile`` knob (input blocks per input tile; the builder's
input tiles may span a group boundary, each group's TIR loop is the knob clipped to the group)."""


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def group_segments(spec: ConvSpec, cfg: NPUConfig) -> list[tuple[int, int, int]]:
    """(group, first input block, end block) of each ISG group of ``spec`` in contract order."""
    _, bgroups = channel_slots(spec.c, spec.isg_groups, cfg)
    return group_order_blocks(bgroups, cfg)


class NotLowerable(ValueError):
    """The layer (or a nest) has no mapping onto the NPU's instructions through TIR."""


def tile_domain(spec: ConvSpec, t: Tiling, cfg: NPUConfig = DEFAULT_CONFIG, cp: int | None = None) -> dict[str, Any]:
    """Extents of the tiled layer: output rows/blocks rounded up to whole tiles; per group segment
    (``segs``: group, offset in the padded input blocks, padded block count, input tile). A depthwise
    conv has one segment whose input blocks are its output blocks, over ``cp`` stored channels (None:
    ``C`` padded to whole blocks); ``dw_isg`` marks one with scaled ISG groups (per-channel shift-add)."""
    oh, ow, kb, _ = conv_geometry(spec)
    if spec.is_depthwise and cp:
        kb = cp // B
    rows, ob = min(t.rows, oh), min(t.ob_tile, kb)
    kbt = _ceil(kb, ob) * ob
    if spec.is_depthwise:
        segs = group_segments(spec, cfg)
        isg = len(segs) != 1 or cfg.isg_group_signs[segs[0][0]] != 0
        return {"n": spec.n, "oh": _ceil(oh, rows) * rows, "ow": ow, "kb": kbt, "cb": kbt, "rows": rows, "ob": ob,
                "kh": spec.kh, "kw": spec.kw, "segs": [(segs[0][0], 0, kbt, ob)], "depthwise": True, "dw_isg": isg}
    segs, off = [], 0
    for g, a, e in group_segments(spec, cfg):
        cbt = min(t.cb_tile, e - a)
        blocks = _ceil(e - a, cbt) * cbt
        segs.append((g, off, blocks, cbt))
        off += blocks
    return {"n": spec.n, "oh": _ceil(oh, rows) * rows, "ow": ow, "kb": kbt, "cb": off,
            "rows": rows, "ob": ob, "kh": spec.kh, "kw": spec.kw, "segs": segs, "depthwise": False}


def single_unity(d: dict[str, Any], cfg: NPUConfig) -> bool:
    """True when the layer has one group of factor 1: no shift-add stage."""
    return not d.get("dw_isg") and len(d["segs"]) == 1 and cfg.isg_group_signs[d["segs"][0][0]] == 0


def _shift_add_stage(j: int, part: te.Tensor, prev: te.Tensor | None, sign: int, shift: int) -> te.Tensor:
    """D2 after group segment j: shift(D1) (+ the D2 of the segments before)."""
    if prev is None:
        return te.compute(part.shape, lambda *i: intrinsics.group_shift(part(*i), sign, shift), name=f"shift_add_{j}")
    return te.compute(part.shape, lambda *i: prev(*i) + intrinsics.group_shift(part(*i), sign, shift),
                      name=f"shift_add_{j}")


def primfunc_shapes(spec: ConvSpec, t: Tiling, cfg: NPUConfig = DEFAULT_CONFIG,
                    cp: int | None = None) -> dict[str, tuple[int, ...]]:
    """Buffer shapes of :func:`conv_primfunc`'s arguments: x (DRAM input, group order; a depthwise conv's
    in the stored order of ``cp`` channels), w (DRAM weights, the builder's layout), m (= b, = g: the
    per-channel ISG signs of a depthwise conv), out (DRAM output, real size)."""
    d = tile_domain(spec, t, cfg, cp)
    oh, ow, kb, _ = conv_geometry(spec)
    cbn = channel_slots(spec.c, spec.isg_groups, cfg)[0].size // B
    if d["depthwise"] and cp:
        kb = cbn = cp // B
    kp = d["kb"] * B
    w = (spec.kh, spec.kw, kp) if d["depthwise"] else (cbn, spec.kh, spec.kw, B, kp)
    return {"x": (spec.n, spec.h, spec.w, cbn, B), "w": w, "m": (d["kb"], B), "out": (spec.n, oh, ow, kb, B)}


def _guard(conds: list[Any], then: Any) -> Any:
    """``then`` where every condition holds, 0 elsewhere (the zero point / zero weight of a padded tile)."""
    conds = [c for c in conds if c is not None]
    if not conds:
        return then
    return tirx.if_then_else(tirx.all(*conds), then, tirx.const(0, then.dtype))


def conv_primfunc(spec: ConvSpec, t: Tiling, cfg: NPUConfig = DEFAULT_CONFIG, cp: int | None = None) -> tirx.PrimFunc:
    """The layer as a PrimFunc (see the module docstring for stages and layouts)."""
    d = tile_domain(spec, t, cfg, cp)
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    pt, pl = spec.pads[0], spec.pads[1]
    shapes = primfunc_shapes(spec, t, cfg, cp)
    shape = (d["n"], d["oh"], d["ow"], d["kb"], B)
    hp = (d["oh"] - 1) * sh + dh * (spec.kh - 1) + 1
    wp = (d["ow"] - 1) * sw + dw * (spec.kw - 1) + 1
    xin = te.placeholder(shapes["x"], "int8", name="x")
    w = te.placeholder(shapes["w"], "int8", name="w")
    real = [(a, e) for _, a, e in group_segments(spec, cfg)] if not d["depthwise"] else [(0, shapes["x"][3])]

    def load_x(j: int, blocks: int) -> te.Tensor:
        a, e = real[j]

        def body(n, y, x, cb, c):  # noqa: ANN001, ANN202
            conds = [y >= pt if pt else None, y < pt + spec.h, x >= pl if pl else None, x < pl + spec.w,
                     cb < e - a]
            return _guard(conds, xin[n, y - pt, x - pl, a + cb, c])
        return te.compute((d["n"], hp, wp, blocks, B), body, name=f"load_x_{j}")

    def load_w(j: int, blocks: int) -> te.Tensor:
        a, e = real[j]
        return te.compute((d["kb"], blocks, spec.kh, spec.kw, B, B), lambda kb, cb, r, s, ci, k: _guard(
            [cb < e - a], w[a + cb, r, s, ci, kb * B + k]), name=f"load_w_{j}")

    def mac(j: int, blocks: int) -> te.Tensor:
        xs, ws = load_x(j, blocks), load_w(j, blocks)
        cb = te.reduce_axis((0, blocks), "cb")
        r, s, ci = te.reduce_axis((0, spec.kh), "r"), te.reduce_axis((0, spec.kw), "s"), te.reduce_axis((0, B), "ci")
        return te.compute(shape, lambda n, y, x, kb, k: te.sum(
            xs[n, y * sh + r * dh, x * sw + s * dw, cb, ci].astype("int32")
            * ws[kb, cb, r, s, ci, k].astype("int32"), axis=[cb, r, s, ci]), name=f"mac_{j}")

    def dw_mac() -> te.Tensor:
        xs = load_x(0, d["kb"])
        ws = te.compute((d["kb"], spec.kh, spec.kw, B), lambda kb, r, s, k: w[r, s, kb * B + k], name="load_w_0")
        r, s = te.reduce_axis((0, spec.kh), "r"), te.reduce_axis((0, spec.kw), "s")
        return te.compute(shape, lambda n, y, x, kb, k: te.sum(
            xs[n, y * sh + r * dh, x * sw + s * dw, kb, k].astype("int32") * ws[kb, r, s, k].astype("int32"),
            axis=[r, s]), name="mac_0")

    d1 = [dw_mac()] if d["depthwise"] else [mac(j, blocks) for j, (_, _, blocks, _) in enumerate(d["segs"])]
    acc = d1[0]
    extra = []
    if d.get("dw_isg"):  # D2 = D1 + g * (D1 >> n), g the sign of each channel's group (stored order)
        g = te.placeholder(shapes["m"], "int32", name="g")
        acc = te.compute(shape, lambda n, y, x, kb, k: d1[0][n, y, x, kb, k] + g[kb, k] * (
            d1[0][n, y, x, kb, k] >> cfg.isg_shift), name="shift_add_0")
        extra = [g]
    elif not single_unity(d, cfg):
        acc = None
        for j, (g, *_rest) in enumerate(d["segs"]):
            acc = _shift_add_stage(j, d1[j], acc, cfg.isg_group_signs[g], cfg.isg_shift)
    m = te.placeholder(shapes["m"], "float32", name="m")
    bias = te.placeholder(shapes["m"], "float32", name="b")
    ms = te.compute(shapes["m"], lambda kb, k: m[kb, k], name="load_m")
    bs = te.compute(shapes["m"], lambda kb, k: bias[kb, k], name="load_b")
    clip = te.placeholder((2,), "int32", name="clip")
    norm = te.compute(shape, lambda n, y, x, kb, k: te.max(te.min(tirx.nearbyint(
        acc[n, y, x, kb, k].astype("float32") * ms[kb, k] + bs[kb, k]).astype("int32"), clip[1]),
        clip[0]).astype(spec.out_dtype), name="norm_act_quant")
    out = te.compute(shapes["out"], lambda *i: norm(*i), name="store_out")
    return te.create_prim_func([xin, w, m, bias, clip, *extra, out])


def var_names(expr: Any) -> list[str]:
    """Names of the TIR vars in ``expr`` (pre-order, repeats kept)."""
    names: list[str] = []
    tvm_ffi.structural_walk(expr, callbacks=[(tirx.Var, lambda v: names.append(v.name))], order="pre")
    return names


def _loops_by_var(sch: Schedule, blk: Any, skip: int) -> dict[str, Any]:
    """The loops of ``blk`` below its ``skip`` outermost ones, keyed by the block iter var (``v_y``,
    ``v_cb``, ...) each one binds; an iter var that binds none of them is absent."""
    loops = sch.get_loops(blk)
    by_name = {sch.get(lp).loop_var.name: lp for lp in loops[skip:]}
    realize = sch.get(loops[-1]).body
    out = {}
    for iv, value in zip(realize.block.iter_vars, realize.iter_values, strict=True):
        names = var_names(value)
        inner = [nm for nm in by_name if nm in names]
        if inner:
            out[iv.var.name] = by_name[inner[-1]]
    return out


def schedule_conv(spec: ConvSpec, t: Tiling, cfg: NPUConfig = DEFAULT_CONFIG, cp: int | None = None) -> Schedule:
    """One loop nest per output tile, as the hardware runs it: the NORM/ACT/QUANT stage is tiled by
    (rows, ob_tile) in ``loop_order``; every MAC and shift-add stage is computed at the tile loop;
    each MAC stage splits its input blocks by ``cb_tile`` and is decomposed (init, update); every
    stage is tensorized with its intrinsic."""
    t.check()
    d = tile_domain(spec, t, cfg, cp)
    sch = Schedule(conv_primfunc(spec, t, cfg, cp))
    blk = sch.get_sblock("norm_act_quant")
    n, y, x, kb, k = sch.get_loops(blk)
    y_o, y_i = sch.split(y, [None, d["rows"]])
    kb_o, kb_i = sch.split(kb, [None, d["ob"]])
    outer = [n, kb_o, y_o] if t.loop_order == "ob_outer" else [n, y_o, kb_o]
    sch.reorder(*outer, y_i, x, kb_i, k)
    anchor = outer[-1]
    sch.reverse_compute_at(sch.get_sblock("store_out"), anchor)
    unity = single_unity(d, cfg)
    for j in reversed(range(len(d["segs"]))):  # first possible place: mac_0, shift_add_0, mac_1, ...
        if not unity:
            sch.compute_at(sch.get_sblock(f"shift_add_{j}"), anchor, index=-2)
        sch.compute_at(sch.get_sblock(f"mac_{j}"), anchor, index=-2)
    for j, (g, _, _, cbt) in enumerate(d["segs"]):
        blk = sch.get_sblock(f"mac_{j}")
        lp = _loops_by_var(sch, blk, len(outer))
        cb_o = cb_i = None
        if "v_cb" in lp:  # dense / grouped (a depthwise MAC has no input-block or ci axis)
            cb_o, cb_i = sch.split(lp["v_cb"], [None, cbt])
        nest = [cb_o, lp.get("v_y"), lp.get("v_x"), lp.get("v_kb"), cb_i, lp.get("v_r"), lp.get("v_s"),
                lp["v_k"], lp.get("v_ci")]
        nest = [lv for lv in nest if lv is not None]
        sch.reorder(*nest)
        at = anchor if cb_o is None else cb_o
        sch.compute_at(sch.get_sblock(f"load_x_{j}"), at)
        sch.compute_at(sch.get_sblock(f"load_w_{j}"), at)
        sch.decompose_reduction(blk, nest[0])
        sch.tensorize(lp["v_k"], intrinsics.DW_MAC if d["depthwise"] else intrinsics.MAC)
        upd = sch.get_sblock(f"mac_{j}_update_o")
        sch.annotate(upd, NBUF_ATTR, int(t.nbuf))
        sch.annotate(upd, CB_TILE_ATTR, int(t.cb_tile))
        if not unity:
            blk = sch.get_sblock(f"shift_add_{j}")
            sch.tensorize(sch.get_loops(blk)[-1], intrinsics_alu.shift_ch_intrin(cfg.isg_shift) if d.get("dw_isg") else
                          intrinsics.shift_add_intrin(cfg.isg_group_signs[g], j == 0, cfg.isg_shift))
    sch.compute_at(sch.get_sblock("load_m"), anchor)
    sch.compute_at(sch.get_sblock("load_b"), anchor)
    sch.tensorize(k, intrinsics.norm_name(spec.out_dtype))
    return sch


def tiling_key(spec: ConvSpec, t: Tiling, cfg: NPUConfig = DEFAULT_CONFIG, cp: int | None = None) -> tuple[Any, ...]:
    """Cache key of a lowered layer: its shape, group layout, stored width ``cp`` (depthwise), out dtype and
    the knobs (not the weights)."""
    segs = tuple((cfg.isg_group_signs[g], a, e) for g, a, e in group_segments(spec, cfg))
    return (spec.n, spec.c, spec.h, spec.w, spec.k, spec.kh, spec.kw, tuple(spec.stride), tuple(spec.pads),
            tuple(spec.dilation), spec.groups, spec.out_dtype, segs, cfg.isg_shift,
            tuple(sorted(t.to_dict().items())), cp if spec.is_depthwise else None)

