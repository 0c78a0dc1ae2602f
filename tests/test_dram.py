"""DRAM model: placement, the byte image and its aliasing views, live ranges and the memory-map check,
SYNC barriers and per-section reports of a linked stream (a small linker written here for the test)."""
import copy

import numpy as np
import pytest

from hw_model import reference as ref
from hw_model.builder import ProgramBuilder, pack_nhwc, unpack_nhwc
from hw_model.config import DEFAULT_CONFIG, NPUConfig
from hw_model.cycles import UNITS, instr_cost, layer_report, section_reports, simulate, timeline
from hw_model.dram import DRAM_ALIGN, DramImage, align, check_memory_map, dram_bytes, live_ranges, place
from hw_model.functional import Machine, run_program
from hw_model.isa import Load, Program, Region, Store, Sync
from hw_model.layer_specs import ConvSpec, PoolSpec, Tiling
from hw_model.layers import build_conv
from hw_model.layers_alu import build_layer

CFG = NPUConfig(instr_overhead_cycles=8, dram_bytes_per_cycle=16.0, pe_arrays=4, pixels_per_cycle=4, post_lanes=2)


def test_align_place_and_dram_bytes():
    assert DRAM_ALIGN == 64 and [align(n) for n in (0, 1, 64, 65)] == [0, 64, 64, 128]
    regs = {"a": Region("a", "int8", 10, "input"), "b": Region("b", "float32", 20, "const", np.zeros(20)),
            "c": Region("c", "int32", 0, "scratch"), "d": Region("d", "int8", 1, "output")}
    assert dram_bytes(regs) == 0
    end = place(regs)
    assert [r.addr for r in regs.values()] == [0, 64, 192, 192] and end == 256 == dram_bytes(regs)
    regs["e"] = Region("e", "int8", 3, "scratch")
    regs["f"] = Region("f", "int8", 3, "scratch", addr=1000)       # placed regions stay, new ones go after them
    assert place(regs, start=100) == 1088 and regs["e"].addr == 1024 and regs["f"].addr == 1000
    assert place({"g": Region("g", "int8", 1, "input")}, start=70) == 192


def test_builder_places_every_region():
    rng = np.random.default_rng(0)
    spec = ConvSpec(1, 20, 5, 5, 18, rng.integers(-8, 8, (18, 20, 3, 3)).astype(np.int8),
                    np.ones(18, np.float32), np.zeros(18, np.float32), pads=(1, 1, 1, 1))
    prog = build_conv(spec)
    addrs = [(r.addr, r.nbytes) for r in prog.regions.values()]
    assert all(a % DRAM_ALIGN == 0 for a, _ in addrs)
    for (a0, n0), (a1, _) in zip(addrs, addrs[1:]):
        assert a1 == align(a0 + n0)                                     # back to back, in allocation order
    assert prog.dram_bytes == align(addrs[-1][0] + addrs[-1][1])
    b = ProgramBuilder()
    b.alloc("x", "int8", 4, "input", addr=128)
    b.alloc("y", "int8", 4, "output")
    assert b.finish().regions["y"].addr == 192


def test_image_views_are_typed_little_endian_and_alias():
    regs = {"a": Region("a", "int32", 4, "scratch", addr=0), "b": Region("b", "uint8", 16, "scratch", addr=0),
            "c": Region("c", "float32", 2, "const", np.array([1.5, -2], np.float32), addr=64)}
    prog = Program([], regs)
    img = DramImage(prog)
    assert img.nbytes == 128 and img.bytes.dtype == np.uint8
    assert np.array_equal(img.view("c"), [1.5, -2]) and img.view("c").dtype == np.float32
    img.view("a")[1] = 0x01020304
    assert img.bytes[4:8].tolist() == [4, 3, 2, 1] and img.view("b")[4:8].tolist() == [4, 3, 2, 1]
    img.view("b")[0] = 255
    assert img.view("a")[0] == 255 and img.view("a").flags.writeable
    with pytest.raises(ValueError, match="no address"):
        DramImage(Program([], {"z": Region("z", "int8", 1, "input")}))


