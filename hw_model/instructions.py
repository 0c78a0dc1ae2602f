"""The NPU instructions: coarse VTA-like instructions with loop fields (the Program container is in
``hw_model.program``; ``hw_model.isa`` re-exports both).

Memories (addresses and sizes in *elements*, see ``docs/isa.md``):
  ``spad`` activation scratchpad, 1-byte elements (int8 / uint8), ``cfg.scratchpad_kib`` KiB;
  ``wbuf`` weight buffer, int8, ``cfg.weight_buf_kib`` KiB;
  ``cbuf`` NORM / ALU constants, float32, ``cfg.const_buf_kib`` KiB;
  ``acc``  accumulator (D2 tiles, and D1 tiles of ISG layers), int32, ``cfg.acc_buf_kib``
           + ``cfg.isg_d1_kib`` KiB (layer plans keep each tile within its bank).
DRAM is a set of named regions (dtype + element count + byte address in one DRAM image, see
``hw_model.dram``); constants are packed at build time.

Queues: LOAD runs on the load queue, STORE on the store queue, everything else on the compute
queue. Dependency tokens (VTA style): ``push_next`` / ``pop_prev`` between load->compute and
compute->store, ``push_prev`` / ``pop_next`` for the way back (compute->load, store->compute).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hw_model.config import NPUConfig

BLOCK = 16
"""Channels per block: the MAC's 16 input x 16 output channels (``cfg.mac_rows`` = ``cfg.mac_cols``)."""
MEMS = ("spad", "wbuf", "cbuf", "acc")
DTYPES = ("int8", "uint8", "int32", "float32")


_EDITS = [0]
"""Instruction field assignments so far, over all instructions (construction included)."""


def edit_count() -> int:
    """How many instruction field assignments have happened in this process: a program whose instruction
    objects are the same and this count unchanged has the same fields (``Program.ensure_valid`` uses it)."""
    return _EDITS[0]


def mem_size(mem: str, cfg: NPUConfig) -> int:
    """Capacity of an on-chip memory in elements."""
    sizes = {"spad": cfg.scratchpad_kib * 1024, "wbuf": cfg.weight_buf_kib * 1024,
             "cbuf": cfg.const_buf_kib * 1024 // 4, "acc": (cfg.acc_buf_kib + cfg.isg_d1_kib) * 1024 // 4}
    if mem not in sizes:
        raise ValueError(f"unknown memory {mem!r}; known: {', '.join(MEMS)}")
    return sizes[mem]


@dataclass
class Instr:
    """Common part: the four dependency-token flags."""

    pop_prev: bool = field(default=False, kw_only=True)
    pop_next: bool = field(default=False, kw_only=True)
    push_prev: bool = field(default=False, kw_only=True)
    push_next: bool = field(default=False, kw_only=True)
    opcode: ClassVar[str] = ""
    queue: ClassVar[str] = "compute"

    def __setattr__(self, name: str, value: Any) -> None:
        _EDITS[0] += 1  # an edit by hand must be validated again (see edit_count)
        object.__setattr__(self, name, value)

    def accesses(self) -> list[tuple[str, int, int, str]]:
        """(memory, lowest address, highest address + 1, role) of every on-chip access."""
        return []

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.opcode, **dataclasses.asdict(self)}


def _span(base: int, dims: list[tuple[int, int]], inner: int) -> tuple[int, int]:
    """[lo, hi) of base + sum(i_k * stride_k) + [0, inner) over i_k < n_k."""
    hi = base + inner
    for n, s in dims:
        hi += (n - 1) * s
    return base, hi


