"""Properties of the numeric contract (hw_model.reference) itself, checked against independent code."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hw_model import reference as ref
from hw_model.config import DEFAULT_CONFIG, NPUConfig

FAST = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


def naive_conv(x, zp, w, stride, pads, dil, groups):
    """int64 conv by explicit window loops (independent of reference._im2col)."""
    n, c, h, wd = x.shape
    k, cg, kh, kw = w.shape
    xp = np.pad(x.astype(np.int64) - zp, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    oh = (xp.shape[2] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (xp.shape[3] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((n, k, oh, ow), np.int64)
    kpg = k // groups
    for oy in range(oh):
        for ox in range(ow):
            ys = oy * stride[0] + dil[0] * np.arange(kh)
            xs = ox * stride[1] + dil[1] * np.arange(kw)
            win = xp[:, :, ys][:, :, :, xs]  # (n, c, kh, kw)
            for g in range(groups):
                out[:, g * kpg:(g + 1) * kpg, oy, ox] = np.einsum(
                    "ncij,kcij->nk", win[:, g * cg:(g + 1) * cg], w[g * kpg:(g + 1) * kpg].astype(np.int64))
    return out


@settings(max_examples=60, **FAST)
@given(seed=st.integers(0, 2**31), c=st.integers(1, 6), k=st.integers(1, 6), h=st.integers(3, 7),
       kh=st.integers(1, 3), s=st.integers(1, 2), d=st.integers(1, 2), p=st.integers(0, 2), dw=st.booleans())
def test_unity_conv_equals_plain_int64_conv(seed, c, k, h, kh, s, d, p, dw):
    rng = np.random.default_rng(seed)
    groups, k = (c, c) if dw else (1, k)
    x = rng.integers(0, 256, (2, c, h, h + 1)).astype(np.uint8)
    w = rng.integers(-128, 128, (k, c // groups, kh, kh)).astype(np.int8)
    zp = int(rng.integers(0, 256))
    if h + 2 * p < d * (kh - 1) + 1:
        return
    got = ref.conv2d_acc(x, zp, w, stride=(s, s), pads=(p, p, p, p), dilation=(d, d), groups=groups)
    assert got.dtype == np.int32
    assert np.array_equal(got, naive_conv(x, zp, w, (s, s), (p, p, p, p), (d, d), groups))


@settings(max_examples=40, **FAST)
@given(seed=st.integers(0, 2**31), c=st.integers(1, 8), ng=st.integers(1, 3))
def test_isg_conv_is_shift_add_of_per_group_convs(seed, c, ng):
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (1, c, 4, 4)).astype(np.int8)
    w = rng.integers(-128, 128, (3, c, 3, 3)).astype(np.int8)
    gv = rng.integers(0, ng, c)
    want = np.zeros((1, 3, 2, 2), np.int64)
    for g, sign in enumerate(DEFAULT_CONFIG.isg_group_signs):
        part = naive_conv(x * (gv == g)[None, :, None, None], 0, w, (1, 1), (0,) * 4, (1, 1), 1)
        want += part + sign * np.floor_divide(part, 16)
    assert np.array_equal(ref.conv2d_acc(x, 0, w, isg_groups=gv), want)


def test_shift_add_floors_like_python_shift():
    d = np.random.default_rng(0).integers(-(2**31), 2**31, 5000)
    for sign in (-1, 0, 1):
        want = np.array([int(v) + sign * (int(v) >> 4) for v in d])
        assert np.array_equal(ref.group_shift_add(d, sign, 4), want)
    assert ref.group_shift_add(np.array([-1]), -1, 4)[0] == 0  # -1 >> 4 == -1 (floor), -1 - (-1) = 0
    assert ref.group_shift_add(np.array([-17]), 1, 4)[0] == -19  # -17 >> 4 == -2


def test_group_factors_match_config():
    cfg = NPUConfig()
    assert cfg.group_factors == (1.0, 1 - 2**-4, 1 + 2**-4)
    d = np.arange(-2**20, 2**20, 16 * 7)  # multiples of 16: the shift is exact
    for sign, f in zip(cfg.isg_group_signs, cfg.group_factors):
        assert np.array_equal(ref.group_shift_add(d, sign, cfg.isg_shift), (d * f).astype(np.int64))


def test_norm_rounds_twice_not_fused():
    rng = np.random.default_rng(1)
    acc = rng.integers(-(2**20), 2**20, 200000).astype(np.int32)
    m = np.float32(rng.uniform(1e-4, 1e-2))
    b = np.float32(rng.uniform(-50, 50))
    t = ref.norm(acc, m, b, axis=0)
    two = (acc.astype(np.float32) * m).astype(np.float32) + b
    fused = (acc.astype(np.float64) * np.float64(m) + np.float64(b)).astype(np.float32)
    assert t.dtype == np.float32 and np.array_equal(t, two)
    assert np.any(t != fused)  # the contract is distinguishable from an FMA on this data


def test_int32_to_float32_conversion_rounds_half_even():
    acc = np.array([2**24 + 1, 2**24 + 3], np.int32)  # halfway between two float32 values
    assert ref.norm(acc, np.float32(1), np.float32(0), axis=0).tolist() == [2.0**24, 2.0**24 + 4]


def test_round_half_even_ties():
    t = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5], np.float32)
    assert ref.act_quant(t, -128, 127).tolist() == [0, 2, 2, 0, -2, -2, 126, 127]
    assert ref.quantize(np.array([0.25, 0.75]), 0.5, 0, -128, 127).tolist() == [0, 2]


def test_clip_bounds():
    assert ref.clip_bounds(8, True) == (-128, 127)
    assert ref.clip_bounds(8, False) == (0, 255)
    assert ref.clip_bounds(4, True) == (-8, 7)
    assert ref.clip_bounds(8, True, "relu", zp=-5) == (-5, 127)
    assert ref.clip_bounds(8, False, "relu6", scale=0.05, zp=10) == (10, 130)
    assert ref.clip_bounds(8, False, "relu6", scale=0.01, zp=10) == (10, 255)
    for bad, match in (((9, True), "bits"), ((8, True, "gelu"), "not a clip"), ((8, True, "relu6"), "scale")):
        with pytest.raises(ValueError, match=match):
            ref.clip_bounds(*bad)


def test_overflow_detection():
    big = np.full((1, 1, 1, 1), 2**31 - 10, np.int64)
    zero = np.zeros_like(big)
    with pytest.raises(OverflowError, match="D1 partial sum"):
        ref.accumulate_groups(np.stack([big + 100, zero, zero]))
    with pytest.raises(OverflowError, match="shifted partial sum"):
        ref.accumulate_groups(np.stack([zero, zero, big]))  # x(1+2^-4) leaves int32
    with pytest.raises(OverflowError, match="D2"):
        ref.accumulate_groups(np.stack([big, big // 2, zero]))


def test_max_pool_padding_never_wins_and_add_formula():
    x = np.full((1, 1, 2, 2), -128, np.int8)
    assert np.array_equal(ref.max_pool2d(x, (3, 3), (1, 1), (1, 1, 1, 1)), x)
    a = np.array([[[[10]]]], np.int8)
    b = np.array([[[[-3]]]], np.int8)
    ma, mb, bias = ref.add_constants(0.1, 0.2, 0.05, 4)
    want = np.float32(np.float32(np.float32(8 * ma) + np.float32(-5 * mb)) + bias)
    assert ref.add(a, 2, ma, b, 2, mb, bias, -128, 127)[0, 0, 0, 0] == np.rint(want)
