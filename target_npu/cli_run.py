"""``tvmc run``: run a compiled ``.tar`` on the NPU simulator, print outputs, timing and the
per-layer profile (table, JSON, plot)."""
from __future__ import annotations

import argparse
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hw_model.config import NPUConfig
from target_npu.cli_common import (
    CLIError,
    atomic_path,
    check_outputs,
    compile_api,
    existing_file,
    read_npz,
    write_atomic,
)

PLOT_SUFFIXES = (".png", ".svg", ".pdf")
"""Formats of ``--profile-plot`` (by the file's suffix)."""


def _input_specs(compiled: Any, path: Path) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of each model input, from the artifact's meta.json."""
    from target_npu.artifact import META, read_member_json

    specs = read_member_json(path, META).get("inputs")
    if not isinstance(specs, list) or not specs:
        raise CLIError(f"{path}: meta.json lists no model inputs; recompile it with tvmc compile")
    out = []
    for i, s in enumerate(specs):
        try:
            shape = tuple(s["shape"])
            if not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d < 2**31 for d in shape):
                raise ValueError(f"dims must be positive ints, got {str(s['shape'])[:80]}")
            out.append((str(s["name"]), shape, str(np.dtype(s["dtype"]))))
        except (KeyError, TypeError, ValueError, RecursionError) as e:
            raise CLIError(f"{path}: meta.json inputs[{i}] is not a (name, shape, dtype) entry ({str(e)[:120]}); "
                           "recompile it with tvmc compile") from None
    return out


def make_inputs(specs: Sequence[tuple[str, tuple[int, ...], str]], npz: str | None, fill_mode: str,
                seed: int) -> dict[str, np.ndarray]:
    """Inputs by name: from ``npz`` (checked against ``specs``), the rest filled by ``fill_mode``.

    random: floats standard normal (chosen: the scale of normalised model inputs), integers
    uniform over the dtype's range; seeded by ``seed``.
    """
    given: dict[str, np.ndarray] = {}
    if npz is not None:
        given = read_npz(npz, "--inputs")
    names = [s[0] for s in specs]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise CLIError(f"--inputs {npz!r}: unknown input(s) {unknown}; the model's inputs are {names}")
    rng = np.random.default_rng(seed)
    inputs = {}
    for name, shape, dtype in specs:
        dt = np.dtype(dtype)
        if name in given:
            x = given[name]
            if x.shape != shape or x.dtype != dt:
                raise CLIError(f"--inputs {npz!r}: input {name!r} is {x.dtype}{list(x.shape)}, "
                               f"the model expects {dt}{list(shape)}")
        elif fill_mode == "zeros":
            x = np.zeros(shape, dt)
        elif fill_mode == "ones":
            x = np.ones(shape, dt)
        elif dt.kind == "f":
            x = rng.standard_normal(shape).astype(dt)
        else:
            info = np.iinfo(dt)
            x = rng.integers(info.min, int(info.max) + 1, size=shape, dtype=dt)
        inputs[name] = x
    return inputs


