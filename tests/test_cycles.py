"""Cycle model: hand-computed counts for small programs, group extra cycles, overlap, report and plot."""
import json

import numpy as np
import pytest

from hw_model.builder import ProgramBuilder
from hw_model.config import NPUConfig
from hw_model.cycles import instr_cost, layer_report, simulate, timeline
from hw_model.layer_specs import ConvSpec, Tiling
from hw_model.layers import build_conv
from hw_model.layers_alu import run_layer
from hw_model.report import network_report, plot_breakdown, save_report

CFG = NPUConfig(instr_overhead_cycles=8, dram_bytes_per_cycle=16.0, pe_arrays=4, pixels_per_cycle=4, post_lanes=2)
"""post path: post_lanes x pe_arrays = 8 values per cycle in the hand counts below."""


def _b():
    b = ProgramBuilder(CFG)
    b.alloc("x", "int8", 4096, "input")
    b.alloc("out", "int8", 4096, "output")
    return b


def test_single_instruction_costs_by_hand():
    b = _b()
    ld = b.load("x", 0, "spad", 0, 2, 3, 16, 48, 16)                      # 96 B / 16 B/cycle = 6
    g = b.gemm(acc_addr=0, acc_stride=16, in_addr=0, in_row_stride=48, in_pix_stride=32, w_addr=0, w_row_stride=16,
               n_ob=1, n_cb=2, kh=1, kw=1, oh=2, ow=3)                     # 6 px * 1 * 2 = 12 / 16 -> 1
    s1 = b.group_shift_add(d1_addr=0, d1_stride=16, d2_addr=96, d2_stride=16, rows=40, cols=16, sign=-1, init=True)
    s2 = b.group_shift_add(d1_addr=0, d1_stride=16, d2_addr=96, d2_stride=16, rows=40, cols=16, sign=1, init=False)
    s3 = b.group_shift_add(d1_addr=0, d1_stride=16, d2_addr=96, d2_stride=16, rows=40, cols=16, sign=0, init=False)
    n = b.norm_act_quant(acc_addr=96, acc_stride=16, out_addr=0, out_stride=16, rows=6, cols=16, m_addr=0,
                         b_addr=16, lo=-128, hi=127)                       # 96 / 8 = 12
    prog = b.finish(validate=False)
    assert instr_cost(ld, prog, CFG) == ("load", 6 + 8)
    assert instr_cost(g, prog, CFG) == ("mac", 1 + 8)
    # pipelined behind the MACs: each costs its steps; scaled+init 1, scaled+combine 2, unity+combine 1 -> 4
    assert [instr_cost(s, prog, CFG)[1] - 8 for s in (s1, s2, s3)] == [1, 2, 1]
    assert instr_cost(n, prog, CFG) == ("post", 12 + 8)


def test_serial_chain_and_overlap_by_hand():
    b = _b()
    b.load("x", 0, "spad", 0, 1, 1, 160, 0, 0, push_next=True)            # 10 + 8 = 18
    b.load("x", 0, "spad", 160, 1, 1, 320, 0, 0, push_next=True)          # 20 + 8 = 28, ends at 46
    kw = dict(acc_addr=0, acc_stride=16, out_addr=512, out_stride=16, rows=10, cols=16, m_addr=0, b_addr=16,
              lo=-128, hi=127)
    b.norm_act_quant(**kw, pop_prev=True, push_next=True)                 # 20 + 8 = 28: 18 -> 46
    b.norm_act_quant(**kw, pop_prev=True, push_next=True)                 # waits for load 2: 46 -> 74
    b.store(512, "out", 0, 1, 1, 160, 0, 0, pop_prev=True)                # 18: 46 -> 64
    b.store(512, "out", 0, 1, 1, 160, 0, 0, pop_prev=True)                # 74 -> 92
    prog = b.finish()
    total, busy, span = timeline(prog, CFG)
    assert span == [(0, 18), (18, 46), (18, 46), (46, 74), (46, 64), (74, 92)]
    assert total == 92 and busy["load"] == 46 and busy["post"] == 56 and busy["store"] == 36


