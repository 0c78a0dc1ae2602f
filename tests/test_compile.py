"""Compiled models equal hw_model.reference bit for bit; API errors, fallbacks, export/load."""
from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

import ioso_tvm
from hw_model.config import NPUConfig
from ioso_tvm.testing import QDQBuilder

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

conv_args = st.fixed_dictionaries({
    "c": st.sampled_from([3, 8, 16, 20, 32]),
    "k": st.sampled_from([4, 16, 24]),
    "hw": st.integers(3, 9),
    "kernel": st.sampled_from([1, 3, 5]),
    "stride": st.sampled_from([1, 2]),
    "depthwise": st.booleans(),
    "wbits": st.integers(2, 8),
    "abits_in": st.integers(2, 8),
    "abits": st.integers(2, 8),
    "act": st.sampled_from([None, "relu", "relu6"]),
    "isg": st.booleans(),
    "oso": st.booleans(),
    "signed_in": st.booleans(),
    "seed": st.integers(0, 2**31 - 1),
})


def _check(b: QDQBuilder, outs, rng) -> None:
    m = b.model(outs)
    cm = ioso_tvm.compile(m)
    x = (rng.standard_normal(b.shape) * 2).astype(np.float32)
    got = cm.run(x)
    want = b.run_reference(x, outs)
    got = [got] if isinstance(got, np.ndarray) else got
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and np.array_equal(g, w)
    rep = cm.report()
    # every chain folds; a layer kept on the CPU by a partition check (e.g. an empty clip range
    # lo > hi) is listed in the fallbacks with its reason
    assert not [f for f in rep["fallbacks"] if f["op"] == "qdq"]
    assert {f["op"] for f in rep["fallbacks"]} == {r["name"] for r in rep["layers"]
                                                   if r["device"] == "cpu" and r["kind"] != "input"}


@SETTINGS
@given(conv_args)
def test_single_conv_layer_bit_exact(a):
    rng = np.random.default_rng(a["seed"])
    b = QDQBuilder((1, a["c"], a["hw"], a["hw"]), rng, abits=a["abits_in"], signed=a["signed_in"])
    k, groups = (a["c"], a["c"]) if a["depthwise"] else (a["k"], 1)
    pad = a["kernel"] // 2
    y = b.conv(b.input, k, kernel=a["kernel"], stride=a["stride"], pad=pad, groups=groups, wbits=a["wbits"],
               abits=a["abits"], act=a["act"], isg=a["isg"], oso=a["oso"], signed_out=a["act"] is None)
    _check(b, [y], rng)


two_layer = st.fixed_dictionaries({
    "c": st.sampled_from([8, 16, 32]),
    "hw": st.integers(4, 8),
    "tail": st.sampled_from(["add", "add_relu", "maxpool", "gap", "two_outputs", "classifier"]),
    "abits": st.integers(3, 8),
    "seed": st.integers(0, 2**31 - 1),
})


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(two_layer)
def test_two_layer_fanout_bit_exact(a):
    """conv -> (conv, identity / conv) fan-out -> add / pool; or one tensor read by two convs."""
    rng = np.random.default_rng(a["seed"])
    c = a["c"]
    b = QDQBuilder((1, c, a["hw"], a["hw"]), rng)
    x = b.conv(b.input, c, abits=a["abits"])
    y = b.conv(x, c, kernel=1, pad=0, act=None, signed_out=True, abits=a["abits"])
    if a["tail"].startswith("add"):
        outs = [b.add(x, y, act="relu" if a["tail"] == "add_relu" else None)]
    elif a["tail"] == "maxpool":
        outs = [b.maxpool(b.add(x, y))]
    elif a["tail"] == "gap":
        outs = [b.gap(b.add(x, y))]
    elif a["tail"] == "classifier":
        outs = [b.linear(b.gap(x), 10, wbits=a["abits"], abits=a["abits"], isg=a["seed"] % 2 == 0)]
    else:
        outs = [y, b.conv(x, 16, kernel=3, stride=2, act="relu6")]
    _check(b, outs, rng)


def _small_model(rng, **kw):
    b = QDQBuilder((1, 16, 5, 5), rng)
    y = b.conv(b.input, 16, **kw)
    return b, y


def test_export_load_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    b = QDQBuilder((1, 16, 6, 6), rng)
    x = b.conv(b.input, 16)
    out = b.gap(b.add(x, b.conv(x, 16, act=None, signed_out=True)))
    cm = ioso_tvm.compile(b.model([out]))
    path = cm.export(tmp_path / "m.tar")
    cm2 = ioso_tvm.load(path)
    xin = rng.standard_normal((1, 16, 6, 6)).astype(np.float32)
    assert np.array_equal(cm2.run(xin), b.run_reference(xin, [out])[0])
    assert cm2.report()["total_cycles"] == cm.report()["total_cycles"] > 0