def test_machine_dram_is_views_into_one_image():
    rng = np.random.default_rng(1)
    spec = ConvSpec(1, 16, 4, 4, 16, rng.integers(-8, 8, (16, 16, 1, 1)).astype(np.int8),
                    np.ones(16, np.float32), np.zeros(16, np.float32))
    prog = build_conv(spec)
    x = rng.integers(-128, 128, 256).astype(np.int8)
    m = Machine(prog, {"x": x})
    for name, r in prog.regions.items():
        assert np.shares_memory(m.dram[name], m.image.bytes) and m.dram[name].size == r.size
    assert np.array_equal(m.dram["x"], x) and np.array_equal(m.dram["w"], prog.regions["w"].data)
    out = m.run()["out"]
    assert not np.shares_memory(out, m.image.bytes) and np.array_equal(out, m.dram["out"])


def _pipeline(t_region="t", second_src="t"):
    """x -> (max over pixel pairs) -> t -> SYNC -> (copy) -> out; x, t, out may share bytes."""
    b = ProgramBuilder()
    b.alloc("x", "int8", 64, "input", addr=0)
    b.alloc(t_region, "int8", 32, "scratch", addr=0)
    b.alloc("out", "int8", 32, "output", addr=0)
    win = dict(in_row_stride=64, in_pix_stride=16, oh=1, cols=16, kh=1, stride_h=1)
    b.load("x", 0, "spad", 0, 1, 1, 64, 0, 0, push_next=True)                                      # 0
    b.alu_max(in_addr=0, out_addr=64, ow=2, kw=2, stride_w=2, **win, pop_prev=True, push_next=True)  # 1
    b.store(64, t_region, 0, 1, 1, 32, 0, 0, pop_prev=True, push_prev=True)                        # 2
    b.sync(pop_next=True, push_prev=True)                                                            # 3
    b.load(second_src, 0, "spad", 128, 1, 1, 32, 0, 0, pop_next=True, push_next=True)              # 4
    b.alu_max(in_addr=128, out_addr=192, ow=2, kw=1, **win, pop_prev=True, push_next=True)           # 5
    b.store(192, "out", 0, 1, 1, 32, 0, 0, pop_prev=True)                                           # 6
    return b


def test_regions_sharing_bytes_with_disjoint_lifetimes_run_right():
    prog = _pipeline().finish()
    assert live_ranges(prog) == {"x": (-1, 0), "t": (2, 4), "out": (6, 7)}
    assert prog.dram_bytes == 64                                         # all three in one 64-byte block
    x = np.random.default_rng(2).integers(-128, 128, 64).astype(np.int8)
    want = np.concatenate([np.maximum(x[0:16], x[16:32]), np.maximum(x[32:48], x[48:64])])  # pixel pairs
    assert np.array_equal(run_program(prog, {"x": x})["out"], want)
    assert not np.array_equal(want, x[:32])


def test_overlapping_lifetimes_and_bad_addresses_are_rejected():
    b = _pipeline(second_src="x")                                        # x stays live until #4, t is stored at #2
    with pytest.raises(ValueError, match="share bytes while both are live") as e:
        b.finish()
    assert "'x' (bytes 0..63, live -1..4)" in str(e.value) and "'t' (bytes 0..31, live 2..2)" in str(e.value)
    prog = _pipeline().finish()
    for name, addr, match in (("t", None, "'t' has no address"), ("t", -64, "'t': address must be"),
                              ("t", 1.5, "'t': address must be")):
        bad = copy.deepcopy(prog)
        bad.regions[name].addr = addr
        with pytest.raises(ValueError, match=match):
            bad.validate()
    bad = Program([], {"w": Region("w", "int32", 2, "const", np.zeros(2, np.int32), addr=66)})
    with pytest.raises(ValueError, match="'w': address 66 is not a multiple of its itemsize 4"):
        check_memory_map(bad)
    two_inputs = Program([], {"a": Region("a", "int8", 64, "input", addr=0),
                              "b": Region("b", "int8", 64, "input", addr=32)})
    assert live_ranges(two_inputs) == {"a": (-1, -1), "b": (-1, -1)}
    with pytest.raises(ValueError, match="'a'.*'b'"):                   # both written by the host at once
        two_inputs.validate()
    untouched = Program([], {"a": Region("a", "int8", 64, "scratch", addr=0),
                             "b": Region("b", "int8", 64, "input", addr=0)})
    untouched.validate()                                                 # a scratch no one touches is never live


