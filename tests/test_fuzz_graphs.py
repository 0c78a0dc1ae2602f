"""Random layer graphs (``onnx_builders.random_graph``) compile and equal the contract bit for bit."""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx_builders import random_graph

import ioso_tvm


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1))
def test_random_graph_is_bit_exact(seed):
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
    assert not cm.report()["fallbacks"]
