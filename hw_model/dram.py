"""The DRAM model: one flat byte-addressed image per program, a byte address per region, and the
memory-map check (address alignment, no two regions share bytes while both are live).

Addresses and sizes here are in **bytes** (instructions keep addressing regions in elements).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from hw_model.instructions import Load, Store

if TYPE_CHECKING:
    from hw_model.program import Program, Region

DRAM_ALIGN = 64
"""Region alignment in bytes. Chosen: one DRAM burst at ``NPUConfig.dram_bytes_per_cycle`` = 64 B/cycle,
so a region never starts in the middle of a burst."""


def align(n: int) -> int:
    """``n`` bytes rounded up to a multiple of :data:`DRAM_ALIGN`."""
    return -(-int(n) // DRAM_ALIGN) * DRAM_ALIGN


def dram_bytes(regions: dict[str, Region]) -> int:
    """Bytes of DRAM the placed regions need: max(addr + nbytes), aligned; 0 if none is placed."""
    ends = [r.addr + r.nbytes for r in regions.values() if r.addr is not None]
    return align(max(ends)) if ends else 0


def place(regions: dict[str, Region], start: int = 0) -> int:
    """Give every region whose ``addr`` is None a byte address, back to back in dict order, each aligned
    to :data:`DRAM_ALIGN`, after ``start`` and after every region that already has one. Returns the
    (aligned) end address in bytes."""
    addr = align(max(int(start), dram_bytes(regions)))
    for r in regions.values():
        if r.addr is None:
            r.addr = addr
            addr = align(addr + r.nbytes)
    return addr


def _touches(ins) -> list[str]:
    """DRAM regions an instruction reads or writes (a LOAD's region and its gather table, a STORE's region)."""
    if isinstance(ins, Load):
        return [ins.region, ins.gather] if ins.gather else [ins.region]
    if isinstance(ins, Store):
        return [ins.region]
    return []


def live_ranges(prog: Program) -> dict[str, tuple[int, int]]:
    """(first, last) instruction index that touches each region, both ends included.

    Inputs start at -1 (written by the host before instruction 0), outputs end at ``len(instrs)`` (read
    by the host after the last one), consts span [-1, len(instrs)]. A region no instruction touches
    keeps its kind's default ends: input (-1, -1), output (n, n), const (-1, n), scratch (n, -1), an
    empty range that overlaps nothing.
    """
    n = len(prog.instrs)
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for k, ins in enumerate(prog.instrs):
        for name in _touches(ins):
            first.setdefault(name, k)
            last[name] = k
    out = {}
    for name, r in prog.regions.items():
        lo, hi = first.get(name), last.get(name)
        if lo is None:
            lo, hi = {"input": (-1, -1), "output": (n, n), "const": (-1, n)}.get(r.kind, (n, -1))
        if r.kind in ("input", "const"):
            lo = -1
        if r.kind in ("output", "const"):
            hi = n
        out[name] = (lo, hi)
    return out


def check_memory_map(prog: Program) -> None:
    """Raise ValueError naming the region(s) if an address is missing, negative or not a multiple of the
    region's itemsize, or if two regions share bytes while both are live (the memory planner's reuse
    must be safe). Live ranges are in issue order (:func:`live_ranges`)."""
    for name, r in prog.regions.items():
        a = r.addr
        isz = np.dtype(r.dtype).itemsize
        if a is None:
            raise ValueError(f"DRAM region {name!r} has no address (place the regions first: hw_model.dram.place)")
        if type(a) is not int and (not isinstance(a, (int, np.integer)) or isinstance(a, bool)) or a < 0:
            raise ValueError(f"DRAM region {name!r}: address must be a non-negative int, got {a!r}")
        if a % isz:
            raise ValueError(f"DRAM region {name!r}: address {a} is not a multiple of its itemsize {isz} "
                             f"({r.dtype})")
    live = live_ranges(prog)
    spans = sorted((r.addr, r.addr + r.nbytes, name) for name, r in prog.regions.items() if r.nbytes > 0)
    for i, (lo_a, hi_a, a) in enumerate(spans):
        for lo_b, hi_b, b in spans[i + 1:]:
            if lo_b >= hi_a:
                break
            (fa, la), (fb, lb) = live[a], live[b]
            if fa <= lb and fb <= la:
                raise ValueError(f"DRAM regions {a!r} (bytes {lo_a}..{hi_a - 1}, live {fa}..{la}) and {b!r} "
                                 f"(bytes {lo_b}..{hi_b - 1}, live {fb}..{lb}) share bytes while both are live")


class DramImage:
    """The DRAM of one program run: one flat ``np.uint8`` array of ``dram_bytes`` bytes with the constants
    written in; :meth:`view` gives a region's bytes as a typed array (regions that share bytes alias)."""

    def __init__(self, prog: Program) -> None:
        for name, r in prog.regions.items():
            if r.addr is None:
                raise ValueError(f"DramImage: DRAM region {name!r} has no address")
        self.regions = prog.regions
        self.bytes = np.zeros(dram_bytes(prog.regions), np.uint8)
        for name, r in prog.regions.items():
            if r.kind == "const" and r.data is not None:
                self.view(name)[...] = np.asarray(r.data).reshape(-1).astype(r.dtype)

    @property
    def nbytes(self) -> int:
        """Size of the image in bytes."""
        return self.bytes.size

    def view(self, name: str) -> np.ndarray:
        """Writable flat view (region dtype, little-endian, ``size`` elements) of region ``name``'s bytes."""
        r = self.regions[name]
        return np.ndarray((r.size,), np.dtype(r.dtype).newbyteorder("<"), buffer=self.bytes, offset=r.addr)