def test_sync_token_flow_and_cost():
    prog = _pipeline().finish()
    sync = prog.instrs[3]
    assert isinstance(sync, Sync) and sync.opcode == "SYNC" and sync.queue == "compute"
    assert sync.to_dict() == {"op": "SYNC", "pop_prev": False, "pop_next": True, "push_prev": True,
                              "push_next": False}
    assert instr_cost(sync, prog, CFG) == ("sync", CFG.instr_overhead_cycles) and "sync" in UNITS
    _, busy, span = timeline(prog, CFG)
    assert span[3][0] == span[2][1]                                     # waits for the STORE before it
    assert span[4][0] == span[3][1]                                     # the next layer's LOAD waits for it
    assert busy["sync"] == CFG.instr_overhead_cycles
    for k in (2, 3):                                                     # drop a push: the pop never returns
        bad = copy.deepcopy(prog)
        bad.instrs[k].push_prev = False
        with pytest.raises(ValueError, match="deadlock"):
            bad.validate()
    assert Program.from_json(prog.to_json()).instrs == prog.instrs


# ------------------------------------------------------------------ a linked stream (the linker's contract)
def _link(progs: list[Program], names: list[str]) -> Program:
    """Concatenate single-input layer programs: out of layer j is x of layer j+1 (one scratch region
    't{j}'), SYNC between layers, every other region renamed 'L{j}.name'; regions placed afresh."""
    regions: dict[str, Region] = {}
    instrs, layers = [], []
    for j, p in enumerate(progs):
        ren = {n: f"L{j}.{n}" for n in p.regions}
        if j > 0:
            ren["x"] = f"t{j - 1}"
        if j < len(progs) - 1:
            ren["out"] = f"t{j}"
        for n, r in p.regions.items():
            if ren[n] in regions:
                assert regions[ren[n]].size == r.size and regions[ren[n]].dtype == r.dtype
                continue
            kind = "scratch" if ren[n].startswith("t") else r.kind
            regions[ren[n]] = Region(ren[n], r.dtype, r.size, kind, r.data)
        body = [copy.deepcopy(i) for i in p.instrs]
        for i in body:
            if isinstance(i, (Load, Store)):
                i.region = ren[i.region]
            if isinstance(i, Load) and i.gather:
                i.gather = ren[i.gather]
        start = len(instrs)
        if j > 0:
            next(i for i in reversed(instrs) if isinstance(i, Store)).push_prev = True
            instrs.append(Sync(pop_next=True, push_prev=True))
            next(i for i in body if isinstance(i, Load)).pop_next = True
        instrs += body
        layers.append({"name": names[j], "start": start, "end": len(instrs), "macs": p.meta["macs"],
                       "groups": p.meta["groups"]})
    place(regions)
    return Program(instrs, regions, {"layer": "region", "layers": layers})


def _chain(rng, cfg):
    """depthwise conv (scaled groups: output in group order) -> max pool (keeps it) -> conv (gathers)."""
    c, h, k = 24, 6, 20
    gv1 = rng.integers(0, 3, c)
    dw = ConvSpec(1, c, h, h, c, rng.integers(-8, 8, (c, 1, 3, 3)).astype(np.int8),
                  rng.uniform(1e-2, 3e-2, c).astype(np.float32), rng.uniform(-3, 3, c).astype(np.float32),
                  pads=(1, 1, 1, 1), groups=c, x_zp=3, isg_groups=gv1)
    pool = PoolSpec("max", 1, c, h, h, (2, 2), (2, 2))
    gv2 = rng.integers(0, 3, c)
    conv = ConvSpec(1, c, h // 2, h // 2, k, rng.integers(-8, 8, (k, c, 3, 3)).astype(np.int8),
                    rng.uniform(1e-3, 3e-3, k).astype(np.float32), rng.uniform(-3, 3, k).astype(np.float32),
                    pads=(1, 1, 1, 1), x_zp=-2, isg_groups=gv2)
    t = Tiling(ob_tile=1, rows=1, cb_tile=1, nbuf=2)
    p0 = build_layer(dw, t, cfg)
    p1 = build_layer(pool, t, cfg, in_slots=[np.array(p0.meta["output"]["slots"])])
    p2 = build_layer(conv, t, cfg, in_slots=[np.array(p1.meta["output"]["slots"])])
    x = rng.integers(-128, 128, (1, c, h, h)).astype(np.int8)
    y0 = ref.conv2d(x, 3, dw.weight, dw.m, dw.b, -128, 127, groups=c, pads=(1, 1, 1, 1), isg_groups=gv1)
    y1 = ref.max_pool2d(y0, (2, 2), (2, 2), (0, 0, 0, 0))
    want = ref.conv2d(y1, -2, conv.weight, conv.m, conv.b, -128, 127, pads=(1, 1, 1, 1), isg_groups=gv2)
    return [p0, p1, p2], x, want


