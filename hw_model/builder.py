"""Program builder: the single place that knows the instruction encoding.

``ProgramBuilder(cfg)`` emits instructions one by one and allocates DRAM regions; the layer
emitters describe whole layers with spec dataclasses and a ``Tiling``: convs and linears in
:mod:`hw_model.layers`, pools, adds, ``build_layer`` and ``run_layer`` in :mod:`hw_model.layers_alu`, the
specs in :mod:`hw_model.layer_specs` (this module imports none of them).

DRAM activation layout: NHWC with the channel axis padded to a multiple of 16 and optionally
permuted; ``slots[j]`` is the original channel stored in padded channel j (-1 = zero padding).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from hw_model.config import DEFAULT_CONFIG, NPUConfig
from hw_model.dram import place
from hw_model.isa import (
    BLOCK,
    DTYPES,
    AluAdd,
    AluMax,
    AluSum,
    Gemm,
    GroupShiftAdd,
    Instr,
    Load,
    NormActQuant,
    Program,
    Region,
    Store,
    Sync,
)


def channel_slots(c: int, isg_groups: np.ndarray | None = None,
                  cfg: NPUConfig = DEFAULT_CONFIG) -> tuple[np.ndarray, list[int]]:
    """Padded, group-contiguous channel layout of a C-channel tensor.

    Returns ``slots`` (int64, length 16*Cb; original channel or -1) and the group of every
    16-channel block. Groups come in contract order, each padded to whole blocks; with one group
    (or groups already contiguous in contract order with whole blocks) this is the identity plus
    tail padding, which is what the compiler hands over after its own permutation.
    """
    if not isinstance(c, (int, np.integer)) or c <= 0:
        raise ValueError(f"channel count must be a positive int, got {c!r}")
    gvec = np.zeros(c, np.int64) if isg_groups is None else np.asarray(isg_groups, np.int64).reshape(-1)
    if gvec.size != c or gvec.min() < 0 or gvec.max() >= cfg.num_groups:
        raise ValueError(f"isg_groups must hold {c} values in 0..{cfg.num_groups - 1}, got {gvec.size} values")
    slots: list[np.ndarray] = []
    block_groups: list[int] = []
    for g in cfg.accumulation_order:
        chans = np.flatnonzero(gvec == g)
        if chans.size == 0:
            continue
        nb = -(-chans.size // BLOCK)
        slots.append(np.concatenate([chans, -np.ones(nb * BLOCK - chans.size, np.int64)]))
        block_groups += [g] * nb
    return np.concatenate(slots), block_groups


def identity_slots(c: int) -> np.ndarray:
    """Channels in order, zero padded to a multiple of 16."""
    cp = -(-c // BLOCK) * BLOCK
    return np.concatenate([np.arange(c), -np.ones(cp - c, np.int64)]).astype(np.int64)


def check_slots(slots: np.ndarray, c: int, what: str = "slots") -> np.ndarray:
    """A stored channel layout as int64: length a multiple of 16, every channel 0..c-1 exactly once, -1
    elsewhere (ValueError naming ``what`` otherwise)."""
    s = np.asarray(slots)
    if s.ndim != 1 or s.size == 0 or s.size % BLOCK or not np.issubdtype(s.dtype, np.integer):
        raise ValueError(f"{what}: a layout is a 1-D int array whose length is a multiple of {BLOCK}, "
                         f"got {s.dtype} {s.shape}")
    s = s.astype(np.int64)
    if s.min() < -1 or sorted(s[s >= 0].tolist()) != list(range(c)):
        raise ValueError(f"{what}: must hold every channel 0..{c - 1} exactly once and -1 elsewhere")
    return s


def gather_table(need: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """int32 table for a gathered LOAD: entry j = stored position of channel ``need[j]``, -1 where
    ``need[j]`` is padding (or the channel is not stored)."""
    pos = np.full(max(int(need.max(initial=-1)), int(stored.max(initial=-1))) + 1, -1, np.int64)
    used = stored >= 0
    pos[stored[used]] = np.flatnonzero(used)
    return np.where(need >= 0, pos[np.maximum(need, 0)], -1).astype(np.int32)


def pack_nhwc(x: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> flat NHWC with padded/permuted channels (zeros in padding), same dtype."""
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"pack_nhwc: x must be (N, C, H, W), got shape {x.shape}")
    if slots.max(initial=-1) >= x.shape[1]:
        raise ValueError(f"pack_nhwc: layout needs channel {slots.max()} but x has {x.shape[1]} channels")
    xt = np.zeros(x.shape[:1] + x.shape[2:] + (slots.size,), x.dtype)
    used = slots >= 0
    xt[..., used] = x.transpose(0, 2, 3, 1)[..., slots[used]]
    return xt.reshape(-1)


def unpack_nhwc(flat: np.ndarray, shape: tuple[int, int, int, int], slots: np.ndarray) -> np.ndarray:
    """Flat padded NHWC -> (N, C, H, W) in the original channel order."""
    n, c, h, w = shape
    y = np.asarray(flat).reshape(n, h, w, slots.size)
    out = np.empty((n, h, w, c), y.dtype)
    used = slots >= 0
    out[..., slots[used]] = y[..., used]
    return out.transpose(0, 3, 1, 2).copy()


def row_window(r_lo: int, r_hi: int, h: int) -> tuple[int, int, int, int]:
    """Input rows [r_lo, r_hi) of an image of h rows -> (first real row, real rows, pad top, pad bottom)."""
    a_lo, a_hi = max(r_lo, 0), min(r_hi, h)
    if a_hi <= a_lo:
        return 0, 0, r_hi - r_lo, 0
    return a_lo, a_hi - a_lo, a_lo - r_lo, r_hi - a_hi


