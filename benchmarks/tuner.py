"""Tuner benchmark: ResNet-18 (224x224) convs measured through the TIR path, and end-to-end latency.

Part 1, on the ResNet-18 conv layers whose space has at most MAX_SPACE points: the exhaustive optimum,
the xgboost tuner with 10 % of the space, random search with the same budget (``--seeds`` runs each) and
the default heuristic (``hw_model.layers.default_tiling``). Gap = mean over layers (and seeds) of
best cycles / optimum - 1, in %. For the 3x3 convs: MAC utilisation of the xgb-tuned and of the optimal
schedule (useful MACs / (cycles x ``macs_per_cycle``)), the roofline bound (below) and
``roofline_fraction`` = utilisation / roofline bound (1.0: the schedule reaches the roofline).
Part 2: ResNet-18 and MobileNetV2 (W4A4, 224x224, batch 1, seeded random weights as in
benchmarks/compile_time.py) compiled with ``ioso_tvm.compile`` without and with the records of
``tune_model`` (what ``tvmc tune`` runs: xgb, ``--e2e-trials`` per layer); latency = sum of the
per-layer cycles of ``CompiledModel.report()`` (perf mode); each model once as exported (one ISG group per
layer) and once with random hardened ISG groups (``_isg``: 2-3 groups per layer, as after calibration).

Prints one JSON line, writes it to benchmarks/out/tuner.json and the best-so-far plot (xgboost vs random).
    python benchmarks/tuner.py [--seeds 3] [--jobs 1] [--e2e-trials 48] [--skip-e2e]
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from tqdm import tqdm

import ioso_tvm
from hw_model.config import DEFAULT_CONFIG, NPUConfig
from ioso_tvm.calib.isg import ISG
from ioso_tvm.calib.qmodel import build_qmodel
from ioso_tvm.export import export_onnx
from ioso_tvm.models import build_model
from target_npu.tuner import (
    ConvSpec,
    Measurer,
    canonical,
    conv_specs,
    default_tiling,
    enumerate_space,
    get_measure,
    make_tuner,
    tune_model,
)
from target_npu.tuner.space import geometry

MAX_SPACE = 5000
"""Layers with more valid points than this are not enumerated. Chosen: every ResNet-18 layer has <= 500."""
E2E_TRIALS = 48
"""Trials per layer of the end-to-end tuning. Chosen: ~10 % of the largest ResNet-18 space (488 points)."""


def exported(name: str, isg: bool = False) -> onnx.ModelProto:
    """W4A4 QDQ ONNX of ``name`` at 1x3x224x224 (seeded random weights, as benchmarks/compile_time.py).

    ``isg``: give every ISG module random hardened groups (16-channel granules drawn uniformly from the
    three groups, the remainder to one group) in place of a calibration, so the layers carry 2-3 groups."""
    torch.manual_seed(0)
    qm = build_qmodel(build_model(name).eval(), (3, 224, 224), 4, 4)
    qm.init_act_scales(torch.randn(2, 3, 224, 224), batch=2)
    if isg:
        rng = np.random.default_rng(0)
        for m in qm.modules():
            if isinstance(m, ISG):
                c, gran = m.groups.numel(), DEFAULT_CONFIG.granularity
                g = np.concatenate([np.repeat(rng.integers(0, DEFAULT_CONFIG.num_groups, c // gran), gran),
                                    np.full(c % gran, rng.integers(0, DEFAULT_CONFIG.num_groups))])
                m.groups.copy_(torch.from_numpy(rng.permutation(g).astype(np.int64)))
                m.hard = True
    return export_onnx(qm, None, (1, 3, 224, 224))


def roofline_bound(spec: ConvSpec, cfg: NPUConfig) -> float:
    """Highest MAC utilisation the layer can reach: compute time MACs / macs_per_cycle against the DMA time
    of the bytes it must move at dram_bytes_per_cycle (weights once, input once, output once; int8, channels
    padded to 16-channel blocks as the NPU stores them)."""
    g = geometry(spec, cfg)
    cp, kp = 16 * g.cbn, 16 * g.kb
    w = spec.kh * spec.kw * kp * (1 if g.depthwise else cp)
    moved = spec.n * (spec.h * spec.w * cp + g.oh * g.ow * kp) + w
    compute = spec.macs() / cfg.macs_per_cycle
    return compute / max(compute, moved / cfg.dram_bytes_per_cycle)


def name_of(s: ConvSpec) -> str:
    return f"{s.c}->{s.k} {s.kh}x{s.kw}/{s.stride[0]} @{s.h}"


def tune_layers(specs: list[ConvSpec], cfg: NPUConfig, seeds: int, budget_frac: float, jobs: int,
                curves: dict[str, list[np.ndarray]]) -> list[dict]:
    """Exhaustive optimum, xgb / random at the budget, default: one row per layer."""
    rows = []
    fn = get_measure("tir")
    for spec in tqdm(specs, desc="layers"):
        space = enumerate_space(spec, cfg)
        with Measurer(spec, cfg, fn, jobs=jobs) as meas:
            allc = meas(space)
        opt = min(allc)
        budget = max(1, math.floor(budget_frac * len(space)))
        dflt = meas([canonical(spec, default_tiling(spec, cfg), cfg)])[0]
        row = {"layer": name_of(spec), "space": len(space), "trials": budget, "opt": opt,
               "default_gap_pct": 100 * (dflt / opt - 1), "is3x3": spec.kh == spec.kw == 3,
               "ideal_cycles": spec.macs() / cfg.macs_per_cycle, "roofline": roofline_bound(spec, cfg)}
        for kind in ("xgb", "random"):
            gaps, best = [], []
            for seed in range(seeds):
                res = make_tuner(kind, spec, cfg, measurer=meas, seed=seed).tune(budget)
                gaps.append(100 * (res.best[1] / opt - 1))
                best.append(res.best[1])
                curves[kind].append(np.asarray(res.best_curve()) / opt)
            row[f"{kind}_gap_pct"] = float(np.mean(gaps))
            row[f"{kind}_best_cycles_mean"] = float(np.mean(best))
        rows.append(row)
    return rows


def end_to_end(name: str, trials: int, jobs: int, cfg: NPUConfig, isg: bool = False) -> dict:
    """Sum of per-layer cycles before / after tuning (records from tune_model over all tunable layers)."""
    model = exported(name, isg)
    base = ioso_tvm.compile(model, config=cfg)
    with tempfile.TemporaryDirectory() as d:
        rec = Path(d) / f"{name}.jsonl"
        t0 = time.time()
        n = len(tune_model(model, trials=trials, output=rec, cfg=cfg, jobs=jobs, progress=False))
        tune_s = time.time() - t0
        tuned = ioso_tvm.compile(model, config=cfg, tuning_records=str(rec))
    rb, rt = base.report()["layers"], tuned.report()["layers"]
    before, after = sum(r["cycles"] for r in rb), sum(r["cycles"] for r in rt)
    changed = [i for i, (a, b) in enumerate(zip(rb, rt)) if a["cycles"] != b["cycles"]]
    return {"cycles_before": before, "cycles_after": after, "speedup": round(before / after, 4),
            "us_before": round(before / cfg.clock_mhz, 1), "us_after": round(after / cfg.clock_mhz, 1),
            "tuned_layers": sum(t is not None for t in tuned.tilings), "records": n, "tune_s": round(tune_s, 1),
            "layers_slower": sum(rt[i]["cycles"] > rb[i]["cycles"] for i in changed),
            "multi_group_convs": sum(r["isg_groups_used"] > 1 for r in rb if r["kind"] == "conv")}


def plot(curves: dict[str, list[np.ndarray]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    grid = np.linspace(0, 1, 51)
    for name, cs in curves.items():
        # each curve: best/opt after each trial, resampled on the fraction of the budget used
        ys = np.array([np.interp(grid, np.linspace(0, 1, len(c)), c) for c in cs])
        ax.plot(100 * grid, 100 * (ys.mean(0) - 1), label=f"{name} (mean of {len(cs)} runs)")
    ax.set_xlabel("trials used (% of the 10% budget)")
    ax.set_ylabel("best so far, % above optimum")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_title("ResNet-18 224x224 convs (TIR path): xgboost vs random")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="tuner seeds per layer (default 3)")
    ap.add_argument("--budget", type=float, default=0.10, help="trials as a fraction of the space (default 0.10)")
    ap.add_argument("--jobs", type=int, default=1, help="measurement processes (default 1)")
    ap.add_argument("--e2e-trials", type=int, default=E2E_TRIALS, help=f"trials per layer end to end ({E2E_TRIALS})")
    ap.add_argument("--skip-e2e", action="store_true", help="only the per-layer part")
    ap.add_argument("--plot", default="benchmarks/out/tuner_best_so_far.png", help="plot path")
    ap.add_argument("--out", default="benchmarks/out/tuner.json", help="JSON output path")
    args = ap.parse_args()
    cfg = DEFAULT_CONFIG
    t0 = time.time()
    r18 = exported("resnet18")
    specs = [s for s in conv_specs(r18) if s.groups == 1 and len(enumerate_space(s, cfg)) <= MAX_SPACE]
    curves: dict[str, list[np.ndarray]] = {"xgb": [], "random": []}
    rows = tune_layers(specs, cfg, args.seeds, args.budget, args.jobs, curves)
    c3 = [r for r in rows if r["is3x3"]]
    util = sum(r["ideal_cycles"] for r in c3) / sum(r["xgb_best_cycles_mean"] for r in c3)
    plot(curves, Path(args.plot))
    out = {
        "layers": len(rows),
        "xgb_gap_pct": round(float(np.mean([r["xgb_gap_pct"] for r in rows])), 3),
        "random_gap_pct": round(float(np.mean([r["random_gap_pct"] for r in rows])), 3),
        "default_gap_pct": round(float(np.mean([r["default_gap_pct"] for r in rows])), 3),
        "mac_utilisation": round(util, 4),
        "measure": "tir",
        "per_3x3": [{"layer": r["layer"], "mac_utilisation": round(r["ideal_cycles"] / r["xgb_best_cycles_mean"], 4),
                     "optimum_utilisation": round(r["ideal_cycles"] / r["opt"], 4),
                     "roofline_bound": round(r["roofline"], 4),
                     "roofline_fraction": round(r["ideal_cycles"] / r["xgb_best_cycles_mean"] / r["roofline"], 4)}
                    for r in c3],
        "min_roofline_fraction": round(min(r["ideal_cycles"] / r["xgb_best_cycles_mean"] / r["roofline"]
                                           for r in c3), 4),
        "per_layer": [{"layer": r["layer"], "space": r["space"], "trials": r["trials"],
                       "xgb_gap_pct": round(r["xgb_gap_pct"], 2), "random_gap_pct": round(r["random_gap_pct"], 2),
                       "default_gap_pct": round(r["default_gap_pct"], 2)} for r in rows],
        "budget_frac": args.budget, "seeds": args.seeds, "plot": args.plot,
    }
    if not args.skip_e2e:
        out["e2e_trials_per_layer"] = args.e2e_trials
        for name in ("resnet18", "mobilenetv2"):
            for isg in (False, True):
                out[f"e2e_{name}{'_isg' if isg else ''}"] = end_to_end(name, args.e2e_trials, args.jobs, cfg, isg)
    out["seconds"] = round(time.time() - t0, 1)
    line = json.dumps(out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
