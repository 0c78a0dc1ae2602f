"""Bad inputs across the stack, table-driven: each case names the exact outcome it expects.

``ERRORS``: a clear error, by exception type and a message naming the argument / layer / file.
``FALLBACKS``: the layer runs on the CPU, the report and the log give the reason, and the
result still equals the contract (or onnxruntime's float result within one step for a float
CPU op). ``CLI``: one line on stderr and a non-zero exit status.
"""
from __future__ import annotations

import json
import logging
import re

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

import ioso_tvm
from hw_model.config import NPUConfig
from hw_model.isa import Program
from hw_model.layer_specs import ConvSpec
from hw_model.layers import build_conv
from ioso_tvm.calib import CalibConfig, calibrate
from ioso_tvm.models import resnet20
from ioso_tvm.testing import QDQBuilder
from ioso_tvm.tvmc.cli import main as tvmc


def _qdq(c=16, hw=5, seed=0, **conv):
    rng = np.random.default_rng(seed)
    b = QDQBuilder((1, c, hw, hw), rng)
    y = b.conv(b.input, 16, **conv)
    return b, y, b.model([y])


def _saved(tmp_path, model=None, name="m.onnx"):
    path = tmp_path / name
    onnx.save(model if model is not None else _qdq()[2], str(path))
    return path


def _compiled():
    b, y, m = _qdq()
    return b, y, ioso_tvm.compile(m)


def _edit_gamma(m, value):
    for init in m.graph.initializer:
        if init.name.startswith("gamma"):
            g = numpy_helper.to_array(init).copy()
            g.flat[0] = value
            init.CopyFrom(numpy_helper.from_array(g, init.name))
    return m


def _edit_weights(m, value):
    for init in m.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.int8 and arr.ndim == 4:
            arr = arr.copy()
            arr.flat[0] = value
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    return m


def _with_unsupported_op(tmp_path):
    m = _qdq()[2]
    out = m.graph.output[0].name
    m.graph.node.append(helper.make_node("Sin", [out], ["sin_out"]))
    m.graph.output[0].name = "sin_out"
    return _saved(tmp_path, m)


def _one_group_violation():
    rng = np.random.default_rng(1)
    b = QDQBuilder((1, 32, 4, 4), rng)
    g = np.tile(np.arange(3), 11)[:32]  # every group scattered: not whole 16-channel blocks
    y = b.conv(b.input, 16, group_vec=g)
    return b.model([y])


def _hand_edited_program(_):
    rng = np.random.default_rng(0)
    spec = ConvSpec(1, 16, 4, 4, 16, rng.integers(-8, 8, (16, 16, 1, 1)).astype(np.int8),
                    np.full(16, 1e-2, np.float32), np.zeros(16, np.float32))
    d = json.loads(build_conv(spec).to_json())
    assert d["instrs"][0]["op"] == "LOAD"
    d["instrs"][0]["dram_offset"] = 10 ** 9
    Program.from_json(json.dumps(d)).validate()


def _calib(data, model=None, **kw):
    return lambda _: calibrate(model or resnet20(), data, **{"method": "rtn", **kw},
                               config=CalibConfig(iters=1, act_iters=1, progress=False, num_samples=8, batch_size=4))


_good = torch.rand(8, 1, 32, 32)
_nan = _good.clone()
_nan[0, 0, 0, 0] = float("nan")


def _inf_weights():
    m = resnet20()
    with torch.no_grad():
        next(m.parameters()).view(-1)[0] = float("inf")
    return m


