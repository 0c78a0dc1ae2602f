"""Tutorial (a): quick start in Python: float ResNet-20 -> IOSO calibration -> NPU -> profile.

Run it from the repository root::

    python tutorials/a_quick_start.py          # quick (the default): a few minutes on a CPU
    python tutorials/a_quick_start.py --full   # the published schedule: hours on a CPU

The quick default calibrates on 64 images with 20 reconstruction iterations per block and tests on
16 images; ``--full`` (or ``IOSO_TUTORIAL_FULL=1``) uses 1024 calibration images and the published
20000 weight / 5000 activation iterations per block, and tests on 256 images.

It writes into ``--out`` (default ``tutorial_out/a``): the quantized ONNX file, the compiled
``.tar``, the per-layer profile as JSON and its plot, and ``summary.json``.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

import ioso_tvm
from hw_model import NPUConfig
from ioso_tvm import datasets, models
from ioso_tvm.tvmc.cli_run import format_profile, plot_profile

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--full", action="store_true", default=os.environ.get("IOSO_TUTORIAL_FULL") == "1",
                    help="the published schedule (hours on a CPU); default: quick (minutes)")
parser.add_argument("--out", default="tutorial_out/a", help="output folder")
args = parser.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
n_calib, n_test, iters = (1024, 256, None) if args.full else (64, 16, 20)
torch.manual_seed(0)

# 1. The float model. The package ships a ResNet-20 trained on Fashion-MNIST (28x28 images
#    padded to 32x32, one channel, ten classes) and small fixed calibration / test subsets.
float_model = models.load_pretrained("resnet20")
calib_images, _ = datasets.load_calib_set(n_calib)
test_images, test_labels = datasets.load_subset("test")
x_calib = torch.from_numpy(datasets.to_model_input(calib_images))
x_test = datasets.to_model_input(test_images[:n_test])
y_test = test_labels[:n_test]

# 2. Calibrate with IOSO at W4A4: every conv learns, per input channel, one of the NPU's
#    three scale groups (x1, x(1-2^-4), x(1+2^-4)) and, per output channel, a scale and an
#    offset folded into the NORM constants. The result is still a torch module.
config = NPUConfig()  # four 16x16 PE arrays at 800 MHz (hw_model/config.py says where each number comes from)
# The quick default shortens the reconstruction (the published 20000 weight / 5000 activation
# iterations per block, --full, take hours on a laptop CPU).
calib_config = ioso_tvm.CalibConfig(seed=0, npu=config, **({"iters": iters, "act_iters": iters} if iters else {}))
qmodel = ioso_tvm.calibrate(float_model, x_calib, method="ioso", wbits=4, abits=4, config=calib_config)

# 3. Export to ONNX (QDQ + IOSO attributes, docs/onnx_format.md) and compile it for the NPU.
#    Layers the NPU cannot run fall back to the CPU (llvm); the compile report says which.
onnx_path = out / "resnet20_w4a4.onnx"
ioso_tvm.export_onnx(qmodel, str(onnx_path), input_shape=(n_test, 1, 32, 32))
compiled = ioso_tvm.compile(str(onnx_path), target="ioso_npu", input_shapes={"input": (n_test, 1, 32, 32)},
                            config=config)
compiled.export(out / "resnet20_w4a4.tar")

# 4. Run the test images on the functional simulator (bit-exact with hw_model/reference.py)
#    and the cycle model in one go (mode "both"), and compare with the float model.
logits = np.asarray(compiled.run({"input": x_test}, mode="both"))
with torch.no_grad():
    float_logits = float_model(torch.from_numpy(x_test)).numpy()
acc_npu = float((logits.argmax(1) == y_test).mean())
acc_float = float((float_logits.argmax(1) == y_test).mean())
print(f"top-1 on {n_test} test images: float {100 * acc_float:.1f}%, NPU W4A4 {100 * acc_npu:.1f}%")

# 5. The per-layer report: cycles, microseconds at the clock, MAC utilisation, groups, NPU/CPU.
report = compiled.report()
print(format_profile(report, config.clock_mhz))
(out / "profile.json").write_text(json.dumps(report, indent=1, default=str))
plot_profile(report, out / "profile.png")
total_cycles = sum(int(layer.get("cycles") or 0) for layer in report.get("layers", []))
summary = {"images": n_test, "acc_float": acc_float, "acc_npu": acc_npu, "total_cycles": total_cycles,
           "latency_us": total_cycles / config.clock_mhz}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary))