@dataclass
class Load(Instr):
    """DRAM -> on-chip, 3-D: ``n0 x n1`` runs of ``n2`` contiguous elements; dst is dense and padded.

    dst shape (pad_top + n0 + pad_bottom, pad_left + n1 + pad_right, n2) at ``sram_addr``; padding is
    filled with ``pad_value``. Source element (i, j, k) = region[dram_offset + i*dram_stride0 + j*dram_stride1 + k].

    Gathered LOAD (``gather`` names a const int32 region, the channel-index table): the innermost run is
    gathered, source element (i, j, k) = region[dram_offset + i*dram_stride0 + j*dram_stride1 + t[k]] with
    t[k] = table[gather_offset + k]; t[k] = -1 writes ``pad_value`` (nothing is read).
    """

    region: str
    dram_offset: int
    mem: str
    sram_addr: int
    n0: int
    n1: int
    n2: int
    dram_stride0: int
    dram_stride1: int
    pad_top: int = 0
    pad_bottom: int = 0
    pad_left: int = 0
    pad_right: int = 0
    pad_value: float = 0
    gather: str = ""
    gather_offset: int = 0
    opcode: ClassVar[str] = "LOAD"
    queue: ClassVar[str] = "load"

    def dst_shape(self) -> tuple[int, int, int]:
        return (self.pad_top + self.n0 + self.pad_bottom, self.pad_left + self.n1 + self.pad_right, self.n2)

    def accesses(self):
        r, c, n = self.dst_shape()
        return [(self.mem, self.sram_addr, self.sram_addr + r * c * n, "dst")]


@dataclass
class Store(Instr):
    """Scratchpad -> DRAM, 3-D: src is dense (n0, n1, n2) at ``sram_addr``; dst strides as in Load."""

    sram_addr: int
    region: str
    dram_offset: int
    n0: int
    n1: int
    n2: int
    dram_stride0: int
    dram_stride1: int
    opcode: ClassVar[str] = "STORE"
    queue: ClassVar[str] = "store"

    def accesses(self):
        return [("spad", self.sram_addr, self.sram_addr + self.n0 * self.n1 * self.n2, "src")]


@dataclass
class Gemm(Instr):
    """D1[p, 16*n_ob] (+)= sum over (cb, ky, kx, ic) of (x - zp) * w, for the oh x ow pixels p of a tile.

    Input (spad): pixel (y, x) channel block cb at ``in_addr + (y*stride_h + ky*dil_h)*in_row_stride
    + (x*stride_w + kx*dil_w)*in_pix_stride + 16*cb``. Weights (wbuf): rows (cb, ky, kx, ic) of
    ``16*n_ob`` output channels, row r at ``w_addr + r*w_row_stride``. Depthwise: n_cb = n_ob, input
    block j feeds output block j only, weight rows (ky, kx) of 16*n_ob per-channel values.
    D1 (acc): pixel p at ``acc_addr + p*acc_stride``, 16*n_ob int32 values.
    """

    acc_addr: int
    acc_stride: int
    in_addr: int
    in_row_stride: int
    in_pix_stride: int
    w_addr: int
    w_row_stride: int
    n_ob: int
    n_cb: int
    kh: int
    kw: int
    oh: int
    ow: int
    stride_h: int = 1
    stride_w: int = 1
    dil_h: int = 1
    dil_w: int = 1
    zp: int = 0
    accumulate: bool = False
    depthwise: bool = False
    opcode: ClassVar[str] = "GEMM"

    def w_rows(self) -> int:
        return self.kh * self.kw * (1 if self.depthwise else self.n_cb * BLOCK)

    def accesses(self):
        ins = _span(self.in_addr, [(self.oh, self.stride_h * self.in_row_stride),
                                   (self.ow, self.stride_w * self.in_pix_stride),
                                   (self.kh, self.dil_h * self.in_row_stride),
                                   (self.kw, self.dil_w * self.in_pix_stride)], BLOCK * self.n_cb)
        w = _span(self.w_addr, [(self.w_rows(), self.w_row_stride)], BLOCK * self.n_ob)
        a = _span(self.acc_addr, [(self.oh * self.ow, self.acc_stride)], BLOCK * self.n_ob)
        return [("spad", *ins, "input"), ("wbuf", *w, "weights"), ("acc", *a, "D1")]


@dataclass
class GroupShiftAdd(Instr):
    """D2 (=|+=) shift(D1) over ``rows`` x ``cols``: sign 0 -> d, -1 -> d - (d >> n), +1 -> d + (d >> n)."""

    d1_addr: int
    d1_stride: int
    d2_addr: int
    d2_stride: int
    rows: int
    cols: int
    sign: int
    init: bool
    opcode: ClassVar[str] = "GROUP_SHIFT_ADD"

    def accesses(self):
        return [("acc", *_span(self.d1_addr, [(self.rows, self.d1_stride)], self.cols), "D1"),
                ("acc", *_span(self.d2_addr, [(self.rows, self.d2_stride)], self.cols), "D2")]


