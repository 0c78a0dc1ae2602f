"""Three-way bit-exactness: torch deploy mode, ``hw_model.reference`` and the compiled NPU model.

Builds ResNet-18/50 or MobileNetV2 (seeded random weights: exactness does not depend on them),
calibrates it with ``ioso_tvm.calibrate(..., method="rtn")`` on a seeded random batch with a short
``--iters`` schedule (``--method ioso`` gives ISG groups and so group permutations), exports it
with ``export_onnx`` and compiles it twice for ioso_npu:
partitioned (NPU layers on the simulator) and with ``offload=False`` (every layer computed by
``hw_model.reference``). Both are compared with ``QuantModel.deploy`` element by element.
Prints one JSON line:
``{"model", "size", "bits", "elements", "mismatches_compiled_vs_deploy",
"mismatches_reference_vs_deploy", "npu_layers", "cpu_layers", "permutes", "host_round_trips"
(layer outputs inside a region that reached the host: 0), "stream_instructions" (stored in the
region streams), "explicit_permutes" (gathered LOADs) and "explicit_permute_cycles", "dram_peak_bytes",
"planner_off" (mismatching elements + extra cycles with the permutation planner off: > 0 means the
permutation is real), "compile_s", ...}``.

    .venv/bin/python benchmarks/bitexact.py --model resnet18 --size cifar --bits W4A4
"""
from __future__ import annotations

import argparse
import json
import re
import time

import numpy as np
import torch

import ioso_tvm
from ioso_tvm.calib.methods import CalibConfig
from ioso_tvm.calib.qmodel import build_qmodel
from ioso_tvm.export import export_onnx
from ioso_tvm.models import build_model

SIZES = {"cifar": 32, "imagenet": 224}


def _mismatches(got: np.ndarray, want: np.ndarray) -> int:
    return int((got != want).sum()) if got.shape == want.shape else int(want.size)


def _random_groups(qm: torch.nn.Module, rng: np.random.Generator) -> None:
    """Seeded random ISG group per 16-channel block (granularity of NPUConfig) of each hard ISG."""
    for mod in qm.modules():
        isg = getattr(mod, "isg", None)
        if isg is None or not hasattr(isg, "groups") or isg.channels % 16:
            continue
        blocks = rng.integers(0, isg.cfg.num_groups, isg.channels // 16)
        isg.groups.copy_(torch.from_numpy(np.repeat(blocks, 16)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["resnet18", "resnet50", "mobilenetv2"], default="resnet18")
    ap.add_argument("--size", choices=sorted(SIZES), default="cifar")
    ap.add_argument("--bits", default="W4A4", help="W<wbits>A<abits>: W2A4, W4A4 or W8A8")
    ap.add_argument("--method", default="rtn",
                    help="calibration method of ioso_tvm.calibrate (default rtn: cheap); 'none': build_qmodel with "
                         "activation ranges of the calibration batch only (fastest)")
    ap.add_argument("--random-groups", action="store_true",
                    help="after calibration, give every 16-channel block of each layer input a seeded random ISG "
                         "group (exercises the group permutation; exactness does not depend on the groups)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--calib", type=int, default=32,
                    help="calibration images (seeded random; calibrate needs >= batch size 32)")
    ap.add_argument("--iters", type=int, default=20,
                    help="weight and activation steps per block (chosen: a short run; exactness does not depend on it)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    m = re.fullmatch(r"W(\d)A(\d)", a.bits)
    if not m:
        ap.error(f"--bits must look like W4A4, got {a.bits!r}")
    wbits, abits = int(m.group(1)), int(m.group(2))
    torch.manual_seed(a.seed)
    hw = SIZES[a.size]
    model = build_model(a.model, num_classes=10 if a.size == "cifar" else 1000).eval()
    t0 = time.perf_counter()
    data = torch.randn(a.calib, 3, hw, hw)
    if a.method == "none":
        qm = build_qmodel(model, (3, hw, hw), wbits, abits)
        qm.init_act_scales(data)
    else:
        cfg = CalibConfig(num_samples=a.calib, batch_size=min(32, a.calib), iters=a.iters, act_iters=a.iters,
                          act_init_samples=a.calib, seed=a.seed)
        qm = ioso_tvm.calibrate(model, data, method=a.method, wbits=wbits, abits=abits, config=cfg)
    if a.random_groups:
        _random_groups(qm, np.random.default_rng(a.seed))
    calib_s = time.perf_counter() - t0
    x = torch.randn(a.batch, 3, hw, hw)
    onnx_model = export_onnx(qm, None, tuple(x.shape))
    t0 = time.perf_counter()
    cm = ioso_tvm.compile(onnx_model)
    compile_s = time.perf_counter() - t0
    ref = ioso_tvm.compile(onnx_model, offload=False)
    with torch.no_grad():
        want = qm.deploy(x).numpy()
    got, got_ref = cm.run(x.numpy(), mode="both"), ref.run(x.numpy())
    boundary = sum(len(st.meta["inputs"]) + len(st.meta["outputs"]) for st in cm.streams)
    host_round_trips = cm.profile.host_transfers - boundary  # tensors between layers that reached the host
    rep = cm.report()
    # mutation of the planner: the same model with no producer permuted
    off = ioso_tvm.compile(onnx_model, permute_groups=False)
    got_off = off.run(x.numpy())
    rep_off = off.report()
    npu = sum(r["device"] == "npu" for r in rep["layers"])
    print(json.dumps({"model": a.model, "size": a.size, "bits": a.bits, "method": a.method,
                      "elements": int(want.size),
                      "mismatches_compiled_vs_deploy": _mismatches(got, want),
                      "mismatches_reference_vs_deploy": _mismatches(got_ref, want),
                      "npu_layers": npu, "cpu_layers": len(rep["layers"]) - npu, "fallbacks": len(rep["fallbacks"]),
                      "npu_regions": [len(r.steps) for r in cm.regions],
                      "permutes": rep["permutes"], "host_round_trips": host_round_trips,
                      "stream_instructions": rep["stream_instructions"],
                      "explicit_permutes": rep["explicit_permutes"],
                      "explicit_permute_cycles": rep["explicit_permute_cycles"],
                      "dram_peak_bytes": rep["dram_peak_bytes"], "total_cycles": rep["total_cycles"],
                      "planner_off": _mismatches(got_off, want) + rep_off["total_cycles"] - rep["total_cycles"],
                      "planner_off_detail": {"mismatches": _mismatches(got_off, want),
                                             "extra_cycles": rep_off["total_cycles"] - rep["total_cycles"],
                                             "explicit_permutes": rep_off["explicit_permutes"]},
                      "compile_s": round(compile_s, 2),
                      "calib_s": round(calib_s, 2)}))


if __name__ == "__main__":
    main()
