"""Simulator and deploy-mode throughput as ratios: against onnxruntime on the same QDQ ONNX model, and
the simulator's conv layers against float64 BLAS.

Whole models (``--models``, default ResNet-18 224 at batch 1 and ResNet-20 at batch 64): the float model
(seeded random weights; speed does not depend on them) is quantized with ``build_qmodel`` and
``init_act_scales`` on a seeded random batch (``--bits``, default W4A4, the project's main setting),
exported with ``export_onnx`` and compiled with ``ioso_tvm.compile``. On one seeded input batch, one
process and one thread everywhere (torch, BLAS, OpenMP, TVM, onnxruntime), the median of ``--repeats``
(default 3) timed rounds, each running every path once (interleaved), of:
  * ``sim``: ``CompiledModel.run`` (the NPU regions on the functional simulator, ``func`` mode);
  * ``deploy``: ``QuantModel.deploy`` (torch integer mode);
  * ``ort``: an onnxruntime ``InferenceSession`` on the exported QDQ model (one intra/inter-op thread).
``ratio_vs_ort`` = sim images/s / ort images/s, ``deploy_ratio_vs_ort`` = deploy images/s / ort images/s
(above 1: faster than onnxruntime). ``mismatches`` counts output elements where the simulator and
deploy mode differ (must be 0: the numeric contract); onnxruntime computes in float and is not
expected to match bit for bit (``ort_max_abs_diff`` is informative).

Conv layers (``convs``): every ResNet-18 224 conv built alone by ``hw_model.builder`` and run with
``run_program`` vs one ``np.matmul`` of its im2col shape (OH*OW, C*KH*KW) @ (C*KH*KW, K), the same MACs.

One thread (chosen): the machines are shared, and threads spinning on an oversubscribed machine measure
the load, not the code. Prints one JSON object and writes it to ``benchmarks/out/sim_speed.json``.

    .venv/bin/python benchmarks/sim_speed.py [--models resnet18:1,resnet20:64] [--bits W4A4] [--profile]
"""
from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TVM_NUM_THREADS"):
    os.environ.setdefault(_v, "1")  # must precede the numpy / torch / tvm imports

import argparse  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pstats  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from hw_model.config import DEFAULT_CONFIG  # noqa: E402
from hw_model.functional import run_program  # noqa: E402
from hw_model.layer_specs import ConvSpec  # noqa: E402
from hw_model.layers import build_conv  # noqa: E402
from hw_model.layers_alu import pack_inputs  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "sim_speed.json"
SIZES = {"resnet18": (3, 224, 1000), "resnet20": (1, 32, 10)}
"""(input channels, input size, classes) per model: ImageNet shape for ResNet-18, Fashion-MNIST for ResNet-20."""


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