def _wrong_version_artifact(tmp_path):
    import tarfile

    path = _compiled()[2].export(tmp_path / "m.tar")
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    manifest = json.loads(members["manifest.json"])
    manifest["format_version"] = 99
    members["manifest.json"] = json.dumps(manifest).encode()
    other = tmp_path / "other.tar"
    import io
    with tarfile.open(other, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ioso_tvm.load(other)


def _truncated(tmp_path):
    path = _saved(tmp_path)
    path.write_bytes(path.read_bytes()[:200])
    ioso_tvm.compile(str(path))


def _garbage(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"\x00\xff not a protobuf \x13" * 10)
    ioso_tvm.compile(str(path))


def _dynamic(_):
    m = _qdq()[2]
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    ioso_tvm.compile(m)


def _run_with(inputs):
    def act(_):
        cm = _compiled()[2]
        cm.run(inputs)
    return act


ERRORS = [  # id, action(tmp_path), exception, message pattern
    ("missing onnx file", lambda t: ioso_tvm.compile(str(t / "nope.onnx")), FileNotFoundError, "nope.onnx"),
    ("garbage onnx file", _garbage, ValueError, "garbage.onnx"),
    ("truncated onnx file", _truncated, ValueError, "m.onnx"),
    ("model of a wrong type", lambda t: ioso_tvm.compile(3.5), TypeError, "model"),
    ("unknown target", lambda t: ioso_tvm.compile(_qdq()[2], target="vta"), ValueError, "target"),
    ("config of a wrong type", lambda t: ioso_tvm.compile(_qdq()[2], config={"pe_arrays": 2}), TypeError, "config"),
    ("dynamic shape without input_shapes", _dynamic, ValueError, "input_shapes"),
    ("missing tuning records", lambda t: ioso_tvm.compile(_qdq()[2], tuning_records=t / "r.json"),
     FileNotFoundError, "r.json"),
    ("gamma value not a group factor", lambda t: ioso_tvm.compile(_edit_gamma(_qdq()[2], 1.5)), ValueError,
     "gamma value 1.5"),
    ("groups not matching the granularity", lambda t: ioso_tvm.compile(_one_group_violation()), ValueError,
     "granularity"),
    ("model groups on a one-group NPU", lambda t: ioso_tvm.compile(_qdq()[2], config=NPUConfig(isg_group_signs=(0,))),
     ValueError, "isg_group_signs|gamma"),
    ("weights outside the declared bit width", lambda t: ioso_tvm.compile(_edit_weights(_qdq(wbits=4)[2], 100)),
     ValueError, "conv1: weights leave the declared 4-bit range"),
    ("run: wrong input name", _run_with({"image": np.zeros((1, 16, 5, 5), np.float32)}), ValueError, "input"),
    ("run: wrong input shape", _run_with(np.zeros((1, 8, 5, 5), np.float32)), ValueError, r"\[1, 16, 5, 5\]"),
    ("run: wrong input dtype", _run_with(np.zeros((1, 16, 5, 5), np.float64)), ValueError, "float32"),
    ("run: unknown mode", lambda t: _compiled()[2].run(np.zeros((1, 16, 5, 5), np.float32), mode="fast"),
     ValueError, "mode"),
    ("artifact of another format version", _wrong_version_artifact, ValueError, "format version 99"),
    ("artifact that is not a tar", lambda t: ioso_tvm.load(_saved(t)), ValueError, "m.onnx"),
    ("program addressing outside a buffer", _hand_edited_program, ValueError, "out of range of region 'x'"),
    ("NPUConfig with a negative field", lambda t: NPUConfig(pe_arrays=-1), ValueError, "pe_arrays"),
    ("NPUConfig from a dict with an unknown field", lambda t: NPUConfig.from_dict({"arrays": 2}), ValueError,
     "arrays"),
    ("calibration data with NaN", _calib(_nan), ValueError, "NaN|finite"),
    ("float weights with Inf", _calib(_good, model=_inf_weights()), ValueError, "finite|Inf|inf"),
    ("weight bits 1", _calib(_good, wbits=1), ValueError, "wbits"),
    ("activation bits 9", _calib(_good, abits=9), ValueError, "abits"),
    ("empty calibration set", _calib(torch.zeros(0, 1, 32, 32)), ValueError, "calib"),
    ("calibration data with the wrong channels", _calib(torch.rand(8, 3, 32, 32)), ValueError, "channel|shape"),
    ("unknown calibration method", _calib(_good, method="gptq"), ValueError, "method"),
    ("export of a float model", lambda t: ioso_tvm.export_onnx(resnet20(), str(t / "x.onnx")), TypeError,
     "QuantModel|qmodel"),
]


@pytest.mark.parametrize("action, exc, match", [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_clear_error(tmp_path, action, exc, match):
    with pytest.raises(exc, match=match):
        action(tmp_path)


def _grouped(**kw):
    rng = np.random.default_rng(7)
    b = QDQBuilder((1, 16, 6, 6), rng)
    y = b.conv(b.input, 16, isg=False, **kw)
    return b, y


FALLBACKS = [  # id, builder -> (QDQBuilder, output), NPUConfig, words the reason must contain
    ("9x9 kernel", lambda: _grouped(kernel=9, pad=4), NPUConfig(), "kernel"),
    ("layer larger than the scratchpad even after tiling",
     lambda: _grouped(), NPUConfig(scratchpad_kib=1, weight_buf_kib=1, acc_buf_kib=1), "fit|buffer|scratchpad"),
]


@pytest.mark.parametrize("build, cfg, reason", [c[1:] for c in FALLBACKS], ids=[c[0] for c in FALLBACKS])
def test_cpu_fallback_with_reason(caplog, build, cfg, reason):
    b, y = build()
    m = b.model([y])
    caplog.set_level(logging.INFO)
    cm = ioso_tvm.compile(m, config=cfg)
    rep = cm.report()
    reasons = [f["reason"] for f in rep["fallbacks"]] + [r["cpu_reason"] or "" for r in rep["layers"]
                                                         if r["kind"] != "input" and r["device"] == "cpu"]
    assert any(re.search(reason, r) for r in reasons), reasons
    x = np.random.default_rng(0).standard_normal(b.shape).astype(np.float32)
    got, want = cm.run(x), b.run_reference(x, [y])[0]
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= y.scale * 1.0001  # exact on the NPU path, one step on a float CPU op


EXACT = [  # id, input channels, output channels, conv groups: odd shapes the NPU runs, zero-padded to 16
    ("20 channels (not a multiple of 16)", 20, 16, 1),
    ("grouped conv, 2 groups", 16, 16, 2),
    ("grouped conv, 3 groups of 8", 24, 24, 3),
    ("depthwise, 24 channels", 24, 24, 24),
    ("depthwise, 20 channels", 20, 20, 20),
]


@pytest.mark.parametrize("c, k, groups", [e[1:] for e in EXACT], ids=[e[0] for e in EXACT])
def test_odd_channels_and_groups_run_on_the_npu_exactly(c, k, groups):
    rng = np.random.default_rng(c * groups)
    b = QDQBuilder((1, c, 6, 6), rng)
    y = b.conv(b.input, k, groups=groups, isg=groups == 1)
    cm = ioso_tvm.compile(b.model([y]))
    rep = cm.report()
    assert not rep["fallbacks"] and [r["device"] for r in rep["layers"] if r["kind"] == "conv"] == ["npu"]
    x = rng.standard_normal(b.shape).astype(np.float32)
    assert np.array_equal(cm.run(x), b.run_reference(x, [y])[0])


def test_unsupported_op_runs_on_the_cpu(tmp_path):
    path = _with_unsupported_op(tmp_path)
    cm = ioso_tvm.compile(str(path))
    x = np.random.default_rng(0).standard_normal((1, 16, 5, 5)).astype(np.float32)
    import onnxruntime as ort
    want = ort.InferenceSession(str(path)).run(None, {"input": x})[0]
    assert np.allclose(cm.run(x), want, atol=1e-5)


CLI = [  # id, argv (with {m} = a saved model, {t} = the tmp folder), words of the one-line error
    ("unknown --target", ["compile", "{m}", "--target=vta", "-o", "{t}/o.tar"], "vta"),
    ("unknown target option", ["compile", "{m}", "--target=ioso_npu", "--target-ioso_npu-warp=3"], "warp"),
    ("bad target option value", ["compile", "{m}", "--target=ioso_npu", "--target-ioso_npu-pe_arrays=x"],
     "pe_arrays"),
    ("missing model file", ["compile", "{t}/none.onnx", "--target=ioso_npu"], "none.onnx"),
    ("missing tuning records", ["compile", "{m}", "--target=ioso_npu", "--tuning-records", "{t}/r.json"], "r.json"),
    ("bad --input-shapes", ["compile", "{m}", "--target=ioso_npu", "--input-shapes", "input:[1,x]"], "input-shapes"),
    ("run of a missing artifact", ["run", "{t}/none.tar"], "none.tar"),
]


@pytest.mark.parametrize("argv, word", [c[1:] for c in CLI], ids=[c[0] for c in CLI])
def test_cli_one_line_error(tmp_path, capsys, argv, word):
    m = _saved(tmp_path)
    rc = tvmc([a.format(m=m, t=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and word in err[0], err


def test_corrupt_and_foreign_tuning_records_fall_back_to_defaults(tmp_path):
    b, y, m = _qdq()
    rec = tmp_path / "r.json"
    rec.write_text('{"not": "a record"}\nnot json at all\n'
                   + json.dumps({"layer": "x", "config": {}, "cycles": 1, "version": "0.0.0-other"}) + "\n")
    with pytest.warns(UserWarning, match="r.json"):
        cm = ioso_tvm.compile(m, tuning_records=rec)
    x = np.random.default_rng(0).standard_normal(b.shape).astype(np.float32)
    assert np.array_equal(cm.run(x), b.run_reference(x, [y])[0])
