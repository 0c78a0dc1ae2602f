"""Tuner benchmark on ResNet-18 (224x224) conv layers: exhaustive optimum vs xgboost, random, default.

Prints one JSON line: {"layers", "xgb_gap_pct", "random_gap_pct", "default_gap_pct", "mac_utilisation", ...};
gap = mean over layers (and seeds) of (best cycles / exhaustive optimum - 1) in %. mac_utilisation is
useful MACs / (xgb-tuned cycles x peak MACs per cycle x pixels per cycle) summed over the 3x3 convs. Writes a plot of
best-so-far vs trials (xgboost vs random). Usage:
    python benchmarks/tuner.py [--seeds 5] [--measure builder|estimate] [--jobs N] [--plot PNG]
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hw_model.config import DEFAULT_CONFIG
from ioso_tvm.models import resnet18
from target_npu.tuner import ConvSpec, Measurer, default_tiling, enumerate_space, make_tuner
from target_npu.tuner.measure import default_backend, get_measure

MAX_SPACE = 5000
"""Layers with more valid points than this are not enumerated. Chosen: every ResNet-18 layer fits (<= 500)."""


def resnet18_convs() -> list[ConvSpec]:
    """Distinct conv layers of ResNet-18 at 224x224, in network order (shapes read by forward hooks)."""
    model, specs = resnet18().eval(), []

    def hook(mod: torch.nn.Conv2d, inp: tuple[torch.Tensor, ...]) -> None:
        s = ConvSpec(mod.in_channels, mod.out_channels, inp[0].shape[2], inp[0].shape[3], *mod.kernel_size,
                     mod.stride[0], mod.padding[0], mod.groups)
        if s not in specs:
            specs.append(s)

    hs = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    for h in hs:
        h.remove()
    return specs


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
    ax.set_title("ResNet-18 convs: xgboost vs random search")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5, help="tuner seeds per layer (default 5)")
    ap.add_argument("--budget", type=float, default=0.10, help="trials as a fraction of the space (default 0.10)")
    ap.add_argument("--measure", default=default_backend(),
                    help="measurement backend: builder (hw_model program + cycle model, default) or estimate")
    ap.add_argument("--jobs", type=int, default=1, help="measurement processes (default 1)")
    ap.add_argument("--plot", default="benchmarks/out/tuner_best_so_far.png", help="plot path")
    args = ap.parse_args()
    cfg, fn = DEFAULT_CONFIG, get_measure(args.measure)
    t0 = time.time()
    rows, curves = [], {"xgb": [], "random": []}
    specs = [s for s in resnet18_convs() if len(enumerate_space(s, cfg)) <= MAX_SPACE]
    for spec in tqdm(specs, desc="layers"):
        space = enumerate_space(spec, cfg)
        meas = Measurer(spec, cfg, fn, jobs=args.jobs)
        opt = min(meas(space))
        budget = max(1, math.floor(args.budget * len(space)))
        row = {"layer": f"{spec.in_ch}->{spec.out_ch} {spec.kh}x{spec.kw}/{spec.stride} @{spec.in_h}",
               "space": len(space), "trials": budget, "opt": opt,
               "default_gap_pct": 100 * (meas([default_tiling(spec, cfg)])[0] / opt - 1)}
        for kind in ("xgb", "random"):
            gaps, best = [], []
            for seed in range(args.seeds):
                res = make_tuner(kind, spec, cfg, measurer=meas, seed=seed).tune(budget)
                gaps.append(100 * (res.best[1] / opt - 1))
                best.append(res.best[1])
                curves[kind].append(np.asarray(res.best_curve()) / opt)
            row[f"{kind}_gap_pct"] = float(np.mean(gaps))
            row[f"{kind}_best_cycles_mean"] = float(np.mean(best))
        row["ideal_cycles"] = spec.macs / (cfg.macs_per_cycle)
        row["is3x3"] = spec.kh == spec.kw == 3
        rows.append(row)
    c3 = [r for r in rows if r["is3x3"]]
    util = sum(r["ideal_cycles"] for r in c3) / sum(r["xgb_best_cycles_mean"] for r in c3)
    plot(curves, Path(args.plot))
    out = {
        "layers": len(rows),
        "xgb_gap_pct": round(float(np.mean([r["xgb_gap_pct"] for r in rows])), 3),
        "random_gap_pct": round(float(np.mean([r["random_gap_pct"] for r in rows])), 3),
        "default_gap_pct": round(float(np.mean([r["default_gap_pct"] for r in rows])), 3),
        "mac_utilisation": round(util, 4),
        "mac_utilisation_per_3x3": [round(r["ideal_cycles"] / r["xgb_best_cycles_mean"], 4) for r in c3],
        "xgb_gap_pct_per_layer": [round(r["xgb_gap_pct"], 2) for r in rows],
        "random_gap_pct_per_layer": [round(r["random_gap_pct"], 2) for r in rows],
        "space_per_layer": [r["space"] for r in rows],
        "budget_frac": args.budget, "seeds": args.seeds, "measure": args.measure,
        "plot": args.plot, "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
