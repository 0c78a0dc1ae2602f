"""Schedule features for the cost model: one float row per (spec, tiling), computed without measuring.

:func:`tile_stats` derives, from the knobs and the layer's extents, the loop extents, tile sizes
(int8 elements = bytes), the bytes each operand moves (re-load rule of ``hw_model.layers.build_conv``:
an operand is loaded when its buffer slot holds another tile), buffer occupancy and a MAC-cycle count.
:func:`roofline_estimate` turns them into a closed-form cycle estimate; it is used only as a feature and
to rank the first batch of the xgboost tuner (measurements go through the TIR path, ``measure.py``).
MetaSchedule's TIR feature extractor sees nothing in tensorized TIR (DESIGN.md), hence these.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hw_model.config import MAC_BLOCK, NPUConfig
from hw_model.isa import mem_size

from .space import ORDERS, ConvSpec, Tiling, geometry

BLOCK = MAC_BLOCK
"""Channels per block (``hw_model.config.MAC_BLOCK``: the MAC array's 16x16 granularity)."""


@dataclass(frozen=True)
class TileStats:
    """Derived quantities of (spec, tiling, cfg). Bytes are int8 elements; cycles are core cycles."""

    n_ob: int
    rows: int
    n_cb: int
    tiles_ob: int
    tiles_y: int
    tiles_cb: int
    in_tile: int
    w_tile: int
    out_tile: int
    in_bytes: int
    w_bytes: int
    out_bytes: int
    loads: int
    mac_cycles: int
    spad_frac: float
    wbuf_frac: float


def tile_stats(spec: ConvSpec, t: Tiling, cfg: NPUConfig) -> TileStats:
    """Loop extents, tile sizes, DMA bytes, load count, MAC cycles and buffer occupancy of one schedule."""
    g = geometry(spec, cfg)
    n_ob, rows = min(t.ob_tile, g.kb), min(t.rows, g.oh)
    n_cb = n_ob if g.depthwise else min(t.cb_tile, g.cbn)
    tiles_ob, tiles_y = -(-g.kb // n_ob), -(-g.oh // rows)
    tiles_cb = 1 if g.depthwise else -(-g.cbn // n_cb)
    in_rows = (rows - 1) * spec.stride[0] + spec.dilation[0] * (spec.kh - 1) + 1
    wp = spec.w + spec.pads[1] + spec.pads[3]
    in_tile = in_rows * wp * n_cb * BLOCK
    w_tile = spec.kh * spec.kw * (1 if g.depthwise else n_cb * BLOCK) * n_ob * BLOCK
    out_tile = rows * g.ow * n_ob * BLOCK
    # build_conv's loop: (ob, y, c) or (y, ob, c); an operand is re-loaded when its slot (step % nbuf)
    # holds another tile. Counted per tile kind, scaled by the tile size.
    if t.loop_order == "ob_outer":
        steps = [(ob, y, c) for ob in range(tiles_ob) for y in range(tiles_y) for c in range(tiles_cb)]
    else:
        steps = [(ob, y, c) for y in range(tiles_y) for ob in range(tiles_ob) for c in range(tiles_cb)]
    held: dict[tuple[str, int], tuple] = {}
    n_in = n_w = 0
    for s, (ob, y, c) in enumerate(steps):
        for kind, key in (("in", (y, ob if g.depthwise else c)), ("w", (ob, c))):
            if held.get((kind, s % t.nbuf)) != key:
                held[(kind, s % t.nbuf)] = key
                n_in, n_w = n_in + (kind == "in"), n_w + (kind == "w")
    waves = -(-n_ob // cfg.pe_arrays)  # the PE arrays share one output-block tile
    pix = -(-rows * g.ow // cfg.pixels_per_cycle)
    taps = spec.kh * spec.kw * (1 if g.depthwise else n_cb)
    mac_cycles = len(steps) * waves * pix * taps
    out_bytes = g.oh * g.ow * g.kb * BLOCK
    return TileStats(n_ob, rows, n_cb, tiles_ob, tiles_y, tiles_cb, in_tile, w_tile, out_tile,
                     n_in * in_tile, n_w * w_tile, out_bytes, n_in + n_w + tiles_ob * tiles_y, mac_cycles,
                     t.nbuf * (in_tile + out_tile) / mem_size("spad", cfg), t.nbuf * w_tile / mem_size("wbuf", cfg))


def roofline_estimate(s: TileStats, t: Tiling, cfg: NPUConfig) -> float:
    """Closed-form cycles: max(MAC, DMA) with double buffering, their sum without, plus the first load
    and one instruction overhead per load (core cycles, float)."""
    bw = cfg.dram_bytes_per_cycle
    dma = (s.in_bytes + s.w_bytes + s.out_bytes) / bw
    fill = (s.in_tile + s.w_tile) / bw
    issue = s.loads * cfg.instr_overhead_cycles
    body = max(s.mac_cycles, dma) if t.nbuf == 2 else s.mac_cycles + dma
    return body + fill + issue


FEATURE_NAMES = (
    "log2_ob_tile", "log2_rows", "log2_cb_tile", "order", "nbuf",
    "log2_tiles_ob", "log2_tiles_y", "log2_tiles_cb", "log2_steps",
    "log2_in_bytes", "log2_w_bytes", "log2_dma_bytes", "log2_loads", "log2_mac_cycles",
    "spad_frac", "wbuf_frac", "array_fill", "pixel_fill", "log2_dma_over_mac",
    "log2_in_tile", "log2_w_tile", "log2_first_load", "log2_roofline_cycles",
)


def _l2(x: float) -> float:
    return math.log2(max(float(x), 1.0))


def features(spec: ConvSpec, tilings: Sequence[Tiling], cfg: NPUConfig) -> np.ndarray:
    """Feature matrix, float32, shape (len(tilings), len(FEATURE_NAMES))."""
    g = geometry(spec, cfg)
    rows = []
    for t in tilings:
        s = tile_stats(spec, t, cfg)
        dma = s.in_bytes + s.w_bytes + s.out_bytes
        fill = s.n_ob / (cfg.pe_arrays * math.ceil(s.n_ob / cfg.pe_arrays))
        px = s.rows * g.ow
        pfill = px / (cfg.pixels_per_cycle * math.ceil(px / cfg.pixels_per_cycle))
        rows.append((
            _l2(s.n_ob), _l2(s.rows), _l2(s.n_cb), float(ORDERS.index(t.loop_order)), float(t.nbuf),
            _l2(s.tiles_ob), _l2(s.tiles_y), _l2(s.tiles_cb), _l2(s.tiles_ob * s.tiles_y * s.tiles_cb),
            _l2(s.in_bytes), _l2(s.w_bytes), _l2(dma), _l2(s.loads), _l2(s.mac_cycles),
            s.spad_frac, s.wbuf_frac, fill, pfill,
            _l2(dma / cfg.dram_bytes_per_cycle) - _l2(s.mac_cycles),
            _l2(s.in_tile), _l2(s.w_tile), _l2(s.in_tile + s.w_tile), _l2(roofline_estimate(s, t, cfg)),
        ))
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), len(FEATURE_NAMES))
