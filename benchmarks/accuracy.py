"""Accuracy of the calibration methods on Fashion-MNIST, measured on the NPU functional simulator.

For each model / bit width / method / seed: draw the calibration set with the seed, calibrate,
export to ONNX, compile for the NPU and run the whole test set on the functional simulator;
the same images go through torch deploy mode, and both top-1 values are recorded (they must be
equal: ``logit_mismatches`` counts differing logits). Rows are merged into ``--out`` as they
finish, so an interrupted run resumes where it stopped (rows already present are skipped).

The rows are independent jobs, dispatched as Ray tasks (one CPU each, ``--threads`` threads inside):
by default on a local Ray started in this process with ``--workers`` CPUs, with ``--ray-address`` on
an existing cluster (its nodes need this package installed, e.g. ``pip install -e ".[sweep]"``), with
``--serial`` in this process without Ray. This process writes every finished row into ``--out``.

    python benchmarks/accuracy.py --models resnet20 --bits W2A4 W4A4 --methods brecq ioso_brecq
    python benchmarks/accuracy.py --quick          # a tiny smoke run
    python benchmarks/accuracy.py --ray-address auto --seeds 0 1 2 3 4   # on a running Ray cluster

Prints one JSON line at the end: rows written, mismatching rows, wall seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import ioso_tvm
from hw_model.config import NPUConfig
from ioso_tvm import datasets, models
from ioso_tvm.calib.methods import default_lr_act
from ioso_tvm.calib.qmodules import NotDeployableError
from target_npu.threads import set_threads

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
    "isg_only": ("ioso", {"ioso_parts": ("isg",)}, {}),
    "oso_only": ("ioso", {"ioso_parts": ("oso",)}, {}),
    "ioso_groups2": ("ioso", {}, {"isg_group_signs": (0, -1)}),
    "ioso_gran1": ("ioso", {"granularity": 1}, {"granularity": 1}),
    "ioso_gran8": ("ioso", {"granularity": 8}, {"granularity": 8}),
    "ioso_gran32": ("ioso", {"granularity": 32}, {"granularity": 32}),
    "ioso_oso_after_act": ("ioso", {"oso_position": "after_act"}, {}),  # fake-quant only (not deployable)
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


def merge_rows(out: Path, others: list[Path]) -> int:
    """Add to ``out`` the rows of ``others`` whose key it lacks; returns how many were added."""
    rows = load_rows(out)
    done = {row_key(r) for r in rows}
    added = 0
    for f in others:
        if not f.is_file():
            raise ValueError(f"--merge: no such file {f}")
        for r in load_rows(f):
            if row_key(r) not in done:
                rows.append(r)
                done.add(row_key(r))
                added += 1
    save_rows(out, rows)
    return added


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def batched_logits(fn, x: np.ndarray, batch: int) -> np.ndarray:
    """``fn`` (torch float32 (B, C, H, W) -> logits) over float32 x (N, C, H, W) in batches of ``batch``."""
    with torch.no_grad():
        return np.concatenate([fn(torch.from_numpy(np.ascontiguousarray(x[i:i + batch]))).numpy()
                               for i in range(0, len(x), batch)])


def fake_quant_top1(qmodel, x: np.ndarray, y: np.ndarray, batch: int) -> float:
    """Top-1 of the fake-quant float model (``QuantModel.forward``) on float32 x (N, C, H, W)."""
    return top1(batched_logits(qmodel, x, batch), y)


def deploy_top1(qmodel, x: np.ndarray, y: np.ndarray, batch: int) -> float:
    """Top-1 of torch deploy mode (the exact integer model) on float32 x (N, C, H, W)."""
    return top1(batched_logits(qmodel.integer_model(), x, batch), y)


def evaluate(qmodel, x: np.ndarray, y: np.ndarray, config: NPUConfig, batch: int) -> dict:
    """Top-1 of the compiled model on the simulator and of deploy mode; float32 x (N, C, H, W).
    A model the NPU cannot run (``NotDeployableError``) gets its fake-quant top-1 only, ``eval`` "fake_quant"."""
    n = len(y) - len(y) % batch
    fq = fake_quant_top1(qmodel, x[:n], y[:n], batch)
    try:
        integer_model = qmodel.integer_model()  # built once: deploy mode's constants for every batch
    except NotDeployableError as e:
        return {"top1": fq, "top1_deploy": None, "top1_fakequant": fq, "test_images": int(n), "eval": "fake_quant",
                "not_deployable": str(e)}
    onnx_model = ioso_tvm.export_onnx(qmodel, None, input_shape=(batch, *x.shape[1:]))
    compiled = ioso_tvm.compile(onnx_model, input_shapes={"input": [batch, *x.shape[1:]]}, config=config)
    sim = np.concatenate([np.asarray(compiled.run({"input": np.ascontiguousarray(x[i:i + batch])}))
                          for i in range(0, n, batch)])
    dep = batched_logits(integer_model, x[:n], batch)
    report = compiled.report()
    return {"top1": top1(sim, y[:n]), "top1_deploy": top1(dep, y[:n]), "top1_fakequant": fq, "test_images": int(n),
            "eval": "npu_simulator",
            "logit_mismatches": int((sim != dep).sum()),
            "npu_layers": sum(r["device"] == "npu" for r in report["layers"]),
            "latency_us": float(report["total_us"]) / batch}


def run_one(model_name: str, wbits: int, abits: int, key: str, seed: int, args, x_test, y_test,
            full: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """One row; ``full`` (x, y): the whole test set, scored in deploy mode too (``top1_deploy_full``)."""
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
    if full is not None and len(full[1]) > ev["test_images"]:
        if ev["eval"] == "fake_quant":
            ev["top1_fakequant_full"] = fake_quant_top1(qmodel, *full, EVAL_BATCH)
        else:
            ev["top1_deploy_full"] = deploy_top1(qmodel, *full, EVAL_BATCH)
        ev["test_images_full"] = int(len(full[1]))
    return {"model": model_name, "wbits": wbits, "abits": abits, "method": key, "seed": seed, **ev,
            "calib_images": args.calib_images, "iters": args.iters, "act_iters": args.act_iters,
            "lr_act": cfg.lr_act,
            "lr_oso_act": cfg.lr_oso_act if cfg.lr_oso_act is not None else default_lr_act(args.act_iters),
            "calib_seconds": round(seconds, 2)}


def fp_row(model_name: str, x: np.ndarray, y: np.ndarray) -> dict:
    with torch.no_grad():
        logits = models.load_pretrained(model_name)(torch.from_numpy(x)).numpy()
    return {"model": model_name, "fp_top1": top1(logits, y), "test_images": int(len(y))}


def summarize(rows: list[dict]) -> list[dict]:
    """Mean / spread (max - min) of top-1 over seeds per (model, bits, method), sorted."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "method" in r:
            groups.setdefault((r["model"], r["wbits"], r["abits"], r["method"]), []).append(r)
    out = []
    for (model, w, a, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1], -kv[0][2],
                                                                             kv[0][3])):
        top = np.array([r["top1"] for r in rs]) * 100
        out.append({"model": model, "bits": f"W{w}A{a}", "method": method, "seeds": len(rs),
                    "top1_mean": round(float(top.mean()), 2), "top1_spread": round(float(top.max() - top.min()), 2),
                    "sim_equals_deploy": None if any(r.get("eval") == "fake_quant" for r in rs) else all(
                        r["top1"] == r["top1_deploy"] and r.get("logit_mismatches", 0) == 0 for r in rs),
                    "calib_s_mean": round(float(np.mean([r["calib_seconds"] for r in rs])), 1)})
    return out