def test_back_pressure_token_delays_load():
    b = _b()
    b.load("x", 0, "spad", 0, 1, 1, 16, 0, 0, push_next=True)             # 9: 0 -> 9
    b.norm_act_quant(acc_addr=0, acc_stride=16, out_addr=512, out_stride=16, rows=80, cols=16, m_addr=0,
                     b_addr=16, lo=-128, hi=127, pop_prev=True, push_prev=True)   # 160 + 8: 9 -> 177
    b.load("x", 0, "spad", 0, 1, 1, 16, 0, 0, pop_next=True)              # must wait: 177 -> 186
    total, _, span = timeline(b.finish(), CFG)
    assert span[2] == (177, 186) and total == 186


@pytest.mark.parametrize("present,extra_steps", [([0], 0), ([1, 0], 2), ([1, 2], 3), ([1, 2, 0], 4)])
def test_group_extra_cycles_per_accumulation(present, extra_steps):
    """Journal App. A-B: 4 extra accumulator cycles with 3 groups; scaled + unity: 2; one group: none."""
    ngroups = len(present)
    c = 16 * ngroups
    gv = np.repeat(present, 16)
    rng = np.random.default_rng(0)
    spec = ConvSpec(1, c, 4, 4, 16, rng.integers(-3, 3, (16, c, 1, 1)).astype(np.int8),
                    np.ones(16, np.float32), np.zeros(16, np.float32), isg_groups=gv)
    prog = build_conv(spec, Tiling(ob_tile=1, rows=4, cb_tile=4, nbuf=1), CFG)
    rep = layer_report(prog, CFG)
    n_gsa = sum(i.opcode == "GROUP_SHIFT_ADD" for i in prog.instrs)
    # one tile of 16 px x 1 block = 1 vector per lane group (16 lanes): extra = steps x 1 cycle
    assert rep["busy"]["acc"] - n_gsa * CFG.instr_overhead_cycles == extra_steps
    assert rep["groups"] == ngroups


def test_perf_mode_has_no_values_and_report_is_json():
    rng = np.random.default_rng(3)
    spec = ConvSpec(1, 20, 6, 6, 20, rng.integers(-3, 3, (20, 20, 3, 3)).astype(np.int8),
                    np.ones(20, np.float32) * 1e-2, np.zeros(20, np.float32), pads=(1, 1, 1, 1),
                    isg_groups=rng.integers(0, 3, 20))
    prog = build_conv(spec, cfg=CFG)
    res = simulate(prog, None, CFG, mode="perf")
    assert res.outputs is None
    rep = json.loads(json.dumps(res.report))
    assert rep["cycles"] > 0 and rep["macs"] == spec.macs() and 0 < rep["mac_utilisation"] <= 1
    assert rep["us"] == pytest.approx(rep["cycles"] / CFG.clock_mhz)
    x = rng.integers(-128, 128, (1, 20, 6, 6)).astype(np.int8)
    _, rep_both = run_layer(spec, x, cfg=CFG, mode="both")
    assert rep_both == res.report
    with pytest.raises(ValueError, match="needs the input"):
        simulate(prog, None, CFG, mode="both")


def test_more_bandwidth_never_slower():
    rng = np.random.default_rng(4)
    spec = ConvSpec(1, 32, 8, 8, 32, rng.integers(-3, 3, (32, 32, 3, 3)).astype(np.int8),
                    np.ones(32, np.float32), np.zeros(32, np.float32), pads=(1, 1, 1, 1))
    slow = layer_report(build_conv(spec, cfg=CFG), CFG)["cycles"]
    fast_cfg = CFG.replace(dram_bytes_per_cycle=64.0)
    assert layer_report(build_conv(spec, cfg=fast_cfg), fast_cfg)["cycles"] < slow


