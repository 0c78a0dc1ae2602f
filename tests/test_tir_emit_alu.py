"""Adds, pools and depthwise convs with scaled ISG groups emitted from their tensorized TIR
(target_npu.codegen.layer_program): equal to the reference on the whole output, and to the builder
(hw_model.layers_alu.build_layer, the oracle): the same instruction list for adds and pools, the same
output and about the cycle count for depthwise convs."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hw_model import reference as ref
from hw_model.builder import identity_slots
from hw_model.config import NPUConfig
from hw_model.cycles import simulate
from hw_model.isa import AluMax, AluSum, Load, NormActQuant, Store
from hw_model.layer_specs import AddSpec, ConvSpec, LinearSpec, PoolSpec, Tiling
from hw_model.layers_alu import build_layer, pack_inputs, unpack_output
from target_npu import codegen

CFG = NPUConfig()
RATIOS: list[float] = []  # cycle ratios (emitted / build_conv) of the depthwise cases checked
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _run(prog, *xs: np.ndarray) -> np.ndarray:
    return unpack_output(prog, simulate(prog, pack_inputs(prog, *xs), CFG, mode="func").outputs["out"])


def _cycles(prog) -> int:
    return simulate(prog, None, CFG, mode="perf").report["cycles"]


def _x(rng: np.random.Generator, dt: str, shape: tuple[int, ...]) -> np.ndarray:
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max + 1, shape).astype(dt)


def _stored(rng: np.random.Generator, c: int, how: int) -> np.ndarray:
    """A stored layout: identity (0), a permutation (1), a permutation with an extra padding block (2)."""
    s = identity_slots(c)
    if how == 2:
        s = np.concatenate([s, -np.ones(16, np.int64)])
    return rng.permutation(s) if how else s


def _same_program(prog, oracle) -> None:
    """Instruction for instruction, region for region (names, order, dtypes, sizes, addresses, constants)."""
    assert prog.instrs == oracle.instrs
    assert list(prog.regions) == list(oracle.regions)
    for name, r in prog.regions.items():
        o = oracle.regions[name]
        assert (r.dtype, r.size, r.kind, r.addr) == (o.dtype, o.size, o.kind, o.addr), name
        assert (r.data is None) == (o.data is None) and (r.data is None or np.array_equal(r.data, o.data)), name
    for key in ("layer", "inputs", "output", "macs", "groups", "tiling", "gathered_loads"):
        assert prog.meta[key] == oracle.meta[key], key
    assert prog.meta["tir"]["stages"] and prog.meta["tir"]["tile_loops"]


def check_pool(a: dict) -> None:
    rng = np.random.default_rng(a["seed"])
    kind, c, h, w = a["kind"], a["c"], a["h"], a["w"]
    k, s = min(a["kernel"], h, w), a["stride"]
    pads = (0, 0, 0, 0)
    if kind == "max" and a["pad"]:
        pads = tuple(int(rng.integers(0, k + 1)) for _ in range(4))  # k: tiles of padding rows only
    in_dt = a["in_dtype"]
    out_dt = in_dt if kind == "max" else a["out_dtype"]
    info = np.iinfo(out_dt)
    lo, hi = sorted(int(v) for v in rng.integers(info.min, info.max + 1, 2))
    zp = int(rng.integers(np.iinfo(in_dt).min, np.iinfo(in_dt).max + 1)) if kind != "max" else 0
    spec = PoolSpec(kind, a["n"], c, h, w, kernel=(k, k), stride=(s, s), pads=pads, x_zp=zp,
                    m=float(np.float32(rng.uniform(0.005, 0.2))), b=float(np.float32(rng.uniform(-10, 10))),
                    lo=lo if kind != "max" else info.min, hi=hi if kind != "max" else info.max, in_dtype=in_dt,
                    out_dtype=out_dt)
    t = Tiling(ob_tile=a["ob"], rows=a["rows"], nbuf=a["nbuf"])
    slots = [_stored(rng, c, a["layout"])]
    prog = codegen.layer_program(spec, t, CFG, slots)
    oracle = build_layer(spec, t, CFG, slots)
    _same_program(prog, oracle)
    x = _x(rng, in_dt, (spec.n, c, h, w))
    if kind == "max":
        want = ref.max_pool2d(x, spec.window, spec.stride, spec.pads)
    else:
        want = ref.avg_pool2d(x, zp, spec.window, spec.stride, spec.m, spec.b, spec.lo, spec.hi, np.dtype(out_dt))
    got = _run(prog, x)
    assert got.dtype == want.dtype and np.array_equal(got, want)


def check_add(a: dict) -> None:
    rng = np.random.default_rng(a["seed"])
    c = a["c"]
    dts = [a["a_dtype"], a["b_dtype"], a["out_dtype"]]
    zps = [int(rng.integers(np.iinfo(d).min, np.iinfo(d).max + 1)) // 4 for d in dts[:2]]
    per_ch = a["per_channel"]
    ma, mb = (rng.uniform(0.1, 1.5, c).astype(np.float32) if per_ch else float(np.float32(rng.uniform(0.1, 1.5)))
              for _ in range(2))
    bias = rng.uniform(-5, 5, c).astype(np.float32) if per_ch else float(np.float32(rng.uniform(-5, 5)))
    info = np.iinfo(dts[2])
    lo, hi = sorted(int(v) for v in rng.integers(info.min, info.max + 1, 2))
    spec = AddSpec(a["n"], c, a["h"], a["w"], zps[0], zps[1], ma, mb, bias, lo, hi, *dts)
    t = Tiling(rows=a["rows"], nbuf=a["nbuf"])
    sx = _stored(rng, c, a["layout"])
    sy = sx if a["same_layout"] else _stored(rng, c, a["layout_y"])
    prog = codegen.layer_program(spec, t, CFG, [sx, sy])
    _same_program(prog, build_layer(spec, t, CFG, [sx, sy]))
    xa, xb = (_x(rng, d, (spec.n, c, spec.h, spec.w)) for d in dts[:2])
    want = ref.add(xa, spec.a_zp, ma, xb, spec.b_zp, mb, bias, lo, hi, np.dtype(dts[2]))
    assert np.array_equal(_run(prog, xa, xb), want)


def check_dw(a: dict) -> None:
    rng = np.random.default_rng(a["seed"])
    c, kern = a["c"], a["kernel"]
    groups = rng.integers(0, CFG.num_groups, c)
    if a["two_runs"]:
        groups = np.repeat(rng.choice(CFG.num_groups, 2, replace=False), [c // 2, c - c // 2])
    w = rng.integers(-2 ** (a["wbits"] - 1), 2 ** (a["wbits"] - 1), (c, 1, kern, kern)).astype(np.int8)
    p = int(rng.integers(0, kern // 2 + 1))
    in_dt = a["in_dtype"]
    zp = int(rng.integers(0, 16)) if in_dt == "uint8" else 0
    spec = ConvSpec(a["n"], c, a["h"], a["h"] + 1, c, w, rng.uniform(1e-3, 2e-2, c).astype(np.float32),
                    rng.uniform(-20, 20, c).astype(np.float32), stride=(a["stride"],) * 2, pads=(p, p, p, p),
                    dilation=(a["dil"],) * 2, groups=c, x_zp=zp, in_dtype=in_dt, isg_groups=groups)
    try:
        spec.check(CFG)
    except ValueError:
        return  # empty output (dilated kernel larger than the padded input)
    t = Tiling(ob_tile=a["ob"], rows=a["rows"], loop_order=a["order"], nbuf=a["nbuf"])
    slots = [_stored(rng, c, a["layout"])]
    prog = codegen.layer_program(spec, t, CFG, slots)
    oracle = build_layer(spec, t, CFG, slots)
    assert "tir" in prog.meta and prog.meta["output"] == oracle.meta["output"]
    assert Counter(type(i) for i in prog.instrs) == Counter(type(i) for i in oracle.instrs)
    x = _x(rng, in_dt, (spec.n, c, spec.h, spec.w))
    want = ref.conv2d(x, zp, w, spec.m, spec.b, spec.lo, spec.hi, np.dtype(spec.out_dtype), stride=spec.stride,
                      pads=spec.pads, dilation=spec.dilation, groups=c, isg_groups=groups, cfg=CFG)
    got = _run(prog, x)
    assert np.array_equal(got, want)
    assert np.array_equal(got, _run(oracle, x))
    # the conv emitter loads only the input columns a strided window reads and packs NORM m / b per step, so
    # a stream may be a little cheaper than build_conv's, never dearer (measured 0.986-1.0, equal in 235 of 261)
    ratio = _cycles(prog) / _cycles(oracle)
    assert 0.9 <= ratio <= 1.0, ratio
    RATIOS.append(ratio)


pools = st.fixed_dictionaries({
    "kind": st.sampled_from(["max", "max", "avg", "global_avg"]), "n": st.sampled_from([1, 1, 2]),
    "c": st.integers(1, 40), "h": st.integers(1, 9), "w": st.integers(1, 9), "kernel": st.integers(1, 3),
    "stride": st.integers(1, 3), "pad": st.booleans(), "in_dtype": st.sampled_from(["int8", "uint8"]),
    "out_dtype": st.sampled_from(["int8", "uint8"]), "ob": st.integers(1, 3), "rows": st.integers(1, 5),
    "nbuf": st.sampled_from([1, 2]), "layout": st.sampled_from([0, 1, 2]), "seed": st.integers(0, 2**31 - 1)})
adds = st.fixed_dictionaries({
    "n": st.sampled_from([1, 2]), "c": st.integers(1, 40), "h": st.integers(1, 6), "w": st.integers(1, 6),
    "a_dtype": st.sampled_from(["int8", "uint8"]), "b_dtype": st.sampled_from(["int8", "uint8"]),
    "out_dtype": st.sampled_from(["int8", "uint8"]), "per_channel": st.booleans(), "rows": st.integers(1, 40),
    "nbuf": st.sampled_from([1, 2]), "layout": st.sampled_from([0, 1, 2]), "layout_y": st.sampled_from([0, 1, 2]),
    "same_layout": st.booleans(), "seed": st.integers(0, 2**31 - 1)})
dws = st.fixed_dictionaries({
    "n": st.sampled_from([1, 1, 2]), "c": st.integers(2, 40), "h": st.integers(2, 8),
    "kernel": st.sampled_from([1, 3, 5]), "stride": st.sampled_from([1, 2]), "dil": st.sampled_from([1, 1, 2]),
    "two_runs": st.booleans(),
    "wbits": st.integers(2, 8), "in_dtype": st.sampled_from(["int8", "uint8"]), "ob": st.integers(1, 3),
    "rows": st.integers(1, 5), "order": st.sampled_from(["ob_outer", "sp_outer"]), "nbuf": st.sampled_from([1, 2]),
    "layout": st.sampled_from([0, 1, 2]), "seed": st.integers(0, 2**31 - 1)})


@settings(max_examples=25, **SETTINGS)
@given(pools)
def test_pools_from_tir_equal_reference_and_builder(a):
    check_pool(a)


@settings(max_examples=20, **SETTINGS)
@given(adds)
def test_adds_from_tir_equal_reference_and_builder(a):
    check_add(a)


@settings(max_examples=15, **SETTINGS)
@given(dws)
def test_depthwise_with_scaled_groups_from_tir_equal_reference_and_builder(a):
    check_dw(a)


def test_one_instruction_per_call_site_and_tile():
    """An average pool: per tile (product of the tile loops) one ALU_SUM, one NORM_ACT_QUANT, one STORE and
    the copies' LOADs (input, m, b); a max pool has no NORM stage and no constant copies."""
    spec = PoolSpec("avg", 2, 40, 9, 7, kernel=(3, 3), stride=(2, 2), x_zp=3, m=0.1, b=2.0)
    t = Tiling(ob_tile=2, rows=2, nbuf=2)
    prog = codegen.layer_program(spec, t, CFG)
    tiles = int(np.prod([e for _, e in prog.meta["tir"]["tile_loops"]]))
    assert tiles == 2 * 2 * 2  # n, row tiles (ceil(4 / 2)), block tiles (ceil(3 / 2))
    count = Counter(type(i) for i in prog.instrs)
    assert count[AluSum] == count[NormActQuant] == count[Store] == tiles and count[Load] == 3 * tiles
    mx = codegen.layer_program(PoolSpec("max", 2, 40, 9, 7, kernel=(3, 3), stride=(2, 2)), t, CFG)
    count = Counter(type(i) for i in mx.instrs)
    assert count[AluMax] == count[Load] == count[Store] == tiles and count[NormActQuant] == 0
    assert {s["extern"] for s in mx.meta["tir"]["stages"]} >= {"ioso_npu_max16_int8", "copy", "init"}


