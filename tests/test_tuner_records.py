"""Tuning records: round trip; corrupt, foreign, other-version, other-NPUConfig records warn, default used."""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hw_model.config import NPUConfig
from target_npu.tuner import (
    ConvSpec,
    Tiling,
    best_tiling,
    default_tiling,
    enumerate_space,
    estimate_cycles,
    layer_key,
    load_records,
    make_tuner,
    save_records,
    tune_model,
)
from target_npu.tuner.records import RECORD_VERSION, TuningRecordWarning, make_record

CFG = NPUConfig()
SPEC = ConvSpec(32, 32, 14, 14)
KEY = layer_key(SPEC, CFG)


def _tuned(tmp_path: Path, kind: str = "random", trials: int = 12) -> tuple[Path, Tiling, int]:
    res = make_tuner(kind, SPEC, CFG, seed=3).tune(trials)
    path = save_records(tmp_path / "r.jsonl", [make_record(KEY, t, c, CFG, kind) for t, c in res.history])
    return path, *res.best


def test_round_trip(tmp_path: Path) -> None:
    path, best, cycles = _tuned(tmp_path)
    recs = load_records(path)
    assert len(recs) == 12 and all(r["version"] == RECORD_VERSION for r in recs)
    assert best_tiling(path, KEY, CFG, spec=SPEC) == best
    assert best_tiling(recs, KEY, CFG) == best
    assert estimate_cycles(SPEC, best, CFG) == cycles
    assert best_tiling(path, layer_key(ConvSpec(16, 16, 8, 8)), CFG) is None  # other layer: no record


def test_layer_keys_distinct() -> None:
    specs = {ConvSpec(32, 32, 14, 14), ConvSpec(32, 32, 14, 14, stride=2), ConvSpec(32, 32, 14, 14, 1, 1, pad=0),
             ConvSpec(32, 64, 14, 14), ConvSpec(32, 32, 14, 12)}
    assert len({layer_key(s) for s in specs}) == len(specs)


def _bad_lines() -> dict[str, str]:
    good = make_record(KEY, default_tiling(SPEC, CFG), 10, CFG, "xgb")
    other_cfg = make_record(KEY, default_tiling(SPEC, CFG), 5, CFG.replace(pe_arrays=2), "xgb")
    too_big = make_record(KEY, Tiling(512, 14, 32, "oc_outer", True), 1, CFG, "xgb")
    return {
        "corrupt JSON": '{"version": 1, "layer_key": ',
        "version 99": json.dumps({**good, "version": 99}),
        "foreign record": json.dumps({"input": "x", "result": [1.0], "version": RECORD_VERSION}),
        "another NPUConfig": json.dumps(other_cfg),
        "tiling invalid": json.dumps(too_big),
        "bad config": json.dumps({**good, "config": {**good["config"], "order": "zigzag"}}),
        "cycles must be": json.dumps({**good, "cycles": -3}),
        "not a JSON object": json.dumps([1, 2]),
    }


@pytest.mark.parametrize("why", list(_bad_lines()))
def test_bad_record_warns_and_falls_back(tmp_path: Path, why: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(_bad_lines()[why] + "\n")
    with pytest.warns(TuningRecordWarning, match=rf"{path.name}:1 ignored: .*{why}"):
        assert best_tiling(path, KEY, CFG, spec=SPEC) is None


def test_bad_records_do_not_hide_good_ones(tmp_path: Path) -> None:
    path, best, _ = _tuned(tmp_path)
    lines = list(_bad_lines().values())
    with path.open("a") as f:
        f.write("\n".join(lines) + "\n\x00\x01garbage\n")
    with pytest.warns(TuningRecordWarning) as rec:
        assert best_tiling(path, KEY, CFG, spec=SPEC) == best
    assert len(rec) == len(lines) + 1
    assert all(str(path) in str(w.message) for w in rec)


def test_missing_file_warns(tmp_path: Path) -> None:
    with pytest.warns(TuningRecordWarning, match="cannot read"):
        assert best_tiling(tmp_path / "none.jsonl", KEY, CFG) is None


def _conv_model() -> onnx.ModelProto:
    import numpy as np
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


def test_tune_model_writes_records_for_dense_convs(tmp_path: Path) -> None:
    out = tmp_path / "m.jsonl"
    with pytest.warns(UserWarning, match="grouped"):
        recs = tune_model(_conv_model(), trials=6, output=out, cfg=CFG, tuner="xgb", progress=False,
                          measure="estimate")
    specs = [ConvSpec(16, 32, 12, 12), ConvSpec(32, 32, 12, 12, 1, 1, 2, 0)]
    assert {r["layer_key"] for r in recs} == {layer_key(s) for s in specs}
    for s in specs:
        t = best_tiling(out, layer_key(s), CFG, spec=s)
        assert t in enumerate_space(s, CFG)
        assert estimate_cycles(s, t, CFG) <= estimate_cycles(s, default_tiling(s, CFG), CFG)
    with pytest.raises(ValueError, match="trials"):
        tune_model(_conv_model(), trials=0, output=out)
    with pytest.raises(ValueError, match="not found"):
        tune_model(tmp_path / "nope.onnx", trials=1, output=out)


def test_builder_hook_round_trip(tmp_path: Path) -> None:
    """best_builder_tiling gives the builder Tiling of the recorded best, which the builder accepts."""
    bridge = pytest.importorskip("target_npu.tuner.bridge")
    if not bridge.builder_available():
        pytest.skip("hw_model builder not present")
    import numpy as np

    from hw_model.layer_specs import ConvSpec as BConv
    from hw_model.layers import check_tiling

    path, best, _ = _tuned(tmp_path)
    z = np.zeros
    bspec = BConv(n=1, c=32, h=14, w=14, k=32, weight=z((32, 32, 3, 3), np.int8), m=z(32, np.float32),
                  b=z(32, np.float32), stride=(1, 1), pads=(1, 1, 1, 1))
    bt = bridge.best_builder_tiling(load_records(path), bspec, CFG)
    assert bt == bridge.to_builder_tiling(best, CFG)
    check_tiling(bspec, bt, CFG)
    assert (bt.ob_tile * 16, bt.rows, bt.cb_tile * 16, bt.nbuf == 2) == \
        (best.oc_tile, best.sp_tile, best.ic_tile, best.double_buffer)
    dw = BConv(n=1, c=32, h=14, w=14, k=32, weight=z((32, 1, 3, 3), np.int8), m=z(32, np.float32),
               b=z(32, np.float32), pads=(1, 1, 1, 1), groups=32)
    assert bridge.best_builder_tiling(load_records(path), dw, CFG) is None  # depthwise: not tuned, default


def test_builder_measure_matches_cycle_model() -> None:
    from target_npu.tuner.measure import builder_available, get_measure
    if not builder_available():
        pytest.skip("hw_model builder not present")
    from hw_model.cycles import simulate
    from hw_model.layers import build_conv
    from target_npu.tuner.bridge import _builder_spec, to_builder_tiling

    spec = ConvSpec(16, 32, 8, 8)
    fn = get_measure("builder")
    for t in enumerate_space(spec, CFG)[::7]:
        prog = build_conv(_builder_spec(spec), to_builder_tiling(t, CFG), CFG)
        assert fn(spec, t, CFG) == simulate(prog, None, CFG, mode="perf").report["cycles"]
