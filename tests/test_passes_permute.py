"""Group permutation planning: contiguous groups, fan-out counts, permuted networks stay bit exact."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ioso_tvm
from hw_model.config import DEFAULT_CONFIG as CFG
from ioso_tvm.testing import QDQBuilder, granular_groups
from target_npu.transform.permute_groups import group_rank, is_contiguous, wished_order


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 80), st.integers(0, 2**31 - 1))
def test_wished_order_meets_the_contract(c, seed):
    g = granular_groups(c, np.random.default_rng(seed), CFG)
    order = wished_order(g, CFG)
    assert sorted(order) == list(range(c))
    s = g[order]
    assert is_contiguous(s, CFG)
    runs = [int(v) for i, v in enumerate(s) if i == 0 or s[i - 1] != v]
    assert len(runs) == len(set(runs))  # each group one contiguous run
    sizes = [int((s == r).sum()) for r in runs]
    assert all(n % CFG.granularity == 0 for n in sizes[:-1])  # only the last run may be a remainder
    rank = group_rank(CFG)
    full = [r for r, n in zip(runs, sizes) if n % CFG.granularity == 0]
    assert [rank[r] for r in full] == sorted(rank[r] for r in full)  # scaled groups first, then unity


def _resnet_like(rng, c=32):
    b = QDQBuilder((1, 3, 8, 8), rng)
    x = b.maxpool(b.conv(b.input, c, isg=False))
    for _ in range(2):
        y = b.conv(b.conv(x, c), c, act=None, signed_out=True)
        x = b.add(x, y)
    y = b.conv(x, 2 * c, stride=2)
    return b, b.linear(b.gap(y), 10)


def _mobilenet_like(rng, c=32):
    b = QDQBuilder((1, 3, 8, 8), rng)
    x = b.conv(b.input, c, isg=False, act="relu6")
    for _ in range(2):
        e = b.conv(x, 2 * c, kernel=1, pad=0, act="relu6")
        d = b.conv(e, 2 * c, groups=2 * c, act="relu6")
        p = b.conv(d, c, kernel=1, pad=0, act=None, signed_out=True)
        x = b.add(x, p, act=None)
    return b, b.linear(b.gap(x), 10)


@pytest.mark.parametrize("build", [_resnet_like, _mobilenet_like])
@pytest.mark.parametrize("seed", range(4))
def test_permuted_networks_stay_bit_exact(build, seed):
    rng = np.random.default_rng(seed)
    b, out = build(rng)
    cm = ioso_tvm.compile(b.model([out]))
    x = rng.standard_normal(b.shape).astype(np.float32)
    assert np.array_equal(cm.run(x), b.run_reference(x, [out])[0])
    rep = cm.report()["permutes"]
    assert rep["permuted_tensors"] > 0
    gathered = 0
    for ly in cm.layers:
        if ly.kind == "conv" and (ly.is_linear or ly.spec.groups == 1) and len(np.unique(ly.isg_groups)) > 1:
            gathered += not is_contiguous(ly.isg_groups, CFG)
    assert gathered == rep["gathered_loads"]


def _fanout(rng, same: bool, expose: bool):
    b = QDQBuilder((1, 16, 6, 6), rng)
    x = b.conv(b.input, 48, isg=False)
    g1 = granular_groups(48, rng, CFG)
    g2 = g1 if same else np.roll(g1, 16) if len(set(g1)) > 1 else (g1 + 1) % 3
    while not same and np.array_equal(np.sort(g2), np.sort(g1)) and is_contiguous(g2[wished_order(g1, CFG)], CFG):
        g2 = granular_groups(48, rng, CFG)
    outs = [b.conv(x, 16, group_vec=g1), b.conv(x, 16, group_vec=g2)]
    return b, outs + ([x] if expose else [])


@pytest.mark.parametrize("same,expose", [(True, False), (False, False), (True, True)])
def test_fanout_counts(same, expose):
    rng = np.random.default_rng(11)
    b, outs = _fanout(rng, same, expose)
    cm = ioso_tvm.compile(b.model(outs))
    rep = cm.report()["permutes"]
    x = rng.standard_normal(b.shape).astype(np.float32)
    for got, want in zip(cm.run(x), b.run_reference(x, outs)):
        assert np.array_equal(got, want)
    convs = [ly for ly in cm.layers if ly.kind == "conv" and len(np.unique(ly.isg_groups)) > 1]
    if expose:  # the shared tensor is a graph output: original order kept, consumers gather
        assert rep["permuted_tensors"] == 0
        assert rep["gathered_loads"] == sum(not is_contiguous(c.isg_groups, CFG) for c in convs)
        assert rep["permutes_needed"] == (rep["gathered_loads"] > 0)
    elif same:
        assert rep["gathered_loads"] == 0 and rep["permutes_needed"] == 0
    else:
        assert rep["gathered_loads"] == 1 and rep["permutes_needed"] == 0


def test_granularity_violation_is_an_error():
    rng = np.random.default_rng(12)
    b = QDQBuilder((1, 16, 4, 4), rng)
    g = np.array([0] * 8 + [1] * 8)  # two groups of 8: two remainders
    y = b.conv(b.input, 16, group_vec=g)
    with pytest.raises(ValueError, match="granularity"):
        ioso_tvm.compile(b.model([y]))
