"""Chrome trace-event writer: well-formed events whose per-unit busy time equals the cycle report's."""
import json

import numpy as np
import pytest

from hw_model.config import DEFAULT_CONFIG as CFG
from hw_model.cycles import UNITS, instruction_timeline, simulate
from hw_model.layer_specs import ConvSpec, Tiling
from hw_model.layers import build_conv
from hw_model.layers_alu import pack_inputs
from hw_model.trace import SECTION_TID, write_chrome_trace


def _prog(seed: int, c: int = 20, k: int = 18, groups: int = 3, tiling: Tiling | None = None):
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (1, c, 6, 7)).astype(np.int8)
    w = rng.integers(-8, 8, (k, c, 3, 3)).astype(np.int8)
    gv = rng.integers(0, groups, c) if groups > 1 else None
    spec = ConvSpec(1, c, 6, 7, k, w, np.full(k, 1e-3, np.float32), np.zeros(k, np.float32), pads=(1, 1, 1, 1),
                    isg_groups=gv)
    prog = build_conv(spec, cfg=CFG, tiling=tiling)
    return prog, pack_inputs(prog, x)


def _x_events(path):
    d = json.loads(path.read_text())
    assert set(d) >= {"traceEvents"}
    ev = d["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "thread_name"}
    assert [names[t] for t in range(1, len(UNITS) + 1)] == list(UNITS) and names[SECTION_TID] == "layers"
    xs = [e for e in ev if e["ph"] == "X"]
    for e in xs:
        assert {"name", "ph", "ts", "dur", "pid", "tid", "args"} <= set(e)
        assert e["ts"] >= 0 and e["dur"] >= 0 and e["tid"] in names
    return xs, names


def _busy_us(xs, names):
    out = dict.fromkeys(UNITS, 0.0)
    for e in xs:
        if e["tid"] != SECTION_TID:
            out[names[e["tid"]]] += e["dur"]
    return out


@pytest.mark.parametrize("seed,groups,tiling", [(0, 1, None), (1, 3, None), (2, 2, Tiling(rows=2, nbuf=2)),
                                                (3, 3, Tiling(ob_tile=1, rows=1, cb_tile=1, nbuf=1))])
def test_trace_busy_equals_cycle_report(tmp_path, seed, groups, tiling):
    prog, inp = _prog(seed, groups=groups, tiling=tiling)
    res = simulate(prog, inp, CFG, mode="both")
    path = write_chrome_trace(res.timeline, tmp_path / "t.json")
    xs, names = _x_events(path)
    assert len([e for e in xs if e["tid"] != SECTION_TID]) == len(prog.instrs)
    busy = _busy_us(xs, names)
    for u in UNITS:  # microseconds at clock_mhz: compare in cycles
        assert round(busy[u] * CFG.clock_mhz) == res.report["busy"][u], u
    assert max(e["args"]["end_cycle"] for e in xs) == res.report["cycles"]
    assert sorted(e["args"]["instruction"] for e in xs) == list(range(len(prog.instrs)))
    # the same timeline from the Program alone (perf mode) gives the same file
    assert write_chrome_trace(prog, tmp_path / "p.json").read_text() == path.read_text()


def test_trace_sections_and_streams_end_to_end(tmp_path):
    prog, _ = _prog(5)
    n = len(prog.instrs)
    prog.meta["layers"] = [{"name": "a", "start": 0, "end": n // 2}, {"name": "b", "start": n // 2, "end": n}]
    tl = instruction_timeline(prog, CFG)
    path = write_chrome_trace([tl, tl], tmp_path / "two.json")
    xs, names = _x_events(path)
    secs = [e for e in xs if e["tid"] == SECTION_TID]
    assert [e["name"] for e in secs] == ["a", "b", "a", "b"]
    assert round(sum(e["dur"] for e in secs) * CFG.clock_mhz) == 2 * tl.total  # sections tile the time axis
    busy = _busy_us(xs, names)
    assert all(round(busy[u] * CFG.clock_mhz) == 2 * tl.busy[u] for u in UNITS)
    second = [e for e in xs if e["tid"] != SECTION_TID and e["args"]["timeline"] == 1]
    assert min(e["args"]["start_cycle"] for e in second) >= tl.total  # laid after the first


def test_trace_refuses_bad_input(tmp_path):
    prog, inp = _prog(6)
    with pytest.raises(TypeError, match="SimResult.timeline"):
        write_chrome_trace([simulate(prog, inp, CFG).report], tmp_path / "x.json")
    with pytest.raises(TypeError, match="Timeline"):
        write_chrome_trace([], tmp_path / "x.json")
    with pytest.raises(IsADirectoryError):
        write_chrome_trace(prog, tmp_path)
    assert simulate(prog, inp, CFG, mode="func").timeline is None
