"""The NPU instruction set: coarse VTA-like instructions with loop fields, and the Program container.

Memories (addresses and sizes in *elements*, see ``docs/isa.md``):
  ``spad`` activation scratchpad, 1-byte elements (int8 / uint8), ``cfg.scratchpad_kib`` KiB;
  ``wbuf`` weight buffer, int8, ``cfg.weight_buf_kib`` KiB;
  ``cbuf`` NORM / ALU constants, float32, ``cfg.const_buf_kib`` KiB;
  ``acc``  accumulator (D1 / D2 tiles), int32, ``cfg.acc_buf_kib`` KiB.
DRAM is a set of named regions (dtype + element count); constants are packed at build time.

Queues: LOAD runs on the load queue, STORE on the store queue, everything else on the compute
queue. Dependency tokens (VTA style): ``push_next`` / ``pop_prev`` between load->compute and
compute->store, ``push_prev`` / ``pop_next`` for the way back (compute->load, store->compute).
"""
from __future__ import annotations

import base64
import dataclasses
import functools
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from hw_model.config import DEFAULT_CONFIG, NPUConfig

BLOCK = 16
"""Channels per block: the MAC's 16 input x 16 output channels (``cfg.mac_rows`` = ``cfg.mac_cols``)."""
MEMS = ("spad", "wbuf", "cbuf", "acc")
DTYPES = ("int8", "uint8", "int32", "float32")
ISA_VERSION = 1


def mem_size(mem: str, cfg: NPUConfig) -> int:
    """Capacity of an on-chip memory in elements."""
    sizes = {"spad": cfg.scratchpad_kib * 1024, "wbuf": cfg.weight_buf_kib * 1024,
             "cbuf": cfg.const_buf_kib * 1024 // 4, "acc": cfg.acc_buf_kib * 1024 // 4}
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


OPCODES: dict[str, type[Instr]] = {c.opcode: c for c in
                                   (Load, Store, Gemm, GroupShiftAdd, NormActQuant, AluAdd, AluMax, AluSum)}


@dataclass
class Region:
    """A named DRAM tensor: ``kind`` is input / output / const / scratch; ``data`` only for const."""

    name: str
    dtype: str
    size: int
    kind: str
    data: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "dtype": self.dtype, "size": self.size, "kind": self.kind}
        if self.data is not None:
            d["data_b64"] = base64.b64encode(np.ascontiguousarray(self.data, np.dtype(self.dtype).newbyteorder("<"))
                                             .tobytes()).decode("ascii")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Region:
        data = None
        if "data_b64" in d:
            data = np.frombuffer(base64.b64decode(d["data_b64"]), np.dtype(d["dtype"]).newbyteorder("<"))
            data = data.astype(d["dtype"])
        return cls(d["name"], d["dtype"], int(d["size"]), d["kind"], data)


@dataclass
class Program:
    """Instructions (in issue order) + DRAM regions + free-form JSON ``meta`` (layer description, layouts)."""

    instrs: list[Instr]
    regions: dict[str, Region]
    meta: dict[str, Any] = field(default_factory=dict)

    def validate(self, cfg: NPUConfig = DEFAULT_CONFIG) -> None:
        """Raise ValueError naming the instruction and field on any bad program."""
        validate_program(self, cfg)

    def to_json(self) -> str:
        return json.dumps({"isa_version": ISA_VERSION, "meta": self.meta,
                           "regions": [r.to_dict() for r in self.regions.values()],
                           "instrs": [i.to_dict() for i in self.instrs]})

    @classmethod
    def from_json(cls, text: str) -> Program:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"Program.from_json: not JSON ({e})") from None
        if not isinstance(d, dict) or d.get("isa_version") != ISA_VERSION:
            raise ValueError(f"Program.from_json: expected isa_version {ISA_VERSION}, "
                             f"got {d.get('isa_version') if isinstance(d, dict) else type(d).__name__}")
        instrs = []
        for k, item in enumerate(d["instrs"]):
            item = dict(item)
            op = item.pop("op", None)
            if op not in OPCODES:
                raise ValueError(f"Program.from_json: instruction #{k} has unknown opcode {op!r}")
            try:
                instrs.append(OPCODES[op](**item))
            except TypeError as e:
                raise ValueError(f"Program.from_json: instruction #{k} ({op}): {e}") from None
        regions = {r["name"]: Region.from_dict(r) for r in d["regions"]}
        return cls(instrs, regions, d.get("meta", {}))


