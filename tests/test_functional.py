"""Functional simulator == hw_model.reference, bit for bit, on >= 1000 hypothesis-generated tiny layers."""
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hw_model import reference as ref
from hw_model.config import DEFAULT_CONFIG
from hw_model.cycles import simulate
from hw_model.functional import run_program
from hw_model.layer_specs import AddSpec, ConvSpec, LinearSpec, PoolSpec, Tiling
from hw_model.layers import build_conv
from hw_model.layers_alu import pack_inputs, run_layer


def fast(n: int) -> settings:
    """Deterministic, no deadline: n examples."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))

tilings = st.one_of(st.none(), st.builds(Tiling, ob_tile=st.integers(1, 3), rows=st.integers(1, 5),
                                         cb_tile=st.integers(1, 3),
                                         loop_order=st.sampled_from(["ob_outer", "sp_outer"]),
                                         nbuf=st.integers(1, 2)))


def _act(rng, dt, shape):
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max + 1, shape).astype(dt)


def _conv_case(rng, n, c, h, w, k, kh, kw, stride, pads, dil, groups, ngroups, dt, out_dt):
    x = _act(rng, dt, (n, c, h, w))
    wbits = int(rng.integers(2, 9))
    wt = rng.integers(-(2 ** (wbits - 1)), 2 ** (wbits - 1), (k, c // groups, kh, kw)).astype(np.int8)
    gv = rng.choice(ngroups, c) if ngroups > 1 else None
    zp = int(rng.integers(np.iinfo(dt).min, np.iinfo(dt).max + 1))
    m = rng.uniform(1e-5, 2e-3, k).astype(np.float32)
    b = rng.uniform(-5, 5, k).astype(np.float32)
    info = np.iinfo(out_dt)
    lo = int(rng.integers(info.min, info.min + 20))
    hi = int(rng.integers(max(lo, info.max - 20), info.max + 1))
    spec = ConvSpec(n, c, h, w, k, wt, m, b, lo, hi, stride, pads, dil, groups, zp, dt, out_dt, gv)
    want = ref.conv2d(x, zp, wt, m, b, lo, hi, np.dtype(out_dt), stride=stride, pads=pads, dilation=dil,
                      groups=groups, isg_groups=gv)
    return spec, x, want


@fast(550)
@given(seed=st.integers(0, 2**31), c=st.integers(1, 40), k=st.integers(1, 40), h=st.integers(1, 7),
       w=st.integers(1, 7), kh=st.integers(1, 3), kw=st.integers(1, 3), s=st.integers(1, 2),
       d=st.integers(1, 2), pads=st.tuples(*[st.integers(0, 2)] * 4), ng=st.integers(1, 3),
       dt=st.sampled_from(["int8", "uint8"]), tiling=tilings, n=st.integers(1, 2))
def test_conv_matches_reference(seed, c, k, h, w, kh, kw, s, d, pads, ng, dt, tiling, n):
    assume(h + pads[0] + pads[2] >= d * (kh - 1) + 1 and w + pads[1] + pads[3] >= kw)
    rng = np.random.default_rng(seed)
    spec, x, want = _conv_case(rng, n, c, h, w, k, kh, kw, (s, s), pads, (d, 1), 1, ng, dt,
                               str(rng.choice(["int8", "uint8"])))
    assert np.array_equal(run_layer(spec, x, tiling=tiling), want)


@fast(200)
@given(seed=st.integers(0, 2**31), c=st.integers(2, 40), h=st.integers(2, 7), kh=st.integers(1, 3),
       s=st.integers(1, 2), ng=st.integers(1, 3), tiling=tilings, kind=st.sampled_from(["dw", "grouped"]))
def test_depthwise_and_grouped_match_reference(seed, c, h, kh, s, ng, tiling, kind):
    rng = np.random.default_rng(seed)
    if kind == "dw":
        groups, k = c, c
    else:
        groups = int(rng.choice([g for g in range(2, c + 1) if c % g == 0]))
        k = groups * int(rng.integers(1, 4))
    p = kh // 2
    spec, x, want = _conv_case(rng, 1, c, h, h + 1, k, kh, kh, (s, s), (p, p, p, p), (1, 1), groups, ng,
                               "int8", "int8")
    assert spec.is_depthwise or kind == "grouped"
    assert np.array_equal(run_layer(spec, x, tiling=tiling), want)


@fast(100)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 6), c=st.integers(1, 50), k=st.integers(1, 40),
       ng=st.integers(1, 3), tiling=tilings)
def test_linear_matches_reference(seed, n, c, k, ng, tiling):
    rng = np.random.default_rng(seed)
    x = _act(rng, "uint8", (n, c))
    wt = rng.integers(-128, 128, (k, c)).astype(np.int8)
    gv = rng.choice(ng, c)
    m, b = rng.uniform(1e-5, 1e-3, k).astype(np.float32), rng.uniform(-3, 3, k).astype(np.float32)
    spec = LinearSpec(n, c, k, wt, m, b, -128, 127, x_zp=int(rng.integers(0, 256)), in_dtype="uint8",
                      isg_groups=gv)
    want = ref.linear(x, spec.x_zp, wt, m, b, -128, 127, np.int8, isg_groups=gv)
    assert np.array_equal(run_layer(spec, x, tiling=tiling), want)


@fast(120)
@given(seed=st.integers(0, 2**31), kind=st.sampled_from(["max", "avg", "global_avg"]), c=st.integers(1, 40),
       h=st.integers(2, 8), k=st.integers(1, 3), s=st.integers(1, 2), p=st.integers(0, 1),
       dt=st.sampled_from(["int8", "uint8"]), tiling=tilings)
def test_pool_matches_reference(seed, kind, c, h, k, s, p, dt, tiling):
    rng = np.random.default_rng(seed)
    x = _act(rng, dt, (2, c, h, h + 1))
    zp = int(rng.integers(np.iinfo(dt).min, np.iinfo(dt).max + 1))
    k = min(k, h)
    p = p if kind == "max" and k > 1 else 0
    if kind == "max":
        spec = PoolSpec("max", 2, c, h, h + 1, (k, k), (s, s), (p, p, p, p), in_dtype=dt, out_dtype=dt,
                        lo=int(np.iinfo(dt).min), hi=int(np.iinfo(dt).max))
        want = ref.max_pool2d(x, (k, k), (s, s), (p, p, p, p))
    else:
        win = (h, h + 1) if kind == "global_avg" else (k, k)
        m, b = ref.avg_pool_constants(rng.uniform(0.01, 0.1), rng.uniform(0.01, 0.1), 3, win[0] * win[1])
        spec = PoolSpec(kind, 2, c, h, h + 1, (k, k), (s, s), x_zp=zp, m=float(m), b=float(b), in_dtype=dt)
        want = ref.avg_pool2d(x, zp, win, (1, 1) if kind == "global_avg" else (s, s), m, b, -128, 127)
    assert np.array_equal(run_layer(spec, x, tiling=tiling), want)


@fast(100)
@given(seed=st.integers(0, 2**31), c=st.integers(1, 40), h=st.integers(1, 6), per_channel=st.booleans(),
       rows=st.integers(1, 50), nbuf=st.integers(1, 2))
def test_add_matches_reference(seed, c, h, per_channel, rows, nbuf):
    rng = np.random.default_rng(seed)
    a, b = _act(rng, "int8", (2, c, h, h)), _act(rng, "int8", (2, c, h, h))
    shape = (c,) if per_channel else ()
    ma, mb = rng.uniform(0.2, 2, shape).astype(np.float32), rng.uniform(0.2, 2, shape).astype(np.float32)
    bias = np.float32(rng.integers(-10, 10))
    spec = AddSpec(2, c, h, h, int(rng.integers(-128, 128)), int(rng.integers(-128, 128)), ma, mb, bias)
    want = ref.add(a, spec.a_zp, ma, b, spec.b_zp, mb, bias, -128, 127)
    assert np.array_equal(run_layer(spec, a, b, tiling=Tiling(rows=rows, nbuf=nbuf)), want)


def test_both_mode_values_and_cycles_agree_with_func_and_perf():
    rng = np.random.default_rng(1)
    spec, x, want = _conv_case(rng, 1, 20, 6, 6, 18, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 3, "int8", "int8")
    y, rep = run_layer(spec, x, mode="both")
    none, rep_perf = run_layer(spec, x, mode="perf")
    assert np.array_equal(y, want) and none is None and rep == rep_perf


def test_overflowing_accumulator_raises():
    x = np.full((1, 66000, 1, 1), -128, np.int8)
    wt = np.full((1, 66000, 1, 1), -128, np.int8)
    spec = ConvSpec(1, 66000, 1, 1, 1, wt, np.ones(1, np.float32), np.zeros(1, np.float32), x_zp=127)
    with pytest.raises(OverflowError, match="int32"):
        run_layer(spec, x)
    with pytest.raises(OverflowError):
        ref.conv2d(x, 127, wt, np.ones(1, np.float32), np.zeros(1, np.float32), -128, 127)


def _prog():
    rng = np.random.default_rng(2)
    spec, x, _ = _conv_case(rng, 1, 8, 4, 4, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 1, "int8", "int8")
    prog = build_conv(spec)
    return prog, pack_inputs(prog, x)


def test_functional_refuses_bad_inputs_and_programs():
    prog, inp = _prog()
    with pytest.raises(ValueError, match="missing input region 'x'"):
        run_program(prog, {})
    with pytest.raises(ValueError, match="not input regions"):
        run_program(prog, {**inp, "zz": inp["x"]})
    with pytest.raises(ValueError, match="expected .* int8"):
        run_program(prog, {"x": inp["x"].astype(np.int16)})
    with pytest.raises(TypeError, match="expected a Program"):
        run_program("prog", inp)
    prog.instrs[0].n0 = 10**6
    with pytest.raises(ValueError, match="instruction #0"):
        run_program(prog, inp)
    with pytest.raises(ValueError, match="mode"):
        simulate(prog, inp, DEFAULT_CONFIG, mode="fast")
    with pytest.raises(ValueError, match="input"):
        run_layer(AddSpec(1, 2, 2, 2, 0, 0, 1.0, 1.0, 0.0), np.zeros((1, 2, 2, 2), np.int8))


def test_gemm_float64_bound_is_asserted(monkeypatch):
    import hw_model.functional as fn
    prog, inp = _prog()
    monkeypatch.setattr(fn, "EXACT_BOUND", 1000.0)
    with pytest.raises(OverflowError, match="2\\^53"):
        run_program(prog, inp)


@pytest.mark.parametrize("f32_bound", [None, 0.0])
@pytest.mark.parametrize("c,wlo,xlo", [(200, 100, 200), (24, -128, 0), (5, -8, 0)])
def test_float32_and_float64_gemm_paths_match_reference(monkeypatch, f32_bound, c, wlo, xlo):
    """Large 8-bit reductions (bound above 2^24: float64) and small ones (float32) are both exact; with
    the float32 bound at 0 every GEMM runs in float64 and gives the same integers."""
    import hw_model.functional as fn
    if f32_bound is not None:
        monkeypatch.setattr(fn, "F32_EXACT_BOUND", f32_bound)
    rng = np.random.default_rng(c)
    x = rng.integers(xlo, 256, (1, c, 9, 8)).astype(np.uint8)
    wt = rng.integers(wlo, 128, (17, c, 3, 3)).astype(np.int8)
    m, b = np.full(17, 2.0**-19, np.float32), rng.uniform(-100, 100, 17).astype(np.float32)
    spec = ConvSpec(1, c, 9, 8, 17, wt, m, b, -128, 127, (1, 1), (1, 1, 1, 1), x_zp=3, in_dtype="uint8",
                    isg_groups=rng.choice(3, c))
    want = ref.conv2d(x, 3, wt, m, b, -128, 127, np.int8, pads=(1, 1, 1, 1), isg_groups=spec.isg_groups)
    assert len(np.unique(want)) > 10
    assert np.array_equal(run_layer(spec, x), want)


def test_program_is_validated_once_and_again_after_an_edit(monkeypatch):
    import hw_model.program as pm
    calls = []
    real = pm.validate_program
    monkeypatch.setattr(pm, "validate_program", lambda p, cfg=DEFAULT_CONFIG: (calls.append(1), real(p, cfg)))
    prog, inp = _prog()
    first = run_program(prog, inp)
    again = run_program(prog, inp)
    assert first and all(np.array_equal(again[k], first[k]) for k in first)
    simulate(prog, inp, DEFAULT_CONFIG, mode="both")
    assert len(calls) == 1  # a stored program is checked once
    gemm = next(i for i in prog.instrs if type(i).__name__ == "Gemm")
    w_addr, gemm.w_addr = gemm.w_addr, 10**7  # edited by hand: checked again, refused
    with pytest.raises(ValueError, match="overflows wbuf"):
        run_program(prog, inp)
    with pytest.raises(ValueError, match="overflows wbuf"):
        simulate(prog, inp, DEFAULT_CONFIG, mode="perf")
    gemm.w_addr = w_addr
    assert all(np.array_equal(v, first[k]) for k, v in run_program(prog, inp).items())
    run_program(prog, inp)
    assert len(calls) == 4  # checked once more after the fix (any field assignment counts), then cached
    next(r for r in prog.regions.values() if np.dtype(r.dtype).itemsize == 4).addr = 3  # a region moved
    with pytest.raises(ValueError, match="not a multiple of its itemsize"):
        run_program(prog, inp)
