"""Schedule features for the cost model: one float row per (spec, tiling).

Read from the tiling and :func:`space.tile_stats` only (no measurement): tile sizes, loop
extents, bytes moved, buffer occupancy, instruction count, PE-array fill, and the closed-form
roofline estimate of :func:`measure.estimate_cycles` (the model learns its error). MetaSchedule's
TIR feature extractor sees nothing in tensorized TIR (DESIGN.md), hence these.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from hw_model.config import NPUConfig

from .measure import estimate_cycles
from .space import ORDERS, ConvSpec, Tiling, tile_stats

FEATURE_NAMES = (
    "log2_oc_tile", "log2_sp_tile", "log2_ic_tile", "order", "double_buffer",
    "log2_n_oc", "log2_n_sp", "log2_n_ic", "log2_tiles",
    "log2_in_bytes", "log2_w_bytes", "log2_dma_bytes", "log2_instructions", "log2_mac_cycles",
    "scratch_frac", "weight_frac", "acc_frac", "array_fill", "log2_dma_over_mac",
    "log2_in_tile_bytes", "log2_w_tile_bytes", "log2_first_load_bytes", "log2_roofline_cycles",
)


def _l2(x: float) -> float:
    return math.log2(max(float(x), 1.0))


def features(spec: ConvSpec, tilings: Sequence[Tiling], cfg: NPUConfig) -> np.ndarray:
    """Feature matrix, float32, shape (len(tilings), len(FEATURE_NAMES))."""
    rows = []
    for t in tilings:
        s = tile_stats(spec, t, cfg)
        dma = s.in_bytes + s.w_bytes + s.out_bytes
        blocks = t.oc_tile // cfg.mac_cols
        fill = blocks / (cfg.pe_arrays * math.ceil(blocks / cfg.pe_arrays))
        rows.append((
            _l2(t.oc_tile), _l2(t.sp_tile), _l2(t.ic_tile), float(ORDERS.index(t.order)), float(t.double_buffer),
            _l2(s.n_oc), _l2(s.n_sp), _l2(s.n_ic), _l2(s.n_oc * s.n_sp * s.n_ic),
            _l2(s.in_bytes), _l2(s.w_bytes), _l2(dma), _l2(s.instructions), _l2(s.mac_cycles),
            s.scratch_frac, s.weight_frac, s.acc_frac, fill,
            _l2(dma / cfg.dram_bytes_per_cycle) - _l2(s.mac_cycles),
            _l2(s.in_tile_bytes), _l2(s.w_tile_bytes), _l2(s.in_tile_bytes + s.w_tile_bytes),
            _l2(estimate_cycles(spec, t, cfg)),
        ))
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), len(FEATURE_NAMES))
