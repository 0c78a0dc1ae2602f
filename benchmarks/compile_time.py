"""Wall time of ``ioso_tvm.compile`` on ResNet-18, ResNet-50 and MobileNetV2 at 224x224 (W4A4).

Each model: seeded random weights quantized with ``build_qmodel`` and exported with
``export_onnx`` (not timed), then compiled for ``ioso_npu`` once with an empty TIR lowering cache
(``cold_s``) and three more times; the fastest of those is reported, split (by the shares of one
profiled compile) into import (ONNX -> Relax), passes (QDQ folding + group permutation + host build)
and NPU program build (one program per layer). Prints one JSON line.

    python benchmarks/compile_time.py [--models resnet18 resnet50 mobilenetv2] [--repeat 3]
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time

import torch

import ioso_tvm
from ioso_tvm.calib.qmodel import build_qmodel
from ioso_tvm.export import export_onnx
from ioso_tvm.models import build_model
from target_npu import codegen

STAGES = {"import": "import_onnx", "programs": "make_program"}
"""Stage -> the function whose cumulative time it is (the rest of compile is "passes")."""


def exported(name: str):
    torch.manual_seed(0)
    qm = build_qmodel(build_model(name).eval(), (3, 224, 224), 4, 4)
    qm.init_act_scales(torch.randn(2, 3, 224, 224), batch=2)
    return export_onnx(qm, None, (1, 3, 224, 224))


def stage_fractions(model) -> tuple[dict, int]:
    """Share of compile time in each stage (one profiled compile) and the number of layers."""
    prof = cProfile.Profile()
    prof.enable()
    cm = ioso_tvm.compile(model)
    prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, ncalls, own s, cumulative s, callers)
    total = sum(v[2] for v in stats.values())
    shares = {k: sum(v[3] for fn, v in stats.items() if fn[2] == name) / total for k, name in STAGES.items()}
    return shares, len(cm.layers)


def timed_compile(model, repeat: int) -> dict:
    """``cold_s``: the first compile with an empty TIR lowering cache (what a user's first ``tvmc
    compile`` pays, TVM's own start-up excluded); ``total_s``: fastest of ``repeat`` later compiles (the
    lowering cache warm, as in a tuning loop or a second model of the same shapes), split by the
    profiled stage shares."""
    codegen._CACHE.clear()
    t0 = time.perf_counter()
    ioso_tvm.compile(model)
    cold = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        ioso_tvm.compile(model)
        best = min(best, time.perf_counter() - t0)
    frac, layers = stage_fractions(model)
    out = {"cold_s": round(cold, 2), "total_s": round(best, 2), "layers": layers}
    out.update({f"{k}_s": round(best * f, 2) for k, f in frac.items()})
    out["passes_s"] = round(best - sum(best * f for f in frac.values()), 2)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "mobilenetv2"])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    result = {}
    for name in args.models:
        result[name] = timed_compile(exported(name), args.repeat)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