def test_report_and_modes():
    rng = np.random.default_rng(2)
    b, y = _small_model(rng)
    cm = ioso_tvm.compile(b.model([y]))
    x = rng.standard_normal(b.shape).astype(np.float32)
    a = cm.run(x, mode="func")
    assert not cm.profile.cycles
    assert np.array_equal(cm.run(x, mode="both"), a)
    rep = cm.report()
    conv = [r for r in rep["layers"] if r["kind"] == "conv"][0]
    assert cm.profile.cycles[conv["name"]] == conv["cycles"]
    assert 0 < conv["mac_utilisation"] <= 1
    with pytest.raises(ValueError, match="mode"):
        cm.run(x, mode="fast")
    with pytest.raises(ValueError, match="input"):
        cm.run(x[:, :8])


def test_unknown_gamma_is_an_error():
    rng = np.random.default_rng(3)
    b, y = _small_model(rng)
    m = b.model([y])
    for init in m.graph.initializer:
        if init.name.startswith("gamma"):
            g = numpy_helper.to_array(init).copy()
            g.flat[0] = 1.5
            init.CopyFrom(numpy_helper.from_array(g, init.name))
    with pytest.raises(ValueError, match="gamma value 1.5"):
        ioso_tvm.compile(m)


def test_unsupported_layer_falls_back_to_cpu(caplog):
    rng = np.random.default_rng(4)
    b, y = _small_model(rng)
    m = b.model([y])
    for node in m.graph.node:
        if node.op_type == "Conv":
            node.attribute.append(onnx.helper.make_attribute("dilations", [2, 2]))
    caplog.set_level("INFO", logger="ioso_tvm.compiler")
    cm = ioso_tvm.compile(m)
    fb = cm.report()["fallbacks"]
    assert len(fb) == 1 and "dilation" in fb[0]["reason"]
    assert "dilation" in caplog.text
    x = rng.standard_normal(b.shape).astype(np.float32)
    import onnxruntime as ort
    want = ort.InferenceSession(m.SerializeToString()).run(None, {"input": x})[0]
    got = cm.run(x)
    assert got.shape == want.shape == (1, 16, 3, 3)
    assert np.abs(got - want).max() <= y.scale * 1.0001  # float conv on the CPU: at most one step apart


def test_llvm_target_matches_within_one_step():
    rng = np.random.default_rng(5)
    b, y = _small_model(rng, act="relu")
    cm = ioso_tvm.compile(b.model([y]), target="llvm")
    x = rng.standard_normal(b.shape).astype(np.float32)
    assert np.abs(cm.run(x) - b.run_reference(x, [y])[0]).max() <= y.scale * 1.0001


def test_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        ioso_tvm.compile(42)
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        ioso_tvm.compile("nope.onnx")
    rng = np.random.default_rng(6)
    b, y = _small_model(rng)
    m = b.model([y])
    with pytest.raises(ValueError, match="target"):
        ioso_tvm.compile(m, target="cuda")
    with pytest.raises(ValueError, match="isg_shift"):
        ioso_tvm.compile(m, config=NPUConfig(isg_shift=3))
    meta = json.loads(m.metadata_props[0].value)
    meta["format_version"] = 9
    m.metadata_props[0].value = json.dumps(meta)
    with pytest.raises(ValueError, match="format_version"):
        ioso_tvm.compile(m)


def test_dynamic_batch_needs_input_shapes():
    rng = np.random.default_rng(9)
    b, y = _small_model(rng)
    m = b.model([y])
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    with pytest.raises(ValueError, match="input_shapes"):
        ioso_tvm.compile(m)
    cm = ioso_tvm.compile(m, input_shapes={"input": [2, 16, 5, 5]})
    x = rng.standard_normal((2, 16, 5, 5)).astype(np.float32)
    assert np.array_equal(cm.run(x), b.run_reference(x, [y])[0])


@pytest.mark.slow
def test_quant_model_compiles_bit_exact_with_deploy():
    torch = pytest.importorskip("torch")
    from ioso_tvm.calib.qmodel import build_qmodel
    from ioso_tvm.models import mobilenetv2_small

    torch.manual_seed(0)
    qm = build_qmodel(mobilenetv2_small().eval(), (1, 16, 16), 4, 4)
    qm.init_act_scales(torch.randn(4, 1, 16, 16))
    cm = ioso_tvm.compile(qm)
    x = torch.randn(1, 1, 16, 16)
    assert np.array_equal(cm.run(x.numpy()), qm.deploy(x).numpy())


