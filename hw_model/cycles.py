"""Cycle model: per-instruction cost, load / compute / store overlap through the dependency tokens.

Costs (cycles; see docs/cycle_model.md), every instruction adds ``cfg.instr_overhead_cycles``:
  LOAD / STORE      ceil(bytes moved / dram_bytes_per_cycle)                      unit load / store
  gathered LOAD     as LOAD + whole bursts per row piece of each run - the plain bytes + runs * dma_burst_cycles
                    + ceil(4 * n2 / dram_bytes_per_cycle) (one 2-D descriptor per run; see _gather_extra)
                    (runs: maximal runs of consecutive table entries; the last term reads the table)
  GEMM              ceil(pixels * n_ob * n_cb * kh * kw / (pe_arrays * pixels_per_cycle)) unit mac
                    (depthwise: n_cb = 1 per output block: one 16-lane block-tap per cycle)
  GROUP_SHIFT_ADD   steps (pipelined behind the MACs: only the stage latency shows), unit acc;
                    steps = (sign != 0: one shift cycle) + (not init: one combine cycle).
                    3 groups: 1 + 2 + 1 = 4 (journal App. A-B), 2 groups: 1 + 1 = 2, 1 group: none.
  NORM_ACT_QUANT    ceil(values / (post_lanes * pe_arrays))                       unit post
  ALU_ADD / MAX / SUM  ceil(values read / (post_lanes * pe_arrays))              unit alu
  SYNC              the overhead only                                             unit sync
The three queues run in order; an instruction starts when its queue is free and every token it
pops has been pushed (FIFO per token channel).

Modes (as Gemmini's simulators): ``func`` values only, ``perf`` cycles only (pure arithmetic over
the instructions), ``both`` values and cycles, with a check that the cycles equal ``perf``'s.
A linked stream (``meta["layers"]``) also gets one report per layer section (:func:`section_reports`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hw_model.config import DEFAULT_CONFIG, NPUConfig
from hw_model.isa import (
    AluAdd,
    AluMax,
    AluSum,
    Gemm,
    GroupShiftAdd,
    Instr,
    Load,
    NormActQuant,
    Program,
    Store,
    Sync,
)

UNITS = ("load", "mac", "acc", "post", "alu", "store", "sync")


def gather_run_lengths(table: np.ndarray) -> list[int]:
    """Lengths of the maximal runs of consecutive entries of a gather table slice (t[k+1] == t[k] + 1);
    -1 entries are not read and break runs."""
    t = np.asarray(table, np.int64).reshape(-1)
    read = np.flatnonzero(t >= 0)
    if read.size == 0:
        return []
    cont = (np.diff(read) == 1) & (np.diff(t[read]) == 1)  # read neighbours that continue a run
    starts = np.concatenate([[0], np.flatnonzero(~cont) + 1, [read.size]])
    return np.diff(starts).tolist()


def gather_runs(table: np.ndarray) -> int:
    """Number of maximal runs of a gather table slice (:func:`gather_run_lengths`)."""
    return len(gather_run_lengths(table))


def _gather_extra(ins: Load, prog: Program, cfg: NPUConfig) -> int:
    """Cycles a gathered LOAD adds to the plain LOAD of the same bytes. The DMA issues one 2-D descriptor
    per contiguous run of the table (``dma_burst_cycles`` of setup each, once per instruction: the run
    repeats over the n0 x n1 rows by stride); every row's piece of a run occupies whole DRAM bursts of
    ``dram_bytes_per_cycle`` bytes (a 16-byte piece costs a full burst); plus the read of the n2 int32
    table entries."""
    tab = prog.regions[ins.gather].data
    lengths = gather_run_lengths(np.asarray(tab).reshape(-1)[ins.gather_offset:ins.gather_offset + ins.n2])
    isz = np.dtype(prog.regions[ins.region].dtype).itemsize
    bw = cfg.dram_bytes_per_cycle
    pieces = ins.n0 * ins.n1 * sum(math.ceil(n * isz / bw) for n in lengths)
    plain = math.ceil(ins.n0 * ins.n1 * ins.n2 * isz / bw)
    return max(pieces - plain, 0) + len(lengths) * cfg.dma_burst_cycles + math.ceil(4 * ins.n2 / bw)


def instr_cost(ins: Instr, prog: Program, cfg: NPUConfig = DEFAULT_CONFIG) -> tuple[str, int]:
    """(unit, cycles) of one instruction, overhead included."""
    lanes = cfg.pe_arrays * cfg.pixels_per_cycle
    # journal App. A-D synthesises MAC -> WAPS -> BN -> ACT -> Quant as one block per 16x16 array, each
    # post stage "8 data in 1 cycle": every array has its own 8-lane post path (ALU ops use it too)
    post = cfg.post_lanes * cfg.pe_arrays
    if isinstance(ins, (Load, Store)):
        nbytes = ins.n0 * ins.n1 * ins.n2 * np.dtype(prog.regions[ins.region].dtype).itemsize
        unit, c = ("load" if isinstance(ins, Load) else "store"), math.ceil(nbytes / cfg.dram_bytes_per_cycle)
        if isinstance(ins, Load) and ins.gather:
            c += _gather_extra(ins, prog, cfg)
    elif isinstance(ins, Gemm):
        work = ins.oh * ins.ow * ins.n_ob * (1 if ins.depthwise else ins.n_cb) * ins.kh * ins.kw
        unit, c = "mac", math.ceil(work / lanes)
    elif isinstance(ins, GroupShiftAdd):
        # the D1 -> shift -> D2 path is pipelined behind the MACs (journal Sec. V-E / Table 8: WAPS adds a
        # flip-flop stage, 1129.278 -> 1129.283 us per layer; App. A-B: 4 cycles per accumulation), so an
        # instruction costs its pipeline steps, not a pass over the tile
        steps = (ins.sign != 0) + (not ins.init)
        unit, c = "acc", steps
    elif isinstance(ins, NormActQuant):
        unit, c = "post", math.ceil(ins.rows * ins.cols / post)
    elif isinstance(ins, AluAdd):
        unit, c = "alu", math.ceil(ins.rows * ins.cols / post)
    elif isinstance(ins, (AluMax, AluSum)):
        unit, c = "alu", math.ceil(ins.oh * ins.ow * ins.cols * ins.kh * ins.kw / post)
    elif isinstance(ins, Sync):
        unit, c = "sync", 0
    else:
        raise TypeError(f"instr_cost: not an NPU instruction: {type(ins).__name__}")
    return unit, c + cfg.instr_overhead_cycles


def _acc_spans(ins: Instr) -> list[tuple[int, int]]:
    return [(lo, hi) for mem, lo, hi, _ in ins.accesses() if mem == "acc"]


def _acc_span(ins: NormActQuant) -> tuple[int, int]:
    return _acc_spans(ins)[0]


def timeline(prog: Program, cfg: NPUConfig = DEFAULT_CONFIG,
             order: list[int] | None = None) -> tuple[int, dict[str, int], list[tuple[int, int]]]:
    """(total cycles, busy cycles per unit, (start, end) per instruction) of the queue overlap."""
    instrs = prog.instrs
    order = list(range(len(instrs))) if order is None else order
    free = {"load": 0, "compute": 0, "store": 0}
    pushed: dict[tuple[str, str], list[int]] = {}
    popped: dict[tuple[str, str], int] = {}
    prev = {"compute": "load", "store": "compute"}
    nxt = {"load": "compute", "compute": "store"}
    busy = dict.fromkeys(UNITS, 0)
    span: list[tuple[int, int]] = [(0, 0)] * len(instrs)
    queues = {q: [k for k in order if instrs[k].queue == q] for q in free}
    pos = dict.fromkeys(free, 0)
    post_busy = (0, 0, 0)  # (acc lo, acc hi, end) of the NORM_ACT_QUANT last issued
    done = 0
    while done < len(order):
        moved = False
        for q, idx in queues.items():
            while pos[q] < len(idx):
                k = idx[pos[q]]
                ins = instrs[k]
                chans = ([(prev[q], q)] if ins.pop_prev else []) + ([(nxt[q], q)] if ins.pop_next else [])
                if any(len(pushed.get(c, [])) <= popped.get(c, 0) for c in chans):
                    break
                start = free[q]
                for c in chans:
                    start = max(start, pushed[c][popped.get(c, 0)])
                    popped[c] = popped.get(c, 0) + 1
                unit, cyc = instr_cost(ins, prog, cfg)
                if isinstance(ins, NormActQuant):
                    # its own pipeline stage (journal App. A-D: MAC -> WAPS -> BN -> ACT -> Quant): issued in
                    # order, it runs beside the next tile's MACs; the compute queue moves on after one
                    # issue cycle. Only the latest one can still be running (it starts after the previous).
                    start = max(start, post_busy[2])
                    post_busy = (*_acc_span(ins), start + cyc)
                elif q == "compute":
                    # an accumulator access waits for the post stage still reading the same addresses
                    for lo, hi in _acc_spans(ins):
                        if lo < post_busy[1] and post_busy[0] < hi:
                            start = max(start, post_busy[2])
                end = start + cyc
                busy[unit] += cyc
                span[k] = (start, end)
                free[q] = start + 1 if isinstance(ins, NormActQuant) else end
                if ins.push_prev:
                    pushed.setdefault((q, prev[q]), []).append(end)
                if ins.push_next:
                    pushed.setdefault((q, nxt[q]), []).append(end)
                pos[q] += 1
                done += 1
                moved = True
        if not moved:
            raise ValueError("cycle model: dependency tokens deadlock (validate the program first)")
    total = max((e for _, e in span), default=0)
    return total, busy, span


def _moved_bytes(prog: Program, instrs: list[Instr], cls: type) -> int:
    """DRAM bytes moved by the LOADs or STOREs among ``instrs`` (n0 * n1 * n2 elements each)."""
    return sum(i.n0 * i.n1 * i.n2 * np.dtype(prog.regions[i.region].dtype).itemsize
               for i in instrs if isinstance(i, cls))


def _report(name: str, total: int, busy: dict[str, int], macs: int, groups: int, instrs: list[Instr],
            prog: Program, cfg: NPUConfig) -> dict[str, Any]:
    peak = cfg.macs_per_cycle
    return {"layer": name, "cycles": int(total), "us": total / cfg.clock_mhz,
            "macs": macs, "mac_utilisation": macs / (total * peak) if total else 0.0,
            "groups": groups, "instructions": len(instrs),
            "bytes_loaded": int(_moved_bytes(prog, instrs, Load)),
            "bytes_stored": int(_moved_bytes(prog, instrs, Store)),
            "busy": {u: int(v) for u, v in busy.items()}}


def layer_report(prog: Program, cfg: NPUConfig = DEFAULT_CONFIG, total: int | None = None,
                 busy: dict[str, int] | None = None) -> dict[str, Any]:
    """JSON-serialisable per-layer report: cycles, us, MACs, utilisation, groups, bytes, busy per unit."""
    if total is None or busy is None:
        total, busy, _ = timeline(prog, cfg)
    return _report(prog.meta.get("layer", "?"), total, busy, int(prog.meta.get("macs", 0)),
                   int(prog.meta.get("groups", 0)), prog.instrs, prog, cfg)


def _sections(prog: Program) -> list[dict[str, Any]]:
    """``prog.meta["layers"]``, checked: [start, end) ranges in order covering every instruction."""
    secs = prog.meta.get("layers")
    if not isinstance(secs, list) or not secs:
        raise ValueError("section_reports: prog.meta['layers'] must be a non-empty list of sections")
    pos = 0
    for j, sec in enumerate(secs):
        if not isinstance(sec, dict) or sec.get("start") != pos or not isinstance(sec.get("end"), (int, np.integer)) \
                or sec["end"] < pos:
            raise ValueError(f"section_reports: section #{j} ({sec!r}) must start at instruction {pos} "
                             f"and end at or after it")
        pos = sec["end"]
    if pos != len(prog.instrs):
        raise ValueError(f"section_reports: the sections end at instruction {pos}, the program has "
                         f"{len(prog.instrs)}")
    return secs


def section_reports(prog: Program, cfg: NPUConfig = DEFAULT_CONFIG,
                    span: list[tuple[int, int]] | None = None) -> list[dict[str, Any]]:
    """One :func:`layer_report`-shaped dict per section of a linked stream (``prog.meta["layers"]``:
    name, [start, end) instruction range, macs, groups). Cycles of section j = (latest end of its and
    the earlier sections' instructions) - (latest end of the earlier sections' instructions), so the
    sections sum to the program's total; busy and bytes count the section's own instructions.
    ``span`` = (start, end) per instruction from :func:`timeline` (computed if None)."""
    secs = _sections(prog)
    if span is None:
        _, _, span = timeline(prog, cfg)
    out, done = [], 0
    for sec in secs:
        instrs = prog.instrs[sec["start"]:sec["end"]]
        end = max([done] + [span[k][1] for k in range(sec["start"], sec["end"])])
        busy = dict.fromkeys(UNITS, 0)
        for ins in instrs:
            unit, cyc = instr_cost(ins, prog, cfg)
            busy[unit] += cyc
        out.append(_report(str(sec.get("name", "?")), end - done, busy, int(sec.get("macs", 0)),
                           int(sec.get("groups", 0)), instrs, prog, cfg))
        done = end
    return out


@dataclass
class Timeline:
    """Per-instruction timing of one program run by the cycle model (what a trace viewer shows).

    ``spans[k]`` = (unit, start, end) of instruction k in cycles (unit as in :data:`UNITS`); ``busy`` = the
    cycles per unit (= the sum of end - start over its instructions); ``total`` = the program's cycles;
    ``sections`` = ``prog.meta["layers"]`` ([start, end) instruction ranges with names) or []."""

    total: int
    busy: dict[str, int]
    spans: list[tuple[str, int, int]]
    opcodes: list[str]
    clock_mhz: float
    sections: list[dict[str, Any]] = field(default_factory=list)
    name: str = "npu"


def instruction_timeline(prog: Program, cfg: NPUConfig = DEFAULT_CONFIG,
                         order: list[int] | None = None) -> Timeline:
    """The :class:`Timeline` of ``prog`` (validated first; ``order`` as in :func:`timeline`)."""
    prog.ensure_valid(cfg)
    total, busy, span = timeline(prog, cfg, order=order)
    return _as_timeline(prog, cfg, total, busy, span)


def _as_timeline(prog: Program, cfg: NPUConfig, total: int, busy: dict[str, int],
                 span: list[tuple[int, int]]) -> Timeline:
    units = [instr_cost(ins, prog, cfg)[0] for ins in prog.instrs]
    secs = prog.meta.get("layers") if isinstance(prog.meta.get("layers"), list) else []
    return Timeline(int(total), {u: int(v) for u, v in busy.items()},
                    [(u, int(a), int(b)) for u, (a, b) in zip(units, span)], [i.opcode for i in prog.instrs],
                    float(cfg.clock_mhz), [dict(s) for s in secs],
                    str(prog.meta.get("symbol", prog.meta.get("layer", "npu"))))


def _full_report(prog: Program, cfg: NPUConfig,
                 order: list[int] | None = None) -> tuple[dict[str, Any], Timeline]:
    """layer_report plus, when ``meta`` has "layers", the per-section reports; and the timeline."""
    total, busy, span = timeline(prog, cfg, order=order)
    report = layer_report(prog, cfg, total, busy)
    if "layers" in prog.meta:
        report["sections"] = section_reports(prog, cfg, span)
    return report, _as_timeline(prog, cfg, total, busy, span)


@dataclass
class SimResult:
    """outputs: output regions (None in perf mode); report: layer report (None in func mode); timeline:
    per-instruction start / end per unit (None in func mode; ``hw_model.trace.write_chrome_trace`` draws it)."""

    outputs: dict[str, np.ndarray] | None
    report: dict[str, Any] | None
    timeline: Timeline | None = None


def simulate(prog: Program, inputs: dict[str, np.ndarray] | None, cfg: NPUConfig = DEFAULT_CONFIG,
             mode: str = "both") -> SimResult:
    """Run ``prog`` in mode ``func`` / ``perf`` / ``both`` (see module docstring); the report has
    ``sections`` (:func:`section_reports`) when ``prog.meta`` has "layers"."""
    from hw_model.functional import Machine
    if mode not in ("func", "perf", "both"):
        raise ValueError(f"simulate: mode must be func, perf or both, got {mode!r}")
    if mode == "perf":
        prog.ensure_valid(cfg)
        return SimResult(None, *_full_report(prog, cfg))
    if inputs is None:
        raise ValueError(f"simulate: mode {mode!r} needs the input regions")
    machine = Machine(prog, inputs, cfg)
    executed: list[int] = []
    outputs = machine.run(on_instr=(lambda k, _i: executed.append(k)) if mode == "both" else None)
    if mode == "func":
        return SimResult(outputs, None)
    report, tl = _full_report(prog, cfg, order=executed)
    perf, _ = _full_report(prog, cfg)
    if perf != report:
        raise RuntimeError(f"cycle model: perf ({perf['cycles']}) and both ({report['cycles']}) disagree")
    return SimResult(outputs, report, tl)