def format_profile(report: dict[str, Any], clock_mhz: float) -> str:
    """The per-layer table: layer, NPU/CPU, cycles, us at ``clock_mhz``, MAC utilisation, groups."""
    rows = [("layer", "on", "cycles", "us", "MAC util", "groups")]
    total = 0
    for lay in report.get("layers", []):
        cyc = lay.get("cycles")
        total += int(cyc or 0)
        util = lay.get("mac_utilisation", lay.get("mac_util"))
        groups = lay.get("isg_groups_used", lay.get("groups", "-"))
        rows.append((str(lay.get("name", "?")), str(lay.get("device", "npu")).upper(),
                     "-" if cyc is None else str(int(cyc)),
                     "-" if cyc is None else f"{int(cyc) / clock_mhz:.2f}",
                     "-" if util is None else f"{100 * float(util):.1f}%", str(groups)))
    rows.append(("total", "", str(total), f"{total / clock_mhz:.2f}", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def cmd_run(args: argparse.Namespace) -> int:
    """``tvmc run``: run a compiled .tar on the NPU simulator (CPU part on the host)."""
    path = existing_file(args.file, "compiled model", (".tar",))
    if (args.profile_json or args.profile_plot) and not args.profile:
        raise CLIError("--profile-json and --profile-plot need --profile")
    if args.print_top is not None and args.print_top <= 0:
        raise CLIError(f"--print-top must be positive, got {args.print_top}")
    if args.repeat <= 0:
        raise CLIError(f"--repeat must be positive, got {args.repeat}")
    check_outputs({"--outputs": args.outputs, "--profile-json": args.profile_json,
                   "--profile-plot": args.profile_plot},
                  {"compiled model": path, "--inputs file": args.inputs}, {"--profile-plot": PLOT_SUFFIXES})
    compiled = compile_api().load(path, trust=args.trust_artifact)
    inputs = make_inputs(_input_specs(compiled, path), args.inputs, args.fill_mode, args.seed)
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        outs = compiled.run(inputs, mode="both" if args.profile else "func")
        times.append(1e3 * (time.perf_counter() - t0))
    outs = [np.asarray(o) for o in (outs if isinstance(outs, (list, tuple)) else [outs])]
    if args.outputs:
        buf = io.BytesIO()  # to the exact path (np.savez would add .npz to a name without it)
        np.savez(buf, **{f"output_{i}": o for i, o in enumerate(outs)})
        write_atomic(args.outputs, buf.getvalue())
        print(f"outputs -> {args.outputs}")
    if args.print_top:
        flat = outs[0].reshape(outs[0].shape[0], -1) if outs[0].ndim > 1 else outs[0][None]
        for b, row in enumerate(flat):
            top = np.argsort(-row, kind="stable")[: args.print_top]
            print(f"output_0[{b}] top-{len(top)}: " + ", ".join(f"{int(i)}: {row[i]:.6g}" for i in top))
    if args.print_time:
        t = np.array(times)
        print("Execution time summary (host, ms):\n mean    median  max     min     std\n"
              f" {t.mean():<7.3f} {np.median(t):<7.3f} {t.max():<7.3f} {t.min():<7.3f} {t.std():<7.3f}")
    if not (args.outputs or args.print_top or args.print_time or args.profile):
        print("outputs: " + ", ".join(f"output_{i} {o.dtype}{list(o.shape)}" for i, o in enumerate(outs)))
    if args.profile:
        _profile(compiled, path, args)
    return 0


def _profile(compiled: Any, path: Path, args: argparse.Namespace) -> None:
    from target_npu.artifact import CONFIG, read_member_json

    report = compiled.report()
    print(format_profile(report, NPUConfig.from_dict(read_member_json(path, CONFIG)).clock_mhz))
    if args.profile_json:
        write_atomic(args.profile_json, json.dumps(report, indent=1, default=str))
        print(f"profile -> {args.profile_json}")
    if args.profile_plot:
        plot_profile(report, args.profile_plot)
        print(f"profile plot -> {args.profile_plot}")


def plot_profile(report: dict[str, Any], png: str | Path) -> Path:
    """Bar chart of cycles per layer (NPU and CPU in two colours), saved (atomically) in the format of
    the suffix of ``png`` (PNG when it has none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report.get("layers", [])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(layers)), 4))
    colors = ["tab:blue" if str(lay.get("device", "npu")).lower() == "npu" else "tab:gray" for lay in layers]
    ax.bar(range(len(layers)), [int(lay.get("cycles") or 0) for lay in layers], color=colors)
    ax.set_xticks(range(len(layers)), [str(lay.get("name", i)) for i, lay in enumerate(layers)], rotation=90)
    ax.set_ylabel("cycles")
    ax.set_title("cycles per layer (blue: NPU, grey: CPU)")
    fig.tight_layout()
    try:
        with atomic_path(png) as tmp:
            fig.savefig(tmp, format=Path(png).suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)
    return Path(png)
