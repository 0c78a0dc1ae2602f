"""Share of MACs the NPU runs for the shipped models, exported two ways.

For ResNet-20 and MobileNetV2 (``ioso_tvm.models.load_pretrained``: the shipped Fashion-MNIST float
checkpoints, input (1, 1, 32, 32)):

- ``project``: ``ioso_tvm.calibrate(..., method="rtn")`` (a quick run, ``--iters`` steps) then
  ``ioso_tvm.export.export_onnx``;
- ``onnxruntime``: the float model exported by ``torch.onnx.export`` and quantized by onnxruntime's
  ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, and the int8-symmetric variant).

Each file is compiled for ioso_npu and with ``offload=False``; prints one JSON line per (model, export):
``{"model", "export", "npu_layers", "layers", "npu_macs", "macs", "mac_share" (CompiledModel.offload_summary),
"qdq_fallbacks" (chains left in float on the CPU, with their reasons), "mismatches" (compiled vs
offload=False, elements), "top_reasons"}``.

    .venv/bin/python benchmarks/offload_share.py
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

import ioso_tvm
from ioso_tvm.calib.methods import CalibConfig
from ioso_tvm.export import export_onnx
from ioso_tvm.models import PRETRAINED, load_pretrained

SHAPE = (1, 1, 32, 32)
"""Input of the shipped models: Fashion-MNIST padded to 32x32 (ioso_tvm.datasets.to_model_input)."""


def _ort_quantize(model: torch.nn.Module, data: np.ndarray, out: Path, symmetric: bool) -> Path:
    """``model`` exported by torch and quantized by onnxruntime's ``quantize_static`` (QDQ)."""
    from onnxruntime import quantization as q

    f32 = out.with_suffix(".f32.onnx")
    torch.onnx.export(model, torch.from_numpy(data[:1]), str(f32), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"])
    it = iter([{"input": data[i:i + 1]} for i in range(len(data))])

    class Reader(q.CalibrationDataReader):
        def get_next(self):  # noqa: D102
            return next(it, None)

    act = q.QuantType.QInt8 if symmetric else q.QuantType.QUInt8
    q.quantize_static(str(f32), str(out), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                      activation_type=act, weight_type=q.QuantType.QInt8,
                      extra_options={"ActivationSymmetric": symmetric})
    return out


def _measure(name: str, export: str, model_file, x: np.ndarray) -> dict:
    cm, ref = ioso_tvm.compile(model_file), ioso_tvm.compile(model_file, offload=False)
    got, want = cm.run(x), ref.run(x)
    s = cm.offload_summary()
    return {"model": name, "export": export, "npu_layers": s["npu_layers"], "layers": s["layers"],
            "npu_macs": s["npu_macs"], "macs": s["macs"], "mac_share": round(s["mac_share"], 4),
            "qdq_fallbacks": sorted({f["reason"] for f in cm.report()["fallbacks"] if f["op"] == "qdq"}),
            "mismatches": int((got != want).sum()), "top_reasons": [[m, why] for m, why, _ in s["top_reasons"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=5,
                    help="RTN activation steps per block (chosen: quick; the offload share does not depend on it)")
    ap.add_argument("--calib", type=int, default=32, help="seeded random calibration images (calibrate needs >= 32)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    data = rng.standard_normal((a.calib, *SHAPE[1:])).astype(np.float32)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        for name in PRETRAINED:
            model = load_pretrained(name)
            cfg = CalibConfig(num_samples=a.calib, batch_size=min(32, a.calib), iters=a.iters, act_iters=a.iters,
                              act_init_samples=a.calib, seed=a.seed)
            qm = ioso_tvm.calibrate(model, torch.from_numpy(data), method="rtn", wbits=4, abits=4, config=cfg)
            print(json.dumps(_measure(name, "project", export_onnx(qm, None, SHAPE), x)), flush=True)
            for sym in (False, True):
                path = _ort_quantize(load_pretrained(name), data, Path(tmp) / f"{name}_{sym}.onnx", sym)
                print(json.dumps(_measure(name, "onnxruntime_int8_symmetric" if sym else "onnxruntime_uint8",
                                          str(path), x)), flush=True)


if __name__ == "__main__":
    main()
