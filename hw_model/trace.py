"""Chrome trace-event JSON of the cycle model's timeline: one row per NPU unit (load, MAC, accumulator,
post, ALU, store, sync), one complete event (``"ph": "X"``) per instruction, plus one row of layer
sections. Perfetto (ui.perfetto.dev) and ``chrome://tracing`` open the file.

Times are microseconds at the configuration's clock (``ts`` / ``dur`` = cycles / ``clock_mhz``); each
event's ``args`` carries the instruction index, opcode and its start / end in cycles. Several timelines
(the region streams of one model run, run one after another) are laid end to end on the same axis.
Format: the Trace Event Format's JSON object form, ``{"traceEvents": [...], "displayTimeUnit": "ns"}``.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hw_model.config import DEFAULT_CONFIG, NPUConfig
from hw_model.cycles import UNITS, Timeline, instruction_timeline
from hw_model.program import Program

PID = 1
"""The one process of the trace (the NPU)."""
SECTION_TID = len(UNITS) + 1
"""Thread id of the layer-section row (units are 1..len(UNITS) in :data:`hw_model.cycles.UNITS` order)."""


def trace_events(timelines: Sequence[Timeline]) -> list[dict[str, Any]]:
    """Trace events of ``timelines`` laid end to end: metadata (process / thread names), one ``X`` event per
    instruction on its unit's row, one per layer section on the section row."""
    tids = {u: n + 1 for n, u in enumerate(UNITS)}
    ev: list[dict[str, Any]] = [{"ph": "M", "pid": PID, "tid": 0, "name": "process_name", "args": {"name": "NPU"}}]
    for u, tid in tids.items():
        ev.append({"ph": "M", "pid": PID, "tid": tid, "name": "thread_name", "args": {"name": u}})
        ev.append({"ph": "M", "pid": PID, "tid": tid, "name": "thread_sort_index", "args": {"sort_index": tid}})
    ev.append({"ph": "M", "pid": PID, "tid": SECTION_TID, "name": "thread_name", "args": {"name": "layers"}})
    offset = 0  # cycles
    for n, tl in enumerate(timelines):
        us = 1.0 / tl.clock_mhz
        for k, ((unit, start, end), op) in enumerate(zip(tl.spans, tl.opcodes)):
            ev.append({"ph": "X", "pid": PID, "tid": tids[unit], "name": op, "cat": unit,
                       "ts": (offset + start) * us, "dur": (end - start) * us,
                       "args": {"stream": tl.name, "timeline": n, "instruction": k, "start_cycle": offset + start,
                                "end_cycle": offset + end}})
        done = 0
        for sec in tl.sections:
            end = max([done] + [tl.spans[k][2] for k in range(sec["start"], sec["end"])])
            ev.append({"ph": "X", "pid": PID, "tid": SECTION_TID, "name": str(sec.get("name", "?")), "cat": "layer",
                       "ts": (offset + done) * us, "dur": (end - done) * us,
                       "args": {"stream": tl.name, "instructions": [sec["start"], sec["end"]]}})
            done = end
        offset += tl.total
    return ev


def write_chrome_trace(report_or_timeline: Timeline | Program | Sequence[Timeline | Program],
                       path: str | Path, cfg: NPUConfig = DEFAULT_CONFIG) -> Path:
    """Write the Chrome trace-event JSON of one or several timelines to ``path`` and return the path.

    ``report_or_timeline``: a :class:`hw_model.cycles.Timeline` (``SimResult.timeline`` of ``simulate`` in
    perf / both mode, or :func:`hw_model.cycles.instruction_timeline`), a Program (its timeline is computed
    with ``cfg``), or a sequence of them (laid end to end, e.g. the region streams of one model run).
    The file is written to a temporary file in the same folder, then renamed."""
    items = [report_or_timeline] if isinstance(report_or_timeline, (Timeline, Program)) else report_or_timeline
    if isinstance(items, (str, bytes, dict)) or not isinstance(items, Sequence) or not items:
        raise TypeError("write_chrome_trace: expected a Timeline, a Program or a non-empty list of them, got "
                        f"{type(report_or_timeline).__name__}")
    tls = []
    for it in items:
        if isinstance(it, Program):
            tls.append(instruction_timeline(it, cfg))
        elif isinstance(it, Timeline):
            tls.append(it)
        else:
            raise TypeError(f"write_chrome_trace: expected a Timeline or a Program, got {type(it).__name__} "
                            "(a cycle report dict has no per-instruction times: pass SimResult.timeline)")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"write_chrome_trace: {str(path)!r} is a directory")
    text = json.dumps({"traceEvents": trace_events(tls), "displayTimeUnit": "ns"})
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
