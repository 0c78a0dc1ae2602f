"""Accuracy of the calibration methods on Fashion-MNIST, measured on the NPU functional simulator.

For each model / bit width / method / seed: draw the calibration set with the seed, calibrate,
export to ONNX, compile for the NPU and run the whole test set on the functional simulator;
the same images go through torch deploy mode, and both top-1 values are recorded (they must be
equal: ``logit_mismatches`` counts differing logits). Rows are merged into ``--out`` as they
finish, so an interrupted run resumes where it stopped (rows already present are skipped).

    python benchmarks/accuracy.py --models resnet20 --bits W2A4 W4A4 --methods brecq ioso_brecq
    python benchmarks/accuracy.py --quick          # a tiny smoke run

Prints one JSON line at the end: rows written, mismatching rows, wall seconds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import ioso_tvm
from hw_model.config import NPUConfig
from ioso_tvm import datasets, models

METHODS = {  # row key -> (calibrate's method, CalibConfig overrides)
    "rtn": ("rtn", {}),
    "adaround": ("adaround", {}),
    "brecq": ("brecq", {}),
    "qdrop": ("qdrop", {}),
    "ioso_brecq": ("ioso", {"base": "brecq"}),
    "ioso_qdrop": ("ioso", {"base": "qdrop"}),
    "qft": ("qft", {}),
}
ABLATIONS = {  # row key -> (method, CalibConfig overrides, NPUConfig overrides); ResNet-20 W2A4 in the issue
    "ioso_groups2": ("ioso", {}, {"group_factors": (1.0, 1.0 - 2.0 ** -4)}),
    "ioso_gran1": ("ioso", {"granularity": 1}, {"granularity": 1}),
    "ioso_gran8": ("ioso", {"granularity": 8}, {"granularity": 8}),
    "ioso_gran32": ("ioso", {"granularity": 32}, {"granularity": 32}),
}
EVAL_BATCH = 500
"""Images per compiled-model call. Chosen: divides 10,000 and 2,000; keeps the simulator's GEMMs large."""


def parse_bits(text: str) -> tuple[int, int]:
    """"W4A4" -> (4, 4); raises ValueError naming the argument otherwise."""
    t = text.upper()
    if not (t.startswith("W") and "A" in t):
        raise ValueError(f"--bits entries look like W4A4, got {text!r}")
    w, a = t[1:].split("A", 1)
    return int(w), int(a)


def row_key(row: dict) -> tuple:
    return (row["model"], row.get("wbits"), row.get("abits"), row.get("method"), row.get("seed"))


def load_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = json.loads(path.read_text())
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows")
    return rows


def save_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(sorted(rows, key=lambda r: tuple(str(v) for v in row_key(r))), indent=1))
    tmp.replace(path)


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def evaluate(qmodel, x: np.ndarray, y: np.ndarray, config: NPUConfig, batch: int) -> dict:
    """Top-1 of the compiled model on the simulator and of deploy mode; float32 x (N, C, H, W)."""
    n = len(y) - len(y) % batch
    onnx_model = ioso_tvm.export_onnx(qmodel, None, input_shape=(batch, *x.shape[1:]))
    compiled = ioso_tvm.compile(onnx_model, input_shapes={"input": [batch, *x.shape[1:]]}, config=config)
    sim, dep = [], []
    for i in range(0, n, batch):
        xb = np.ascontiguousarray(x[i:i + batch])
        sim.append(np.asarray(compiled.run({"input": xb})))
        with torch.no_grad():
            dep.append(qmodel.deploy(torch.from_numpy(xb)).numpy())
    sim, dep = np.concatenate(sim), np.concatenate(dep)
    report = compiled.report()
    return {"top1": top1(sim, y[:n]), "top1_deploy": top1(dep, y[:n]), "test_images": int(n),
            "logit_mismatches": int((sim != dep).sum()),
            "npu_layers": sum(r["device"] == "npu" for r in report["layers"]),
            "latency_us": float(report["total_us"]) / batch}


