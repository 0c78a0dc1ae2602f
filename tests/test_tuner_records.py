"""Tuning records: round trip; corrupt, foreign, old-version, other-NPUConfig records warn, default used."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hw_model.config import NPUConfig
from target_npu.tuner import (
    Measurer,
    Tiling,
    best_tiling,
    canonical,
    default_tiling,
    enumerate_space,
    layer_key,
    load_records,
    make_record,
    make_tuner,
    save_records,
    shape_spec,
    tkey,
    tune_model,
)
from target_npu.tuner.records import RECORD_VERSION, TuningRecordWarning

CFG = NPUConfig()
SPEC = shape_spec(32, 32, 14, 14, pads=1)


def _tuned(tmp_path: Path, kind: str = "random", trials: int = 12) -> tuple[Path, Tiling, int]:
    res = make_tuner(kind, SPEC, CFG, seed=3).tune(trials)
    path = save_records(tmp_path / "r.jsonl", [make_record(SPEC, t, c, CFG, kind) for t, c in res.history],
                        append=False)
    return path, *res.best


def test_round_trip(tmp_path: Path) -> None:
    path, best, cycles = _tuned(tmp_path)
    recs = load_records(path)
    assert len(recs) == 12 and all(r["version"] == RECORD_VERSION == 2 for r in recs)
    assert tkey(best_tiling(path, SPEC, CFG)) == tkey(best)
    assert tkey(best_tiling(recs, SPEC, CFG)) == tkey(best)
    assert Measurer(SPEC, CFG)([best]) == [cycles]
    assert best_tiling(path, shape_spec(16, 16, 8, 8), CFG) is None  # other layer: no record
    assert best_tiling(path, shape_spec(32, 32, 14, 14, pads=1, groups=2), CFG) is None  # grouped: another key


def test_layer_keys_distinct() -> None:
    specs = [shape_spec(32, 32, 14, 14, pads=1), shape_spec(32, 32, 14, 14, stride=2, pads=1),
             shape_spec(32, 32, 14, 14), shape_spec(32, 64, 14, 14), shape_spec(32, 32, 14, 12),
             shape_spec(32, 32, 14, 14, pads=(1, 1, 0, 0)), shape_spec(32, 32, 14, 14, groups=32),
             shape_spec(32, 32, 14, 14, dilation=(2, 2)), shape_spec(32, 32, 14, 14, n=2)]
    grouped = [shape_spec(32, 32, 14, 14) for _ in range(3)]
    grouped[0].isg_groups = np.repeat([1, 0], 16)
    grouped[1].isg_groups = np.repeat([0, 1], 16)  # the same blocks per group: the same program, the same key
    grouped[2].isg_groups = np.repeat([1, 2, 0, 0], 8)  # 1 block of group 1, 1 of group 2, 1 of group 0
    specs += [grouped[0], grouped[2]]
    assert len({layer_key(s) for s in specs}) == len(specs)
    assert layer_key(grouped[0]) == layer_key(grouped[1]) == layer_key(specs[2]) + "_isg1x1.0x1"
    assert layer_key(grouped[2]).endswith("_isg1x1.2x1.0x1")
    with pytest.raises(TypeError, match="ConvSpec"):
        layer_key("conv")


def _bad_lines() -> dict[str, str]:
    good = make_record(SPEC, default_tiling(SPEC, CFG), 10, CFG, "xgb")
    other_cfg = make_record(SPEC, default_tiling(SPEC, CFG), 5, CFG.replace(pe_arrays=2), "xgb")
    too_big = make_record(SPEC, Tiling(2, 14, 2, "ob_outer", 2), 1, NPUConfig(scratchpad_kib=8), "xgb")
    too_big["npu_config_hash"] = good["npu_config_hash"]
    # a version-1 record: the tuner's former channel-count knobs
    v1 = {"version": 1, "layer_key": "conv2d_ic32_oc32_h14_w14_k3x3_s1_p1_g1", "cycles": 3, "tuner": "xgb",
          "npu_config_hash": good["npu_config_hash"],
          "config": {"oc_tile": 32, "sp_tile": 14, "ic_tile": 32, "order": "oc_outer", "double_buffer": True}}
    return {
        "corrupt JSON": '{"version": 2, "layer_key": ',
        "version 1, this tuner reads version 2": json.dumps(v1),
        "version 99": json.dumps({**good, "version": 99}),
        "foreign record": json.dumps({"input": "x", "result": [1.0], "version": RECORD_VERSION}),
        "another NPUConfig": json.dumps(other_cfg),
        "bad config": json.dumps({**good, "config": {**good["config"], "loop_order": "zigzag"}}),
        "nbuf must be 1 or 2": json.dumps({**good, "config": {**good["config"], "nbuf": 3}}),
        "cycles must be": json.dumps({**good, "cycles": -3}),
        "not a JSON object": json.dumps([1, 2]),
    }


def test_invalid_tiling_record_warns(tmp_path: Path) -> None:
    """A record whose tiling overflows this NPUConfig's buffers (check_tiling) is skipped."""
    small = NPUConfig(scratchpad_kib=8)
    path = save_records(tmp_path / "r.jsonl", [make_record(SPEC, Tiling(2, 14, 2, "ob_outer", 2), 1, small, "x")])
    with pytest.warns(TuningRecordWarning, match=r"r.jsonl:1 ignored: tiling invalid .*overflows"):
        assert best_tiling(path, SPEC, small) is None


