"""Fuzz the compiler: random layer graphs compiled for the NPU against the contract and deploy mode.

Most cases are QDQ graphs from ``ioso_tvm.testing.random_graph`` (conv / depthwise / grouped
conv, residual adds with fan-out, adds reading one tensor twice, pools, linear; odd shapes, bits 2-8,
random ISG groups):
compiled output == ``hw_model.reference``. Every ``--torch-every``-th case is a small random
torch network quantized with ``build_qmodel`` (random bits and ISG groups) and exported:
compiled output == ``QuantModel.deploy``. A failing case is saved (ONNX + seed) under
``--failures``. Prints one JSON line ``{"cases", "mismatches", "crashes", "seconds", "cases_per_s"}``.

    python benchmarks/fuzz.py --cases 10000 --seed 0 [--jobs 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from tqdm import tqdm

import ioso_tvm
from ioso_tvm.calib.qmodel import build_qmodel
from ioso_tvm.export import export_onnx
from ioso_tvm.testing import random_graph


class TinyNet(nn.Module):
    """conv-bn-relu, a residual pair, optional depthwise, pool, linear; widths from ``rng``."""

    def __init__(self, rng: np.random.Generator, cin: int) -> None:
        super().__init__()
        w = int(rng.choice([8, 16, 24]))
        self.stem = nn.Sequential(nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(w, w, 1), nn.BatchNorm2d(w))
        self.dw = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, groups=w), nn.ReLU()) if rng.integers(2) else None
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w, int(rng.integers(2, 11)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.b(self.a(x)))
        if self.dw is not None:
            x = self.dw(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def qdq_case(rng: np.random.Generator) -> tuple[onnx.ModelProto, bool]:
    b, outs = random_graph(rng, self_add=True)
    m = b.model(outs)
    x = (rng.standard_normal(b.shape) * 2).astype(np.float32)
    got = ioso_tvm.compile(m).run(x)
    got = [got] if isinstance(got, np.ndarray) else got
    return m, all(np.array_equal(g, w) for g, w in zip(got, b.run_reference(x, outs)))


def torch_case(rng: np.random.Generator) -> tuple[onnx.ModelProto, bool]:
    torch.manual_seed(int(rng.integers(2**31)))
    cin, hw = int(rng.choice([1, 3, 5])), int(rng.integers(6, 13))
    net = TinyNet(rng, cin).eval()
    for mod in net.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    qm = build_qmodel(net, (cin, hw, hw), int(rng.integers(2, 9)), int(rng.integers(2, 9)))
    qm.init_act_scales(torch.randn(8, cin, hw, hw), batch=8)
    for layer in qm.layers():
        groups = layer.isg.groups
        if groups.numel() % 16 == 0 and layer.weight.shape[1] > 1:  # whole 16-channel blocks, not depthwise
            blocks = torch.from_numpy(rng.integers(0, 3, groups.numel() // 16))
            groups.copy_(blocks.repeat_interleave(16)[torch.from_numpy(rng.permutation(groups.numel()))])
    x = torch.randn(1, cin, hw, hw)
    m = export_onnx(qm, None, (1, cin, hw, hw))
    with torch.no_grad():
        want = qm.deploy(x).numpy()
    return m, bool(np.array_equal(ioso_tvm.compile(m).run(x.numpy()), want))


def run_case(i: int, seed0: int, torch_every: int, failures: str) -> str:
    """Run case ``i``; returns "ok", "mismatch" or "crash" (a failing case is saved under ``failures``)."""
    torch.set_num_threads(1)
    seed = seed0 * 1_000_003 + i
    rng = np.random.default_rng(seed)
    kind = "torch" if torch_every and i % torch_every == torch_every - 1 else "qdq"
    model, why, status = None, None, "ok"
    try:
        model, ok = (torch_case if kind == "torch" else qdq_case)(rng)
        if not ok:
            why = status = "mismatch"
    except Exception:  # a crash is what the fuzzer looks for: record it whole
        why, status = traceback.format_exc(), "crash"
    if why is not None:
        out = Path(failures)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{kind}_{seed}.txt").write_text(f"seed {seed} kind {kind}\n{why}")
        if model is not None:
            onnx.save(model, str(out / f"{kind}_{seed}.onnx"))
        tqdm.write(f"case {i} (seed {seed}, {kind}): {why.splitlines()[-1]}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (cases are independent)")
    ap.add_argument("--torch-every", type=int, default=20, help="every N-th case is a calibrated torch network")
    ap.add_argument("--failures", default="benchmarks/out/fuzz_failures")
    args = ap.parse_args(argv)
    if args.cases < 0 or args.jobs < 1:
        raise SystemExit("fuzz: --cases must be >= 0 and --jobs >= 1")
    work = partial(run_case, seed0=args.seed, torch_every=args.torch_every, failures=args.failures)
    t0 = time.perf_counter()
    bar = partial(tqdm, total=args.cases, desc="fuzz", file=sys.stderr)
    if args.jobs == 1:
        statuses = [work(i) for i in bar(range(args.cases))]
    else:
        with ProcessPoolExecutor(args.jobs) as pool:
            statuses = list(bar(pool.map(work, range(args.cases), chunksize=8)))
    seconds = time.perf_counter() - t0
    result = {"cases": args.cases, "mismatches": statuses.count("mismatch"), "crashes": statuses.count("crash"),
              "seconds": round(seconds, 1), "cases_per_s": round(args.cases / max(seconds, 1e-9), 2)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
