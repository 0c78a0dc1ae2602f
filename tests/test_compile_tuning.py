"""compile(tuning_records=...) applies the recorded tiling: another program, the same numbers."""
from __future__ import annotations

import numpy as np
import pytest

import ioso_tvm
from hw_model.cycles import simulate
from hw_model.layer_specs import Tiling
from ioso_tvm.testing import QDQBuilder
from target_npu import runtime
from target_npu.tuner import TuningRecordWarning, layer_key, make_record, save_records, tkey, tune_model


def test_tuning_records_change_program_and_keep_results(tmp_path):
    rng = np.random.default_rng(21)
    b = QDQBuilder((1, 32, 8, 8), rng)
    y = b.conv(b.input, 48)
    model = b.model([y])
    base = ioso_tvm.compile(model)
    i, conv = next((i, ly) for i, ly in enumerate(base.layers) if ly.kind == "conv")
    spec = runtime.to_spec(conv)
    t = Tiling(ob_tile=1, rows=2, cb_tile=1, loop_order="sp_outer", nbuf=1)
    path = save_records(tmp_path / "rec.jsonl", [make_record(spec, t, 1, base.config, "test")], append=False)
    tuned = ioso_tvm.compile(model, tuning_records=str(path))
    assert tuned.tilings[i] is not None and tkey(tuned.tilings[i]) == tkey(t)
    assert tuned.layer_instructions(i) != base.layer_instructions(i)
    x = rng.standard_normal(b.shape).astype(np.float32)
    want = b.run_reference(x, [y])[0]
    assert np.array_equal(tuned.run(x), want) and np.array_equal(base.run(x), want)
    loaded = ioso_tvm.load(tuned.export(tmp_path / "m.tar"))
    assert loaded.tilings[i] == tuned.tilings[i]
    assert np.array_equal(loaded.run(x), want)
    # a record for another NPUConfig: warned, default schedule
    other = save_records(tmp_path / "o.jsonl", [make_record(spec, t, 1, base.config.replace(pe_arrays=2), "x")])
    with pytest.warns(TuningRecordWarning, match="another NPUConfig"):
        assert ioso_tvm.compile(model, tuning_records=str(other)).tilings[i] is None


@pytest.mark.parametrize("seed", [5, 6])
def test_tune_model_records_reach_compile(tmp_path, seed):
    """tvmc-tune-style records of a QDQ model with ISG groups are found by compile for each conv layer; the
    compiled layer takes exactly the recorded best cycles (same group layout, same TIR path), never more
    than the default, and the outputs stay bit exact."""
    rng = np.random.default_rng(seed)
    b = QDQBuilder((1, 40, 12, 12), rng)
    y = b.conv(b.conv(b.input, 48), 48, groups=48)
    model = b.model([y])
    path = tmp_path / "rec.jsonl"
    recs = tune_model(model, trials=8, output=path, progress=False)
    base, tuned = ioso_tvm.compile(model), ioso_tvm.compile(model, tuning_records=str(path))
    convs = [i for i, ly in enumerate(base.layers) if ly.kind == "conv"]
    assert len(convs) == 2 and all(tuned.tilings[i] is not None for i in convs)
    best = {}
    for r in recs:
        best[r["layer_key"]] = min(best.get(r["layer_key"], r["cycles"]), r["cycles"])
    cfg = base.config
    for i in convs:  # the layer program the compiler links, measured alone as the tuner measures it
        key = layer_key(runtime.to_spec(base.layers[i]), cfg)
        cyc = [simulate(runtime.make_program(cm.layers[i], cfg, cm.tilings[i])[0], None, cfg, mode="perf")
               .report["cycles"] for cm in (tuned, base)]
        assert cyc[0] == best[key] <= cyc[1]
    assert tuned.report()["total_cycles"] <= base.report()["total_cycles"]
    assert "_isg" in layer_key(runtime.to_spec(base.layers[convs[0]]), base.config)
    x = rng.standard_normal(b.shape).astype(np.float32)
    want = b.run_reference(x, [y])[0]
    assert np.array_equal(tuned.run(x), want)
