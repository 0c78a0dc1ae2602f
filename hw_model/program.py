"""The Program container (instructions + DRAM regions + meta, JSON round trip) and its validation:
field ranges, memory bounds, DRAM regions, gather tables, the memory map, dependency-token deadlocks."""
from __future__ import annotations

import base64
import dataclasses
import functools
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hw_model.config import DEFAULT_CONFIG, NPUConfig
from hw_model.dram import check_memory_map, dram_bytes
from hw_model.instructions import (
    DTYPES,
    MEMS,
    OPCODES,
    AluAdd,
    Gemm,
    GroupShiftAdd,
    Instr,
    Load,
    NormActQuant,
    Store,
    _span,
    edit_count,
    mem_size,
)

ISA_VERSION = 2
"""Version of the JSON encoding. 2: regions carry byte addresses (one DRAM image), LOAD gather, SYNC."""


@dataclass
class Region:
    """A named DRAM tensor: ``kind`` is input / output / const / scratch; ``data`` only for const;
    ``addr`` its byte address in the DRAM image (None until placed, see ``hw_model.dram.place``)."""

    name: str
    dtype: str
    size: int
    kind: str
    data: np.ndarray | None = None
    addr: int | None = None

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "dtype": self.dtype, "size": self.size, "kind": self.kind,
             "addr": None if self.addr is None else int(self.addr)}
        if self.data is not None:
            d["data_b64"] = base64.b64encode(np.ascontiguousarray(self.data, np.dtype(self.dtype).newbyteorder("<"))
                                             .tobytes()).decode("ascii")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Region:
        """A region from its JSON form; every field is checked (ValueError naming the region and key)."""
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise ValueError(f"DRAM region: expected an object with a string 'name', got {str(d)[:80]}")
        where = f"DRAM region {d['name']!r}"
        if d.get("dtype") not in DTYPES:
            raise ValueError(f"{where}: dtype {d.get('dtype')!r} not in {DTYPES}")
        if d.get("kind") not in ("input", "output", "const", "scratch"):
            raise ValueError(f"{where}: kind {d.get('kind')!r} not in input/output/const/scratch")
        size, addr = d.get("size"), d.get("addr")
        for key, v in (("size", size), ("addr", addr)):
            if not (v is None and key == "addr") and (type(v) is not int or v < 0):
                raise ValueError(f"{where}: {key} must be a non-negative int, got {v!r}")
        data = None
        if "data_b64" in d:
            try:
                raw = base64.b64decode(d["data_b64"], validate=True)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: data_b64 is not base64") from None
            if len(raw) != size * np.dtype(d["dtype"]).itemsize:
                raise ValueError(f"{where}: data_b64 holds {len(raw)} bytes, {size} {d['dtype']} elements need "
                                 f"{size * np.dtype(d['dtype']).itemsize}")
            data = np.frombuffer(raw, np.dtype(d["dtype"]).newbyteorder("<")).astype(d["dtype"])
            if data.dtype.kind == "f" and not np.isfinite(data).all():
                raise ValueError(f"{where}: constant data holds NaN or Inf")
        return cls(d["name"], d["dtype"], size, d["kind"], data, addr)


