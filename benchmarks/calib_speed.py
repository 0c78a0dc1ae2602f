"""Seconds per weight-step iteration of round-only BRECQ vs IOSO on the same model, data and iterations.

Prints one JSON line: brecq_s_per_iter, ioso_s_per_iter, ratio (target <= 1.3), plus the mean final
block reconstruction loss of each (W2A4 by default) on the same blocks.
Usage: python benchmarks/calib_speed.py [--model resnet20] [--iters 100] [--samples 256]
"""
from __future__ import annotations

import argparse
import json

import torch

from ioso_tvm.calib import CalibConfig, calibrate
from ioso_tvm.datasets import load_calib_set, to_model_input
from ioso_tvm.models import load_pretrained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="resnet20", choices=["resnet20", "mobilenetv2_small"])
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--wbits", type=int, default=2)
    ap.add_argument("--abits", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = torch.from_numpy(to_model_input(load_calib_set()[0][: args.samples])).float()
    model = load_pretrained(args.model)
    out = {}
    for method in ("brecq", "ioso"):
        cfg = CalibConfig(num_samples=args.samples, iters=args.iters, act_iters=0, progress=False, seed=0)
        qm = calibrate(model, data, method, args.wbits, args.abits, cfg)
        hist = [h for h in qm.calib_history.values() if "weight_rec_loss" in h]
        trained = [h["weight_rec_loss"] for h in hist]
        # weight-step loop time only (caching and initialisation are the same for both methods)
        out[f"{method}_s_per_iter"] = sum(h["weight_step_s"] for h in hist) / (args.iters * len(hist))
        out[f"{method}_rec_loss"] = sum(trained) / len(trained)
    out["ratio"] = out["ioso_s_per_iter"] / out["brecq_s_per_iter"]
    out.update(model=args.model, iters=args.iters, samples=args.samples, wbits=args.wbits, abits=args.abits)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