@dataclass
class NormActQuant(Instr):
    """spad out[r, c] = clip(rint(fl(fl(f32(acc[r, c]) * m[c]) + b[c])), lo, hi); m, b float32 in cbuf."""

    acc_addr: int
    acc_stride: int
    out_addr: int
    out_stride: int
    rows: int
    cols: int
    m_addr: int
    b_addr: int
    lo: int
    hi: int
    out_dtype: str = "int8"
    opcode: ClassVar[str] = "NORM_ACT_QUANT"

    def accesses(self):
        return [("acc", *_span(self.acc_addr, [(self.rows, self.acc_stride)], self.cols), "D2"),
                ("spad", *_span(self.out_addr, [(self.rows, self.out_stride)], self.cols), "output"),
                ("cbuf", self.m_addr, self.m_addr + self.cols, "m"),
                ("cbuf", self.b_addr, self.b_addr + self.cols, "b")]


@dataclass
class AluAdd(Instr):
    """Residual add on dense (rows, cols) spad tiles: fl(fl(fl(xa*ma) + fl(xb*mb)) + bias) -> ACT + QUANT.

    xa = a - a_zp with the spad bytes of ``a`` read as ``a_dtype`` (int8 / uint8); the same for b.
    """

    a_addr: int
    b_addr: int
    out_addr: int
    rows: int
    cols: int
    a_zp: int
    b_zp: int
    ma_addr: int
    mb_addr: int
    bias_addr: int
    lo: int
    hi: int
    out_dtype: str = "int8"
    a_dtype: str = "int8"
    b_dtype: str = "int8"
    opcode: ClassVar[str] = "ALU_ADD"

    def accesses(self):
        n = self.rows * self.cols
        return [("spad", self.a_addr, self.a_addr + n, "a"), ("spad", self.b_addr, self.b_addr + n, "b"),
                ("spad", self.out_addr, self.out_addr + n, "output")] + \
               [("cbuf", a, a + self.cols, k) for a, k in
                ((self.ma_addr, "ma"), (self.mb_addr, "mb"), (self.bias_addr, "bias"))]


@dataclass
class _Window(Instr):
    """Common fields of the window ops: input pixel (y, x) at in_addr + y*in_row_stride + x*in_pix_stride."""

    in_addr: int
    in_row_stride: int
    in_pix_stride: int
    out_addr: int
    oh: int
    ow: int
    cols: int
    kh: int
    kw: int
    stride_h: int = 1
    stride_w: int = 1

    def _in_span(self):
        return _span(self.in_addr, [(self.oh, self.stride_h * self.in_row_stride),
                                    (self.ow, self.stride_w * self.in_pix_stride),
                                    (self.kh, self.in_row_stride), (self.kw, self.in_pix_stride)], self.cols)


@dataclass
class AluMax(_Window):
    """Max pool: spad out (oh*ow, cols) dense = max over the kh x kw window of the stored integers."""

    opcode: ClassVar[str] = "ALU_MAX"

    def accesses(self):
        n = self.oh * self.ow * self.cols
        return [("spad", *self._in_span(), "input"), ("spad", self.out_addr, self.out_addr + n, "output")]


@dataclass
class AluSum(_Window):
    """Window sum of x - zp into acc (oh*ow, cols) dense int32 at ``out_addr`` (average pool before NORM)."""

    zp: int = 0
    opcode: ClassVar[str] = "ALU_SUM"

    def accesses(self):
        n = self.oh * self.ow * self.cols
        return [("spad", *self._in_span(), "input"), ("acc", self.out_addr, self.out_addr + n, "output")]


@dataclass
class Sync(Instr):
    """Barrier between the layers of one stream (compute queue, token flags only; no data moves).

    The linker emits: the last STORE of layer j with ``push_prev``, ``Sync(pop_next=True, push_prev=True)``,
    then the first LOAD of layer j+1 with ``pop_next``: layer j+1 loads nothing before layer j has stored.
    """

    opcode: ClassVar[str] = "SYNC"


OPCODES: dict[str, type[Instr]] = {c.opcode: c for c in
                                   (Load, Store, Gemm, GroupShiftAdd, NormActQuant, AluAdd, AluMax, AluSum, Sync)}