def test_network_report_and_plot(tmp_path):
    rng = np.random.default_rng(5)
    reps = []
    for c in (16, 32):
        spec = ConvSpec(1, c, 4, 4, 16, rng.integers(-3, 3, (16, c, 1, 1)).astype(np.int8),
                        np.ones(16, np.float32), np.zeros(16, np.float32))
        reps.append(layer_report(build_conv(spec, cfg=CFG), CFG))
    net = network_report(reps, CFG)
    assert net["cycles"] == sum(r["cycles"] for r in reps)
    p = save_report(net, tmp_path / "r.json")
    assert json.loads(p.read_text())["macs"] == net["macs"]
    png = plot_breakdown(reps, tmp_path / "b.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no layers"):
        plot_breakdown([], tmp_path / "c.png")
    with pytest.raises(ValueError, match="layer reports"):
        network_report([1, 2], CFG)


def _hazard_free(prog, cfg):
    """Every pair of instructions on different queues touching overlapping on-chip addresses runs in
    program order in the timeline (the tokens protect RAW and WAR hazards across the queues)."""
    _, _, span = timeline(prog, cfg)
    acc = [[(m, lo, hi) for m, lo, hi, _ in i.accesses()] for i in prog.instrs]
    for a in range(len(prog.instrs)):
        for b in range(a + 1, len(prog.instrs)):
            if prog.instrs[a].queue == prog.instrs[b].queue:
                continue
            if any(ma == mb and la < hb and lb < ha for ma, la, ha in acc[a] for mb, lb, hb in acc[b]):
                assert span[a][1] <= span[b][0], (a, b, prog.instrs[a].opcode, prog.instrs[b].opcode, span[a], span[b])


@pytest.mark.parametrize("nbuf", [1, 2])
@pytest.mark.parametrize("order", ["ob_outer", "sp_outer"])
def test_builder_tokens_protect_buffers(nbuf, order):
    from hw_model.layer_specs import AddSpec, PoolSpec
    from hw_model.layers_alu import build_add, build_pool
    rng = np.random.default_rng(6)
    spec = ConvSpec(1, 40, 6, 6, 36, rng.integers(-3, 3, (36, 40, 3, 3)).astype(np.int8),
                    np.ones(36, np.float32), np.zeros(36, np.float32), pads=(1, 1, 1, 1),
                    isg_groups=rng.integers(0, 3, 40))
    t = Tiling(ob_tile=1, rows=2, cb_tile=2, loop_order=order, nbuf=nbuf)
    _hazard_free(build_conv(spec, t, CFG), CFG)
    _hazard_free(build_pool(PoolSpec("avg", 1, 40, 6, 6, (2, 2), (2, 2)), Tiling(ob_tile=1, rows=1, nbuf=nbuf), CFG),
                 CFG)
    _hazard_free(build_add(AddSpec(1, 20, 4, 4, 0, 0, 1.0, 1.0, 0.0), Tiling(rows=3, nbuf=nbuf), CFG), CFG)


def test_hazard_check_catches_missing_back_pressure():
    rng = np.random.default_rng(7)
    spec = ConvSpec(1, 16, 6, 6, 16, rng.integers(-3, 3, (16, 16, 3, 3)).astype(np.int8),
                    np.ones(16, np.float32), np.zeros(16, np.float32), pads=(1, 1, 1, 1))
    prog = build_conv(spec, Tiling(ob_tile=1, rows=1, cb_tile=1, nbuf=1), CFG)
    for i in prog.instrs:
        i.pop_next = i.pop_next and i.queue != "load"   # loads no longer wait for compute
        i.push_prev = i.push_prev and i.queue != "compute"
    prog.validate(CFG)
    with pytest.raises(AssertionError):
        _hazard_free(prog, CFG)


