"""Random layer graphs (``ioso_tvm.testing.random_graph``) compile and equal the contract bit for bit."""
from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ioso_tvm
from ioso_tvm.testing import random_graph

_EMPTY_CLIP = re.compile(r"clip \[(-?\d+), (-?\d+)\]")


def _allowed_fallback(reason: str) -> bool:
    """Only a degenerate activation range (clip lo > hi: a constant output) may stay on the CPU."""
    m = _EMPTY_CLIP.match(reason)
    return bool(m) and int(m.group(1)) > int(m.group(2))


def _check(seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    b, outs = random_graph(rng)
    cm = ioso_tvm.compile(b.model(outs))
    x = (rng.standard_normal(b.shape) * 2).astype(np.float32)
    got = cm.run(x)
    got = [got] if isinstance(got, np.ndarray) else got
    want = b.run_reference(x, outs)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and np.array_equal(g, w)
    fallbacks = cm.report()["fallbacks"]
    assert all(_allowed_fallback(f["reason"]) for f in fallbacks), fallbacks
    return fallbacks


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1))
def test_random_graph_is_bit_exact(seed):
    _check(seed)


@pytest.mark.parametrize("seed", [339])
def test_regression_empty_relu_range_falls_back_exactly(seed):
    """Fuzz seed 339: a ReLU whose zero point lies above the 2-bit maximum (clip [4, 3]) equals
    the contract; if it stays on the CPU, the report says why."""
    _check(seed)
