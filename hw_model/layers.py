"""Conv layer emitters: ``build_conv`` / ``build_linear``, ``check_tiling``, ``default_tiling``.

The specs and ``Tiling`` live in :mod:`hw_model.layer_specs`; pools, adds, ``build_layer`` and
``run_layer`` in :mod:`hw_model.layers_alu`.

All emit through :class:`hw_model.builder.ProgramBuilder`. Programs take one DRAM input region
``x`` (and ``y`` for add) in padded NHWC (see :func:`hw_model.builder.pack_nhwc`) and write ``out``;
``Program.meta`` records shapes and channel layouts so :func:`run_layer` can pack and unpack.

``in_slots`` (one int64 slots array per input) is the layout each input has in DRAM (default: the
identity, zero padded). A conv needs its input in group order (``channel_slots``); when the stored
layout differs, its input LOADs gather through a const int32 table ``gather_x`` (one DMA burst per
run of consecutive channels, costed by the cycle model) instead of the host permuting the tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hw_model.builder import (
    BLOCK,
    ProgramBuilder,
    StepTokens,
    channel_slots,
    check_slots,
    gather_table,
    identity_slots,
    row_window,
)
from hw_model.config import DEFAULT_CONFIG, NPUConfig
from hw_model.isa import Program, mem_size
from hw_model.layer_specs import AddSpec, ConvSpec, LinearSpec, PoolSpec, Tiling, conv_geometry, pool_geometry

__all__ = ["build_conv", "build_linear", "default_tiling", "check_tiling", "stored_layouts",
           "channel_group_runs", "group_order_blocks"]


@dataclass
class _Plan:
    """Buffer sizes (elements) of one tiling."""

    in_tile: int
    w_tile: int
    c_tile: int
    out_tile: int
    acc: int
    steps: list = field(default_factory=list)


def _conv_plan(spec: ConvSpec, t: Tiling, cfg: NPUConfig) -> _Plan:
    oh, ow, kb, _ = conv_geometry(spec)
    slots, bgroups = channel_slots(spec.c, spec.isg_groups, cfg)
    cb = slots.size // BLOCK
    dw = spec.is_depthwise
    kb = cb if dw else kb
    n_cb = min(t.ob_tile, kb) if dw else min(t.cb_tile, cb)
    n_ob = min(t.ob_tile, kb)
    rows = min(t.rows, oh)
    in_rows = (rows - 1) * spec.stride[0] + spec.dilation[0] * (spec.kh - 1) + 1
    wp = spec.w + spec.pads[1] + spec.pads[3]
    w_rows = spec.kh * spec.kw * (1 if dw else n_cb * BLOCK)
    single = len(set(bgroups)) == 1 and cfg.isg_group_signs[bgroups[0]] == 0
    p = rows * ow * n_ob * BLOCK
    return _Plan(in_rows * wp * n_cb * BLOCK, w_rows * n_ob * BLOCK, 2 * n_ob * BLOCK, p, p if single else 2 * p)


def _stored_width(spec, in_slots: list | None) -> int:
    """Padded channels per pixel of a pool's / add's (first) input as stored (its tiles keep that layout)."""
    if in_slots is not None and len(in_slots):
        return int(np.size(in_slots[0]))
    return -(-spec.c // BLOCK) * BLOCK


def check_tiling(spec, tiling: Tiling, cfg: NPUConfig = DEFAULT_CONFIG, in_slots: list | None = None) -> None:
    """Raise ValueError if the tiling's buffers (times ``nbuf``) do not fit the on-chip memories.

    ``in_slots``: stored input layouts (matter for pools and adds, whose tiles keep them)."""
    if not isinstance(tiling, Tiling):
        raise TypeError(f"tiling must be a Tiling, got {type(tiling).__name__}")
    tiling.check()
    if isinstance(spec, LinearSpec):
        spec = spec.as_conv()
    if isinstance(spec, ConvSpec):
        pl = _conv_plan(spec, tiling, cfg)
        need = {"spad": tiling.nbuf * (pl.in_tile + pl.out_tile), "wbuf": tiling.nbuf * pl.w_tile,
                "cbuf": tiling.nbuf * pl.c_tile, "acc": tiling.nbuf * pl.out_tile}
        if pl.acc > pl.out_tile and pl.out_tile > cfg.isg_d1_kib * 256:
            raise ValueError(f"tiling {tiling} overflows the ISG D1 bank: needs {pl.out_tile} elements, "
                             f"it holds {cfg.isg_d1_kib * 256}")
    elif isinstance(spec, PoolSpec):
        oh, ow = pool_geometry(spec)
        kh, kw = spec.window
        rows, n_cb = min(tiling.rows, oh), min(tiling.ob_tile, _stored_width(spec, in_slots) // BLOCK)
        in_rows = (rows - 1) * spec.stride[0] + kh
        wp = spec.w + spec.pads[1] + spec.pads[3]
        out = rows * ow * n_cb * BLOCK
        need = {"spad": tiling.nbuf * (in_rows * wp * n_cb * BLOCK + (out if spec.kind == "max" else 0))
                + (tiling.nbuf * out if spec.kind != "max" else 0),
                "cbuf": tiling.nbuf * 2 * n_cb * BLOCK, "acc": out if spec.kind != "max" else 0}
    elif isinstance(spec, AddSpec):
        cp = _stored_width(spec, in_slots)
        pix = min(tiling.rows, spec.n * spec.h * spec.w)
        need = {"spad": tiling.nbuf * 3 * pix * cp, "cbuf": 3 * cp}
    else:
        raise TypeError(f"unknown layer spec {type(spec).__name__}")
    for mem, n in need.items():
        size = cfg.acc_buf_kib * 256 if mem == "acc" else mem_size(mem, cfg)  # D2 bank only
        if n > size:
            raise ValueError(f"tiling {tiling} overflows {mem}: needs {n} elements, {mem} holds {size}")


def default_tiling(spec, cfg: NPUConfig = DEFAULT_CONFIG, in_slots: list | None = None) -> Tiling:
    """Largest tiles that fit, double buffered when possible (chosen: greedy, rows first, then out blocks);
    ``in_slots`` as in :func:`check_tiling`."""
    if isinstance(spec, LinearSpec):
        spec = spec.as_conv()
    if isinstance(spec, AddSpec):
        total = spec.n * spec.h * spec.w
        cands = [Tiling(rows=r, nbuf=nb) for nb in (2, 1) for r in (total, 4096, 1024, 256, 64, 16, 4, 1)]
    else:
        oh = conv_geometry(spec)[0] if isinstance(spec, ConvSpec) else pool_geometry(spec)[0]
        nblk = -(-spec.k // BLOCK) if isinstance(spec, ConvSpec) else _stored_width(spec, in_slots) // BLOCK
        cbl = -(-spec.c // BLOCK)
        cands = [Tiling(ob_tile=ob, rows=r, cb_tile=cb, nbuf=nb)
                 for nb in (2, 1) for cb in sorted({cbl, 16, 8, 4, 2, 1}, reverse=True)
                 for ob in sorted({nblk, 8, 4, 2, 1}, reverse=True)
                 for r in sorted({oh, 64, 32, 16, 8, 4, 2, 1}, reverse=True)]
        # chosen: double buffered first (DMA of tile s+1 overlaps the compute of tile s), then the biggest
        # tile volume; on ties more output blocks (an input tile is re-read once per output-block tile),
        # then more rows
        cands.sort(key=lambda t: (-t.nbuf, -(min(t.rows, oh) * min(t.ob_tile, nblk) * min(t.cb_tile, cbl)),
                                  -min(t.ob_tile, nblk), -min(t.rows, oh)))
    for t in cands:
        try:
            check_tiling(spec, t, cfg, in_slots)
            return t
        except ValueError:
            continue
    raise ValueError(f"no tiling of {spec.__class__.__name__} fits the on-chip memories of {cfg}")


def _steps(n: int, ytiles: int, obtiles: int, cbtiles: int, order: str) -> list[tuple[int, int, int, int]]:
    if order == "ob_outer":
        return [(i, ob, y, c) for i in range(n) for ob in range(obtiles) for y in range(ytiles) for c in range(cbtiles)]
    return [(i, y, ob, c)[:1] + (ob, y, c) for i in range(n) for y in range(ytiles) for ob in range(obtiles)
            for c in range(cbtiles)]


def stored_layouts(in_slots: list | None, chans: list[int]) -> list[np.ndarray]:
    """The stored layout of each input: ``in_slots`` checked, or the identity (zero padded)."""
    if in_slots is None:
        return [identity_slots(c) for c in chans]
    if not isinstance(in_slots, (list, tuple)) or len(in_slots) != len(chans):
        raise ValueError(f"in_slots must be a list of {len(chans)} slots array(s), one per input")
    return [check_slots(s, c, f"in_slots[{j}]") for j, (s, c) in enumerate(zip(in_slots, chans))]


def build_conv(spec: ConvSpec, tiling: Tiling | None = None, cfg: NPUConfig = DEFAULT_CONFIG,
               in_slots: list[np.ndarray] | None = None) -> Program:
    """Program of one conv layer (MAC + ISG + NORM + ACT + QUANT), DRAM regions x -> out.

    ``in_slots``: ``[slots]`` of x as stored in DRAM (None: identity). The input LOADs are gathered
    through ``gather_x`` when that differs from the group order the layer needs."""
    spec.check(cfg)
    tiling = default_tiling(spec, cfg) if tiling is None else tiling
    check_tiling(spec, tiling, cfg)
    oh, ow, kb, cbn = conv_geometry(spec)
    dw = spec.is_depthwise
    slots_in, bgroups = channel_slots(spec.c, spec.isg_groups, cfg)
    stored = stored_layouts(in_slots, [spec.c])[0]
    runs: list[tuple[int, int, int]] = []
    if dw:  # one group per channel: the shifter runs on column runs of the stored order, nothing is gathered
        slots_in, runs = stored, channel_group_runs(stored, spec.isg_groups)
        bgroups = sorted({g for g, _, _ in runs}, key=lambda g: cfg.isg_group_signs[g] == 0)
    gathered = not np.array_equal(stored, slots_in)
    slots_out = slots_in if dw else identity_slots(spec.k)
    cp, kp, cps = slots_in.size, slots_out.size, stored.size
    kb = kp // BLOCK
    cbn = cp // BLOCK
    pl = _conv_plan(spec, tiling, cfg)
    n_ob_t, rows_t = min(tiling.ob_tile, kb), min(tiling.rows, oh)
    n_cb_t = n_ob_t if dw else min(tiling.cb_tile, cbn)
    (sh, sw), (dh, dwl), (pt, pleft, _pb, pright) = spec.stride, spec.dilation, spec.pads
    b = ProgramBuilder(cfg)
    b.alloc("x", spec.in_dtype, spec.n * spec.h * spec.w * cps, "input")
    b.alloc("out", spec.out_dtype, spec.n * oh * ow * kp, "output")
    if gathered:
        b.const("gather_x", gather_table(slots_in, stored), "int32")
    wq = spec.dense_weight()
    used_in, used_out = slots_in >= 0, slots_out >= 0
    if dw:
        wd = np.zeros((spec.kh, spec.kw, cp), np.int8)
        wd[:, :, used_in] = wq[slots_in[used_in], 0].transpose(1, 2, 0)
    else:
        wd = np.zeros((cbn * BLOCK, spec.kh, spec.kw, kp), np.int8)
        wd[np.ix_(used_in, np.arange(spec.kh), np.arange(spec.kw), used_out)] = \
            wq[slots_out[used_out]][:, slots_in[used_in]].transpose(1, 2, 3, 0)
        wd = wd.reshape(cbn, BLOCK, spec.kh, spec.kw, kp).transpose(0, 2, 3, 1, 4)
    b.const("w", wd, "int8")
    mb = np.zeros(2 * kp, np.float32)
    mb[:kp][used_out] = np.asarray(spec.m, np.float32)[slots_out[used_out]]
    mb[kp:][used_out] = np.asarray(spec.b, np.float32)[slots_out[used_out]]
    b.const("norm", mb, "float32")
    order = group_order_blocks(bgroups, cfg)
    single = len(order) == 1 and cfg.isg_group_signs[order[0][0]] == 0
    ytiles, obtiles = -(-oh // rows_t), -(-kb // n_ob_t)
    cbtiles = 1 if dw else -(-cbn // n_cb_t)
    steps = _steps(spec.n, ytiles, obtiles, cbtiles, tiling.loop_order)
    nb = tiling.nbuf
    spad_in = [i * pl.in_tile for i in range(nb)]
    spad_out = [nb * pl.in_tile + i * pl.out_tile for i in range(nb)]
    held: dict[tuple[str, int], tuple] = {}
    loads_of = []
    for s, (i, ob, y, c) in enumerate(steps):
        keys = {"in": (i, y, ob if dw else c), "w": (ob, c), "c": (ob,)}
        need = [k for k, v in keys.items() if held.get((k, s % nb)) != v]
        for k in need:
            held[(k, s % nb)] = keys[k]
        loads_of.append(need)
    out_steps = [s if st[3] == cbtiles - 1 else None for s, st in enumerate(steps)]
    tok = StepTokens([bool(x) for x in loads_of], out_steps, nb, nb)
    u = 0
    # D2 tiles alternate between nbuf slots of the D2 bank so that NORM/ACT/QUANT of tile u (post
    # path) overlaps the MACs of tile u+1; D1 (ISG only) follows the D2 slots
    d1 = nb * pl.out_tile
    for s, (i, ob, y, c) in enumerate(steps):
        slot = s % nb
        d2 = (u % nb) * pl.out_tile
        ob0, ob1 = ob * n_ob_t, min(kb, (ob + 1) * n_ob_t)
        nob = ob1 - ob0
        c0, c1 = (ob0, ob1) if dw else (c * n_cb_t, min(cbn, (c + 1) * n_cb_t))
        y0, y1 = y * rows_t, min(oh, (y + 1) * rows_t)
        r_lo = y0 * sh - pt
        r_hi = (y1 - 1) * sh - pt + dh * (spec.kh - 1) + 1
        a_lo, n_real, pad_t, pad_b = row_window(r_lo, r_hi, spec.h)
        pix = (c1 - c0) * BLOCK
        wp = spec.w + pleft + pright
        wrow = nob * BLOCK
        cbase = slot * pl.c_tile
        ld = []
        for k in loads_of[s]:
            if k == "in":
                # gathered: the table maps needed channel position c0*16 + k to its stored position
                gx = dict(gather="gather_x", gather_offset=c0 * BLOCK) if gathered else {}
                ld.append(dict(region="x", dram_offset=((i * spec.h + a_lo) * spec.w) * cps
                               + (0 if gathered else c0 * BLOCK), mem="spad",
                               sram_addr=spad_in[slot], n0=n_real, n1=spec.w, n2=pix, dram_stride0=spec.w * cps,
                               dram_stride1=cps, pad=(pad_t, pleft, pad_b, pright), pad_value=spec.x_zp, **gx))
            elif k == "w" and dw:
                ld.append(dict(region="w", dram_offset=ob0 * BLOCK, mem="wbuf", sram_addr=slot * pl.w_tile,
                               n0=spec.kh * spec.kw, n1=1, n2=wrow, dram_stride0=cp, dram_stride1=0))
            elif k == "w":
                ld.append(dict(region="w", dram_offset=c0 * spec.kh * spec.kw * BLOCK * kp + ob0 * BLOCK,
                               mem="wbuf", sram_addr=slot * pl.w_tile, n0=(c1 - c0) * spec.kh * spec.kw * BLOCK,
                               n1=1, n2=wrow, dram_stride0=kp, dram_stride1=0))
            else:
                for off in (0, kp):
                    ld.append(dict(region="norm", dram_offset=off + ob0 * BLOCK, mem="cbuf",
                                   sram_addr=cbase + (wrow if off else 0), n0=1, n1=1, n2=wrow,
                                   dram_stride0=0, dram_stride1=0))
        for j, kw_ in enumerate(ld):
            b.load(**kw_, pop_next=j == 0 and tok.load_pop(s), push_next=j == len(ld) - 1)
        comp = []
        segs = [(g, max(a, c0), min(e, c1)) for g, a, e in order if max(a, c0) < min(e, c1)]
        if dw:
            segs = [(order[0][0], ob0, ob1)] if single else []
        if dw and not single:  # D1 = the tile's MACs, then D2 = shift(D1) per run of channels of one group
            comp.append(("gemm", dict(
                acc_addr=d1, acc_stride=wrow, in_addr=spad_in[slot], in_row_stride=wp * pix, in_pix_stride=pix,
                w_addr=slot * pl.w_tile, w_row_stride=wrow, n_ob=nob, n_cb=nob, kh=spec.kh, kw=spec.kw,
                oh=y1 - y0, ow=ow, stride_h=sh, stride_w=sw, dil_h=dh, dil_w=dwl, zp=spec.x_zp, depthwise=True)))
            for g, a, e in runs:
                a, e = max(a, ob0 * BLOCK), min(e, ob1 * BLOCK)
                if a < e:
                    off = a - ob0 * BLOCK
                    comp.append(("gsa", dict(d1_addr=d1 + off, d1_stride=wrow, d2_addr=d2 + off, d2_stride=wrow,
                                             rows=(y1 - y0) * ow, cols=e - a, sign=cfg.isg_group_signs[g],
                                             init=True)))
        for g, a, e in segs:
            first = dw or a == next(st for gg, st, _ in order if gg == g)
            last = dw or e == next(en for gg, _, en in order if gg == g)
            lo_off = (a - ob0) if dw else 0
            comp.append(("gemm", dict(
                acc_addr=(d2 if single else d1) + lo_off * BLOCK, acc_stride=wrow,
                in_addr=spad_in[slot] + (a - c0) * BLOCK, in_row_stride=wp * pix, in_pix_stride=pix,
                w_addr=slot * pl.w_tile + (lo_off * BLOCK if dw else (a - c0) * spec.kh * spec.kw * BLOCK * wrow),
                w_row_stride=wrow, n_ob=(e - a) if dw else nob, n_cb=e - a, kh=spec.kh, kw=spec.kw,
                oh=y1 - y0, ow=ow, stride_h=sh, stride_w=sw, dil_h=dh, dil_w=dwl, zp=spec.x_zp,
                accumulate=not first, depthwise=dw)))
            if last and not single:
                comp.append(("gsa", dict(d1_addr=d1 + lo_off * BLOCK, d1_stride=wrow, d2_addr=d2 + lo_off * BLOCK,
                                         d2_stride=wrow, rows=(y1 - y0) * ow, cols=(e - a) * BLOCK if dw else wrow,
                                         sign=cfg.isg_group_signs[g], init=dw or g == order[0][0])))
        final = c == cbtiles - 1
        if final:
            comp.append(("naq", dict(acc_addr=d2, acc_stride=wrow, out_addr=spad_out[u % nb], out_stride=wrow,
                                     rows=(y1 - y0) * ow, cols=wrow, m_addr=cbase, b_addr=cbase + wrow,
                                     lo=spec.lo, hi=spec.hi, out_dtype=spec.out_dtype)))
        for j, (kind, f) in enumerate(comp):
            deps = dict(pop_prev=j == 0 and bool(loads_of[s]),
                        push_prev=j == len(comp) - 1 and tok.compute_push_prev(s),
                        pop_next=kind == "naq" and tok.out_pop(u), push_next=kind == "naq")
            {"gemm": b.gemm, "gsa": b.group_shift_add, "naq": b.norm_act_quant}[kind](**f, **deps)
        if final:
            b.store(spad_out[u % nb], "out", ((i * oh + y0) * ow) * kp + ob0 * BLOCK, y1 - y0, ow, wrow,
                    ow * kp, kp, pop_prev=True, push_prev=tok.store_push(u))
            u += 1
    meta = {"layer": "conv", "inputs": {"x": {"shape": [spec.n, spec.c, spec.h, spec.w],
                                              "slots": stored.tolist(), "dtype": spec.in_dtype}},
            "output": {"region": "out", "shape": [spec.n, spec.k, oh, ow], "slots": slots_out.tolist(),
                       "dtype": spec.out_dtype},
            "macs": spec.macs(), "groups": len(order), "tiling": tiling.to_dict(),
            "gathered_loads": sum(bool(getattr(i, "gather", "")) for i in b.instrs)}
    return b.finish(meta)


def channel_group_runs(slots: np.ndarray, isg_groups: np.ndarray | None) -> list[tuple[int, int, int]]:
    """(group, first, end) padded channel positions of each maximal run of one ISG group in the stored
    order ``slots``; a padding position (-1, zero weights) joins the run before it."""
    gvec = np.zeros(int(slots.max(initial=-1)) + 1, np.int64) if isg_groups is None else np.asarray(isg_groups)
    runs: list[tuple[int, int, int]] = []
    for p, ch in enumerate(slots):
        g = int(gvec[ch]) if ch >= 0 else (runs[-1][0] if runs else None)
        if runs and (g is None or runs[-1][0] == g):
            runs[-1] = (runs[-1][0], runs[-1][1], p + 1)
        else:
            runs.append((0 if g is None else g, p, p + 1))
    return runs


def group_order_blocks(bgroups: list[int], cfg: NPUConfig) -> list[tuple[int, int, int]]:
    """(group, first block, end block) of each group present, in layout (= contract) order."""
    out: list[tuple[int, int, int]] = []
    for j, g in enumerate(bgroups):
        if out and out[-1][0] == g:
            out[-1] = (g, out[-1][1], j + 1)
        else:
            out.append((g, j, j + 1))
    return out


def build_linear(spec: LinearSpec, tiling: Tiling | None = None, cfg: NPUConfig = DEFAULT_CONFIG,
                 in_slots: list[np.ndarray] | None = None) -> Program:
    """A linear layer as a 1x1 conv whose pixels are the batch rows (x region = (N, len(stored slots)))."""
    prog = build_conv(spec.as_conv(), tiling, cfg, in_slots)
    prog.meta["layer"] = "linear"
    return prog

