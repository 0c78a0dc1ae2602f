"""Bit-exactness of the compiled model against torch deploy mode (the integer contract).

Builds ResNet-18 or MobileNetV2 (seeded random weights: exactness does not depend on them),
quantizes it with ``build_qmodel`` (activation ranges from a seeded random batch), exports it
with ``export_onnx``, compiles it for ``ioso_npu`` and compares the outputs with
``QuantModel.deploy``. Prints one JSON line:
``{"model", "size", "bits", "elements", "mismatches", "compile_s", "npu_layers", "fallbacks", ...}``.

    .venv/bin/python benchmarks/bitexact.py --model resnet18 --size cifar --bits W4A4
"""
from __future__ import annotations

import argparse
import json
import re
import time

import torch

import ioso_tvm
from ioso_tvm.calib.qmodel import build_qmodel
from ioso_tvm.export import export_onnx
from ioso_tvm.models import build_model

SIZES = {"cifar": 32, "imagenet": 224}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["resnet18", "mobilenetv2"], default="resnet18")
    ap.add_argument("--size", choices=sorted(SIZES), default="cifar")
    ap.add_argument("--bits", default="W4A4", help="W<wbits>A<abits>, e.g. W4A4 or W8A8")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    m = re.fullmatch(r"W(\d)A(\d)", a.bits)
    if not m:
        ap.error(f"--bits must look like W4A4, got {a.bits!r}")
    wbits, abits = int(m.group(1)), int(m.group(2))
    torch.manual_seed(a.seed)
    hw = SIZES[a.size]
    model = build_model(a.model, num_classes=10 if a.size == "cifar" else 1000).eval()
    qm = build_qmodel(model, (3, hw, hw), wbits, abits)
    calib = torch.randn(8, 3, hw, hw)
    qm.init_act_scales(calib)
    x = torch.randn(a.batch, 3, hw, hw)
    onnx_model = export_onnx(qm, None, tuple(x.shape))
    t0 = time.perf_counter()
    cm = ioso_tvm.compile(onnx_model)
    compile_s = time.perf_counter() - t0
    got = cm.run(x.numpy())
    with torch.no_grad():
        want = qm.deploy(x).numpy()
    rep = cm.report()
    print(json.dumps({"model": a.model, "size": a.size, "bits": a.bits, "elements": int(want.size),
                      "mismatches": int((got != want).sum()) if got.shape == want.shape else int(want.size),
                      "compile_s": round(compile_s, 2), "npu_layers": sum(r["device"] == "npu" for r in rep["layers"]),
                      "fallbacks": len(rep["fallbacks"]), "permutes": rep["permutes"]}))


if __name__ == "__main__":
    main()
