"""Models quantized by onnxruntime's quantize_static (QDQ, per-channel int8 weights, uint8 activations, int32
biases) reach the NPU: the shipped ResNet-20 and MobileNetV2 run (almost) all their MACs there, equal the
contract exactly, and agree with onnxruntime's own integer kernels within the rounding documented in
docs/onnx_format.md (at most ``ORT_STEPS`` output quantization steps, same top-1)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import ioso_tvm
from ioso_tvm.datasets import load_subset, to_model_input
from ioso_tvm.models import load_pretrained

ort = pytest.importorskip("onnxruntime")
quant = pytest.importorskip("onnxruntime.quantization")
torch = pytest.importorskip("torch")

ORT_STEPS = 4
"""Largest difference from onnxruntime, in output quantization steps. Measured on 32 shipped calibration images
(models quantized with the first 16): ResNet-20 at most 1 step, MobileNetV2 0 (onnxruntime's QLinearConv
requantizes each layer with its own fixed-point rounding, the NPU with float32 NORM; one-step differences
propagate). Chosen: 4, room for other images."""


def _quantize(name: str, tmp_path, images: np.ndarray):
    f32, q = tmp_path / f"{name}.onnx", tmp_path / f"{name}_q.onnx"
    torch.onnx.export(load_pretrained(name).eval(), torch.from_numpy(images[:1]), f32, dynamo=False,
                      opset_version=17, input_names=["input"])

    class Reader(quant.CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": images[i:i + 1]} for i in range(16)])

        def get_next(self):
            return next(self.it, None)

    quant.quantize_static(str(f32), str(q), Reader(), quant_format=quant.QuantFormat.QDQ, per_channel=True,
                          activation_type=quant.QuantType.QUInt8, weight_type=quant.QuantType.QInt8)
    return q


def _output_step(path) -> float:
    """Scale of the DequantizeLinear that makes the model's output."""
    model = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = model.graph.output[0].name
    node = next(n for n in model.graph.node if out in n.output)
    return float(inits[node.input[1]].reshape(-1)[0])


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2_small"])
def test_quantize_static_model_runs_on_the_npu(name, tmp_path):
    images = to_model_input(load_subset("calib")[0][:24]).astype(np.float32)
    q = _quantize(name, tmp_path, images)
    cm, contract = ioso_tvm.compile(q), ioso_tvm.compile(q, offload=False)
    summary = cm.offload_summary()
    assert summary["mac_share"] >= 0.95, summary["line"]
    sess = ort.InferenceSession(str(q), providers=["CPUExecutionProvider"])
    step = _output_step(q)
    for i in range(16, 24):
        x = images[i:i + 1]
        got, theirs = cm.run(x), sess.run(None, {"input": x})[0]
        assert np.array_equal(got, contract.run(x))  # the NPU is the contract, exactly
        assert np.abs(got - theirs).max() <= ORT_STEPS * step * (1 + 1e-6)
        assert got.argmax() == theirs.argmax()


def test_a_torch_ao_quantized_model_runs_on_the_npu(tmp_path):
    """torch.ao.quantization (eager mode, fbgemm qconfig) converted and exported by torch.onnx: a QDQ graph whose
    convs and Linear all run on the NPU, exactly as the contract."""
    import warnings

    import torch.ao.quantization as tq

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.dq = tq.QuantStub(), tq.DeQuantStub()
            self.c1, self.relu = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU()
            self.c2, self.fc = torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.Linear(16 * 8 * 8, 10)

        def forward(self, x):
            return self.dq(self.fc(self.c2(self.relu(self.c1(self.q(x)))).flatten(1)))

    torch.manual_seed(0)
    m = Net().eval()
    m.qconfig = tq.get_default_qconfig("fbgemm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        prepared = tq.prepare(m)
        for _ in range(4):
            prepared(torch.randn(1, 3, 8, 8))
        path = tmp_path / "tao.onnx"
        torch.onnx.export(tq.convert(prepared), torch.randn(1, 3, 8, 8), path, dynamo=False, opset_version=17,
                          input_names=["input"])
    cm, contract = ioso_tvm.compile(path), ioso_tvm.compile(path, offload=False)
    assert cm.offload_summary()["mac_share"] == 1.0
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert np.array_equal(cm.run(x), contract.run(x))
