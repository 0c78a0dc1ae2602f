"""Search space of one offloaded conv layer: the schedule knobs and their validity.

A point of the space is a :class:`Tiling` (output-channel tile, spatial tile in output
rows, input-channel tile, loop order, double-buffer split). :func:`tile_stats` derives
the loop extents, bytes moved and buffer occupancy that the validity check, the cost
model's features and the stand-in cycle estimate share.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import asdict, dataclass

from hw_model.config import NPUConfig

ORDERS = ("oc_outer", "sp_outer")
"""Loop orders: output-channel tiles outermost (weights stay) or spatial tiles outermost (inputs stay)."""


@dataclass(frozen=True)
class ConvSpec:
    """One conv layer, NCHW, int8 activations and weights (1 byte per element)."""

    in_ch: int
    out_ch: int
    in_h: int
    in_w: int
    kh: int = 3
    kw: int = 3
    stride: int = 1
    pad: int = 1
    groups: int = 1

    def __post_init__(self) -> None:
        for name in ("in_ch", "out_ch", "in_h", "in_w", "kh", "kw", "stride", "groups"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"ConvSpec.{name} must be a positive int, got {v!r}")
        if not isinstance(self.pad, int) or self.pad < 0:
            raise ValueError(f"ConvSpec.pad must be a non-negative int, got {self.pad!r}")
        if self.groups != 1:
            raise ValueError(f"ConvSpec.groups: only dense convs (groups=1) are tunable, got {self.groups}")
        if self.out_h <= 0 or self.out_w <= 0:
            raise ValueError(f"ConvSpec: kernel {self.kh}x{self.kw} larger than padded input {self.in_h}x{self.in_w}")

    @property
    def out_h(self) -> int:
        return (self.in_h + 2 * self.pad - self.kh) // self.stride + 1

    @property
    def out_w(self) -> int:
        return (self.in_w + 2 * self.pad - self.kw) // self.stride + 1

    @property
    def macs(self) -> int:
        """Useful multiply-accumulates of the layer (no channel padding)."""
        return self.in_ch * self.out_ch * self.kh * self.kw * self.out_h * self.out_w


@dataclass(frozen=True)
class Tiling:
    """Schedule knobs of one conv layer.

    oc_tile, ic_tile: channels per tile (multiples of 16); sp_tile: output rows per tile;
    order: one of :data:`ORDERS`; double_buffer: split every buffer in two halves so DMA
    overlaps compute.
    """

    oc_tile: int
    sp_tile: int
    ic_tile: int
    order: str = "oc_outer"
    double_buffer: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Tiling:
        if not isinstance(d, dict):
            raise TypeError(f"tiling must be a dict, got {type(d).__name__}")
        names = {"oc_tile", "sp_tile", "ic_tile", "order", "double_buffer"}
        if set(d) != names:
            raise ValueError(f"tiling keys must be {sorted(names)}, got {sorted(d)}")
        for k in ("oc_tile", "sp_tile", "ic_tile"):
            if not isinstance(d[k], int) or isinstance(d[k], bool):
                raise ValueError(f"tiling.{k} must be an int, got {d[k]!r}")
        if d["order"] not in ORDERS:
            raise ValueError(f"tiling.order must be one of {ORDERS}, got {d['order']!r}")
        if not isinstance(d["double_buffer"], bool):
            raise ValueError(f"tiling.double_buffer must be a bool, got {d['double_buffer']!r}")
        return cls(**d)


def _pad(n: int, m: int) -> int:
    return -(-n // m) * m


def _channel_tiles(ch: int, cfg: NPUConfig) -> list[int]:
    """Power-of-two multiples of the 16-channel block up to the padded channel count."""
    top = _pad(ch, cfg.granularity)
    vals, t = [], cfg.granularity
    while t < top:
        vals.append(t)
        t *= 2
    return vals + [top]


def _row_tiles(rows: int) -> list[int]:
    """Divisors of the output height plus powers of two below it."""
    vals = {d for d in range(1, rows + 1) if rows % d == 0}
    vals |= {2**i for i in range(int(math.log2(rows)) + 1)}
    return sorted(vals)


@dataclass(frozen=True)
class TileStats:
    """Derived quantities of (spec, tiling, cfg). Bytes are int8 elements; cycles are core cycles."""

    n_oc: int
    n_sp: int
    n_ic: int
    in_rows: int
    in_tile_bytes: int
    w_tile_bytes: int
    acc_tile_bytes: int
    in_bytes: int
    w_bytes: int
    out_bytes: int
    instructions: int
    mac_cycles: int
    post_cycles: int
    scratch_frac: float
    weight_frac: float
    acc_frac: float


def tile_stats(spec: ConvSpec, t: Tiling, cfg: NPUConfig) -> TileStats:
    """Loop extents, DMA bytes, instruction count and buffer occupancy of one schedule."""
    icp, ocp = _pad(spec.in_ch, cfg.granularity), _pad(spec.out_ch, cfg.granularity)
    n_oc, n_ic = -(-ocp // t.oc_tile), -(-icp // t.ic_tile)
    n_sp = -(-spec.out_h // t.sp_tile)
    in_rows = (t.sp_tile - 1) * spec.stride + spec.kh
    k = spec.kh * spec.kw
    bufs = 2 if t.double_buffer else 1
    in_tile = t.ic_tile * min(in_rows, spec.in_h + 2 * spec.pad) * (spec.in_w + 2 * spec.pad)
    w_tile = t.oc_tile * t.ic_tile * k
    acc_tile = t.oc_tile * t.sp_tile * spec.out_w * cfg.acc_bits // 8
    # Reuse: the operand whose tile index is outermost stays resident across the inner loop
    # only when its whole reduction (all ic tiles) fits at once (n_ic == 1).
    in_once = n_ic * n_sp * in_tile
    w_once = n_ic * n_oc * w_tile
    if t.order == "oc_outer":
        w_bytes = w_once if n_ic == 1 else w_once * n_sp
        in_bytes = in_once * n_oc
    else:
        in_bytes = in_once if n_ic == 1 else in_once * n_oc
        w_bytes = w_once * n_sp
    out_bytes = ocp * spec.out_h * spec.out_w
    oc_blocks = t.oc_tile // cfg.mac_cols
    ic_blocks = icp // cfg.mac_rows  # the last ic tile may be partial: count real blocks
    ppc = getattr(cfg, "pixels_per_cycle", 1)
    # The PE arrays share one oc tile: a tile of b oc blocks takes ceil(b / arrays) waves per
    # pixel, ic block and kernel tap. The last oc tile may be partial.
    mac_cycles = 0
    for oc_i in range(n_oc):
        blocks = min(oc_blocks, ocp // cfg.mac_cols - oc_i * oc_blocks)
        waves = -(-blocks // cfg.pe_arrays)
        mac_cycles += waves * -(-spec.out_h * spec.out_w // ppc) * ic_blocks * k
    post_cycles = -(-ocp * spec.out_h * spec.out_w // (cfg.post_lanes * cfg.pe_arrays))  # a post path per array
    # One load per operand tile, one MAC instruction per (tile, ic tile, kernel tap), one store per tile.
    instructions = n_oc * n_sp * (n_ic * (2 + k) + 2)
    return TileStats(
        n_oc=n_oc, n_sp=n_sp, n_ic=n_ic, in_rows=in_rows,
        in_tile_bytes=in_tile, w_tile_bytes=w_tile, acc_tile_bytes=acc_tile,
        in_bytes=in_bytes, w_bytes=w_bytes, out_bytes=out_bytes,
        instructions=instructions, mac_cycles=mac_cycles, post_cycles=post_cycles,
        scratch_frac=bufs * in_tile / (cfg.scratchpad_kib * 1024),
        weight_frac=bufs * w_tile / (cfg.weight_buf_kib * 1024),
        acc_frac=bufs * acc_tile / (cfg.acc_buf_kib * 1024),
    )


def why_invalid(spec: ConvSpec, t: Tiling, cfg: NPUConfig) -> str | None:
    """Reason a tiling cannot run on this NPU (buffer overflow, granularity), or None if valid."""
    g = cfg.granularity
    if t.oc_tile <= 0 or t.oc_tile % cfg.mac_cols:
        return f"oc_tile={t.oc_tile} is not a positive multiple of {cfg.mac_cols} (MAC columns)"
    if t.ic_tile <= 0 or t.ic_tile % g:
        return f"ic_tile={t.ic_tile} is not a positive multiple of the granularity {g}"
    if t.oc_tile > _pad(spec.out_ch, g) or t.ic_tile > _pad(spec.in_ch, g):
        return f"tile {t.oc_tile}x{t.ic_tile} larger than the padded channels {spec.out_ch}x{spec.in_ch}"
    if not 1 <= t.sp_tile <= spec.out_h:
        return f"sp_tile={t.sp_tile} outside 1..{spec.out_h} output rows"
    if t.order not in ORDERS:
        return f"order={t.order!r} not in {ORDERS}"
    s = tile_stats(spec, t, cfg)
    for name, frac in (("scratchpad", s.scratch_frac), ("weight buffer", s.weight_frac),
                       ("accumulator buffer", s.acc_frac)):
        if frac > 1.0:
            return f"{name} overflow: needs {frac:.2f}x its capacity"
    return None


def enumerate_space(spec: ConvSpec, cfg: NPUConfig) -> list[Tiling]:
    """All valid tilings of a layer, in a fixed (grid) order (see :func:`_enumerate`)."""
    return list(_enumerate(spec, cfg))


@functools.lru_cache(maxsize=256)
def _enumerate(spec: ConvSpec, cfg: NPUConfig) -> tuple[Tiling, ...]:
    """All valid tilings of a layer, in a fixed (grid) order.

    Valid = :func:`why_invalid` is None and, when ``hw_model``'s builder is present, its own
    buffer check (``bridge.builder_check``) accepts the tiling too.
    """
    from .bridge import builder_check  # lazy: bridge imports records, which imports this module

    pts = []
    for oc, sp, ic, order, db in itertools.product(
            _channel_tiles(spec.out_ch, cfg), _row_tiles(spec.out_h), _channel_tiles(spec.in_ch, cfg),
            ORDERS, (False, True)):
        t = Tiling(oc, sp, ic, order, db)
        if why_invalid(spec, t, cfg) is None and builder_check(spec, t, cfg) is None:
            pts.append(t)
    return tuple(pts)


def default_tiling(spec: ConvSpec, cfg: NPUConfig) -> Tiling:
    """The untuned heuristic: one PE-array wave of output channels, all input channels if they
    fit, double-buffered, then the largest row tile that fits (chosen: a common greedy rule)."""
    oc = min(cfg.pe_arrays * cfg.mac_cols, _pad(spec.out_ch, cfg.granularity))
    for ic in reversed(_channel_tiles(spec.in_ch, cfg)):
        for sp in reversed(_row_tiles(spec.out_h)):
            for db in (True, False):
                t = Tiling(oc, sp, ic, "oc_outer", db)
                if why_invalid(spec, t, cfg) is None:
                    return t
    raise ValueError(f"no valid tiling for layer {spec} on this NPUConfig (buffers too small)")