def run_one(model_name: str, wbits: int, abits: int, key: str, seed: int, args, x_test, y_test) -> dict:
    table = ABLATIONS if key in ABLATIONS else METHODS
    method, overrides, *npu_over = table[key]
    npu = NPUConfig(**(npu_over[0] if npu_over else {}))
    images, _ = datasets.load_calib_set(args.calib_images, seed=seed if args.full_data else None)
    x_calib = torch.from_numpy(datasets.to_model_input(images))
    cfg = ioso_tvm.CalibConfig(seed=seed, iters=args.iters, act_iters=args.act_iters, progress=False,
                               num_samples=args.calib_images, npu=npu, **overrides)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    qmodel = ioso_tvm.calibrate(models.load_pretrained(model_name), x_calib, method=method, wbits=wbits,
                                abits=abits, config=cfg)
    seconds = time.perf_counter() - t0
    ev = evaluate(qmodel, x_test, y_test, npu, min(EVAL_BATCH, len(y_test)))
    return {"model": model_name, "wbits": wbits, "abits": abits, "method": key, "seed": seed, **ev,
            "calib_images": args.calib_images, "iters": args.iters, "act_iters": args.act_iters,
            "calib_seconds": round(seconds, 2)}


def fp_row(model_name: str, x: np.ndarray, y: np.ndarray) -> dict:
    with torch.no_grad():
        logits = models.load_pretrained(model_name)(torch.from_numpy(x)).numpy()
    return {"model": model_name, "fp_top1": top1(logits, y), "test_images": int(len(y))}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2_small"])
    p.add_argument("--bits", nargs="+", default=["W2A4", "W4A4", "W3A3", "W8A8", "W2A2"])
    p.add_argument("--methods", nargs="+", default=["rtn", "brecq", "qdrop", "ioso_brecq", "ioso_qdrop"],
                   help=f"row keys: {sorted(METHODS) + sorted(ABLATIONS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--iters", type=int, default=500,
                   help="weight-step iterations per block (chosen: fits the grid on a 2-core CPU; papers: 20000)")
    p.add_argument("--act-iters", type=int, default=200,
                   help="activation-step iterations per block (chosen as --iters; papers: 5000)")
    p.add_argument("--calib-images", type=int, default=1024, help="papers: 1024")
    p.add_argument("--test-images", type=int, default=None, help="default: the whole test set")
    p.add_argument("--shipped-data", dest="full_data", action="store_false",
                   help="use the shipped subsets instead of drawing from the Debian package's data")
    p.add_argument("--out", default="benchmarks/results/accuracy.json")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.bits, args.methods, args.seeds = ["resnet20"], ["W4A4"], ["rtn"], [0]
        args.iters, args.act_iters, args.calib_images, args.test_images, args.full_data = 2, 2, 32, 50, False
    bad = [m for m in args.methods if m not in METHODS and m not in ABLATIONS]
    if bad:
        p.error(f"unknown --methods {bad}; known: {sorted(METHODS) + sorted(ABLATIONS)}")
    torch.set_num_threads(1)
    out = Path(args.out)
    rows = load_rows(out)
    done = {row_key(r) for r in rows}
    if args.full_data:
        images, labels, _ = datasets.load_test_set()
    else:
        images, labels = datasets.load_subset("test")
    if args.test_images:
        images, labels = images[:args.test_images], labels[:args.test_images]
    x_test, y_test = datasets.to_model_input(images), labels
    todo = [(m, *parse_bits(b), k, s) for m in args.models for b in args.bits for k in args.methods
            for s in args.seeds]
    todo = [t for t in todo if t not in done]
    t_start, mismatching = time.perf_counter(), 0
    for m in args.models:
        if (m, None, None, None, None) not in done:
            rows.append(fp_row(m, x_test, y_test))
            done.add((m, None, None, None, None))
    save_rows(out, rows)
    for m, w, a, k, s in tqdm(todo, desc="accuracy grid", file=sys.stderr):
        row = run_one(m, w, a, k, s, args, x_test, y_test)
        mismatching += row["top1"] != row["top1_deploy"] or row["logit_mismatches"] > 0
        tqdm.write(json.dumps(row), file=sys.stderr)
        rows.append(row)
        save_rows(out, rows)
    summary = {"rows_written": len(todo), "rows_total": len(rows), "simulator_vs_deploy_mismatching_rows": mismatching,
               "seconds": round(time.perf_counter() - t_start, 1)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