class ProgramBuilder:
    """Low-level emitter: one method per instruction, DRAM allocation, ``finish() -> Program``."""

    def __init__(self, cfg: NPUConfig = DEFAULT_CONFIG) -> None:
        if not isinstance(cfg, NPUConfig):
            raise TypeError(f"ProgramBuilder: cfg must be an NPUConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.instrs: list[Instr] = []
        self.regions: dict[str, Region] = {}

    # ---------------------------------------------------------------- DRAM
    def alloc(self, name: str, dtype: str, size: int, kind: str = "scratch", addr: int | None = None) -> str:
        """Reserve a DRAM region of ``size`` elements (kind input / output / scratch); ``addr`` (bytes) fixes
        its place in the DRAM image, None lets :meth:`finish` place it."""
        if name in self.regions:
            raise ValueError(f"DRAM region {name!r} allocated twice")
        if dtype not in DTYPES:
            raise ValueError(f"DRAM region {name!r}: dtype {dtype!r} not in {DTYPES}")
        self.regions[name] = Region(name, dtype, int(size), kind, addr=addr)
        return name

    def const(self, name: str, data: np.ndarray, dtype: str, addr: int | None = None) -> str:
        """A constant DRAM region packed now (flattened, cast to ``dtype`` exactly); ``addr`` as in alloc."""
        arr = np.asarray(data)
        flat = arr.astype(dtype).reshape(-1)
        if not np.array_equal(flat.astype(np.float64), arr.reshape(-1).astype(np.float64)):
            raise ValueError(f"constant {name!r} does not fit {dtype} exactly")
        self.alloc(name, dtype, flat.size, "const", addr)
        self.regions[name].data = flat
        return name

    # ---------------------------------------------------------------- instructions
    def _emit(self, ins: Instr) -> Instr:
        self.instrs.append(ins)
        return ins

    def load(self, region: str, dram_offset: int, mem: str, sram_addr: int, n0: int, n1: int, n2: int,
             dram_stride0: int, dram_stride1: int, pad: tuple[int, int, int, int] = (0, 0, 0, 0),
             pad_value: float = 0, gather: str = "", gather_offset: int = 0, **deps: bool) -> Load:
        """LOAD; ``pad`` = (top, left, bottom, right) in rows / runs of the destination; ``gather`` names a
        const int32 channel-index table (entries from ``gather_offset``) for a gathered innermost run."""
        pt, pl, pb, pr = pad
        return self._emit(Load(region, dram_offset, mem, sram_addr, n0, n1, n2, dram_stride0, dram_stride1,
                               pt, pb, pl, pr, pad_value, gather, gather_offset, **deps))

    def store(self, sram_addr: int, region: str, dram_offset: int, n0: int, n1: int, n2: int,
              dram_stride0: int, dram_stride1: int, **deps: bool) -> Store:
        return self._emit(Store(sram_addr, region, dram_offset, n0, n1, n2, dram_stride0, dram_stride1, **deps))

    def gemm(self, **fields: Any) -> Gemm:
        """GEMM; fields as in :class:`hw_model.isa.Gemm`."""
        return self._emit(Gemm(**fields))

    def group_shift_add(self, **fields: Any) -> GroupShiftAdd:
        return self._emit(GroupShiftAdd(**fields))

    def norm_act_quant(self, **fields: Any) -> NormActQuant:
        return self._emit(NormActQuant(**fields))

    def alu_add(self, **fields: Any) -> AluAdd:
        return self._emit(AluAdd(**fields))

    def alu_max(self, **fields: Any) -> AluMax:
        return self._emit(AluMax(**fields))

    def alu_sum(self, **fields: Any) -> AluSum:
        return self._emit(AluSum(**fields))

    def sync(self, **deps: bool) -> Sync:
        """SYNC: the barrier between two layers of one stream (token flags only)."""
        return self._emit(Sync(**deps))

    def finish(self, meta: dict[str, Any] | None = None, validate: bool = True) -> Program:
        """The Program, every region placed in the DRAM image (``hw_model.dram.place``), validated against
        ``cfg`` unless told otherwise."""
        place(self.regions)
        prog = Program(list(self.instrs), dict(self.regions), dict(meta or {}))
        if validate:
            prog.validate(self.cfg)
        return prog


class StepTokens:
    """Dependency tokens of a pipelined loop of steps with ``nbuf`` input and output buffers.

    Step s loads into slot s % nbuf, so its loads wait for the compute of step s - nbuf; output
    tile u (written by compute) waits for the store of tile u - nbuf. Pushes and pops pair 1:1.
    """

    def __init__(self, has_loads: list[bool], out_step: list[int | None], nbuf: int, nbuf_out: int) -> None:
        self.has_loads, self.nbuf, self.nbuf_out = has_loads, nbuf, nbuf_out
        self.n_out = sum(o is not None for o in out_step)
        self.out_step = out_step

    def load_pop(self, s: int) -> bool:
        return s >= self.nbuf and self.has_loads[s]

    def compute_push_prev(self, s: int) -> bool:
        return s + self.nbuf < len(self.has_loads) and self.has_loads[s + self.nbuf]

    def out_pop(self, u: int) -> bool:
        return u >= self.nbuf_out

    def store_push(self, u: int) -> bool:
        return u + self.nbuf_out < self.n_out

