"""Cycle model: per-instruction cost, load / compute / store overlap through the dependency tokens.

Costs (cycles; see docs/cycle_model.md), every instruction adds ``cfg.instr_overhead_cycles``:
  LOAD / STORE      ceil(bytes moved / dram_bytes_per_cycle)                      unit load / store
  GEMM              ceil(pixels * n_ob * n_cb * kh * kw / (pe_arrays * pixels_per_cycle)) unit mac
                    (depthwise: n_cb = 1 per output block: one 16-lane block-tap per cycle)
  GROUP_SHIFT_ADD   steps (pipelined behind the MACs: only the stage latency shows), unit acc;
                    steps = (sign != 0: one shift cycle) + (not init: one combine cycle).
                    3 groups: 1 + 2 + 1 = 4 (journal App. A-B), 2 groups: 1 + 1 = 2, 1 group: none.
  NORM_ACT_QUANT    ceil(values / (post_lanes * pe_arrays))                       unit post
  ALU_ADD / MAX / SUM  ceil(values read / (post_lanes * pe_arrays))              unit alu
The three queues run in order; an instruction starts when its queue is free and every token it
pops has been pushed (FIFO per token channel).

Modes (as Gemmini's simulators): ``func`` values only, ``perf`` cycles only (pure arithmetic over
the instructions), ``both`` values and cycles, with a check that the cycles equal ``perf``'s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from hw_model.config import DEFAULT_CONFIG, NPUConfig
from hw_model.isa import AluAdd, AluMax, AluSum, Gemm, GroupShiftAdd, Instr, Load, NormActQuant, Program, Store

UNITS = ("load", "mac", "acc", "post", "alu", "store")


def instr_cost(ins: Instr, prog: Program, cfg: NPUConfig = DEFAULT_CONFIG) -> tuple[str, int]:
    """(unit, cycles) of one instruction, overhead included."""
    lanes = cfg.pe_arrays * cfg.pixels_per_cycle
    # journal App. A-D synthesises MAC -> WAPS -> BN -> ACT -> Quant as one block per 16x16 array, each
    # post stage "8 data in 1 cycle": every array has its own 8-lane post path (ALU ops use it too)
    post = cfg.post_lanes * cfg.pe_arrays
    if isinstance(ins, (Load, Store)):
        nbytes = ins.n0 * ins.n1 * ins.n2 * np.dtype(prog.regions[ins.region].dtype).itemsize
        unit, c = ("load" if isinstance(ins, Load) else "store"), math.ceil(nbytes / cfg.dram_bytes_per_cycle)
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


def layer_report(prog: Program, cfg: NPUConfig = DEFAULT_CONFIG, total: int | None = None,
                 busy: dict[str, int] | None = None) -> dict[str, Any]:
    """JSON-serialisable per-layer report: cycles, us, MACs, utilisation, groups, bytes, busy per unit."""
    if total is None or busy is None:
        total, busy, _ = timeline(prog, cfg)
    macs = int(prog.meta.get("macs", 0))
    peak = cfg.macs_per_cycle
    nbytes = {q: sum(i.n0 * i.n1 * i.n2 * np.dtype(prog.regions[i.region].dtype).itemsize
                     for i in prog.instrs if isinstance(i, cls)) for q, cls in (("load", Load), ("store", Store))}
    return {"layer": prog.meta.get("layer", "?"), "cycles": int(total), "us": total / cfg.clock_mhz,
            "macs": macs, "mac_utilisation": macs / (total * peak) if total else 0.0,
            "groups": int(prog.meta.get("groups", 0)), "instructions": len(prog.instrs),
            "bytes_loaded": int(nbytes["load"]), "bytes_stored": int(nbytes["store"]),
            "busy": {u: int(v) for u, v in busy.items()}}


@dataclass
class SimResult:
    """outputs: output regions (None in perf mode); report: layer report (None in func mode)."""

    outputs: dict[str, np.ndarray] | None
    report: dict[str, Any] | None


def simulate(prog: Program, inputs: dict[str, np.ndarray] | None, cfg: NPUConfig = DEFAULT_CONFIG,
             mode: str = "both") -> SimResult:
    """Run ``prog`` in mode ``func`` / ``perf`` / ``both`` (see module docstring)."""
    from hw_model.functional import Machine
    if mode not in ("func", "perf", "both"):
        raise ValueError(f"simulate: mode must be func, perf or both, got {mode!r}")
    if mode == "perf":
        prog.validate(cfg)
        return SimResult(None, layer_report(prog, cfg))
    if inputs is None:
        raise ValueError(f"simulate: mode {mode!r} needs the input regions")
    machine = Machine(prog, inputs, cfg)
    executed: list[int] = []
    outputs = machine.run(on_instr=(lambda k, _i: executed.append(k)) if mode == "both" else None)
    if mode == "func":
        return SimResult(outputs, None)
    total, busy, _ = timeline(prog, cfg, order=executed)
    report = layer_report(prog, cfg, total, busy)
    perf = layer_report(prog, cfg)
    if perf != report:
        raise RuntimeError(f"cycle model: perf ({perf['cycles']}) and both ({report['cycles']}) disagree")
    return SimResult(outputs, report)