@dataclass
class Program:
    """Instructions (in issue order) + DRAM regions + free-form JSON ``meta`` (layer description, layouts)."""

    instrs: list[Instr]
    regions: dict[str, Region]
    meta: dict[str, Any] = field(default_factory=dict)
    _valid_key: Any = field(default=None, init=False, repr=False, compare=False)

    def validate(self, cfg: NPUConfig = DEFAULT_CONFIG) -> None:
        """Raise ValueError naming the instruction and field on any bad program (always checks everything)."""
        validate_program(self, cfg)
        self._valid_key = _fingerprint(self, cfg)

    def ensure_valid(self, cfg: NPUConfig = DEFAULT_CONFIG) -> None:
        """:meth:`validate` unless the program was validated with ``cfg`` and is unchanged since: the
        simulator calls this on every run, so a stored program is checked once, and one edited by hand
        (an instruction field, the instruction list, a region, a gather table) is checked again."""
        key = _fingerprint(self, cfg)
        try:
            same = self._valid_key is not None and bool(key == self._valid_key)
        except Exception:  # a field holding something that does not compare (an array): not the same
            same = False
        if not same:
            validate_program(self, cfg)
            self._valid_key = key

    @property
    def dram_bytes(self) -> int:
        """Bytes of the DRAM image: max(addr + nbytes) over the placed regions, aligned (``hw_model.dram``)."""
        return dram_bytes(self.regions)

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
        got = d.get("isa_version", "none") if isinstance(d, dict) else f"none (a JSON {type(d).__name__})"
        if got != ISA_VERSION:
            raise ValueError(f"Program.from_json: got isa_version {got}, expected {ISA_VERSION} (version 2 added "
                             f"DRAM addresses, gathered LOADs and SYNC; rebuild the program with this hw_model)")
        for key in ("instrs", "regions"):
            if not isinstance(d.get(key), list):
                raise ValueError(f"Program.from_json: {key!r} must be a JSON list, got {str(d.get(key))[:80]}")
        if not isinstance(d.get("meta", {}), dict):
            raise ValueError("Program.from_json: 'meta' must be a JSON object")
        instrs = []
        for k, item in enumerate(d["instrs"]):
            if not isinstance(item, dict):
                raise ValueError(f"Program.from_json: instruction #{k} is not a JSON object")
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
           "in_pix_stride", "w_row_stride", "d1_stride", "d2_stride", "out_stride", "gather_offset")
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
    _check_types(where, ins)
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
        inner = _check_gather(where, ins, prog) if isinstance(ins, Load) and ins.gather else ins.n2
        lo, hi = _span(ins.dram_offset, [(ins.n0, ins.dram_stride0), (ins.n1, ins.dram_stride1)], inner)
        if inner and hi > reg.size:
            raise ValueError(f"{where}: DRAM address {hi - 1} out of range of region {ins.region!r} "
                             f"({reg.size} elements)")
        if isinstance(ins, Store) and reg.kind == "const":
            raise ValueError(f"{where}: STORE into constant region {ins.region!r}")
        if isinstance(ins, Load) and np.dtype(reg.dtype).itemsize != (4 if ins.mem in ("cbuf", "acc") else 1):
            raise ValueError(f"{where}: region {ins.region!r} ({reg.dtype}) does not fit memory {ins.mem}")
        if isinstance(ins, Load):
            _check_pad_value(where, ins, reg)
    for mem, _lo, hi, role in ins.accesses():
        size = mem_size(mem, cfg)
        if hi > size:
            raise ValueError(f"{where}: {role} overflows {mem} (needs addresses up to {hi - 1}, "
                             f"{mem} holds {size} elements)")


_ZP_FIELDS = {"zp": "int8|uint8", "a_zp": "a_dtype", "b_zp": "b_dtype"}


def _check_types(where: str, ins: Instr) -> None:
    """bool / str / int fields hold exactly those types; zero points fit the byte they shift."""
    for f in dataclasses.fields(ins):
        v, typ = getattr(ins, f.name), str(f.type)
        if typ == "bool" and not isinstance(v, (bool, np.bool_)):
            raise ValueError(f"{where}: field {f.name} must be true or false, got {v!r}")
        if typ == "str" and not isinstance(v, str):
            raise ValueError(f"{where}: field {f.name} must be a string, got {v!r}")
        if typ == "int" and (isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))):
            raise ValueError(f"{where}: field {f.name} must be an int, got {v!r}")
    for name, dt in _ZP_FIELDS.items():
        if hasattr(ins, name):
            lo, hi = (-128, 255) if dt == "int8|uint8" else (
                (-128, 127) if getattr(ins, dt) == "int8" else (0, 255))
            if not lo <= getattr(ins, name) <= hi:
                raise ValueError(f"{where}: field {name} = {getattr(ins, name)} must be in {lo}..{hi} "
                                 f"(a zero point of a {dt if dt != 'int8|uint8' else 'int8 / uint8'} byte)")