def test_linked_stream_runs_bit_exact_and_sections_sum_to_the_total():
    rng = np.random.default_rng(3)
    progs, x, want = _chain(rng, CFG)
    assert progs[0].meta["output"]["slots"] == list(range(24)) + [-1] * 8  # depthwise keeps the stored order
    assert progs[1].meta["gathered_loads"] == 0 and progs[2].meta["gathered_loads"] > 0
    prog = _link(progs, ["dw", "pool", "conv"])
    prog.validate(CFG)
    inp = {"L0.x": pack_nhwc(x, np.array(progs[0].meta["inputs"]["x"]["slots"]))}
    res = simulate(prog, inp, CFG, mode="both")
    out = progs[2].meta["output"]
    assert np.array_equal(unpack_nhwc(res.outputs["L2.out"], tuple(out["shape"]), np.array(out["slots"])), want)
    rep = res.report
    secs = rep["sections"]
    assert [s["layer"] for s in secs] == ["dw", "pool", "conv"]
    assert sum(s["cycles"] for s in secs) == rep["cycles"] and all(s["cycles"] > 0 for s in secs)
    assert sum(s["instructions"] for s in secs) == len(prog.instrs)
    for key in ("bytes_loaded", "bytes_stored", "macs"):
        assert sum(s[key] for s in secs) == (rep[key] if key != "macs" else sum(p.meta["macs"] for p in progs))
    for u in UNITS:
        assert sum(s["busy"][u] for s in secs) == rep["busy"][u]
    assert secs[2]["macs"] == progs[2].meta["macs"] and secs[1]["groups"] == 0
    perf = simulate(prog, None, CFG, mode="perf").report
    assert perf == rep
    # each section costs at least what its layer costs alone, minus the overlap with the previous one
    alone = [layer_report(p, CFG)["cycles"] for p in progs]
    assert rep["cycles"] <= sum(alone) + 2 * CFG.instr_overhead_cycles


def test_linked_stream_reuses_memory_when_lifetimes_allow():
    rng = np.random.default_rng(4)
    progs, x, want = _chain(rng, DEFAULT_CONFIG)
    prog = _link(progs, ["dw", "pool", "conv"])
    r = prog.regions
    live = live_ranges(prog)
    assert live["L0.x"][1] < live["t1"][0] and live["t0"][1] < live["L2.out"][0]
    bad = copy.deepcopy(prog)
    r["t1"].addr, r["L2.out"].addr = r["L0.x"].addr, r["t0"].addr   # the planner's reuse
    prog.validate()
    inp = {"L0.x": pack_nhwc(x, np.array(progs[0].meta["inputs"]["x"]["slots"]))}
    out = progs[2].meta["output"]
    got = run_program(prog, inp)["L2.out"]
    assert np.array_equal(unpack_nhwc(got, tuple(out["shape"]), np.array(out["slots"])), want)
    bad.regions["t0"].addr = bad.regions["L0.x"].addr                 # x is still read after t0's first STORE
    with pytest.raises(ValueError, match="'L0.x' .*'t0' .*share bytes while both are live"):
        bad.validate()


def test_section_reports_reject_bad_sections():
    progs, _, _ = _chain(np.random.default_rng(5), CFG)
    prog = _link(progs, ["a", "b", "c"])
    secs = prog.meta["layers"]
    for bad in ([], [dict(secs[0], end=secs[0]["end"] - 1)] + secs[1:], secs[:2], [secs[1], secs[0], secs[2]]):
        prog.meta["layers"] = bad
        with pytest.raises(ValueError, match="section"):
            section_reports(prog, CFG)
    prog.meta["layers"] = secs
    assert len(section_reports(prog, CFG)) == 3
    single = build_conv(ConvSpec(1, 16, 4, 4, 16, np.ones((16, 16, 1, 1), np.int8), np.ones(16, np.float32),
                                 np.zeros(16, np.float32)), cfg=CFG)
    assert "sections" not in simulate(single, None, CFG, mode="perf").report