def test_a_float_model_gets_a_warning_and_runs_on_the_cpu(tmp_path, caplog):
    """A float ONNX file (no QDQ) compiles, but the user is told that nothing reaches the NPU."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["input", "w"], ["y"], pads=[1, 1, 1, 1])], "float",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    path = tmp_path / "float.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with caplog.at_level(logging.WARNING, logger="ioso_tvm.compiler"):
        cm = ioso_tvm.compile(path)
    assert any("nothing runs on the NPU" in r.getMessage() for r in caplog.records)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    y = cm.run(x)
    assert y.shape == (1, 4, 8, 8) and all(r["device"] != "npu" for r in cm.report()["layers"])


def test_a_model_quantized_by_onnxruntime_reaches_the_npu_with_its_module_names(tmp_path):
    """A QDQ file from onnxruntime's quantize_static (per-channel int8 weights, uint8 activations): its convs,
    Gemm, add and pool run on the NPU, exactly as the contract, and the report names the torch modules."""
    torch = pytest.importorskip("torch")
    quant = pytest.importorskip("onnxruntime.quantization")

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1)
            self.fc = torch.nn.Linear(16 * 4 * 4, 10)

        def forward(self, x):
            y = torch.relu(self.c1(x))
            y = torch.nn.functional.max_pool2d(torch.relu(self.c2(y)) + y, 2)
            return self.fc(y.flatten(1))

    torch.manual_seed(0)
    f32, q = tmp_path / "f.onnx", tmp_path / "q.onnx"
    torch.onnx.export(Net().eval(), torch.randn(1, 3, 8, 8), f32, dynamo=False, opset_version=17,
                      input_names=["input"])
    rng = np.random.default_rng(0)

    class Reader(quant.CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.it, None)

    quant.quantize_static(str(f32), str(q), Reader(), quant_format=quant.QuantFormat.QDQ, per_channel=True,
                          activation_type=quant.QuantType.QUInt8, weight_type=quant.QuantType.QInt8)
    cm, ref_cm = ioso_tvm.compile(q), ioso_tvm.compile(q, offload=False)
    rows = {r["source"]: r for r in cm.report()["layers"]}
    assert {"/c1/Conv", "/c2/Conv", "/Add", "/MaxPool", "/fc/Gemm"} <= set(rows)
    assert all(rows[s]["device"] == "npu" for s in ("/c1/Conv", "/c2/Conv", "/Add", "/MaxPool", "/fc/Gemm"))
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert np.array_equal(cm.run(x), ref_cm.run(x))


def test_offload_summary_counts_layers_and_macs_and_warns_when_low(caplog):
    """The summary line counts NPU layers and MACs; a model mostly on the CPU gets a warning naming the reason."""
    rng = np.random.default_rng(4)
    b = QDQBuilder((1, 16, 6, 6), rng)
    y = b.conv(b.conv(b.input, 16, kernel=1, pad=0), 64, kernel=3)
    tiny = NPUConfig(scratchpad_kib=1, weight_buf_kib=1, acc_buf_kib=1)  # the 64-channel 3x3 conv does not fit
    with caplog.at_level(logging.INFO, logger="ioso_tvm.compiler"):
        cm = ioso_tvm.compile(b.model([y]), config=tiny)
    s = cm.offload_summary()
    rows = [r for r in cm.report()["layers"] if r["kind"] != "input"]
    assert s["layers"] == len(rows) == 2 and s["npu_layers"] == sum(r["device"] == "npu" for r in rows)
    assert s["macs"] == sum(r["macs"] for r in rows) and 0 < s["mac_share"] < 0.5
    assert s["line"].startswith(f"{s['npu_layers']} of 2 layers (")
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("of the MACs run on the NPU" in w and "fits the on-chip memories" in w for w in warn), warn


def test_compile_takes_the_relax_module_of_the_import():
    """compile() accepts the IRModule ioso_tvm.frontend.import_onnx makes (a user may run passes on it first)
    and gives the same integers as compiling the ONNX model; anything else is a clear TypeError."""
    from ioso_tvm.frontend import import_onnx

    rng = np.random.default_rng(5)
    b = QDQBuilder((1, 16, 6, 6), rng)
    y = b.gap(b.conv(b.input, 32))
    model = b.model([y])
    mod, _ = import_onnx(model, NPUConfig())
    x = rng.standard_normal(b.shape).astype(np.float32)
    from_ir, from_onnx = ioso_tvm.compile(mod), ioso_tvm.compile(model)
    assert np.array_equal(from_ir.run(x), from_onnx.run(x))
    assert [r["device"] for r in from_ir.report()["layers"]] == [r["device"] for r in from_onnx.report()["layers"]]
    with pytest.raises(TypeError, match="IRModule"):
        ioso_tvm.compile(42)
