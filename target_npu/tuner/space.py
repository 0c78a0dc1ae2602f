"""Search space of one conv layer: ``hw_model.layer_specs.Tiling`` points, checked by ``hw_model``.

The knobs are those of :class:`hw_model.layer_specs.Tiling`: output blocks per tile (``ob_tile``,
16 output channels a block), output rows per tile (``rows``), input blocks per tile (``cb_tile``),
loop order (``ob_outer`` / ``sp_outer``) and buffers per slot (``nbuf``, 2 = double buffering).
A point is valid when ``hw_model.layers.check_tiling`` accepts it (buffers x nbuf fit the on-chip
memories, ISG D1 bank). Points are canonical: each knob at most the layer's extent (the builder
clips larger values, so they would only repeat a point).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from hw_model.builder import channel_slots
from hw_model.config import DEFAULT_CONFIG, NPUConfig
from hw_model.layer_specs import ConvSpec, Tiling, conv_geometry
from hw_model.layers import check_tiling, default_tiling

__all__ = ["ORDERS", "ConvSpec", "Geometry", "Tiling", "canonical", "default_tiling", "enumerate_space",
           "geometry", "group_blocks", "shape_key", "shape_spec", "tkey", "tunable", "why_invalid"]

ORDERS = ("ob_outer", "sp_outer")
"""Loop orders of ``hw_model.layer_specs.Tiling``: output-block tiles outermost (weights stay) or row tiles."""

TKey = tuple[int, int, int, str, int]


def tkey(t: Tiling) -> TKey:
    """Hashable key of a Tiling (``hw_model``'s Tiling is a mutable dataclass)."""
    return (int(t.ob_tile), int(t.rows), int(t.cb_tile), str(t.loop_order), int(t.nbuf))


def shape_spec(c: int, k: int, h: int, w: int, kh: int = 3, kw: int = 3, stride: tuple[int, int] | int = 1,
               pads: tuple[int, int, int, int] | int = 0, groups: int = 1, n: int = 1,
               dilation: tuple[int, int] = (1, 1)) -> ConvSpec:
    """A shape-only ``hw_model`` ConvSpec (zero int8 weights, zero NORM constants, one ISG group).

    c, k: input / output channels; h, w: input size; pads (top, left, bottom, right) or one int.
    """
    stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
    pads = (pads,) * 4 if isinstance(pads, int) else tuple(pads)
    if groups < 1 or c % groups or k % groups:
        raise ValueError(f"shape_spec: groups={groups} must divide c={c} and k={k}")
    spec = ConvSpec(n, c, h, w, k, np.zeros((k, c // groups, kh, kw), np.int8), np.zeros(k, np.float32),
                    np.zeros(k, np.float32), stride=stride, pads=pads, dilation=tuple(dilation), groups=groups)
    spec.check()
    return spec


def group_blocks(spec: ConvSpec, cfg: NPUConfig) -> tuple[tuple[int, int], ...]:
    """(ISG group, 16-channel input blocks) in the builder's layout order: the only part of the group
    vector that shapes a program (each group padded to whole blocks, contract order)."""
    _, bgroups = channel_slots(spec.c, spec.isg_groups, cfg)
    out: list[tuple[int, int]] = []
    for g in bgroups:
        out[-1:] = [(g, out[-1][1] + 1)] if out and out[-1][0] == g else [*out[-1:], (g, 1)]
    return tuple(out)


def shape_key(spec: ConvSpec, cfg: NPUConfig = DEFAULT_CONFIG) -> tuple:
    """Everything of a ConvSpec that shapes its programs (not the weights): sizes, kernel, stride, pads,
    dilation, groups and the 16-channel block layout of its ISG groups."""
    return (int(spec.n), int(spec.c), int(spec.h), int(spec.w), int(spec.k), spec.kh, spec.kw, tuple(spec.stride),
            tuple(spec.pads), tuple(spec.dilation), int(spec.groups), group_blocks(spec, cfg))


def tunable(spec: object) -> str | None:
    """Why a layer is not tuned (None: it is): 2-D convs (dense, grouped, depthwise) are."""
    if not isinstance(spec, ConvSpec):
        return f"only hw_model ConvSpec layers are tuned, got {type(spec).__name__}"
    return None


@dataclass(frozen=True)
class Geometry:
    """Extents of a layer in the builder's units: output rows/cols, output blocks, input blocks (padded per group)."""

    oh: int
    ow: int
    kb: int
    cbn: int
    depthwise: bool


def geometry(spec: ConvSpec, cfg: NPUConfig) -> Geometry:
    """The layer's tile extents (input blocks counted as the builder lays them out, per ISG group)."""
    oh, ow, kb, _ = conv_geometry(spec)
    cbn = channel_slots(spec.c, spec.isg_groups, cfg)[0].size // 16
    return Geometry(oh, ow, cbn if spec.is_depthwise else kb, cbn, spec.is_depthwise)


def canonical(spec: ConvSpec, t: Tiling, cfg: NPUConfig) -> Tiling:
    """The same schedule with every knob clipped to the layer (depthwise: ``cb_tile`` 1, it is unused)."""
    g = geometry(spec, cfg)
    return Tiling(ob_tile=min(int(t.ob_tile), g.kb), rows=min(int(t.rows), g.oh),
                  cb_tile=1 if g.depthwise else min(int(t.cb_tile), g.cbn), loop_order=t.loop_order, nbuf=int(t.nbuf))


def why_invalid(spec: ConvSpec, t: Tiling, cfg: NPUConfig) -> str | None:
    """``hw_model``'s reason a tiling cannot run this layer (bad knob, buffer overflow), or None if valid."""
    try:
        check_tiling(spec, t, cfg)
    except (TypeError, ValueError) as e:
        return str(e)
    return None


def _pow2_upto(n: int) -> list[int]:
    """Powers of two below n, then n."""
    vals, v = [], 1
    while v < n:
        vals.append(v)
        v *= 2
    return vals + [n]


def _rows(oh: int) -> list[int]:
    """Divisors of the output height and powers of two below it."""
    return sorted({d for d in range(1, oh + 1) if oh % d == 0} | set(_pow2_upto(oh)))


_SPACES: dict[tuple, tuple[TKey, ...]] = {}
"""Valid points by (shape_key, NPUConfig): check_tiling depends on nothing else of the spec."""


def _enumerate(spec: ConvSpec, cfg: NPUConfig) -> tuple[TKey, ...]:
    key = (shape_key(spec, cfg), cfg)
    if key not in _SPACES:
        g = geometry(spec, cfg)
        cbs = [1] if g.depthwise else _pow2_upto(g.cbn)
        pts = []
        for ob, rows, cb, order, nbuf in itertools.product(_pow2_upto(g.kb), _rows(g.oh), cbs, ORDERS, (1, 2)):
            t = Tiling(ob_tile=ob, rows=rows, cb_tile=cb, loop_order=order, nbuf=nbuf)
            if why_invalid(spec, t, cfg) is None:
                pts.append(tkey(t))
        _SPACES[key] = tuple(pts)
    return _SPACES[key]


def enumerate_space(spec: ConvSpec, cfg: NPUConfig) -> list[Tiling]:
    """All valid canonical tilings of a layer, in a fixed (grid) order: output blocks and input blocks
    (powers of two and the full extent), rows (divisors of the output height and powers of two),
    both loop orders, nbuf 1 and 2. Raises ValueError for a layer that is not tunable."""
    why = tunable(spec)
    if why is not None:
        raise ValueError(f"enumerate_space: {why}")
    return [Tiling(*k) for k in _enumerate(spec, cfg)]