EQUAL_TEXT = {True: "yes", False: "NO", None: "n/a (fake-quant only)"}


def float_top1(rows: list[dict]) -> dict[str, float]:
    """Model -> float top-1 in % (the ``fp_top1`` rows)."""
    return {r["model"]: 100 * r["fp_top1"] for r in rows if "fp_top1" in r}


def markdown_table(rows: list[dict]) -> str:
    """The summary as a Markdown table (top-1 in %, mean and spread over seeds)."""
    fp = float_top1(rows)
    lines = ["| model | bits | method | top-1 % (mean) | spread (max-min) | seeds | simulator == deploy | "
             "calib s |", "|---|---|---|---|---|---|---|---|"]
    for m, v in fp.items():
        lines.append(f"| {m} | float | - | {v:.2f} | - | - | - | - |")
    for r in summarize(rows):
        lines.append(f"| {r['model']} | {r['bits']} | {r['method']} | {r['top1_mean']:.2f} | {r['top1_spread']:.2f} "
                     f"| {r['seeds']} | {EQUAL_TEXT[r['sim_equals_deploy']]} | {r['calib_s_mean']} |")
    return "\n".join(lines)


def pivot_table(rows: list[dict], methods: list[str] | None = None) -> str:
    """Markdown: one line per (model, bits), one column per method, cells "mean (spread, seeds)"."""
    summ = {(r["model"], r["bits"], r["method"]): r for r in summarize(rows)}
    methods = methods or [m for m in METHODS if any(k[2] == m for k in summ)]
    cases = sorted({k[:2] for k in summ if k[2] in methods}, key=lambda c: (c[0], -parse_bits(c[1])[0],
                                                                           -parse_bits(c[1])[1]))
    fp = float_top1(rows)
    lines = ["| model | bits | float | " + " | ".join(methods) + " |", "|---|---|---|" + "---|" * len(methods)]
    for model, bits in cases:
        cells = [f"{summ[model, bits, m]['top1_mean']:.2f} ({summ[model, bits, m]['top1_spread']:.2f}, "
                 f"{summ[model, bits, m]['seeds']})" if (model, bits, m) in summ else "-" for m in methods]
        lines.append(f"| {model} | {bits} | {fp.get(model, float('nan')):.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_table(rows: list[dict]) -> str:
    """Markdown check of the targets: IOSO gain over its base vs the larger seed spread (W2A4, W3A3),
    and the W4A4 IOSO gap to float (<= 1.5 pp)."""
    summ = {(r["model"], r["bits"], r["method"]): r for r in summarize(rows)}
    fp = float_top1(rows)
    lines = ["| model | bits | comparison | value | bar | seeds | met |", "|---|---|---|---|---|---|---|"]
    for model in sorted(fp):
        for bits in ("W2A4", "W3A3"):
            for base in ("brecq", "qdrop"):
                a, b = summ.get((model, bits, f"ioso_{base}")), summ.get((model, bits, base))
                if a and b:
                    gain, bar = a["top1_mean"] - b["top1_mean"], max(a["top1_spread"], b["top1_spread"])
                    seeds = min(a["seeds"], b["seeds"])
                    lines.append(f"| {model} | {bits} | ioso_{base} - {base} | {gain:+.2f} pp | > {bar:.2f} (spread) "
                                 f"| {seeds} | {'yes' if gain > bar and seeds >= 3 else 'no'} |")
        for m in ("ioso_brecq", "ioso_qdrop"):
            a = summ.get((model, "W4A4", m))
            if a:
                gap = fp[model] - a["top1_mean"]
                lines.append(f"| {model} | W4A4 | float - {m} | {gap:.2f} pp | <= 1.50 | {a['seeds']} | "
                             f"{'yes' if gap <= 1.5 and a['seeds'] >= 3 else 'no'} |")
    return "\n".join(lines)


def ablation_table(rows: list[dict]) -> str:
    """Markdown: the ablation rows next to ioso_brecq of the same model, bits and seeds, with the cycle
    model's latency per image (batch 500) and its change against ioso_brecq."""
    abl = [r for r in rows if r.get("method") in ABLATIONS]
    lines = ["| model | bits | method | seeds | top-1 % | latency us/image | vs ioso_brecq |",
             "|---|---|---|---|---|---|---|"]
    for model, w, a in sorted({(r["model"], r["wbits"], r["abits"]) for r in abl}):
        seeds = {r["seed"] for r in abl if (r["model"], r["wbits"], r["abits"]) == (model, w, a)}
        same = [r for r in rows if (r.get("model"), r.get("wbits"), r.get("abits")) == (model, w, a)
                and r.get("seed") in seeds]
        ref_lat = np.mean([r["latency_us"] for r in same if r["method"] == "ioso_brecq"] or [np.nan])
        for m in ["ioso_brecq", *ABLATIONS]:
            rs = [r for r in same if r["method"] == m]
            if not rs:
                continue
            lat = np.mean([r.get("latency_us", np.nan) for r in rs])
            rel = f"{100 * (lat / ref_lat - 1):+.1f} %" if np.isfinite(lat) and np.isfinite(ref_lat) else "-"
            top = 100 * np.mean([r["top1"] for r in rs])
            cost = f"{lat:.2f} | {rel}" if np.isfinite(lat) else "- (not deployable) | -"
            lines.append(f"| {model} | W{w}A{a} | {m} | {len(rs)} | {top:.2f} | {cost} |")
    return "\n".join(lines)


def plot(rows: list[dict], png: str | Path) -> Path:
    """Grouped bars: mean top-1 per method (METHODS keys) for each (model, bits), error bars = seed range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = summarize(rows)
    cases = sorted({(r["model"], r["bits"]) for r in summ})
    methods = [m for m in METHODS if any(r["method"] == m for r in summ)]  # ablations: ablation_table
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(cases)), 4))
    width = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        xs, ys, err = [], [], []
        for i, case in enumerate(cases):
            r = next((r for r in summ if (r["model"], r["bits"]) == case and r["method"] == m), None)
            if r is not None:
                xs.append(i + j * width)
                ys.append(r["top1_mean"])
                err.append(r["top1_spread"] / 2)
        ax.bar(xs, ys, width, yerr=err, label=m, capsize=2)
    labels = [f"{m.replace('_small', '')}\n{b}" for m, b in cases]
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], labels, fontsize=8)
    ax.set_ylabel("top-1 % (NPU simulator)")
    if methods:  # a file of ablation rows only has no bars here (see ablation_table)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return Path(png)


def plan_jobs(models_: Sequence[str], bits: Sequence[str], methods: Sequence[str], seeds: Sequence[int],
              done: set[tuple]) -> list[tuple]:
    """The grid's jobs (model, wbits, abits, method, seed) in grid order, less those whose row is in ``done``."""
    todo = [(m, *parse_bits(b), k, s) for m in models_ for b in bits for k in methods for s in seeds]
    return [t for t in todo if t not in done]


def run_job(job: tuple, args: argparse.Namespace, x_test: np.ndarray, y_test: np.ndarray,
            full: tuple[np.ndarray, np.ndarray] | None) -> dict:
    """One grid row in this process (a Ray worker or the driver) with ``args.threads`` threads."""
    set_threads(args.threads)
    return run_one(*job, args, x_test, y_test, full)


def dispatch(fn: Callable[..., Any], jobs: Sequence[tuple], on_result: Callable[[tuple, Any], None], shared: tuple = (),
             serial: bool = False, address: str | None = None, workers: int | None = None) -> None:
    """Run ``fn(job, *shared)`` for every job; ``on_result(job, result)`` in this process as each one ends.

    ``serial``: one after the other here. Else as Ray tasks (1 CPU each): on the cluster at ``address``,
    or on a local Ray started here with ``workers`` CPUs (default: all) and shut down at the end.
    ``shared`` values go to the object store once. A failing job raises here (finished jobs are reported)."""
    bar = tqdm(total=len(jobs), desc="accuracy grid", file=sys.stderr)
    if serial or not jobs:
        for job in jobs:
            on_result(job, fn(job, *shared))
            bar.update()
        bar.close()
        return
    import ray

    if __name__ in sys.modules and __name__ != "__main__":  # loaded by path (tests): workers cannot import it
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    try:
        task = ray.remote(num_cpus=1)(fn)
        refs = [ray.put(v) for v in shared]
        pending = {task.remote(job, *refs): job for job in jobs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            on_result(job, ray.get(ready[0]))
            bar.update()
    finally:
        bar.close()
        if started:
            ray.shutdown()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2_small"])
    p.add_argument("--bits", nargs="+", default=["W2A4", "W4A4", "W3A3", "W8A8", "W2A2"])
    p.add_argument("--methods", nargs="+", default=["rtn", "brecq", "qdrop", "ioso_brecq", "ioso_qdrop"],
                   help=f"row keys: {sorted(METHODS) + sorted(ABLATIONS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--iters", type=int, default=500,
                   help="weight-step iterations per block (chosen: fits the grid on a 2-core CPU; papers: 20000)")
    p.add_argument("--act-iters", type=int, default=100,
                   help="activation-step iterations per block (chosen: 1/5 of --iters; papers: 5000)")
    p.add_argument("--calib-images", type=int, default=1024, help="papers: 1024")
    p.add_argument("--test-images", type=int, default=None,
                   help="images run on the simulator (default: the whole test set)")
    p.add_argument("--deploy-full", action="store_true",
                   help="with --test-images: also score the whole test set in deploy mode (top1_deploy_full; "
                        "about 1 min per row for 10k images on one core)")
    p.add_argument("--shipped-data", dest="full_data", action="store_false",
                   help="use the shipped subsets instead of drawing from the Debian package's data")
    p.add_argument("--out", default="benchmarks/results/accuracy.json")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes")
    p.add_argument("--serial", action="store_true", help="run the jobs one after the other in this process, no Ray")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="run the jobs on this Ray cluster (e.g. 'auto' or 'ray://host:10001'); "
                        "default: a local Ray started here")
    p.add_argument("--workers", type=int, default=os.cpu_count(),
                   help="CPUs of the local Ray, one job each (default: all cores)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch / BLAS threads per job (default 1, chosen: the jobs are the parallelism)")
    p.add_argument("--report", metavar="PNG", help="no runs: print the Markdown table of --out and plot it to PNG")
    p.add_argument("--merge", nargs="+", metavar="JSON", default=[],
                   help="first add the rows of these files (written by parallel runs) to --out; rows in --out win")
    args = p.parse_args(argv)
    if args.merge:
        added = merge_rows(Path(args.out), [Path(f) for f in args.merge])
        if not args.report:  # merging is its own job: no calibration runs after it
            print(json.dumps({"rows_added": added, "rows_total": len(load_rows(Path(args.out)))}))
            return {"rows_added": added}
    if args.report:
        rows = load_rows(Path(args.out))
        print(pivot_table(rows), target_table(rows), ablation_table(rows), markdown_table(rows), sep="\n\n")
        plot(rows, args.report)
        return {"rows": len(rows)}
    if args.quick:
        args.models, args.bits, args.methods, args.seeds = ["resnet20"], ["W4A4"], ["rtn"], [0]
        args.iters, args.act_iters, args.calib_images, args.test_images, args.full_data = 2, 2, 32, 50, False
    bad = [m for m in args.methods if m not in METHODS and m not in ABLATIONS]
    if bad:
        p.error(f"unknown --methods {bad}; known: {sorted(METHODS) + sorted(ABLATIONS)}")
    if args.workers is not None and args.workers < 1 or args.threads < 1:
        p.error("--workers and --threads must be >= 1")
    set_threads(args.threads)
    out = Path(args.out)
    rows = load_rows(out)
    done = {row_key(r) for r in rows}
    if args.full_data:
        images, labels, _ = datasets.load_test_set()
    else:
        images, labels = datasets.load_subset("test")
    x_all, y_all = datasets.to_model_input(images), labels
    x_test, y_test = (x_all[:args.test_images], y_all[:args.test_images]) if args.test_images else (x_all, y_all)
    full = (x_all, y_all) if args.deploy_full and len(y_all) > len(y_test) else None  # deploy mode on all
    todo = plan_jobs(args.models, args.bits, args.methods, args.seeds, done)
    t_start, mismatching = time.perf_counter(), 0
    for m in args.models:
        if (m, None, None, None, None) not in done:
            rows.append(fp_row(m, x_test, y_test))
            if full is not None:
                rows[-1].update(fp_top1_full=fp_row(m, *full)["fp_top1"], test_images_full=int(len(y_all)))
            done.add((m, None, None, None, None))
    save_rows(out, rows)
    def finished(job: tuple, row: dict) -> None:  # in this process: the one writer of --out
        nonlocal mismatching
        if row["eval"] == "npu_simulator":
            mismatching += row["top1"] != row["top1_deploy"] or row["logit_mismatches"] > 0
        tqdm.write(json.dumps(row), file=sys.stderr)
        rows.append(row)
        save_rows(out, rows)

    dispatch(run_job, todo, finished, (args, x_test, y_test, full), serial=args.serial, address=args.ray_address,
             workers=args.workers)
    summary = {"rows_written": len(todo), "rows_total": len(rows), "simulator_vs_deploy_mismatching_rows": mismatching,
               "seconds": round(time.perf_counter() - t_start, 1)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
