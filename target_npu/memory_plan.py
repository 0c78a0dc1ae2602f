"""DRAM memory planner of a linked NPU stream: byte addresses for every tensor, reused by liveness.

Constants (weights, NORM constants, gather tables) are placed first, back to back: they are written
once when the model is loaded and live for the whole stream. Activation tensors (the region's
inputs, the layer outputs, the region's outputs) get addresses by first fit over their live
ranges (``hw_model.dram.live_ranges``: first to last instruction that touches them; inputs are live
from before the stream, outputs until after it), so a tensor whose last reader has run gives its
bytes to a later one. Every address is aligned to ``hw_model.dram.DRAM_ALIGN``. The simulator runs
the stream over one DRAM image where reused bytes alias for real, and ``Program.validate`` rejects
two overlapping tensors that are live at once, so a wrong plan fails loudly, not silently.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hw_model.dram import align, live_ranges
from hw_model.isa import Program


@dataclass(frozen=True)
class MemoryReport:
    """Bytes of one planned stream: the DRAM image, its constant part, the activation peak (with reuse)
    and the activation bytes without reuse."""

    dram_bytes: int
    const_bytes: int
    activation_peak_bytes: int
    activation_total_bytes: int

    def to_dict(self) -> dict[str, int]:
        return {"dram_bytes": self.dram_bytes, "const_bytes": self.const_bytes,
                "activation_peak_bytes": self.activation_peak_bytes,
                "activation_total_bytes": self.activation_total_bytes}


def plan_memory(prog: Program, reuse: bool = True) -> MemoryReport:
    """Assign ``addr`` (bytes) to every region of ``prog`` in place; ``reuse=False`` gives every
    activation its own bytes (the reference the reuse is measured against)."""
    live = live_ranges(prog)
    consts = [r for r in prog.regions.values() if r.kind == "const"]
    acts = sorted((r for r in prog.regions.values() if r.kind != "const"),
                  key=lambda r: (live[r.name][0], r.name))
    addr = 0
    for r in consts:
        r.addr = addr
        addr = align(addr + r.nbytes)
    base = addr
    placed: list[tuple[int, int, int]] = []  # (offset from base, end offset, last live instruction)
    peak = 0
    for r in acts:
        first, last = live[r.name]
        size = align(r.nbytes)
        busy = sorted((lo, hi) for lo, hi, end in placed if end >= first) if reuse else \
            sorted((lo, hi) for lo, hi, _ in placed)
        off = 0
        for lo, hi in busy:  # first fit between the tensors still live
            if off + size <= lo:
                break
            off = max(off, hi)
        r.addr = base + off
        placed.append((off, off + size, last))
        peak = max(peak, off + size)
    total = sum(align(r.nbytes) for r in acts)
    return MemoryReport(base + peak, base, peak, total)


def memory_of(prog: Program) -> dict[str, Any]:
    """The memory report stored in a linked program's meta (empty for a single-layer program)."""
    return dict(prog.meta.get("memory", {}))
