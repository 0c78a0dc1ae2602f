"""``ioso-calibrate``: float model -> calibrated, quantized ONNX (the input of ``tvmc compile``).

::

    ioso-calibrate --model resnet20 --pretrained --data shipped --method ioso --wbits 4 --abits 4 \\
                   [--iters N] [--seed S] [--num-samples N] [--device cuda] [--threads N] [--report [PNG]] \\
                   -o model.onnx

``--report`` prints the per-layer error table (``ioso_tvm.calib.layer_report``) after calibration,
writes it as JSON next to the output (``model.layers.json``) and, given a path, the plot as PNG.

``--data`` is ``shipped`` (the 1024-image Fashion-MNIST calibration subset shipped with the
package) or an ``.npz`` holding either ``x`` (float32 model inputs, N x C x H x W) or
``images`` (uint8 Fashion-MNIST images, N x 28 x 28, turned into model inputs by
``ioso_tvm.datasets.to_model_input``). Errors are one line ``ioso-calibrate: error: ...``.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ioso_tvm.tvmc.cli_common import CLIError, Parser, check_output, one_line, read_npz, run_main, write_atomic

METHODS = ("ioso", "brecq", "qdrop", "adaround", "rtn", "qft", "qft+isg")
DEFAULT_SAMPLES = 1024
"""Calibration images (DESIGN "Calibration methods": the published default of 1024 samples)."""


def load_calib_inputs(data: str, num_samples: int, shape: tuple[int, ...]) -> np.ndarray:
    """Calibration model inputs, float32 (N, C, H, W), N <= ``num_samples``, checked against ``shape`` (C, H, W)."""
    from ioso_tvm import datasets

    if num_samples <= 0:
        raise CLIError(f"--num-samples must be positive, got {num_samples}")
    if data == "shipped":
        images, _ = datasets.load_calib_set(min(num_samples, DEFAULT_SAMPLES))
        x = datasets.to_model_input(images)
    else:
        arrays = read_npz(data, "--data")
        if "x" in arrays:
            x = arrays["x"]
            if x.dtype.kind != "f":
                raise CLIError(f"--data {data!r}: 'x' must hold float model inputs, got dtype {x.dtype}")
            x = x.astype(np.float32)
        elif "images" in arrays:
            try:
                x = datasets.to_model_input(arrays["images"])
            except (TypeError, ValueError) as e:
                raise CLIError(f"--data {data!r}: 'images' {one_line(e)}") from None
        else:
            raise CLIError(f"--data {data!r} must hold 'x' (float32 N,C,H,W model inputs) or 'images' "
                           f"(uint8 N,28,28); it holds {sorted(arrays)}")
        x = x[:num_samples]
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape):
        want = ", ".join(map(str, shape))
        raise CLIError(f"--data {data!r}: inputs have shape {list(x.shape)}, the model expects [N, {want}]")
    if len(x) == 0:
        raise CLIError(f"--data {data!r} holds no samples")
    if not np.isfinite(x).all():
        raise CLIError(f"--data {data!r} holds NaN or Inf values")
    return np.ascontiguousarray(x)


def _calib_config(calib: Any, args: argparse.Namespace) -> Any:
    """CalibConfig with the command-line overrides that it has fields for."""
    cls = getattr(calib, "CalibConfig", None)
    if cls is None:
        return None
    names = {f.name for f in dataclasses.fields(cls)}
    wanted = {"iters": args.iters, "act_iters": args.act_iters, "seed": args.seed, "num_samples": args.num_samples,
              "checkpoint_dir": args.resume, "device": args.device}
    missing = [k for k, v in wanted.items() if v is not None and k not in names]
    if missing:
        raise CLIError(f"this calibration engine has no setting for {', '.join(missing)}")
    return cls(**{k: v for k, v in wanted.items() if v is not None})


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Build/load the model, calibrate it on the data, export the quantized ONNX."""
    for flag in ("wbits", "abits"):
        if not 2 <= getattr(args, flag) <= 8:
            raise CLIError(f"--{flag} must be in 2..8, got {getattr(args, flag)}")
    for flag in ("iters", "act_iters"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise CLIError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    data = None if args.data == "shipped" else args.data
    out = check_output(args.output, "-o/--output", {"--data file": data}, (".onnx",))
    report_json = out.with_suffix(".layers.json")
    if args.report is not None:
        check_output(report_json, "--report JSON", {"--data file": data})
        if args.report:
            check_output(args.report, "--report", {"--data file": data, "-o/--output": out}, (".png",))
    if args.resume is not None and Path(args.resume).exists() and not Path(args.resume).is_dir():
        raise CLIError(f"--resume {args.resume!r} is not a folder")
    from target_npu.threads import set_threads

    try:
        threads = set_threads(args.threads)  # before torch starts its thread pool
    except ValueError as e:
        raise CLIError(f"--{e}") from None
    from ioso_tvm.calib.device import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise CLIError(f"--{e}") from None
    from ioso_tvm import models

    if args.model not in models.MODELS:
        raise CLIError(f"unknown --model {args.model!r}; known: {', '.join(sorted(models.MODELS))}")
    if args.pretrained and args.model not in models.PRETRAINED:
        raise CLIError(f"--pretrained: no shipped checkpoint for {args.model!r}; "
                       f"available: {', '.join(models.PRETRAINED)}")
    x = load_calib_inputs(args.data, args.num_samples, models.INPUT_SHAPES[args.model])
    import torch

    import ioso_tvm

    try:
        from ioso_tvm import calib, export
    except ImportError as e:
        raise CLIError(f"calibration is not available in this installation ({one_line(e)})") from None
    if not (hasattr(calib, "calibrate") and hasattr(export, "export_onnx")):
        raise CLIError("calibration is not available in this installation (ioso_tvm.calib.calibrate missing)")
    calib_config = _calib_config(calib, args)

    torch.manual_seed(args.seed if args.seed is not None else 0)
    model = models.load_pretrained(args.model) if args.pretrained else models.build_model(args.model).eval()
    qmodel = ioso_tvm.calibrate(model, torch.from_numpy(x), method=args.method, wbits=args.wbits, abits=args.abits,
                                config=calib_config)
    proto = ioso_tvm.export_onnx(qmodel, None, input_shape=(1, *models.INPUT_SHAPES[args.model]))
    write_atomic(out, proto.SerializeToString())
    if args.report is not None:
        _write_report(qmodel, x, report_json, args.report or None)
    print(f"calibrated {args.model} ({args.method}, W{args.wbits}A{args.abits}, {len(x)} samples, on {device}, "
          f"{threads} thread{'s' * (threads != 1)}) -> {out}")
    return 0


def _write_report(qmodel: Any, x: np.ndarray, json_path: Path, png: str | None) -> None:
    """Print the per-layer error table of ``qmodel`` on the calibration inputs ``x``; write it as JSON and
    (``png`` given) the plot."""
    import torch

    from ioso_tvm.calib.layer_report import format_layer_report, layer_report, layer_report_json, plot_layer_report

    rows = layer_report(qmodel, torch.from_numpy(x))
    print(format_layer_report(rows))
    write_atomic(json_path, layer_report_json(rows))
    if png is not None:
        plot_layer_report(rows, png)
    print(f"layer report -> {json_path}" + (f", {png}" if png else ""))


def build_parser() -> Parser:
    """The ``ioso-calibrate`` argument parser."""
    p = Parser(prog="ioso-calibrate", allow_abbrev=False,
               description="Calibrate a float CNN for the ioso_npu and export it as quantized ONNX.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging; -vv shows tracebacks")
    p.add_argument("--model", required=True, help="model name (ioso_tvm.models), e.g. resnet20")
    p.add_argument("--pretrained", action="store_true", help="load the shipped Fashion-MNIST float checkpoint")
    p.add_argument("--data", default="shipped", help="'shipped' or an .npz with 'x' or 'images' (default shipped)")
    p.add_argument("--num-samples", type=int, default=DEFAULT_SAMPLES, help="calibration samples (default 1024)")
    p.add_argument("--method", choices=METHODS, default="ioso", help="calibration method (default ioso)")
    p.add_argument("--wbits", type=int, default=4, help="weight bits, 2..8 (default 4)")
    p.add_argument("--abits", type=int, default=4, help="activation bits, 2..8 (default 4)")
    p.add_argument("--iters", type=int, help="reconstruction iterations per block (default: the method's)")
    p.add_argument("--act-iters", type=int, help="activation-step iterations per block (default: the method's)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--resume", metavar="DIR", help="checkpoint folder: one checkpoint per finished block; "
                   "running again with the same folder and arguments resumes after the last finished block")
    p.add_argument("--device", help="where calibration runs: cpu, cuda or cuda:N (default: cuda when torch sees a "
                   "GPU, else cpu); the exported file does not depend on it")
    p.add_argument("--threads", type=int, help="CPU threads of torch, BLAS/OpenMP and TVM (default: "
                   "target_npu.threads.DEFAULT_THREADS, measured by benchmarks/threads.py)")
    p.add_argument("--report", nargs="?", const="", metavar="PNG", help="print the per-layer error table (SQNR, "
                   "reconstruction loss, ISG groups) after calibration and write it to <output>.layers.json; "
                   "with PNG also the plot")
    p.add_argument("-o", "--output", required=True, help="quantized ONNX file to write")
    p.set_defaults(func=cmd_calibrate)
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``ioso-calibrate`` arguments."""
    return build_parser().parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ioso-calibrate`` console script; returns the exit status."""
    return run_main("ioso-calibrate", parse_args, argv)
