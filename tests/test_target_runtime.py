"""Runtime: programs built per layer; schedule knobs change the program, never the numbers."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ioso_tvm
from hw_model.config import NPUConfig
from hw_model.layer_specs import Tiling
from hw_model.layers import check_tiling, default_tiling
from ioso_tvm.testing import QDQBuilder
from target_npu import runtime


def _conv_layer(seed: int, c: int, k: int, hw: int):
    rng = np.random.default_rng(seed)
    b = QDQBuilder((1, c, hw, hw), rng)
    y = b.conv(b.input, k, kernel=3, stride=1, pad=1)
    cm = ioso_tvm.compile(b.model([y]))
    conv = next(ly for ly in cm.layers if ly.kind == "conv")
    x = rng.integers(-128, 128, (1, c, hw, hw)).astype(np.int8)
    return cm, conv, x


@settings(max_examples=15, deadline=None, derandomize=True)
@given(st.integers(0, 2**31 - 1), st.sampled_from([16, 40]), st.sampled_from([16, 48]), st.integers(4, 9),
       st.sampled_from([(1, 1, 1, "ob_outer", 1), (2, 2, 1, "sp_outer", 2), (1, 3, 2, "ob_outer", 2)]))
def test_knobs_change_program_not_results(seed, c, k, hw, knobs):
    cm, conv, x = _conv_layer(seed, c, k, hw)
    t = Tiling(ob_tile=knobs[0], rows=knobs[1], cb_tile=knobs[2], loop_order=knobs[3], nbuf=knobs[4])
    spec = runtime.to_spec(conv)
    check_tiling(spec, t, cm.config)
    p_default, why = runtime.make_program(conv, cm.config)
    p_knob, why2 = runtime.make_program(conv, cm.config, t)
    assert why is None and why2 is None
    want = runtime.execute(conv, [x], cm.config)
    for prog in (p_default, p_knob):
        from hw_model.cycles import simulate
        from hw_model.layers_alu import pack_inputs, unpack_output
        got = unpack_output(prog, simulate(prog, pack_inputs(prog, x), cm.config, mode="func").outputs["out"])
        assert np.array_equal(got, want)
    if default_tiling(spec, cm.config) != t:
        assert p_default.instrs != p_knob.instrs


def test_mixed_dtype_residual_add_runs_on_the_npu():
    """An add of a uint8 (after ReLU) and an int8 tensor (no activation): on the NPU, exact."""
    rng = np.random.default_rng(7)
    b = QDQBuilder((1, 16, 4, 4), rng)
    x = b.conv(b.input, 16)
    y = b.conv(x, 16, act=None, signed_out=True)
    out = b.add(x, y)
    cm = ioso_tvm.compile(b.model([out]))
    row = next(r for r in cm.report()["layers"] if r["kind"] == "add")
    assert row["device"] == "npu" and row["cycles"] > 0
    xin = rng.standard_normal(b.shape).astype(np.float32)
    assert np.array_equal(cm.run(xin, mode="both"), b.run_reference(xin, [out])[0])


def test_rejected_layer_runs_on_cpu_with_reason():
    """A conv whose smallest tile does not fit a 1 KiB accumulator: the contract on the CPU, reason given."""
    rng = np.random.default_rng(7)
    b = QDQBuilder((1, 16, 6, 6), rng)
    out = b.conv(b.input, 16)
    cm = ioso_tvm.compile(b.model([out]), config=NPUConfig(scratchpad_kib=1, weight_buf_kib=1, acc_buf_kib=1))
    row = next(r for r in cm.report()["layers"] if r["kind"] == "conv")
    assert row["device"] == "cpu" and "hw_model rejects" in row["cpu_reason"]
    xin = rng.standard_normal(b.shape).astype(np.float32)
    assert np.array_equal(cm.run(xin, mode="both"), b.run_reference(xin, [out])[0])


def test_perf_mode_records_model_cycles():
    rng = np.random.default_rng(8)
    b = QDQBuilder((1, 16, 6, 6), rng)
    y = b.gap(b.maxpool(b.conv(b.input, 32)))
    cm = ioso_tvm.compile(b.model([y]))
    x = rng.standard_normal(b.shape).astype(np.float32)
    out = cm.run(x, mode="perf")
    assert np.array_equal(out, b.run_reference(x, [y])[0])
    rows = {r["name"]: r for r in cm.report()["layers"]}
    npu = [n for n in cm.profile.cycles if rows[n]["device"] == "npu"]
    assert len(npu) == 3 and all(cm.profile.cycles[n] == rows[n]["cycles"] > 0 for n in npu)
    with pytest.raises(ValueError, match="mode"):
        runtime.Profile().reset("turbo")
