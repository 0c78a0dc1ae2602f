"""Numbers derived from NPUConfig: the ISG accumulation order, read by the contract, the builder and the planner."""
from __future__ import annotations

import numpy as np
import pytest

from hw_model import reference as ref
from hw_model.builder import channel_slots
from hw_model.config import NPUConfig

SIGNS = [(0, -1, 1), (-1, 1, 0), (1, 0, -1), (0,), (-1, 1), (0, 0, 1), (1, -1, 0, 0)]


@pytest.mark.parametrize("signs", SIGNS)
def test_accumulation_order_is_scaled_groups_then_unity(signs):
    order = NPUConfig(isg_group_signs=signs).accumulation_order
    assert sorted(order) == list(range(len(signs)))
    scaled = [g for g in order if signs[g] != 0]
    assert list(order) == scaled + [g for g in order if signs[g] == 0] and scaled == sorted(scaled)
    assert NPUConfig().accumulation_order == (1, 2, 0)


@pytest.mark.parametrize("signs", SIGNS)
def test_builder_and_planner_follow_the_config_order(signs):
    pytest.importorskip("tvm")
    from target_npu.transform.permute_groups import group_rank

    cfg = NPUConfig(isg_group_signs=signs)
    assert np.array_equal(np.argsort(group_rank(cfg)), cfg.accumulation_order)
    gvec = np.repeat(np.arange(cfg.num_groups), cfg.granularity)[::-1].copy()
    slots, bgroups = channel_slots(gvec.size, gvec, cfg)
    runs = [g for i, g in enumerate(bgroups) if i == 0 or bgroups[i - 1] != g]
    assert runs == list(cfg.accumulation_order)
    assert np.array_equal(np.sort(gvec[slots[slots >= 0]], kind="stable"), np.sort(gvec))


@pytest.mark.parametrize("seed", range(5))
def test_reference_accumulates_in_the_config_order(seed):
    """D2 = the groups shifted and summed in ``cfg.accumulation_order``."""
    rng = np.random.default_rng(seed)
    cfg = NPUConfig()
    partial = rng.integers(-(2**20), 2**20, (cfg.num_groups, 4, 5)).astype(np.int64)
    want = np.zeros((4, 5), np.int64)
    for g in cfg.accumulation_order:
        want += ref.group_shift_add(partial[g], cfg.isg_group_signs[g], cfg.isg_shift)
    assert np.array_equal(ref.accumulate_groups(partial, cfg), want.astype(np.int32))


def test_reference_overflow_check_follows_the_config_order():
    """Default order (1, 2, 0): -0.9375 big, +1.0625 big, +big stays in int32. Signs (1, 0, -1), order
    (0, 2, 1): +1.0625 big + 0.9375 big = 2.2e9 leaves int32 before group 1 brings it back."""
    big = 1_100_000_000
    partial = np.array([big, -big, big], np.int64).reshape(3, 1)
    got = ref.accumulate_groups(partial, NPUConfig())
    assert got.dtype == np.int32 and got[0] == big - (big - (big >> 4)) + (big + (big >> 4))
    assert NPUConfig(isg_group_signs=(1, 0, -1)).accumulation_order == (0, 2, 1)
    with pytest.raises(OverflowError, match="D2 accumulator"):
        ref.accumulate_groups(partial, NPUConfig(isg_group_signs=(1, 0, -1)))
