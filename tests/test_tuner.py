"""Tuner: validity filter, measurement cache, xgboost vs random on small enumerable spaces."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hw_model.config import NPUConfig
from target_npu.tuner import (
    ConvSpec,
    Measurer,
    Tiling,
    default_tiling,
    enumerate_space,
    estimate_cycles,
    make_tuner,
    why_invalid,
)
from target_npu.tuner.features import FEATURE_NAMES, features
from target_npu.tuner.space import tile_stats

CFG = NPUConfig()
SMALL_CFG = NPUConfig(scratchpad_kib=8, weight_buf_kib=8, acc_buf_kib=4)

specs = st.builds(
    ConvSpec, in_ch=st.integers(1, 80), out_ch=st.integers(1, 80), in_h=st.integers(3, 20),
    in_w=st.integers(3, 20), kh=st.sampled_from([1, 3]), kw=st.sampled_from([1, 3]),
    stride=st.sampled_from([1, 2]), pad=st.integers(0, 1))


@settings(max_examples=30, deadline=None)
@given(spec=specs, oc=st.integers(1, 6), ic=st.integers(1, 6), sp=st.integers(1, 20), db=st.booleans())
def test_validity_matches_buffer_capacity(spec: ConvSpec, oc: int, ic: int, sp: int, db: bool) -> None:
    t = Tiling(16 * oc, sp, 16 * ic, "sp_outer", db)
    why = why_invalid(spec, t, SMALL_CFG)
    in_range = 16 * oc <= -(-spec.out_ch // 16) * 16 and 16 * ic <= -(-spec.in_ch // 16) * 16 and sp <= spec.out_h
    if not in_range:
        assert why is not None
        return
    s = tile_stats(spec, t, SMALL_CFG)
    fits = max(s.scratch_frac, s.weight_frac, s.acc_frac) <= 1.0
    assert (why is None) == fits
    if not fits:
        assert "overflow" in why
        # the stated occupancy is the real byte count over the capacity
        bufs = 2 if db else 1
        assert s.weight_frac == pytest.approx(bufs * 16 * oc * 16 * ic * spec.kh * spec.kw / (8 * 1024))


@settings(max_examples=15, deadline=None)
@given(spec=specs)
def test_space_is_valid_and_tuners_never_measure_invalid_points(spec: ConvSpec) -> None:
    space = enumerate_space(spec, SMALL_CFG)
    assert all(why_invalid(spec, t, SMALL_CFG) is None for t in space)
    assert len(set(space)) == len(space)
    bad = [Tiling(16, 1, 16, "oc_outer", True).__class__(32 * 64, 1, 16, "oc_outer", True),
           Tiling(24, 1, 16, "oc_outer", True), Tiling(16, 1, 8, "oc_outer", True)]
    assert all(why_invalid(spec, t, SMALL_CFG) is not None for t in bad)
    if not space:
        with pytest.raises(ValueError, match="no valid tiling"):
            make_tuner("random", spec, SMALL_CFG)
        return
    seen = []

    def fn(s: ConvSpec, t: Tiling, c: NPUConfig) -> int:
        assert why_invalid(s, t, c) is None
        seen.append(t)
        return estimate_cycles(s, t, c)

    res = make_tuner("random", spec, SMALL_CFG, measurer=Measurer(spec, SMALL_CFG, fn), seed=1).tune(10)
    assert len(seen) == len(res.history) == min(10, len(space))


def test_estimate_rejects_invalid_and_features_shape() -> None:
    spec = ConvSpec(64, 64, 28, 28)
    with pytest.raises(ValueError, match="invalid tiling"):
        estimate_cycles(spec, Tiling(16, 1, 8), CFG)
    space = enumerate_space(spec, CFG)
    f = features(spec, space, CFG)
    assert f.shape == (len(space), len(FEATURE_NAMES)) and f.dtype == np.float32 and np.isfinite(f).all()


def test_measurer_cache_and_parallel_agree() -> None:
    spec = ConvSpec(32, 48, 12, 12)
    space = enumerate_space(spec, CFG)[:12]
    serial = Measurer(spec, CFG)
    a = serial(space + space[:5])
    assert serial.calls == len(space)
    serial(space[:3])
    assert serial.calls == len(space)
    b = Measurer(spec, CFG, jobs=2)(space)
    assert a[: len(space)] == b == [estimate_cycles(spec, t, CFG) for t in space]


def test_grid_exhausts_space_and_finds_optimum() -> None:
    spec = ConvSpec(32, 32, 14, 14)
    space = enumerate_space(spec, CFG)
    res = make_tuner("grid", spec, CFG).tune(len(space) + 5)
    assert [t for t, _ in res.history] == space
    assert res.best[1] == min(estimate_cycles(spec, t, CFG) for t in space)
    curve = res.best_curve()
    assert all(x >= y for x, y in zip(curve, curve[1:]))


@pytest.mark.parametrize("spec", [ConvSpec(32, 32, 14, 14), ConvSpec(48, 64, 16, 16)])
def test_xgb_finds_optimum_more_often_than_random(spec: ConvSpec) -> None:
    space = enumerate_space(spec, CFG)
    opt = min(estimate_cycles(spec, t, CFG) for t in space)
    budget = max(1, -(-len(space) // 10))
    seeds = range(6)
    hits = {k: sum(make_tuner(k, spec, CFG, seed=s).tune(budget).best[1] == opt for s in seeds)
            for k in ("xgb", "random")}
    gaps = {k: np.mean([make_tuner(k, spec, CFG, seed=s).tune(budget).best[1] / opt - 1 for s in seeds])
            for k in ("xgb", "random")}
    assert hits["xgb"] > hits["random"]
    assert gaps["xgb"] < gaps["random"]
    assert hits["xgb"] >= len(seeds) // 2


def test_xgb_never_worse_than_default() -> None:
    spec = ConvSpec(64, 64, 28, 28)
    d = estimate_cycles(spec, default_tiling(spec, CFG), CFG)
    for s in range(3):
        assert make_tuner("xgb", spec, CFG, seed=s).tune(5).best[1] <= d


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="tuner must be one of"):
        make_tuner("annealing", ConvSpec(16, 16, 4, 4), CFG)
    with pytest.raises(ValueError, match="n_trials"):
        make_tuner("grid", ConvSpec(16, 16, 4, 4), CFG).tune(0)
    with pytest.raises(ValueError, match="ConvSpec.in_ch"):
        ConvSpec(0, 16, 4, 4)
    with pytest.raises(ValueError, match="jobs"):
        Measurer(ConvSpec(16, 16, 4, 4), CFG, jobs=0)
