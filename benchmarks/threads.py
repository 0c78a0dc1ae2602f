"""Images/s of the three inference engines at 1 and 2 threads, and the thread count chosen from them.

Model: the shipped Fashion-MNIST ResNet-20, round-to-nearest W4A4 (calibration method does not change
the work per image), batch ``--batch``. Engines:

- ``sim``: the compiled model's functional run (``CompiledModel.run``, the hw_model simulator for the
  NPU regions, the Relax VM for the rest), artifact loaded with ``ioso_tvm.load``;
- ``deploy``: torch deploy mode (``QuantModel.integer_model()``);
- ``tvmc``: ``tvmc run --number 1 --repeat R --print-time`` on the same artifact (median host time).

Each thread count runs in fresh processes whose thread settings are made before numpy / torch / TVM
load (``target_npu.threads.set_threads`` for the Python engines, its environment variables for
``tvmc run``): a thread pool's size is fixed once it has started. Every figure is the median of
``--repeat`` timed runs after one warm-up run. ``chosen`` is the count with the higher geometric mean
of the three engines' images/s.

    python benchmarks/threads.py [--batch 16] [--repeat 5] [--counts 1 2]

Prints one JSON line: {"counts", "images_per_s": {engine: {count: value}}, "chosen", "default", ...}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
from target_npu.threads import DEFAULT_THREADS, ENV_VARS, set_threads  # noqa: E402 - no torch / numpy import

MODEL = "resnet20"
"""Chosen: the model of the accuracy tables (docs/accuracy.md)."""


def _quant_model():
    import torch

    import ioso_tvm
    from ioso_tvm import datasets, models

    images, _ = datasets.load_calib_set(32)
    cfg = ioso_tvm.CalibConfig(num_samples=32, act_init_samples=32, progress=False, device="cpu")
    torch.manual_seed(0)
    return ioso_tvm.calibrate(models.load_pretrained(MODEL), torch.from_numpy(datasets.to_model_input(images)),
                              "rtn", 4, 4, cfg)


def _median_rate(fn, batch: int, repeat: int) -> float:
    fn()  # warm-up: caches, lazy builds
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def worker(count: int, artifact: str, batch: int, repeat: int) -> dict:
    """Simulator and deploy-mode images/s in this process at ``count`` threads (set before any import)."""
    used = set_threads(count)
    import numpy as np
    import torch

    import ioso_tvm
    from ioso_tvm import models

    set_threads(count)  # the pools that the imports started
    x = np.random.default_rng(0).standard_normal((batch, *models.INPUT_SHAPES[MODEL])).astype(np.float32)
    compiled = ioso_tvm.load(artifact)
    integer_model = _quant_model().integer_model()
    with torch.no_grad():
        deploy = _median_rate(lambda: integer_model(torch.from_numpy(x)), batch, repeat)
    sim = _median_rate(lambda: compiled.run({"input": x}), batch, repeat)
    return {"threads": used, "torch_threads": torch.get_num_threads(), "sim": sim, "deploy": deploy}


def tvmc_rate(count: int, artifact: str, batch: int, repeat: int) -> float:
    """``tvmc run`` images/s: batch / median host time of ``repeat`` runs (environment set to ``count``)."""
    env = {**os.environ, **{k: str(count) for k in ENV_VARS}}
    tvmc = Path(sys.executable).with_name("tvmc")
    cmd = [str(tvmc) if tvmc.exists() else "tvmc", "run", artifact, "--fill-mode", "random", "--number", "1",
           "--repeat", str(repeat + 1), "--print-time"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    lines = out[out.index("Execution time summary"):].splitlines()
    median_ms = float(re.split(r"\s+", lines[2].strip())[1])  # columns: mean median max min std
    return batch / (median_ms / 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16, help="images per run (chosen: a small serving batch)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per figure (median)")
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 2], help="thread counts to measure")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--artifact", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker is not None:
        print(json.dumps(worker(a.worker, a.artifact, a.batch, a.repeat)))
        return
    set_threads(1)
    import ioso_tvm
    from ioso_tvm import models
    from ioso_tvm.export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        shape = [a.batch, *models.INPUT_SHAPES[MODEL]]
        artifact = str(ioso_tvm.compile(export_onnx(_quant_model(), None, tuple(shape)),
                                        input_shapes={"input": shape}).export(Path(tmp) / "m.tar"))
        rates: dict[str, dict[int, float]] = {"sim": {}, "deploy": {}, "tvmc": {}}
        for n in a.counts:
            out = subprocess.run([sys.executable, __file__, "--worker", str(n), "--artifact", artifact,
                                  "--batch", str(a.batch), "--repeat", str(a.repeat)],
                                 capture_output=True, text=True, check=True).stdout
            got = json.loads(out.strip().splitlines()[-1])
            rates["sim"][n], rates["deploy"][n] = got["sim"], got["deploy"]
            rates["tvmc"][n] = tvmc_rate(n, artifact, a.batch, a.repeat)
    score = {n: math.exp(statistics.mean(math.log(rates[e][n]) for e in rates)) for n in a.counts}
    chosen = max(score, key=score.get)
    print(json.dumps({"model": MODEL, "batch": a.batch, "repeat": a.repeat, "cpus": os.cpu_count(),
                      "counts": a.counts, "images_per_s": {e: {n: round(v, 2) for n, v in r.items()}
                                                           for e, r in rates.items()},
                      "geomean": {n: round(v, 2) for n, v in score.items()}, "chosen": chosen,
                      "default": DEFAULT_THREADS}))


if __name__ == "__main__":
    main()