# ------------------------------------------------------------------------------ validation
_NONNEG = ("dram_offset", "sram_addr", "acc_addr", "in_addr", "w_addr", "out_addr", "d1_addr", "d2_addr",
           "m_addr", "b_addr", "a_addr", "ma_addr", "mb_addr", "bias_addr", "pad_top", "pad_bottom",
           "pad_left", "pad_right", "dram_stride0", "dram_stride1", "acc_stride", "in_row_stride",
           "in_pix_stride", "w_row_stride", "d1_stride", "d2_stride", "out_stride")
_POS = ("n0", "n1", "n2", "n_ob", "n_cb", "kh", "kw", "oh", "ow", "rows", "cols", "stride_h", "stride_w",
        "dil_h", "dil_w")
_QUEUE_FLAGS = {"load": ("pop_prev", "push_prev"), "store": ("pop_next", "push_next")}


@functools.cache
def _int_fields(cls: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Names of the non-negative and of the positive integer fields of an instruction class."""
    names = [f.name for f in dataclasses.fields(cls)]
    return tuple(n for n in names if n in _NONNEG), tuple(n for n in names if n in _POS)


def _check_fields(k: int, ins: Instr, prog: Program, cfg: NPUConfig) -> None:
    where = f"instruction #{k} ({ins.opcode})"
    nonneg, pos = _int_fields(type(ins))
    for name in nonneg:
        v = getattr(ins, name)
        if type(v) is not int and (not isinstance(v, (int, np.integer)) or isinstance(v, bool)) or v < 0:
            raise ValueError(f"{where}: field {name} must be a non-negative int, got {v!r}")
    for name in pos:
        v = getattr(ins, name)
        zero_ok = name == "n0" and isinstance(ins, Load) and v == 0  # a LOAD may write padding only
        if type(v) is not int and (not isinstance(v, (int, np.integer)) or isinstance(v, bool)) or \
                (v <= 0 and not zero_ok):
            raise ValueError(f"{where}: field {name} must be a positive int, got {v!r}")
    for flag in _QUEUE_FLAGS.get(ins.queue, ()):
        if getattr(ins, flag):
            raise ValueError(f"{where}: the {ins.queue} queue has no neighbour for {flag}")
    if isinstance(ins, (NormActQuant, AluAdd)):
        if ins.out_dtype not in ("int8", "uint8"):
            raise ValueError(f"{where}: out_dtype must be int8 or uint8, got {ins.out_dtype!r}")
        info = np.iinfo(ins.out_dtype)
        if not info.min <= ins.lo <= ins.hi <= info.max:
            raise ValueError(f"{where}: clip bounds lo={ins.lo}, hi={ins.hi} must satisfy "
                             f"{info.min} <= lo <= hi <= {info.max} for {ins.out_dtype}")
    if isinstance(ins, AluAdd):
        for f in ("a_dtype", "b_dtype"):
            if getattr(ins, f) not in ("int8", "uint8"):
                raise ValueError(f"{where}: {f} must be int8 or uint8, got {getattr(ins, f)!r}")
    if isinstance(ins, GroupShiftAdd) and ins.sign not in cfg.isg_group_signs:
        raise ValueError(f"{where}: sign {ins.sign} is not one of NPUConfig.isg_group_signs {cfg.isg_group_signs}")
    if isinstance(ins, Gemm) and ins.depthwise and ins.n_cb != ins.n_ob:
        raise ValueError(f"{where}: depthwise GEMM needs n_cb == n_ob, got {ins.n_cb} and {ins.n_ob}")
    if isinstance(ins, Load) and ins.mem not in MEMS:
        raise ValueError(f"{where}: unknown memory {ins.mem!r}; known: {', '.join(MEMS)}")
    if isinstance(ins, (Load, Store)):
        reg = prog.regions.get(ins.region)
        if reg is None:
            raise ValueError(f"{where}: unknown DRAM region {ins.region!r}; known: {', '.join(prog.regions)}")
        lo, hi = _span(ins.dram_offset, [(ins.n0, ins.dram_stride0), (ins.n1, ins.dram_stride1)], ins.n2)
        if hi > reg.size:
            raise ValueError(f"{where}: DRAM address {hi - 1} out of range of region {ins.region!r} "
                             f"({reg.size} elements)")
        if isinstance(ins, Store) and reg.kind == "const":
            raise ValueError(f"{where}: STORE into constant region {ins.region!r}")
        if isinstance(ins, Load) and np.dtype(reg.dtype).itemsize != (4 if ins.mem in ("cbuf", "acc") else 1):
            raise ValueError(f"{where}: region {ins.region!r} ({reg.dtype}) does not fit memory {ins.mem}")
    for mem, _lo, hi, role in ins.accesses():
        size = mem_size(mem, cfg)
        if hi > size:
            raise ValueError(f"{where}: {role} overflows {mem} (needs addresses up to {hi - 1}, "
                             f"{mem} holds {size} elements)")


def check_tokens(instrs: list[Instr]) -> None:
    """Run the three queues with token counters; raise ValueError on a deadlock / token underflow."""
    queues = {q: [k for k, i in enumerate(instrs) if i.queue == q] for q in ("load", "compute", "store")}
    pos = dict.fromkeys(queues, 0)
    tok = {("load", "compute"): 0, ("compute", "load"): 0, ("compute", "store"): 0, ("store", "compute"): 0}
    prev = {"compute": "load", "store": "compute"}
    nxt = {"load": "compute", "compute": "store"}
    progress = True
    while progress:
        progress = False
        for q, idx in queues.items():
            while pos[q] < len(idx):
                ins = instrs[idx[pos[q]]]
                need = []
                if ins.pop_prev:
                    need.append((prev[q], q))
                if ins.pop_next:
                    need.append((nxt[q], q))
                if any(tok[t] == 0 for t in need):
                    break
                for t in need:
                    tok[t] -= 1
                if ins.push_prev:
                    tok[(q, prev[q])] += 1
                if ins.push_next:
                    tok[(q, nxt[q])] += 1
                pos[q] += 1
                progress = True
    stuck = [(q, idx[pos[q]]) for q, idx in queues.items() if pos[q] < len(idx)]
    if stuck:
        desc = "; ".join(f"{q} queue waits at instruction #{k} ({instrs[k].opcode})" for q, k in stuck)
        raise ValueError(f"dependency tokens deadlock (a pop without a matching push): {desc}")


def validate_program(prog: Program, cfg: NPUConfig = DEFAULT_CONFIG) -> None:
    """All checks of :meth:`Program.validate`."""
    if not isinstance(prog, Program):
        raise TypeError(f"expected a Program, got {type(prog).__name__}")
    for name, r in prog.regions.items():
        if r.dtype not in DTYPES:
            raise ValueError(f"DRAM region {name!r}: dtype {r.dtype!r} not in {DTYPES}")
        if r.kind not in ("input", "output", "const", "scratch"):
            raise ValueError(f"DRAM region {name!r}: kind {r.kind!r} not in input/output/const/scratch")
        if r.kind == "const" and (r.data is None or r.data.size != r.size):
            raise ValueError(f"DRAM region {name!r}: a const region needs data of {r.size} elements")
    for k, ins in enumerate(prog.instrs):
        if not isinstance(ins, Instr) or type(ins) not in OPCODES.values():
            raise ValueError(f"instruction #{k}: not an NPU instruction ({type(ins).__name__})")
        _check_fields(k, ins, prog, cfg)
    check_tokens(prog.instrs)
