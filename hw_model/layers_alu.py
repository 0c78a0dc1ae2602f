"""ALU layer emitters (pooling, residual add), ``build_layer`` and the ``run_layer`` convenience."""
from __future__ import annotations

from typing import Any

import numpy as np

from hw_model.builder import BLOCK, ProgramBuilder, StepTokens, gather_table, pack_nhwc, row_window, unpack_nhwc
from hw_model.config import DEFAULT_CONFIG, NPUConfig
from hw_model.isa import Program
from hw_model.layer_specs import AddSpec, ConvSpec, LinearSpec, PoolSpec, Tiling, pool_geometry
from hw_model.layers import build_conv, build_linear, check_tiling, default_tiling, stored_layouts


def build_pool(spec: PoolSpec, tiling: Tiling | None = None, cfg: NPUConfig = DEFAULT_CONFIG,
               in_slots: list[np.ndarray] | None = None) -> Program:
    """Max / average / global average pool; DRAM regions x -> out (padded NHWC). Channels are independent:
    the output keeps the stored input layout ``in_slots[0]`` (None: identity), no gather."""
    spec.check()
    slots = stored_layouts(in_slots, [spec.c])[0]
    tiling = default_tiling(spec, cfg, [slots]) if tiling is None else tiling
    check_tiling(spec, tiling, cfg, [slots])
    oh, ow = pool_geometry(spec)
    (kh, kw), (sh, sw), (pt, pleft, _pb, pright) = spec.window, spec.stride, spec.pads
    cp = slots.size
    nblk = cp // BLOCK
    rows_t, n_cb_t = min(tiling.rows, oh), min(tiling.ob_tile, nblk)
    in_rows = (rows_t - 1) * sh + kh
    wp = spec.w + pleft + pright
    in_tile, out_tile = in_rows * wp * n_cb_t * BLOCK, rows_t * ow * n_cb_t * BLOCK
    nb = tiling.nbuf
    b = ProgramBuilder(cfg)
    b.alloc("x", spec.in_dtype, spec.n * spec.h * spec.w * cp, "input")
    b.alloc("out", spec.out_dtype, spec.n * oh * ow * cp, "output")
    is_max = spec.kind == "max"
    if not is_max:
        b.const("norm", np.concatenate([np.full(cp, spec.m, np.float32), np.full(cp, spec.b, np.float32)]),
                "float32")
    steps = [(i, y, c) for i in range(spec.n) for y in range(-(-oh // rows_t)) for c in range(-(-nblk // n_cb_t))]
    tok = StepTokens([True] * len(steps), list(range(len(steps))), nb, nb)
    pad_value = np.iinfo(spec.in_dtype).min if is_max else spec.x_zp
    for s, (i, y, c) in enumerate(steps):
        slot = s % nb
        c0, c1 = c * n_cb_t, min(nblk, (c + 1) * n_cb_t)
        y0, y1 = y * rows_t, min(oh, (y + 1) * rows_t)
        r_lo, r_hi = y0 * sh - pt, (y1 - 1) * sh - pt + kh
        a_lo, n_real, pad_t, pad_b = row_window(r_lo, r_hi, spec.h)
        pix = (c1 - c0) * BLOCK
        in_addr, out_addr = slot * in_tile, nb * in_tile + slot * out_tile
        cb = slot * 2 * n_cb_t * BLOCK
        loads = [dict(region="x", dram_offset=((i * spec.h + a_lo) * spec.w) * cp + c0 * BLOCK, mem="spad",
                      sram_addr=in_addr, n0=n_real, n1=spec.w, n2=pix, dram_stride0=spec.w * cp,
                      dram_stride1=cp, pad=(pad_t, pleft, pad_b, pright), pad_value=pad_value)]
        if not is_max:
            loads += [dict(region="norm", dram_offset=off + c0 * BLOCK, mem="cbuf", sram_addr=cb + (pix if off else 0),
                           n0=1, n1=1, n2=pix, dram_stride0=0, dram_stride1=0) for off in (0, cp)]
        for j, ld in enumerate(loads):
            b.load(**ld, pop_next=j == 0 and tok.load_pop(s), push_next=j == len(loads) - 1)
        win = dict(in_addr=in_addr, in_row_stride=wp * pix, in_pix_stride=pix, oh=y1 - y0, ow=ow, cols=pix,
                   kh=kh, kw=kw, stride_h=sh, stride_w=sw)
        last = dict(push_prev=tok.compute_push_prev(s), pop_next=tok.out_pop(s), push_next=True)
        if is_max:
            b.alu_max(**win, out_addr=out_addr, pop_prev=True, **last)
        else:
            b.alu_sum(**win, out_addr=0, zp=spec.x_zp, pop_prev=True)
            b.norm_act_quant(acc_addr=0, acc_stride=pix, out_addr=out_addr, out_stride=pix, rows=(y1 - y0) * ow,
                             cols=pix, m_addr=cb, b_addr=cb + pix, lo=spec.lo, hi=spec.hi,
                             out_dtype=spec.out_dtype, **last)
        b.store(out_addr, "out", ((i * oh + y0) * ow) * cp + c0 * BLOCK, y1 - y0, ow, pix, ow * cp, cp,
                pop_prev=True, push_prev=tok.store_push(s))
    meta = {"layer": f"{spec.kind}_pool", "inputs": {"x": {"shape": [spec.n, spec.c, spec.h, spec.w],
                                                           "slots": slots.tolist(), "dtype": spec.in_dtype}},
            "output": {"region": "out", "shape": [spec.n, spec.c, oh, ow], "slots": slots.tolist(),
                       "dtype": spec.out_dtype}, "macs": 0, "groups": 0, "tiling": tiling.to_dict(),
            "gathered_loads": 0}
    return b.finish(meta)


def add_regions(spec: AddSpec, slots: np.ndarray, slots_y: np.ndarray, cfg: NPUConfig) -> ProgramBuilder:
    """A builder holding an add's DRAM regions: inputs x, y and output out (padded NHWC, ``slots`` / ``slots_y``
    the stored layouts), the ``gather_y`` table when y's layout differs, and the ALU constants ``alu``
    (ma, mb, bias per stored channel, float32). Shared by this builder and the TIR path."""
    total, cp = spec.n * spec.h * spec.w, slots.size
    b = ProgramBuilder(cfg)
    b.alloc("x", spec.a_dtype, total * cp, "input")
    b.alloc("y", spec.b_dtype, total * slots_y.size, "input")
    b.alloc("out", spec.out_dtype, total * cp, "output")
    if not np.array_equal(slots, slots_y):
        b.const("gather_y", gather_table(slots, slots_y), "int32")
    consts = np.zeros(3 * cp, np.float32)
    used = slots >= 0
    for j, v in enumerate((spec.ma, spec.mb, spec.bias)):
        consts[j * cp:(j + 1) * cp][used] = np.broadcast_to(np.asarray(v, np.float32), (spec.c,))[slots[used]]
    b.const("alu", consts, "float32")
    return b


def build_add(spec: AddSpec, tiling: Tiling | None = None, cfg: NPUConfig = DEFAULT_CONFIG,
              in_slots: list[np.ndarray] | None = None) -> Program:
    """Residual add; DRAM regions x, y -> out (padded NHWC); ``tiling.rows`` = pixels per tile.

    ``in_slots`` = [layout of x, layout of y] as stored (None: identity). The output keeps x's layout;
    y is gathered into it through ``gather_y`` when its layout differs."""
    spec.check()
    slots, slots_y = stored_layouts(in_slots, [spec.c, spec.c])
    tiling = default_tiling(spec, cfg, [slots]) if tiling is None else tiling
    check_tiling(spec, tiling, cfg, [slots])
    gathered = not np.array_equal(slots, slots_y)
    cp, cpy = slots.size, slots_y.size
    total = spec.n * spec.h * spec.w
    pix = min(tiling.rows, total)
    nb, tile = tiling.nbuf, pix * cp
    b = add_regions(spec, slots, slots_y, cfg)
    steps = list(range(-(-total // pix)))
    tok = StepTokens([True] * len(steps), list(steps), nb, nb)
    for s in steps:
        slot = s % nb
        p0, p1 = s * pix, min(total, (s + 1) * pix)
        n = (p1 - p0) * cp
        base = slot * 3 * tile
        loads = [dict(region=r, dram_offset=p0 * cp, mem="spad", sram_addr=base + j * tile, n0=1, n1=1, n2=n,
                      dram_stride0=0, dram_stride1=0) for j, r in enumerate(("x", "y"))]
        if gathered:  # one run of cp gathered channels per pixel, into x's layout
            loads[1] = dict(region="y", dram_offset=p0 * cpy, mem="spad", sram_addr=base + tile, n0=p1 - p0, n1=1,
                            n2=cp, dram_stride0=cpy, dram_stride1=0, gather="gather_y", gather_offset=0)
        if s == 0:
            loads.append(dict(region="alu", dram_offset=0, mem="cbuf", sram_addr=0, n0=1, n1=1, n2=3 * cp,
                              dram_stride0=0, dram_stride1=0))
        for j, ld in enumerate(loads):
            b.load(**ld, pop_next=j == 0 and tok.load_pop(s), push_next=j == len(loads) - 1)
        b.alu_add(a_addr=base, b_addr=base + tile, out_addr=base + 2 * tile, rows=p1 - p0, cols=cp,
                  a_zp=spec.a_zp, b_zp=spec.b_zp, ma_addr=0, mb_addr=cp, bias_addr=2 * cp, lo=spec.lo,
                  hi=spec.hi, out_dtype=spec.out_dtype, a_dtype=spec.a_dtype, b_dtype=spec.b_dtype,
                  pop_prev=True, push_prev=tok.compute_push_prev(s),
                  pop_next=tok.out_pop(s), push_next=True)
        b.store(base + 2 * tile, "out", p0 * cp, 1, 1, n, 0, 0, pop_prev=True, push_prev=tok.store_push(s))
    shape = [spec.n, spec.c, spec.h, spec.w]
    meta = {"layer": "add", "inputs": {"x": {"shape": shape, "slots": slots.tolist(), "dtype": spec.a_dtype},
                                       "y": {"shape": shape, "slots": slots_y.tolist(), "dtype": spec.b_dtype}},
            "output": {"region": "out", "shape": shape, "slots": slots.tolist(), "dtype": spec.out_dtype},
            "macs": 0, "groups": 0, "tiling": tiling.to_dict(),
            "gathered_loads": sum(bool(getattr(i, "gather", "")) for i in b.instrs)}
    return b.finish(meta)


def build_layer(spec, tiling: Tiling | None = None, cfg: NPUConfig = DEFAULT_CONFIG,
                in_slots: list[np.ndarray] | None = None) -> Program:
    """Dispatch on the spec type; ``in_slots`` = stored layout of each input (None: identity)."""
    table = {ConvSpec: build_conv, LinearSpec: build_linear, PoolSpec: build_pool, AddSpec: build_add}
    if type(spec) not in table:
        raise TypeError(f"build_layer: unknown spec type {type(spec).__name__}")
    return table[type(spec)](spec, tiling, cfg, in_slots)


def pack_inputs(prog: Program, *arrays: np.ndarray) -> dict[str, np.ndarray]:
    """NCHW (or (N, C) for linear) arrays -> DRAM input regions, in the order of ``prog.meta['inputs']``."""
    names = list(prog.meta["inputs"])
    if len(arrays) != len(names):
        raise ValueError(f"layer {prog.meta['layer']} takes {len(names)} input(s) ({', '.join(names)}), "
                         f"got {len(arrays)}")
    out = {}
    for name, a in zip(names, arrays):
        info = prog.meta["inputs"][name]
        a = np.asarray(a)
        if prog.meta["layer"] == "linear" and a.ndim == 2:
            a = a.T[None, :, :, None]
        if list(a.shape) != info["shape"] or a.dtype != np.dtype(info["dtype"]):
            raise ValueError(f"input {name!r}: expected {info['dtype']} {tuple(info['shape'])}, "
                             f"got {a.dtype} {a.shape}")
        out[name] = pack_nhwc(a, np.asarray(info["slots"], np.int64))
    return out


def unpack_output(prog: Program, flat: np.ndarray) -> np.ndarray:
    """DRAM output region -> NCHW (or (N, K) for linear)."""
    info = prog.meta["output"]
    y = unpack_nhwc(flat, tuple(info["shape"]), np.asarray(info["slots"], np.int64))
    return y[0, :, :, 0].T.copy() if prog.meta["layer"] == "linear" else y


def run_layer(spec, *inputs: np.ndarray, tiling: Tiling | None = None, cfg: NPUConfig = DEFAULT_CONFIG,
              mode: str = "func") -> Any:
    """Build, run and unpack one layer. ``func`` -> output array; ``perf`` -> (None, report);
    ``both`` -> (output, report), with the check that perf and both agree on cycles."""
    from hw_model.cycles import simulate
    prog = build_layer(spec, tiling, cfg)
    res = simulate(prog, pack_inputs(prog, *inputs) if mode != "perf" else None, cfg, mode=mode)
    y = unpack_output(prog, res.outputs["out"]) if res.outputs is not None else None
    return y if mode == "func" else (y, res.report)
