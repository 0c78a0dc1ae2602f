"""Conv layers lowered through TIR (schedule + tensorize + walk) equal hw_model.reference bit for bit."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hw_model import reference as ref
from hw_model.builder import channel_slots
from hw_model.config import NPUConfig
from hw_model.cycles import simulate
from hw_model.isa import GroupShiftAdd
from hw_model.layer_specs import ConvSpec, LinearSpec, Tiling, conv_geometry
from hw_model.layers_alu import pack_inputs, unpack_output
from target_npu import codegen, intrinsics
from target_npu.schedule import B, conv_primfunc, group_segments, primfunc_shapes, schedule_conv, tile_domain

CFG = NPUConfig()


def _spec(rng, c, k, hw, kernel, stride, isg, in_dtype="uint8", wbits=4) -> ConvSpec:
    lim = 2 ** (wbits - 1)
    w = rng.integers(-lim, lim, (k, c, kernel, kernel)).astype(np.int8)
    m = rng.uniform(1e-3, 2e-2, k).astype(np.float32)
    b = rng.uniform(-20, 20, k).astype(np.float32)
    gvec = rng.integers(0, CFG.num_groups, c) if isg else None
    zp = int(rng.integers(0, 16)) if in_dtype == "uint8" else 0
    p = kernel // 2
    return ConvSpec(1, c, hw, hw, k, w, m, b, lo=-128, hi=127, stride=(stride, stride), pads=(p, p, p, p),
                    x_zp=zp, in_dtype=in_dtype, out_dtype="int8", isg_groups=gvec)


def _run(prog, spec: ConvSpec, x: np.ndarray) -> np.ndarray:
    res = simulate(prog, pack_inputs(prog, x), CFG, mode="func")
    return unpack_output(prog, res.outputs["out"])


def _want(spec: ConvSpec, x: np.ndarray) -> np.ndarray:
    return ref.conv2d(x, spec.x_zp, spec.weight, spec.m, spec.b, spec.lo, spec.hi, np.dtype(spec.out_dtype),
                      stride=spec.stride, pads=spec.pads, groups=1, isg_groups=spec.isg_groups, cfg=CFG)


def _x(rng, spec: ConvSpec) -> np.ndarray:
    info = np.iinfo(spec.in_dtype)
    return rng.integers(info.min, info.max + 1, (spec.n, spec.c, spec.h, spec.w)).astype(spec.in_dtype)


KNOBS = [Tiling(ob_tile=1, rows=1, cb_tile=1, nbuf=1), Tiling(ob_tile=2, rows=3, cb_tile=1),
         Tiling(ob_tile=1, rows=2, cb_tile=2, loop_order="ob_outer"), Tiling(ob_tile=8, rows=64, cb_tile=8)]
SHAPES = [(20, 24, 9, 3, 1, True), (32, 16, 8, 3, 2, False), (16, 40, 6, 1, 1, True), (48, 32, 7, 5, 2, True)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "c{}k{}hw{}k{}s{}isg{}".format(*s))
def test_knobs_change_the_program_not_the_result(shape):
    rng = np.random.default_rng(sum(shape))
    spec = _spec(rng, *shape)
    x = _x(rng, spec)
    want = _want(spec, x)
    programs = []
    for t in KNOBS:
        prog = codegen.lower_conv(spec, t, CFG)
        assert np.array_equal(_run(prog, spec, x), want), t
        programs.append([repr(i) for i in prog.instrs])
    distinct = {tuple(p) for p in programs}
    assert len(distinct) >= 3  # the knobs that change the tile geometry of this shape change the program


def test_walk_reads_the_knobs_back_from_the_tir():
    rng = np.random.default_rng(3)
    spec = _spec(rng, 48, 40, 10, 3, 1, True)
    oh, _, kb, cb = conv_geometry(spec)
    segs = group_segments(spec, CFG)
    for t in KNOBS:
        low = codegen.read_layer(codegen.walk_nest(schedule_conv(spec, t, CFG).mod["main"]))
        got = low.tiling
        assert (got.ob_tile, got.rows, got.cb_tile) == (min(t.ob_tile, kb), min(t.rows, oh), t.cb_tile)
        assert (got.loop_order, got.nbuf) == (t.loop_order, t.nbuf)
        assert len(codegen.calls_of(low.nest, intrinsics.EXTERN)) == len(segs)
        names = [n for n, _ in low.nest.tile_loops]
        assert (names.index("kb_0") < names.index("y_0")) == (t.loop_order == "ob_outer")
        # every copy and call sits under the output-tile loops; each group has its own input / weight copy
        copies = [b.name for b in codegen.blocks(low.nest.body) if b.dst]
        assert {f"load_x_{j}" for j in range(len(segs))} | {"load_m", "load_b", "store_out"} <= set(copies)


def _tir_values(spec: ConvSpec, t: Tiling, x: np.ndarray) -> np.ndarray:
    """Run the (unscheduled) TE description of the layer with llvm: copies, MAC per group, shift-add, NORM."""
    d = tile_domain(spec, t, CFG)
    func = conv_primfunc(spec, t, CFG)
    shapes = primfunc_shapes(spec, t, CFG)
    slots, _ = channel_slots(spec.c, spec.isg_groups, CFG)
    n, h, w, cbn, _ = shapes["x"]
    xt = np.zeros((n, h, w, cbn * B), np.int8)
    wt = np.zeros((cbn * B, spec.kh, spec.kw, shapes["w"][-1]), np.int8)
    for pos, ch in enumerate(slots):
        if ch >= 0:
            xt[..., pos] = x[:, ch]
            wt[pos, :, :, :spec.k] = spec.weight[:, ch].transpose(1, 2, 0)
    wt = wt.reshape(cbn, B, spec.kh, spec.kw, -1).transpose(0, 2, 3, 1, 4)
    m = np.zeros(shapes["m"], np.float32)
    b = np.zeros(shapes["m"], np.float32)
    m.reshape(-1)[:spec.k], b.reshape(-1)[:spec.k] = spec.m, spec.b
    out = np.zeros(shapes["out"], spec.out_dtype)
    arrays = (xt.reshape(shapes["x"]), np.ascontiguousarray(wt), m, b, np.array([spec.lo, spec.hi], np.int32), out)
    args = [tvm.runtime.tensor(a) for a in arrays]
    tvm.compile(tvm.IRModule({"main": func}), target="llvm")["main"](*args)
    assert d["kb"] * B == shapes["w"][-1]
    got = args[5].numpy().reshape(n, shapes["out"][1], shapes["out"][2], -1)[..., :spec.k]
    return got.transpose(0, 3, 1, 2)


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({"c": st.integers(1, 40), "k": st.integers(1, 24), "hw": st.integers(2, 6),
                              "kernel": st.sampled_from([1, 3]), "stride": st.sampled_from([1, 2]),
                              "rows": st.integers(1, 4), "cb": st.integers(1, 3), "seed": st.integers(0, 2**31 - 1)}))
def test_tir_description_computes_the_contract(a):
    """The TE stages (MAC per ISG group, shift-add, NORM/ACT/QUANT) compiled for the CPU equal the reference."""
    rng = np.random.default_rng(a["seed"])
    spec = _spec(rng, a["c"], a["k"], a["hw"], a["kernel"], a["stride"], True, "int8")
    x = _x(rng, spec)
    got = _tir_values(spec, Tiling(ob_tile=1, rows=a["rows"], cb_tile=a["cb"]), x)
    assert np.array_equal(got, _want(spec, x))


def test_tensorized_stages_follow_the_contract_group_order():
    rng = np.random.default_rng(11)
    for _ in range(8):
        c = int(rng.integers(17, 60))
        spec = _spec(rng, c, 20, 5, 3, 1, True)
        t = Tiling(ob_tile=1, rows=2, cb_tile=int(rng.integers(1, 4)))
        prog = codegen.lower_conv(spec, t, CFG)
        order = group_segments(spec, CFG)
        want = [(CFG.isg_group_signs[g], j == 0) for j, (g, _, _) in enumerate(order)]
        assert [tuple(x) for x in prog.meta["tir"]["shift_adds"]] == want
        signs = [i.sign for i in prog.instrs if isinstance(i, GroupShiftAdd)]
        assert signs[:len(want)] == [s for s, _ in want]
        x = _x(rng, spec)
        assert np.array_equal(_run(prog, spec, x), _want(spec, x))


def test_tensorized_primfunc_calls_every_stage_intrinsic():
    rng = np.random.default_rng(0)
    plain = _spec(rng, 16, 16, 4, 3, 1, False)
    script = schedule_conv(plain, Tiling(ob_tile=1, rows=2, cb_tile=1), CFG).mod["main"].script()
    assert "ioso_npu_mac16x16" in script and "ioso_npu_norm_act_quant_int8" in script
    assert "shift_add" not in script  # one unity group: the MACs write D2 directly
    isg = _spec(rng, 40, 16, 4, 3, 1, True)
    script = schedule_conv(isg, Tiling(ob_tile=1, rows=2, cb_tile=1), CFG).mod["main"].script()
    assert "ioso_npu_shift_add_" in script and "_init_s4" in script


@pytest.mark.parametrize("c, groups", [(16, 16), (40, 40), (32, 2), (48, 3)])
@pytest.mark.parametrize("stride", [1, 2])
def test_grouped_and_depthwise_convs_lower_through_tir(c, groups, stride):
    rng = np.random.default_rng(c + groups + stride)
    spec = _spec(rng, c, c, 7, 3, stride, False)
    spec = dataclasses.replace(spec, groups=groups, weight=spec.weight[:, : c // groups].copy())
    for t in (Tiling(ob_tile=1, rows=2, cb_tile=1), Tiling(ob_tile=3, rows=7, cb_tile=2, loop_order="ob_outer")):
        prog = codegen.lower_conv(spec, t, CFG)
        externs = {s["extern"] for s in prog.meta["tir"]["stages"]}
        assert (intrinsics.DW_EXTERN in externs) == spec.is_depthwise
        assert (intrinsics.EXTERN in externs) != spec.is_depthwise
        x = _x(rng, spec)
        want = ref.conv2d(x, spec.x_zp, spec.weight, spec.m, spec.b, spec.lo, spec.hi, np.dtype(spec.out_dtype),
                          stride=spec.stride, pads=spec.pads, groups=groups, cfg=CFG)
        assert np.array_equal(_run(prog, spec, x), want)


def test_depthwise_with_scaled_groups_lowers_through_tir():
    """D2 = D1 + g * (D1 >> n) with g the per-channel group sign: one stage, tensorized with shift_add_ch."""
    rng = np.random.default_rng(4)
    spec = _spec(rng, 32, 32, 5, 3, 1, False)
    spec = dataclasses.replace(spec, groups=32, weight=spec.weight[:, :1].copy(),
                               isg_groups=np.repeat([1, 0], 16))
    prog = codegen.lower_conv(spec, Tiling(ob_tile=1, rows=2), CFG)
    assert prog.meta["tir"]["shift_adds"] == [["ch", True]]
    assert any(s["extern"].startswith("ioso_npu_shift_add_ch_s") for s in prog.meta["tir"]["stages"])
    x = _x(rng, spec)
    want = ref.conv2d(x, spec.x_zp, spec.weight, spec.m, spec.b, spec.lo, spec.hi, np.dtype(spec.out_dtype),
                      pads=spec.pads, groups=32, isg_groups=spec.isg_groups, cfg=CFG)
    assert np.array_equal(_run(prog, spec, x), want)


def test_lowered_nests_are_cached_by_shape_and_knobs():
    rng = np.random.default_rng(5)
    a, b = _spec(rng, 24, 24, 5, 3, 1, True), _spec(rng, 24, 24, 5, 3, 1, True)  # same shape, new weights
    t = Tiling(ob_tile=1, rows=2, cb_tile=1)
    codegen.lower_conv(a, t, CFG)
    n = len(codegen._CACHE)
    pb = codegen.lower_conv(b, t, CFG)
    assert len(codegen._CACHE) == n
    x = _x(rng, b)
    assert np.array_equal(_run(pb, b, x), _want(b, x))
    codegen.lower_conv(b, Tiling(ob_tile=1, rows=3, cb_tile=1), CFG)
    assert len(codegen._CACHE) == n + 1


def test_linear_layer_through_tir():
    rng = np.random.default_rng(9)
    n, c, k = 3, 40, 10
    w = rng.integers(-8, 8, (k, c)).astype(np.int8)
    m, b = rng.uniform(1e-3, 1e-2, k).astype(np.float32), rng.uniform(-5, 5, k).astype(np.float32)
    spec = LinearSpec(n, c, k, w, m, b, in_dtype="int8", isg_groups=rng.integers(0, CFG.num_groups, c))
    prog = codegen.lower_conv(spec, None, CFG)
    x = rng.integers(-128, 128, (n, c)).astype(np.int8)
    got = unpack_output(prog, simulate(prog, pack_inputs(prog, x), CFG, mode="func").outputs["out"])
    want = ref.conv2d(x.reshape(n, c, 1, 1), 0, w[:, :, None, None], m, b, -128, 127, np.dtype("int8"),
                      isg_groups=spec.isg_groups, cfg=CFG).reshape(n, k)
    assert np.array_equal(got.reshape(n, k), want)


conv_layers = st.fixed_dictionaries({
    "c": st.integers(1, 40), "k": st.integers(1, 40), "hw": st.integers(2, 9),
    "kernel": st.sampled_from([1, 3, 5]), "stride": st.sampled_from([1, 2]), "isg": st.booleans(),
    "in_dtype": st.sampled_from(["int8", "uint8"]), "wbits": st.integers(2, 8),
    "ob": st.integers(1, 3), "rows": st.integers(1, 9), "cb": st.integers(1, 3),
    "order": st.sampled_from(["ob_outer", "sp_outer"]), "nbuf": st.sampled_from([1, 2]),
    "seed": st.integers(0, 2**31 - 1),
})


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(conv_layers)
def test_tir_program_equals_reference_on_random_conv_layers(a):
    rng = np.random.default_rng(a["seed"])
    spec = _spec(rng, a["c"], a["k"], a["hw"], a["kernel"], a["stride"], a["isg"], a["in_dtype"], a["wbits"])
    t = Tiling(ob_tile=a["ob"], rows=a["rows"], cb_tile=a["cb"], loop_order=a["order"], nbuf=a["nbuf"])
    prog = codegen.lower_conv(spec, t, CFG)
    x = _x(rng, spec)
    assert np.array_equal(_run(prog, spec, x), _want(spec, x))


@pytest.mark.parametrize("order", ["ob_outer", "sp_outer"])
def test_batched_conv_lowers_through_tir(order):
    rng = np.random.default_rng(21)
    spec = dataclasses.replace(_spec(rng, 40, 24, 5, 3, 1, True), n=3)
    prog = codegen.lower_conv(spec, Tiling(ob_tile=1, rows=2, cb_tile=2, loop_order=order), CFG)
    x = _x(rng, spec)
    assert np.array_equal(_run(prog, spec, x), _want(spec, x))
