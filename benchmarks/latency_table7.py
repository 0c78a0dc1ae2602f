"""Cycle model against the journal's Table 7: ResNet-50 and MobileNetV2 at 224x224 on four PE arrays.

Table 7 (journal, RTL simulation at 800 MHz): ResNet-50 1762 us (BRECQ, no ISG) -> 1780 us
(WAPS, with ISG); MobileNetV2 7994 us -> 8187 us. For each model this script exports a seeded
random-weight W8A8 network (latency does not depend on the weight values), compiles it for the
NPU (group permutation, default tilings) and sums the cycle model's perf-mode cycles of every
layer twice: with one unity group per conv ("no ISG", the BRECQ column) and with three groups
(a third of the input channels, rounded to the granularity, in each scaled group; the rest
unity; depthwise convs carry no groups, journal Sec. IV-D). The first and last layer stay as
compiled.

``--fit`` searches the parameters the paper does not give (``pixels_per_cycle``,
``dram_bytes_per_cycle``, ``acc_buf_kib`` = ``isg_d1_kib``, ``instr_overhead_cycles``) on a grid
(``FIT_GRID``) for the smallest ``fit_score`` = the largest of |ResNet-50 error| / 10 % (both
columns) and |ResNet-50 ISG overhead error| / 0.5 pp: score <= 1 meets the targets. Deterministic:
first best point in grid order. The NPUConfig defaults are the result. Prints one JSON line:
``{"resnet50": {"baseline_us", "isg_us", "overhead_pct", errors, "stream_baseline_us" (the baseline
as compiled: the linked region streams with their SYNC barriers), "stream_vs_layer_sum_pct"},
"mobilenetv2": {...}, "paper": {...},
"max_rel_err_pct", "max_overhead_err_pp", "fit_score", "config", "seconds"}``.

    python benchmarks/latency_table7.py [--fit]
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import ioso_tvm
from hw_model.config import NPUConfig
from hw_model.cycles import simulate
from hw_model.layer_specs import ConvSpec, LinearSpec
from hw_model.layers import default_tiling
from hw_model.layers_alu import build_layer
from ioso_tvm.calib.qmodel import build_qmodel
from ioso_tvm.export import export_onnx
from ioso_tvm.models import build_model
from target_npu.runtime import to_spec

PAPER_US = {"resnet50": (1762.0, 1780.0), "mobilenetv2": (7994.0, 8187.0)}
"""Journal Table 7: (BRECQ latency, WAPS latency) in microseconds."""
FIT_GRID = {"pixels_per_cycle": (4, 8), "dram_bytes_per_cycle": (32.0, 48.0, 64.0, 96.0),
            "acc_buf_kib": (64, 128, 256), "instr_overhead_cycles": (4, 8, 16)}
"""Chosen: powers of two (and midpoints) around the values that bracket ResNet-50's Table 7 latency.
``isg_d1_kib`` follows ``acc_buf_kib`` (one D1 per D2, journal App. A-A)."""
FIT_ON = "resnet50"
"""Chosen: the fit uses ResNet-50 only (dense convs, what the journal's App. A describes); MobileNetV2 is
a prediction (its Table 7 latency is not reachable, see docs/cycle_model.md)."""


def compiled(name: str, cfg: NPUConfig) -> ioso_tvm.compiler.CompiledModel:
    """``name`` at 1x3x224x224, W8A8, seeded random weights, compiled for the NPU (one ISG group)."""
    torch.manual_seed(0)
    qm = build_qmodel(build_model(name).eval(), (3, 224, 224), 8, 8)
    qm.init_act_scales(torch.randn(2, 3, 224, 224), batch=2)
    return ioso_tvm.compile(export_onnx(qm, None, (1, 3, 224, 224)), config=cfg)


def stream_us(cm: ioso_tvm.compiler.CompiledModel) -> float:
    """Latency of the compiled model's linked region streams (SYNC barriers between layers, every
    inter-layer tensor through DRAM) from the cycle model, in microseconds."""
    return cm.report()["total_us"]


def layer_specs(name: str, cfg: NPUConfig, cm: ioso_tvm.compiler.CompiledModel | None = None) -> list:
    """hw_model specs of every NPU layer of ``name`` at 1x3x224x224 (compiled, permuted)."""
    cm = compiled(name, cfg) if cm is None else cm
    specs = []
    for ly in cm.layers:
        spec = to_spec(ly)
        if spec is not None:
            specs.append(spec)
    return specs


def with_groups(spec, cfg: NPUConfig, isg: bool):
    """``spec`` with one unity group (isg False) or three groups (scaled first, then unity)."""
    if not isinstance(spec, (ConvSpec, LinearSpec)) or getattr(spec, "groups", 1) != 1:
        return spec
    c = spec.c
    groups = np.zeros(c, np.int64)
    if isg and c >= 3 * cfg.granularity:
        third = max(cfg.granularity, c // 3 // cfg.granularity * cfg.granularity)
        groups[:third], groups[third:2 * third] = 1, 2
    return dataclasses.replace(spec, isg_groups=groups)


def network_us(specs: list, cfg: NPUConfig, isg: bool) -> float:
    total = 0
    for spec in specs:
        s = with_groups(spec, cfg, isg)
        prog = build_layer(s, default_tiling(s, cfg), cfg)
        total += int(simulate(prog, None, cfg, mode="perf").report["cycles"])
    return total / cfg.clock_mhz


def evaluate(specs: dict[str, list], cfg: NPUConfig) -> dict:
    """The issue's JSON: per model baseline / ISG latency and overhead, the paper's, the errors."""
    out: dict = {"paper": {}}
    for model, (base_paper, isg_paper) in PAPER_US.items():
        base, isg = network_us(specs[model], cfg, False), network_us(specs[model], cfg, True)
        overhead, paper_overhead = 100 * (isg - base) / base, 100 * (isg_paper - base_paper) / base_paper
        out["paper"][model] = {"baseline_us": base_paper, "isg_us": isg_paper,
                               "overhead_pct": round(paper_overhead, 2)}
        out[model] = {"baseline_us": round(base, 1), "isg_us": round(isg, 1), "overhead_pct": round(overhead, 2),
                      "baseline_err_pct": round(100 * (base - base_paper) / base_paper, 2),
                      "isg_err_pct": round(100 * (isg - isg_paper) / isg_paper, 2),
                      "overhead_err_pp": round(overhead - paper_overhead, 2)}
    out["max_rel_err_pct"] = max(max(abs(out[m]["baseline_err_pct"]), abs(out[m]["isg_err_pct"])) for m in PAPER_US)
    out["max_overhead_err_pp"] = max(abs(out[m]["overhead_err_pp"]) for m in PAPER_US)
    fit = out[FIT_ON]
    out["fit_score"] = max(abs(fit["baseline_err_pct"]) / 10, abs(fit["isg_err_pct"]) / 10,
                           abs(fit["overhead_err_pp"]) / 0.5)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", action="store_true", help="grid-search the parameters the paper does not give")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    base = NPUConfig()
    models = {m: compiled(m, base) for m in PAPER_US}
    specs = {m: layer_specs(m, base, cm) for m, cm in models.items()}
    result = {"config": {k: getattr(base, k) for k in FIT_GRID}, **evaluate(specs, base)}
    for m, cm in models.items():  # the same baseline column as one linked stream per region
        result[m]["stream_baseline_us"] = round(stream_us(cm), 1)
        result[m]["stream_vs_layer_sum_pct"] = round(100 * (stream_us(cm) / result[m]["baseline_us"] - 1), 2)
    if args.fit:
        best = None
        points = list(itertools.product(*FIT_GRID.values()))
        for point in tqdm(points, desc="fit", file=sys.stderr):
            point_cfg = dict(zip(FIT_GRID, point))
            cfg = base.replace(**point_cfg, isg_d1_kib=point_cfg["acc_buf_kib"])
            try:
                ev = evaluate(specs, cfg)
            except ValueError as e:  # a tiling that no longer fits: not a candidate
                tqdm.write(f"skip {point}: {e}", file=sys.stderr)
                continue
            if best is None or ev["fit_score"] < best[1]["fit_score"]:
                best = (dict(zip(FIT_GRID, point)), ev)
        result["fit"] = {"config": best[0], **best[1]}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
