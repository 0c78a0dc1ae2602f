"""Tuner: measurement dispatch (serial / Ray), warm start from records, early stopping, upstream names."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hw_model.config import NPUConfig
from target_npu.tuner import (
    GridTuner,
    Measurer,
    RandomTuner,
    XGBTuner,
    builder_cycles,
    dispatch,
    make_tuner,
    search,
    shape_spec,
    tune,
)
from target_npu.tuner.space import tkey

CFG = NPUConfig()


def _two_conv_model(c: int = 16, k: int = 32, hw: int = 8) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((k, c, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((k, k, 1, 1)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "w2"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w1, w2])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _lines(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


# ------------------------------------------------------------------------------- names
def test_upstream_tuner_names_are_aliases():
    spec = shape_spec(16, 32, 8, 8, pads=1)
    assert isinstance(make_tuner("gridsearch", spec, CFG), GridTuner)
    assert isinstance(make_tuner("grid", spec, CFG), GridTuner)
    assert isinstance(make_tuner("random", spec, CFG), RandomTuner)
    assert isinstance(make_tuner("xgb", spec, CFG), XGBTuner)
    with pytest.raises(ValueError, match=r"tuner must be one of \['grid', 'gridsearch', 'random', 'xgb'\]"):
        make_tuner("ga", spec, CFG)


# ------------------------------------------------------------------------- early stopping
@pytest.mark.parametrize("kind, patience, seed", [("gridsearch", 3, 0), ("random", 2, 1), ("random", 5, 2),
                                                  ("xgb", 4, 0)])
def test_early_stopping_stops_after_n_without_improvement(kind, patience, seed):
    spec = shape_spec(16, 32, 8, 8, pads=1)
    t = make_tuner(kind, spec, CFG, measurer=Measurer(spec, CFG, builder_cycles), seed=seed)
    res = t.tune(len(t.space), early_stopping=patience)
    cyc = [c for _, c in res.history]
    best_at = int(np.argmin(cyc))
    # stopped at the first point where `patience` measurements in a row brought nothing better
    since, stop = 0, len(cyc)
    for i, c in enumerate(cyc):
        since = 0 if c < min(cyc[:i], default=np.inf) else since + 1
        if since >= patience:
            stop = i + 1
            break
    assert stop < len(t.space)  # it did stop early on these spaces
    assert len(cyc) - stop < search.DEFAULT_BATCH  # the rest of the last batch at most
    assert all(c >= cyc[best_at] for c in cyc[best_at:])
    with pytest.raises(ValueError, match="early_stopping must be a positive int"):
        t.tune(2, early_stopping=0)


# ------------------------------------------------------------------------------ warm start
def test_warm_start_never_remeasures_and_keeps_old_records(tmp_path, monkeypatch):
    model = _two_conv_model()
    first = tmp_path / "a.jsonl"
    old = tune.tune_model(model, trials=5, output=first, measure="builder", progress=False, tuner="random")
    calls = []
    orig = Measurer._run

    def spy(self, todo):
        calls.extend((self.spec.c, tkey(t)) for t in todo)
        return orig(self, todo)

    monkeypatch.setattr(Measurer, "_run", spy)
    new = tune.tune_model(model, trials=4, output=first, measure="builder", progress=False, tuner="random",
                          warm_start=first, seed=1)  # resume in place
    old_keys = {(r["layer_key"], json.dumps(r["config"], sort_keys=True)) for r in old}
    new_keys = [(r["layer_key"], json.dumps(r["config"], sort_keys=True)) for r in new]
    assert new[: len(old) // 2] == old[: len(old) // 2]  # layer 1: its old records first
    assert old_keys <= set(new_keys) and len(new_keys) == len(set(new_keys)) == len(old) + 2 * 4
    assert len(calls) == 2 * 4 and len(set(calls)) == len(calls)  # only new points were measured
    assert _lines(first) == new


def test_warm_start_ignores_other_npu_configs(tmp_path):
    model = _two_conv_model()
    other = tmp_path / "o.jsonl"
    tune.tune_model(model, trials=3, output=other, measure="builder", progress=False, cfg=NPUConfig(pe_arrays=2))
    recs = tune.tune_model(model, trials=3, output=tmp_path / "n.jsonl", measure="builder", progress=False,
                           warm_start=other)
    assert len(recs) == 2 * 3 and {r["npu_config_hash"] for r in recs} == {recs[0]["npu_config_hash"]}


# -------------------------------------------------------------------------------- dispatch
class _CountingRay:
    """Stands in for RayExecutor: records the dispatched batches, maps in this process."""

    made: list = []

    def __init__(self, address=None, num_cpus=None):
        self.address, self.num_cpus, self.batches, self.closed = address, num_cpus, [], False
        _CountingRay.made.append(self)

    def map(self, fn, items):
        items = list(items)
        self.batches.append(len(items))
        return dispatch.SerialExecutor().map(fn, items)

    def shutdown(self):
        self.closed = True


@pytest.mark.parametrize("tuner", ["xgb", "random"])
def test_ray_dispatch_logic_equals_serial(tmp_path, monkeypatch, tuner):
    model = _two_conv_model()
    serial = tune.tune_model(model, trials=6, output=tmp_path / "s.jsonl", measure="builder", progress=False,
                             tuner=tuner)
    monkeypatch.setattr(dispatch, "RayExecutor", _CountingRay)
    _CountingRay.made = []
    via = tune.tune_model(model, trials=6, output=tmp_path / "r.jsonl", measure="builder", progress=False,
                          tuner=tuner, executor="ray", ray_address="ray://cluster:10001", jobs=3)
    assert via == serial and _lines(tmp_path / "r.jsonl") == _lines(tmp_path / "s.jsonl")
    (ex,) = _CountingRay.made  # one executor for all layers, closed at the end
    assert ex.closed and ex.address == "ray://cluster:10001" and ex.num_cpus == 3
    assert sum(ex.batches) >= 6 and all(n > 1 for n in ex.batches)  # batches went out as tasks


def test_executor_names_and_address_checks():
    assert dispatch.make_executor("serial", 1) is None
    assert dispatch.SerialExecutor().map(lambda v: v * 2, [1, 2, 3]) == [2, 4, 6]
    with pytest.raises(ValueError, match="executor must be one of"):
        dispatch.make_executor("dask")
    with pytest.raises(ValueError, match="ray_address needs executor='ray'"):
        dispatch.make_executor("serial", 1, "auto")


def test_cli_passes_tune_flags(tmp_path, monkeypatch, capsys):
    import target_npu.tuner as tuner_pkg
    from ioso_tvm.tvmc import cli

    got = {}
    monkeypatch.setattr(tuner_pkg, "tune_model", lambda *a, **k: got.update(k))
    real_find_spec = cli.importlib.util.find_spec
    ray_installed = {"yes": True}  # the tune itself is stubbed: only the executor choice is under test

    def find_spec(name, *a):
        if name == "ray":
            return object() if ray_installed["yes"] else None
        return real_find_spec(name, *a)

    monkeypatch.setattr(cli.importlib.util, "find_spec", find_spec)
    model = tmp_path / "m.onnx"
    onnx.save(_two_conv_model(), str(model))
    warm = tmp_path / "old.jsonl"
    warm.write_text("")
    argv = ["tune", str(model), "--target=ioso_npu", "--tuner", "gridsearch", "--early-stopping", "7",
            "--tuning-records", str(warm), "--ray-address", "auto", "-o", str(warm)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert got["tuner"] == "gridsearch" and got["early_stopping"] == 7 and got["warm_start"] == str(warm)
    assert got["executor"] == "ray" and got["ray_address"] == "auto" and got["jobs"] == 1
    assert cli.main([*argv[:-4], "--executor", "serial", "-o", str(tmp_path / "r.jsonl")]) == 0
    assert got["executor"] == "serial" and got["ray_address"] is None
    assert cli.main([*argv, "--executor", "serial"]) == 2
    assert "--ray-address needs --executor ray" in capsys.readouterr().err
    ray_installed["yes"] = False  # without Ray: the default measures in-process, asking for Ray is one line
    assert cli.main([*argv[:-4], "-o", str(tmp_path / "s.jsonl")]) == 0
    assert got["executor"] == "serial"
    assert cli.main([*argv[:-4], "--executor", "ray", "-o", str(tmp_path / "s.jsonl")]) == 2
    assert "needs Ray" in capsys.readouterr().err
    assert cli.main([*argv, "--early-stopping", "0"]) == 2
    assert "--early-stopping must be positive, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_tune_on_a_local_ray_equals_serial(tmp_path):
    """A 2-layer tune (TIR measurement) with Ray tasks on a local Ray gives the serial records (> 20 s: Ray
    starts in about 8 s, and its workers import TVM)."""
    pytest.importorskip("ray")
    model = _two_conv_model()
    serial = tune.tune_model(model, trials=4, output=tmp_path / "s.jsonl", progress=False)
    ray_recs = tune.tune_model(model, trials=4, output=tmp_path / "r.jsonl", progress=False, executor="ray", jobs=2)
    assert len({r["layer_key"] for r in serial}) == 2
    assert ray_recs == serial and _lines(tmp_path / "r.jsonl") == _lines(tmp_path / "s.jsonl")
