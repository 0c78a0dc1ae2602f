"""compile(tuning_records=...) applies the recorded tiling: another program, the same numbers."""
from __future__ import annotations

import numpy as np
from onnx_builders import QDQBuilder

import ioso_tvm
from target_npu import runtime
from target_npu.tuner.bridge import from_builder_spec
from target_npu.tuner.records import layer_key, make_record, save_records
from target_npu.tuner.space import Tiling as TunerTiling


def test_tuning_records_change_program_and_keep_results(tmp_path):
    rng = np.random.default_rng(21)
    b = QDQBuilder((1, 32, 8, 8), rng)
    y = b.conv(b.input, 48)
    model = b.model([y])
    base = ioso_tvm.compile(model)
    i, conv = next((i, ly) for i, ly in enumerate(base.layers) if ly.kind == "conv")
    key = layer_key(from_builder_spec(runtime.to_spec(conv)), base.config)
    t = TunerTiling(oc_tile=16, sp_tile=2, ic_tile=16, order="sp_outer", double_buffer=False)
    path = save_records(tmp_path / "rec.jsonl", [make_record(key, t, 1, base.config, "test")], append=False)
    tuned = ioso_tvm.compile(model, tuning_records=str(path))
    assert tuned.tilings[i] is not None and tuned.tilings[i].rows == 2 and tuned.tilings[i].nbuf == 1
    assert tuned.programs[i].instrs != base.programs[i].instrs
    x = rng.standard_normal(b.shape).astype(np.float32)
    want = b.run_reference(x, [y])[0]
    assert np.array_equal(tuned.run(x), want) and np.array_equal(base.run(x), want)
    loaded = ioso_tvm.load(tuned.export(tmp_path / "m.tar"))
    assert loaded.tilings[i] == tuned.tilings[i]
    assert np.array_equal(loaded.run(x), want)
