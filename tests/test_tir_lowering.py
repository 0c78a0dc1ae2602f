"""Conv layers lowered through TIR (schedule + tensorize + walk) equal hw_model.reference bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hw_model import reference as ref
from hw_model.config import NPUConfig
from hw_model.cycles import simulate
from hw_model.layer_specs import ConvSpec, LinearSpec, Tiling, conv_geometry
from hw_model.layers_alu import pack_inputs, unpack_output
from target_npu import codegen
from target_npu.schedule import schedule_conv

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
    for t in KNOBS:
        nest = codegen.walk(schedule_conv(spec, t).mod["main"])
        got = nest.tiling()
        assert (got.ob_tile, got.rows, got.cb_tile) == (min(t.ob_tile, kb), min(t.rows, oh), min(t.cb_tile, cb))
        assert (got.loop_order, got.nbuf) == (t.loop_order, t.nbuf)
        assert nest.mac_calls == 1
        names = [n for n, _ in nest.loops]
        assert names.index("kb_0") < names.index("y_0") if t.loop_order == "ob_outer" else \
            names.index("y_0") < names.index("kb_0")


def test_tensorized_primfunc_calls_the_mac_intrinsic():
    spec = _spec(np.random.default_rng(0), 16, 16, 4, 3, 1, False)
    script = schedule_conv(spec, Tiling(ob_tile=1, rows=2, cb_tile=1)).mod["main"].script()
    assert "ioso_npu_mac16x16" in script and "mac_update_o" in script


def test_grouped_conv_is_refused_by_the_tir_path():
    rng = np.random.default_rng(0)
    spec = _spec(rng, 16, 16, 4, 3, 1, False)
    spec.groups, spec.weight = 2, spec.weight[:, :8]
    with pytest.raises(ValueError, match="groups"):
        schedule_conv(spec, Tiling())


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