@pytest.mark.parametrize("c,k,hw,kernel", [(64, 64, 56, 3), (256, 512, 28, 1), (16, 16, 8, 3)])
def test_mac_utilisation_never_exceeds_the_peak(c, k, hw, kernel):
    """The peak counts every array and every pixel slice: no layer can beat it."""
    rng = np.random.default_rng(c + k)
    w = rng.integers(-8, 8, (k, c, kernel, kernel)).astype(np.int8)
    spec = ConvSpec(1, c, hw, hw, k, w, np.full(k, 1e-3, np.float32), np.zeros(k, np.float32),
                    pads=(kernel // 2,) * 4)
    rep = layer_report(build_conv(spec, cfg=CFG), CFG)
    assert rep["macs"] == hw * hw * c * k * kernel * kernel
    assert 0.05 < rep["mac_utilisation"] <= 1.0


def test_post_path_scales_with_arrays():
    """NORM/ACT/QUANT runs on one 8-lane post path per PE array (journal App. A-D)."""
    b = _b()
    n = b.norm_act_quant(acc_addr=0, acc_stride=16, out_addr=0, out_stride=16, rows=64, cols=16, m_addr=0,
                         b_addr=16, lo=-128, hi=127)
    prog = b.finish(validate=False)
    for arrays in (1, 2, 4):
        cfg = CFG.replace(pe_arrays=arrays, instr_overhead_cycles=1)
        assert instr_cost(n, prog, cfg) == ("post", 64 * 16 // (cfg.post_lanes * arrays) + 1)


def test_isg_tile_uses_the_d1_bank():
    """A 3-group conv may use a D2 tile as large as a 1-group conv's: D1 lives in its own bank."""
    from hw_model.layers import check_tiling
    rng = np.random.default_rng(5)
    c = 48
    one = ConvSpec(1, c, 64, 64, 64, rng.integers(-3, 3, (64, c, 1, 1)).astype(np.int8),
                   np.ones(64, np.float32), np.zeros(64, np.float32))
    three = ConvSpec(**{**one.__dict__, "isg_groups": np.repeat([1, 2, 0], 16)})
    cfg = CFG.replace(acc_buf_kib=64, isg_d1_kib=64)
    t = Tiling(ob_tile=4, rows=4, cb_tile=3, nbuf=1)                        # D2 tile 4*64 px * 64 = 16 Ki elements
    check_tiling(one, t, cfg)
    check_tiling(three, t, cfg)
    with pytest.raises(ValueError, match="D1 bank"):
        check_tiling(three, t, cfg.replace(isg_d1_kib=32))
    with pytest.raises(ValueError, match="overflows acc"):
        check_tiling(one, Tiling(ob_tile=4, rows=5, cb_tile=3, nbuf=1), cfg)


def test_post_stage_overlaps_next_macs_but_not_a_write_to_its_tile():
    """NORM_ACT_QUANT runs beside the next GEMM into another D2 slot; a GEMM into its own tile waits."""
    def prog(next_acc):
        b = _b()
        g = dict(acc_stride=16, in_addr=0, in_row_stride=16, in_pix_stride=16, w_addr=0, w_row_stride=16,
                 n_ob=1, n_cb=1, kh=1, kw=1, oh=16, ow=16)                 # 256 px / 16 lanes = 16 + 8
        b.gemm(acc_addr=0, **g)
        b.norm_act_quant(acc_addr=0, acc_stride=16, out_addr=4096, out_stride=16, rows=256, cols=16, m_addr=0,
                         b_addr=16, lo=-128, hi=127)                       # 4096 / 8 = 512 + 8: 24 -> 544
        b.gemm(acc_addr=next_acc, **g)
        return b.finish()
    _, _, span = timeline(prog(4096), CFG)
    assert span[1] == (24, 544) and span[2] == (25, 49)
    total, _, span = timeline(prog(0), CFG)
    assert span[2] == (544, 568) and total == 568