def test_window_fields_come_from_the_tir_indices():
    """The ALU_MAX stride / window / tile strides are the coefficients of the TIR loops in the operand indices."""
    spec = PoolSpec("max", 1, 32, 9, 9, kernel=(3, 2), stride=(2, 3), pads=(1, 0, 1, 1))
    prog = codegen.layer_program(spec, Tiling(ob_tile=1, rows=2), CFG)
    ops = [i for i in prog.instrs if isinstance(i, AluMax)]
    assert {(i.kh, i.kw, i.stride_h, i.stride_w, i.cols) for i in ops} == {(3, 2, 2, 3, 16)}
    wp = 9 + 0 + 1
    assert {(i.in_row_stride, i.in_pix_stride) for i in ops} == {(wp * 16, 16)}
    loads = [i for i in prog.instrs if isinstance(i, Load)]
    assert {(i.pad_left, i.pad_right, i.pad_value) for i in loads} == {(0, 1, -128)}


def test_layer_program_dispatch_and_errors():
    rng = np.random.default_rng(1)
    lin = LinearSpec(3, 20, 10, rng.integers(-8, 8, (10, 20)).astype(np.int8), np.full(10, 0.01, np.float32),
                     np.zeros(10, np.float32))
    prog = codegen.layer_program(lin, None, CFG)
    assert prog.meta["layer"] == "linear" and "tir" in prog.meta
    with pytest.raises(TypeError, match="layer_program"):
        codegen.layer_program(object(), None, CFG)
    add = AddSpec(1, 20, 4, 4, 0, 0, 1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="in_slots"):
        codegen.layer_program(add, None, CFG, [identity_slots(20)])  # an add has two inputs
    with pytest.raises(ValueError, match="overflows"):
        codegen.layer_program(PoolSpec("max", 1, 16, 64, 64), Tiling(rows=64, ob_tile=1, nbuf=2),
                              NPUConfig(scratchpad_kib=8))