@pytest.mark.parametrize("why", list(_bad_lines()))
def test_bad_record_warns_and_falls_back(tmp_path: Path, why: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(_bad_lines()[why] + "\n")
    with pytest.warns(TuningRecordWarning, match=rf"{path.name}:1 ignored: .*{why}"):
        assert best_tiling(path, SPEC, CFG) is None


def test_bad_records_do_not_hide_good_ones(tmp_path: Path) -> None:
    path, best, _ = _tuned(tmp_path)
    lines = list(_bad_lines().values())
    with path.open("a") as f:
        f.write("\n".join(lines) + "\n\x00\x01garbage\n")
    with pytest.warns(TuningRecordWarning) as rec:
        assert tkey(best_tiling(path, SPEC, CFG)) == tkey(best)
    assert len(rec) == len(lines) + 1
    assert all(str(path) in str(w.message) for w in rec)


def test_missing_file_warns(tmp_path: Path) -> None:
    with pytest.warns(TuningRecordWarning, match="cannot read"):
        assert best_tiling(tmp_path / "none.jsonl", SPEC, CFG) is None


def _conv_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((32, 16, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 32, 1, 1)).astype(np.float32), "w2")
    w3 = numpy_helper.from_array(rng.standard_normal((32, 1, 3, 3)).astype(np.float32), "w3")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "w2"], ["c"], strides=[2, 2]),
             helper.make_node("Conv", ["c", "w3"], ["y"], pads=[1, 1, 1, 1], group=32)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 12, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w1, w2, w3])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_tune_model_writes_records_for_tunable_convs(tmp_path: Path) -> None:
    out = tmp_path / "m.jsonl"
    recs = tune_model(_conv_model(), trials=6, output=out, cfg=CFG, tuner="xgb", progress=False)
    specs = [shape_spec(16, 32, 12, 12, pads=1), shape_spec(32, 32, 12, 12, 1, 1, stride=2),
             shape_spec(32, 32, 6, 6, pads=1, groups=32)]
    assert {r["layer_key"] for r in recs} == {layer_key(s) for s in specs}
    assert len(recs) == 3 * 6
    for s in specs:
        t = best_tiling(out, s, CFG)
        assert tkey(t) in {tkey(p) for p in enumerate_space(s, CFG)}
        meas = Measurer(s, CFG)
        assert meas([t])[0] <= meas([canonical(s, default_tiling(s, CFG), CFG)])[0]
    with pytest.raises(ValueError, match="trials"):
        tune_model(_conv_model(), trials=0, output=out)
    with pytest.raises(ValueError, match="jobs"):
        tune_model(_conv_model(), trials=1, output=out, jobs=0)
    with pytest.raises(ValueError, match="not found"):
        tune_model(tmp_path / "nope.onnx", trials=1, output=out)


def test_tune_model_tunes_grouped_convs_and_skips_unknown_shapes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((32, 8, 3, 3)).astype(np.float32), "w")
    w1 = numpy_helper.from_array(rng.standard_normal((32, 32, 3)).astype(np.float32), "w1")
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], group=4, name="gc"),
             helper.make_node("Conv", ["z", "w1"], ["v"], name="c1d")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 8, 8]),
                                       helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 32, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("v", TensorProto.FLOAT, None)], [w, w1])
    with pytest.warns(UserWarning, match="'c1d': unknown or non-2-D"):
        recs = tune_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), trials=2,
                          output=tmp_path / "g.jsonl", progress=False)
    assert {r["layer_key"] for r in recs} == {layer_key(shape_spec(32, 32, 8, 8, pads=1, groups=4))}
