"""Functional-simulator throughput on the ResNet-18 (224x224, batch 1) conv layers vs float64 BLAS.

Prints one JSON line {"sim_gmacs", "blas_gmacs", "ratio", ...}. The BLAS reference does one
``np.matmul`` per layer of the im2col shape (OH*OW, C*KH*KW) @ (C*KH*KW, K): the same MAC count.
Only simulation is timed (program build and packing are not). Both sides use the same BLAS
thread count, ``OPENBLAS_NUM_THREADS`` (default 1, chosen: the machines are shared, and OpenBLAS
threads spinning on an oversubscribed machine slow small GEMMs by 10-40x, which would measure the
load, not the simulator). Usage: python benchmarks/sim_speed.py [--groups 3]
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # must precede the numpy import

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from hw_model.builder import ConvSpec, build_conv, pack_inputs  # noqa: E402
from hw_model.config import DEFAULT_CONFIG  # noqa: E402
from hw_model.functional import run_program  # noqa: E402


def resnet18_convs() -> list[tuple[int, int, int, int, int, int]]:
    """(C, H, K, kernel, stride, pad) of every ResNet-18 conv at 224x224 (He et al. 2016, Table 1)."""
    layers = [(3, 224, 64, 7, 2, 3)]
    h, c = 56, 64
    for k, first_stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for blk in range(2):
            s = first_stride if blk == 0 else 1
            layers.append((c, h, k, 3, s, 1))
            if s != 1 or c != k:
                layers.append((c, h, k, 1, s, 0))
            h = h // s
            layers.append((k, h, k, 3, 1, 1))
            c = k
    return layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=3, help="ISG groups per layer (chosen: 3, the method's case)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    sim_t = blas_t = 0.0
    macs = 0
    for c, h, k, ks, s, p in tqdm(resnet18_convs(), desc="resnet18 convs"):
        x = rng.integers(-128, 128, (1, c, h, h)).astype(np.int8)
        w = rng.integers(-8, 8, (k, c, ks, ks)).astype(np.int8)
        # groups cover whole 16-channel blocks, as the compiler hands them over (granularity 16)
        gv = np.repeat(rng.integers(0, args.groups, -(-c // 16)), 16)[:c]
        spec = ConvSpec(1, c, h, h, k, w, np.full(k, 1e-3, np.float32), np.zeros(k, np.float32),
                        stride=(s, s), pads=(p, p, p, p), x_zp=3, isg_groups=gv)
        prog = build_conv(spec, cfg=DEFAULT_CONFIG)
        inputs = pack_inputs(prog, x)
        t0 = time.perf_counter()
        run_program(prog, inputs, DEFAULT_CONFIG)
        sim_t += time.perf_counter() - t0
        macs += spec.macs()
        oh = prog.meta["output"]["shape"][2]
        a = rng.standard_normal((oh * oh, c * ks * ks))
        b = rng.standard_normal((c * ks * ks, k))
        t0 = time.perf_counter()
        np.matmul(a, b)
        blas_t += time.perf_counter() - t0
    sim, blas = macs / sim_t / 1e9, macs / blas_t / 1e9
    print(json.dumps({"sim_gmacs": round(sim, 3), "blas_gmacs": round(blas, 3), "ratio": round(sim / blas, 3),
                      "gmac": round(macs / 1e9, 3), "layers": len(resnet18_convs()), "isg_groups": args.groups,
                      "blas_threads": os.environ["OPENBLAS_NUM_THREADS"]}))


if __name__ == "__main__":
    main()
