"""Gathered LOAD: semantics against a numpy oracle, validation, cost; stored input layouts of the layer
emitters (conv / depthwise / linear gather, pool keeps its layout, add gathers its second input)."""
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hw_model import reference as ref
from hw_model.builder import ProgramBuilder, channel_slots, gather_table, identity_slots, pack_nhwc
from hw_model.config import DEFAULT_CONFIG, NPUConfig
from hw_model.cycles import gather_run_lengths, gather_runs, instr_cost, layer_report, simulate
from hw_model.functional import Machine, run_program
from hw_model.isa import Load, Program
from hw_model.layer_specs import AddSpec, ConvSpec, LinearSpec, PoolSpec, Tiling
from hw_model.layers import build_conv, build_linear
from hw_model.layers_alu import build_add, build_layer, build_pool, pack_inputs, unpack_output

CFG = NPUConfig(instr_overhead_cycles=8, dram_bytes_per_cycle=16.0, pe_arrays=4, pixels_per_cycle=4, post_lanes=2)


def fast(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


# ------------------------------------------------------------------ the instruction
def _gather_prog(src, table, load_kw, mem="spad"):
    b = ProgramBuilder()
    b.alloc("src", str(src.dtype), src.size, "input")
    b.const("tab", table, "int32")
    ld = b.load("src", mem=mem, sram_addr=0, gather="tab", **load_kw)
    return b.finish(), ld


@fast(300)
@given(seed=st.integers(0, 2**31), n0=st.integers(0, 4), n1=st.integers(1, 4), n2=st.integers(1, 40),
       pads=st.tuples(*[st.integers(0, 2)] * 4), off=st.integers(0, 2),
       dt=st.sampled_from(["int8", "uint8", "float32"]))
def test_gathered_load_matches_numpy_oracle(seed, n0, n1, n2, pads, off, dt):
    rng = np.random.default_rng(seed)
    width = int(rng.integers(1, 48))
    table = np.where(rng.random(n2 + off) < 0.25, -1, rng.integers(0, width, n2 + off))
    if rng.random() < 0.5:                                              # a permuted layout with runs
        perm = rng.permutation(width)
        table = np.resize(perm, n2 + off)
    s1 = width + int(rng.integers(0, 3))
    s0 = n1 * s1 + int(rng.integers(0, 5))
    start = int(rng.integers(0, 7))
    size = start + max(n0 - 1, 0) * s0 + (n1 - 1) * s1 + width + int(rng.integers(0, 3))
    src = (rng.uniform(-100, 100, size).astype(np.float32) if dt == "float32"
           else rng.integers(np.iinfo(dt).min, np.iinfo(dt).max + 1, size).astype(dt))
    pad_value = int(rng.integers(-128, 128))
    pt, pl, pb, pr = pads
    kw = dict(dram_offset=start, n0=n0, n1=n1, n2=n2, dram_stride0=s0, dram_stride1=s1, pad=(pt, pl, pb, pr),
              pad_value=pad_value, gather_offset=off)
    prog, ld = _gather_prog(src, table, kw, "cbuf" if dt == "float32" else "spad")
    m = Machine(prog, {"src": src})
    m.run()
    shape = ld.dst_shape()
    got = m.mem[ld.mem][:np.prod(shape)].reshape(shape)
    want = np.full(shape, pad_value, np.float64)
    t = table[off:off + n2]
    for i in range(n0):
        for j in range(n1):
            for k in range(n2):
                if t[k] >= 0:
                    want[pt + i, pl + j, k] = src[start + i * s0 + j * s1 + t[k]]
    assert np.array_equal(got, want)


def _gather_prog_valid(table, n2, **kw):
    b = ProgramBuilder()
    b.alloc("src", "int8", 64, "input")
    b.alloc("out", "int8", 16, "scratch")
    b.const("tab", table, "int32")
    b.const("f", np.zeros(4, np.float32), "float32")
    b.load("src", 0, "spad", 0, 1, 1, n2, 0, 0, gather=kw.pop("gather", "tab"), **kw)
    return b.finish


@pytest.mark.parametrize("table,n2,kw,match", [
    (np.arange(8), 8, dict(gather="nope"), "unknown gather table 'nope'"),
    (np.arange(8), 8, dict(gather="out"), "must be a const int32 region, got scratch int8"),
    (np.arange(8), 8, dict(gather="f"), "must be a const int32 region, got const float32"),
    (np.arange(8), 8, dict(gather_offset=1), "gather entries 1..8 out of range of table 'tab' \\(8 entries\\)"),
    (np.array([0, -2, 1]), 3, {}, "holds -2"),
    (np.array([0, 64]), 2, {}, "DRAM address 64 out of range of region 'src'"),
    (np.arange(8), 8, dict(gather_offset=-1), "gather_offset must be a non-negative int"),
])
def test_gather_validation_errors(table, n2, kw, match):
    with pytest.raises(ValueError, match=match):
        _gather_prog_valid(table, n2, **kw)()


def test_gather_range_check_uses_the_tables_largest_entry():
    # 100 entries on a 64-element region: a plain LOAD would overflow, the gather reads src[0..5] only
    _gather_prog_valid(np.resize(np.arange(6), 100), 100)().validate()
    _gather_prog_valid(np.full(4, -1), 4)().validate()                 # nothing read at all


def test_gather_runs_and_cost_by_hand():
    assert [gather_runs(np.array(t, np.int64)) for t in ([], [-1, -1], [-1, 0, 1], [0, 1, -1, 2], [3, 2],
                                                        [0, 1, 2, 3, 8, 9, -1, -1, 5])] == [0, 0, 1, 2, 2, 3]
    table = np.array([0, 1, 2, 3, 8, 9, -1, -1, 5])
    src = np.zeros(64, np.int8)
    prog, ld = _gather_prog(src, table, dict(dram_offset=0, n0=2, n1=3, n2=9, dram_stride0=30, dram_stride1=10))
    plain = Load("src", 0, "spad", 0, 2, 3, 9, 30, 10)
    base = instr_cost(plain, prog, CFG)
    assert base == ("load", 4 + 8)                                      # 54 B / 16 B per cycle
    # runs of 4, 2, 1 bytes: each row piece takes a whole 16 B burst (6 rows x 3 pieces = 18 bursts, 4 of
    # them paid by the plain cost), one descriptor setup per run, and the table read (9 x 4 B / 16 B)
    assert gather_run_lengths(table) == [4, 2, 1]
    assert instr_cost(ld, prog, CFG) == ("load", 12 + (18 - 4) + 3 * CFG.dma_burst_cycles + 3)
    assert DEFAULT_CONFIG.dma_burst_cycles == 8


def test_instruction_round_trip_with_gather():
    ld = Load("x", 0, "spad", 0, 1, 2, 16, 32, 16, pad_value=-3, gather="g", gather_offset=16)
    d = ld.to_dict()
    assert d["gather"] == "g" and d["gather_offset"] == 16 and list(d)[-2:] == ["gather", "gather_offset"]
    assert Load(**{k: v for k, v in d.items() if k != "op"}) == ld


# ------------------------------------------------------------------ stored layouts of the layer emitters
def _noncontiguous_groups(rng, c):
    gv = rng.integers(0, 3, c)
    return gv, not np.array_equal(channel_slots(c, gv)[0], identity_slots(c))


def _conv(rng, n, c, h, w, k, ks, s, groups, dt="int8"):
    gv, nc = _noncontiguous_groups(rng, c)
    wt = rng.integers(-20, 20, (k, c // groups, ks, ks)).astype(np.int8)
    info = np.iinfo(dt)
    spec = ConvSpec(n, c, h, w, k, wt, rng.uniform(1e-3, 1e-2, k).astype(np.float32),
                    rng.uniform(-3, 3, k).astype(np.float32), stride=(s, s), pads=(ks // 2,) * 4, groups=groups,
                    x_zp=int(rng.integers(info.min, info.max + 1)), in_dtype=dt, isg_groups=gv)
    x = rng.integers(info.min, info.max + 1, (n, c, h, w)).astype(dt)
    want = ref.conv2d(x, spec.x_zp, wt, spec.m, spec.b, -128, 127, stride=(s, s), pads=spec.pads, groups=groups,
                      isg_groups=gv)
    return spec, x, want, nc


def _run(prog, *xs, cfg=DEFAULT_CONFIG):
    return unpack_output(prog, run_program(prog, pack_inputs(prog, *xs), cfg)["out"])


@fast(150)
@given(seed=st.integers(0, 2**31), c=st.integers(2, 48), k=st.integers(1, 40), h=st.integers(1, 6),
       ks=st.sampled_from([1, 3]), s=st.integers(1, 2), kind=st.sampled_from(["dense", "grouped", "dw"]),
       dt=st.sampled_from(["int8", "uint8"]), rows=st.integers(1, 4), cb=st.integers(1, 3), nbuf=st.integers(1, 2))
def test_conv_with_noncontiguous_groups_gathers_and_matches_reference(seed, c, k, h, ks, s, kind, dt, rows, cb,
                                                                      nbuf):
    rng = np.random.default_rng(seed)
    groups = {"dense": 1, "dw": c, "grouped": int(rng.choice([g for g in range(1, c + 1) if c % g == 0]))}[kind]
    k = c if kind == "dw" else groups * max(1, k // groups)
    spec, x, want, nc = _conv(rng, int(rng.integers(1, 3)), c, h, h + 1, k, ks, s, groups, dt)
    assume(nc)
    tiling = Tiling(ob_tile=cb, rows=rows, cb_tile=cb, nbuf=nbuf)
    prog = build_conv(spec, tiling)
    need = channel_slots(c, spec.isg_groups)[0]
    assert prog.meta["inputs"]["x"]["slots"] == identity_slots(c).tolist()          # stored, not needed
    if spec.is_depthwise:  # one group per channel: shift-add per run of channels, never a gather
        assert prog.meta["gathered_loads"] == 0 and "gather_x" not in prog.regions
        assert prog.meta["output"]["slots"] == identity_slots(c).tolist()
        assert np.array_equal(_run(prog, x), want)
        assert np.array_equal(_run(build_conv(spec, tiling, in_slots=[need]), x), want)
        return
    assert prog.meta["gathered_loads"] == sum(bool(i.gather) for i in prog.instrs if isinstance(i, Load)) > 0
    assert prog.regions["x"].size == spec.n * spec.h * spec.w * identity_slots(c).size
    assert prog.regions["gather_x"].kind == "const" and prog.regions["gather_x"].size == need.size
    assert prog.meta["output"]["slots"] == (need if spec.is_depthwise else identity_slots(k)).tolist()
    assert np.array_equal(_run(prog, x), want)
    # the same layer with its input stored in group order: plain LOADs, same values, fewer cycles
    perm = build_conv(spec, tiling, in_slots=[need])
    assert perm.meta["gathered_loads"] == 0 and "gather_x" not in perm.regions
    assert perm.regions["x"].size == spec.n * spec.h * spec.w * need.size
    assert np.array_equal(_run(perm, x), want)
    rep_g, rep_p = layer_report(prog, CFG), layer_report(perm, CFG)
    assert rep_g["cycles"] > rep_p["cycles"] and rep_g["busy"]["load"] > rep_p["busy"]["load"]
    # and any other stored layout (random order, padding anywhere) gathers into the same values
    other = np.full(-(-c // 16) * 16 + 16 * int(rng.integers(0, 2)), -1, np.int64)
    other[rng.choice(other.size, c, replace=False)] = rng.permutation(c)
    assert np.array_equal(_run(build_conv(spec, tiling, in_slots=[other]), x), want)


def test_contiguous_layers_do_not_gather():
    rng = np.random.default_rng(1)
    spec, x, want, nc = _conv(rng, 1, 40, 5, 5, 20, 3, 1, 1)
    spec.isg_groups = np.repeat([1, 2, 0], [16, 16, 8])                 # already in group order
    want = ref.conv2d(x, spec.x_zp, spec.weight, spec.m, spec.b, -128, 127, pads=spec.pads,
                      isg_groups=spec.isg_groups)
    prog = build_conv(spec)
    assert prog.meta["gathered_loads"] == 0 and set(prog.regions) == {"x", "out", "w", "norm"}
    assert np.array_equal(_run(prog, x), want)


def test_linear_gathers_its_input():
    rng = np.random.default_rng(2)
    n, c, k = 5, 37, 12
    gv = rng.integers(0, 3, c)
    x = rng.integers(-128, 128, (n, c)).astype(np.int8)
    wt = rng.integers(-128, 128, (k, c)).astype(np.int8)
    m, b = rng.uniform(1e-5, 1e-3, k).astype(np.float32), rng.uniform(-3, 3, k).astype(np.float32)
    spec = LinearSpec(n, c, k, wt, m, b, isg_groups=gv)
    prog = build_linear(spec)
    assert prog.meta["layer"] == "linear" and prog.meta["gathered_loads"] > 0
    want = ref.linear(x, 0, wt, m, b, -128, 127, np.int8, isg_groups=gv)
    assert np.array_equal(_run(prog, x), want)
    assert np.array_equal(_run(build_layer(spec, in_slots=[channel_slots(c, gv)[0]]), x), want)


def _layout(rng, c):
    """A random stored layout of c channels: a permutation with padding in random places."""
    s = np.full(-(-c // 16) * 16 + 16 * int(rng.integers(0, 2)), -1, np.int64)
    s[rng.choice(s.size, c, replace=False)] = rng.permutation(c)
    return s


@fast(60)
@given(seed=st.integers(0, 2**31), c=st.integers(1, 40), h=st.integers(1, 5), rows=st.integers(1, 40),
       nbuf=st.integers(1, 2), same=st.booleans())
def test_add_gathers_its_second_input_into_the_first_ones_layout(seed, c, h, rows, nbuf, same):
    rng = np.random.default_rng(seed)
    a, b = (rng.integers(-128, 128, (2, c, h, h)).astype(np.int8) for _ in range(2))
    ma = rng.uniform(0.2, 2, c).astype(np.float32)
    spec = AddSpec(2, c, h, h, int(rng.integers(-128, 128)), int(rng.integers(-128, 128)), ma, np.float32(0.7),
                   rng.uniform(-5, 5, c).astype(np.float32))
    sa = _layout(rng, c)
    sb = sa.copy() if same else _layout(rng, c)
    prog = build_add(spec, Tiling(rows=rows, nbuf=nbuf), in_slots=[sa, sb])
    assert prog.meta["output"]["slots"] == sa.tolist() and prog.meta["inputs"]["y"]["slots"] == sb.tolist()
    assert prog.regions["y"].size == 2 * h * h * sb.size and prog.regions["out"].size == 2 * h * h * sa.size
    n_steps = sum(i.opcode == "ALU_ADD" for i in prog.instrs)
    assert prog.meta["gathered_loads"] == (0 if np.array_equal(sa, sb) else n_steps)
    want = ref.add(a, spec.a_zp, ma, b, spec.b_zp, spec.mb, spec.bias, -128, 127)
    assert np.array_equal(_run(prog, a, b), want)


@pytest.mark.parametrize("kind", ["max", "avg", "global_avg"])
def test_pool_keeps_the_stored_layout(kind):
    rng = np.random.default_rng(3)
    c, h = 21, 6
    x = rng.integers(-128, 128, (1, c, h, h)).astype(np.int8)
    spec = PoolSpec(kind, 1, c, h, h, (2, 2), (2, 2), x_zp=3, m=0.25, b=1.0)
    s = _layout(rng, c)
    prog = build_pool(spec, Tiling(ob_tile=1, rows=1), in_slots=[s])
    assert prog.meta["output"]["slots"] == prog.meta["inputs"]["x"]["slots"] == s.tolist()
    _, _, oh, ow = prog.meta["output"]["shape"]
    assert prog.meta["gathered_loads"] == 0 and prog.regions["out"].size == oh * ow * s.size
    assert np.array_equal(_run(prog, x), _run(build_pool(spec), x))
    assert pack_inputs(prog, x)["x"].size == prog.regions["x"].size


def test_bad_in_slots_are_rejected():
    rng = np.random.default_rng(4)
    spec, *_ = _conv(rng, 1, 20, 4, 4, 8, 1, 1, 1)
    bads = [([identity_slots(20)] * 2, "one per input"), (identity_slots(20), "list of 1"),
            ([identity_slots(20)[:20]], "multiple of 16"), ([identity_slots(20) * 1.0], "int array"),
            ([np.r_[np.arange(19), -np.ones(13, int)]], "every channel 0..19 exactly once"),
            ([np.r_[np.arange(20), np.zeros(12, int)]], "exactly once"),
            ([np.r_[np.arange(20), -2 * np.ones(12, int)]], "exactly once")]
    for bad, match in bads:
        with pytest.raises(ValueError, match=match):
            build_conv(spec, in_slots=bad)
    with pytest.raises(ValueError, match="in_slots\\[1\\]"):
        build_add(AddSpec(1, 4, 2, 2, 0, 0, 1.0, 1.0, 0.0), in_slots=[identity_slots(4), np.arange(16)])


def test_gather_table_maps_needed_positions_to_stored_ones():
    need = np.array([3, 0, -1, 1, 2, -1])
    stored = np.array([2, -1, 0, 1, 3, -1])
    assert gather_table(need, stored).tolist() == [4, 2, -1, 3, 0, -1]
    assert gather_table(need, stored).dtype == np.int32


def test_json_round_trip_of_a_gathered_program():
    rng = np.random.default_rng(5)
    spec, x, want, nc = _conv(rng, 1, 30, 5, 5, 18, 3, 1, 1)
    assert nc
    prog = build_conv(spec)
    text = prog.to_json()
    back = Program.from_json(text)
    assert back.instrs == prog.instrs and back.to_json() == text
    assert back.regions["gather_x"].addr == prog.regions["gather_x"].addr
    assert np.array_equal(back.regions["gather_x"].data, prog.regions["gather_x"].data)
    assert any(i["op"] == "LOAD" and i["gather"] == "gather_x" for i in json.loads(text)["instrs"])
    inp = pack_inputs(prog, x)
    assert np.array_equal(run_program(back, inp)["out"], run_program(prog, inp)["out"])
    both = simulate(back, inp, CFG, mode="both").report
    assert both == simulate(prog, None, CFG, mode="perf").report
    assert np.array_equal(pack_nhwc(x, identity_slots(30)), inp["x"])