def _check_pad_value(where: str, ins: Load, reg: Region) -> None:
    """A LOAD's pad value must be a finite number that the region's (= the memory's) dtype holds exactly."""
    v = ins.pad_value
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)) \
            or not np.isfinite(v):
        raise ValueError(f"{where}: pad_value must be a finite number, got {v!r}")
    if ins.mem == "cbuf":
        with np.errstate(over="ignore"):
            ok = np.isfinite(np.float32(v)) and float(np.float32(v)) == float(v)
        rng, kind = "a float32 value", "float32"
    else:  # spad / wbuf hold bytes (read as int8 or uint8), acc int32
        lo, hi = (-128, 255) if ins.mem in ("spad", "wbuf") else (-(2**31), 2**31 - 1)
        ok, rng = float(v).is_integer() and lo <= v <= hi, f"an integer in {lo}..{hi}"
        kind = "bytes: int8 or uint8" if ins.mem != "acc" else "int32"
    if not ok:
        raise ValueError(f"{where}: pad_value {v!r} is not representable in {ins.mem} ({kind}): must be {rng}")


def _check_gather(where: str, ins: Load, prog: Program) -> int:
    """Check a gathered LOAD's table; returns the innermost extent it reads (max entry + 1, 0 if none)."""
    tab = prog.regions.get(ins.gather)
    if tab is None:
        raise ValueError(f"{where}: unknown gather table {ins.gather!r}; known: {', '.join(prog.regions)}")
    if tab.kind != "const" or tab.dtype != "int32":
        raise ValueError(f"{where}: gather table {ins.gather!r} must be a const int32 region, "
                         f"got {tab.kind} {tab.dtype}")
    if ins.gather_offset + ins.n2 > tab.size:
        raise ValueError(f"{where}: gather entries {ins.gather_offset}..{ins.gather_offset + ins.n2 - 1} out of "
                         f"range of table {ins.gather!r} ({tab.size} entries)")
    if tab.data is None or tab.data.size != tab.size:
        raise ValueError(f"{where}: gather table {ins.gather!r} has no data")
    t = np.asarray(tab.data).reshape(-1)[ins.gather_offset:ins.gather_offset + ins.n2]
    if t.min() < -1:
        raise ValueError(f"{where}: gather table {ins.gather!r} holds {int(t.min())} (entries must be >= -1)")
    return int(t.max()) + 1


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


def _fingerprint(prog: Program, cfg: NPUConfig) -> tuple:
    """Everything :func:`validate_program` reads: cfg, the instruction objects and their fields (by identity and
    :func:`hw_model.instructions.edit_count`), each
    region's fields and data identity/size, and the contents of the gather tables (small int32 regions)."""
    instrs = prog.instrs
    # the same instruction objects (ids) and no field assignment anywhere since (edit_count): the same fields
    ins = (edit_count(), tuple(map(id, instrs))) if isinstance(instrs, list) else (id(instrs),)
    regs = prog.regions
    if not isinstance(regs, dict):
        return cfg, ins, id(regs)
    tables = {i.gather for i in instrs if isinstance(i, Load) and i.gather} if isinstance(instrs, list) else set()
    reg = tuple((k, type(r), *((r.name, r.dtype, r.size, r.kind, r.addr, id(r.data),
                                None if r.data is None else np.shape(r.data),
                                np.asarray(r.data).tobytes() if k in tables and r.data is not None else None)
                               if isinstance(r, Region) else ()))
                for k, r in regs.items())
    return cfg, ins, reg


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
    check_memory_map(prog)
    check_tokens(prog.instrs)
