"""Load time of a compiled artifact: the default (host graph rebuilt from the stored Relax IR, no code
from the file runs) against ``trust=True`` (the stored native ``host.so`` is loaded), in one process.

Builds the model with seeded random weights at W8A8 (load time does not depend on them), compiles and
exports it, then loads it ``--repeat`` times each way. Prints one JSON line:
``{"model", "size", "artifact_bytes", "load_s_rebuild", "load_s_trusted", "ratio"}`` (medians; ratio =
rebuild / trusted).

    .venv/bin/python benchmarks/load_time.py --model resnet18 --size 224
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import ioso_tvm
from ioso_tvm.calib.qmodel import build_qmodel
from ioso_tvm.export import export_onnx
from ioso_tvm.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18", choices=["resnet18", "resnet50", "mobilenetv2", "resnet20"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    qm = build_qmodel(build_model(a.model).eval(), (3, a.size, a.size), 8, 8)
    qm.init_act_scales(torch.randn(2, 3, a.size, a.size), batch=2)
    cm = ioso_tvm.compile(export_onnx(qm, None, (1, 3, a.size, a.size)))
    with tempfile.TemporaryDirectory() as tmp:
        path = cm.export(Path(tmp) / "m.tar")
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(a.repeat):
            for trust in (False, True):
                t0 = time.perf_counter()
                ioso_tvm.load(path, trust=trust)
                times[trust].append(time.perf_counter() - t0)
        size = path.stat().st_size
    rebuild, trusted = statistics.median(times[False]), statistics.median(times[True])
    print(json.dumps({"model": a.model, "size": a.size, "artifact_bytes": size, "load_s_rebuild": round(rebuild, 3),
                      "load_s_trusted": round(trusted, 3), "ratio": round(rebuild / trusted, 2)}))


if __name__ == "__main__":
    main()