def conv_ratio(groups: int, seed: int) -> dict:
    """Simulator GMAC/s on the ResNet-18 convs alone vs float64 BLAS GMAC/s on the same shapes."""
    rng = np.random.default_rng(seed)
    sim_t = blas_t = 0.0
    macs = 0
    for c, h, k, ks, s, p in tqdm(resnet18_convs(), desc="resnet18 convs"):
        x = rng.integers(-128, 128, (1, c, h, h)).astype(np.int8)
        w = rng.integers(-8, 8, (k, c, ks, ks)).astype(np.int8)
        # groups cover whole 16-channel blocks, as the compiler hands them over (granularity 16)
        gv = np.repeat(rng.integers(0, groups, -(-c // 16)), 16)[:c]
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
    return {"sim_gmacs": round(sim, 3), "blas_gmacs": round(blas, 3), "ratio": round(sim / blas, 3),
            "gmac": round(macs / 1e9, 3), "layers": len(resnet18_convs()), "isg_groups": groups}


def _median_times(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds per path over ``repeats`` rounds; each round runs every path once (interleaved, so a
    change of machine load between rounds affects all paths alike)."""
    ts: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def _top(prof: cProfile.Profile, n: int = 12) -> list[str]:
    """The ``n`` functions with the most own time, as 'seconds file:line(function)'."""
    st = pstats.Stats(prof, stream=io.StringIO())
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:n]
    return [f"{v[2]:.3f}s {Path(k[0]).name}:{k[1]}({k[2]})" for k, v in rows]


def model_ratio(name: str, batch: int, wbits: int, abits: int, repeats: int, seed: int, profile: bool) -> dict:
    """Simulator / deploy mode / onnxruntime images per second on one model (see the module docstring)."""
    import onnxruntime as ort
    import torch

    import ioso_tvm
    from ioso_tvm.calib.qmodel import build_qmodel
    from ioso_tvm.export import export_onnx
    from ioso_tvm.models import build_model

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    cin, hw, classes = SIZES[name]
    model = build_model(name, num_classes=classes).eval()
    qm = build_qmodel(model, (cin, hw, hw), wbits, abits)
    qm.init_act_scales(torch.randn(16, cin, hw, hw))
    x = torch.randn(batch, cin, hw, hw)
    onnx_model = export_onnx(qm, None, tuple(x.shape))
    cm = ioso_tvm.compile(onnx_model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    xn = x.numpy()
    runs = {"sim": lambda: cm.run(xn), "deploy": lambda: qm.deploy(x), "ort": lambda: sess.run(None, {"input": xn})}
    outs = {k: fn() for k, fn in runs.items()}  # warm-up (and the outputs compared below)
    times = _median_times(runs, repeats)
    sim, dep, ortv = np.asarray(outs["sim"]), outs["deploy"].numpy(), np.asarray(outs["ort"][0])
    ips = {k: batch / t for k, t in times.items()}
    res = {"model": name, "size": hw, "batch": batch, "bits": f"W{wbits}A{abits}",
           "ratio_vs_ort": round(ips["sim"] / ips["ort"], 3),
           "deploy_ratio_vs_ort": round(ips["deploy"] / ips["ort"], 3),
           "images_per_s": {k: round(v, 2) for k, v in ips.items()},
           "mismatches": int((sim != dep).sum()) if sim.shape == dep.shape else int(dep.size),
           "elements": int(dep.size),
           "ort_max_abs_diff": float(np.abs(ortv.reshape(dep.shape) - dep).max())}
    if profile:
        for k in ("sim", "deploy"):
            prof = cProfile.Profile()
            prof.runcall(runs[k])
            res[f"{k}_profile"] = _top(prof)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18:1,resnet20:64",
                    help="comma-separated model:batch (models: resnet18 at 224, resnet20 at 32); '' for none")
    ap.add_argument("--bits", default="W4A4", help="W<wbits>A<abits>")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per path (median; chosen: 3)")
    ap.add_argument("--groups", type=int, default=3,
                    help="ISG groups per conv layer in the conv benchmark (chosen: 3, the method's case)")
    ap.add_argument("--no-convs", action="store_true", help="skip the conv-layer vs BLAS benchmark")
    ap.add_argument("--profile", action="store_true", help="add the cProfile top functions of one sim / deploy run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT, help=f"JSON output file (default {OUT})")
    a = ap.parse_args()
    m = re.fullmatch(r"W(\d)A(\d)", a.bits)
    if not m:
        ap.error(f"--bits must look like W4A4, got {a.bits!r}")
    specs = []
    for item in filter(None, a.models.split(",")):
        name, _, batch = item.partition(":")
        if name not in SIZES or not batch.isdigit() or int(batch) < 1:
            ap.error(f"--models: {item!r} must be model:batch with model in {sorted(SIZES)} and batch >= 1")
        specs.append((name, int(batch)))
    if a.repeats < 1:
        ap.error("--repeats must be >= 1")
    out: dict = {"threads": 1, "repeats": a.repeats, "load_average_1min": round(os.getloadavg()[0], 2)}
    out["models"] = [model_ratio(n, b, int(m.group(1)), int(m.group(2)), a.repeats, a.seed, a.profile)
                     for n, b in specs]
    if not a.no_convs:
        out["convs"] = conv_ratio(a.groups, a.seed)
    text = json.dumps(out)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
