"""``tvmc run``: run a compiled ``.tar`` on the NPU simulator, print outputs, timing and the
per-layer profile (table, JSON, plot).

Running needs neither torch nor the calibration code: ``tvm_ffi`` imports torch at its own import
when torch is installed (seconds, hundreds of MB), so :func:`cmd_run` makes ``import torch`` fail
while it runs, unless torch is already loaded in the process (then nothing changes).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hw_model.config import NPUConfig
from ioso_tvm.tvmc.cli_common import (
    CLIError,
    atomic_path,
    check_outputs,
    compile_api,
    existing_file,
    read_npz,
    set_thread_count,
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


REASON_CHARS = 70
"""Characters of a CPU-fallback reason shown in the profile table (chosen: one terminal line; the JSON
report holds the whole reason)."""


def _short(text: Any) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + "..."


def format_profile(report: dict[str, Any], clock_mhz: float) -> str:
    """The per-layer table: layer, NPU/CPU, cycles, us at ``clock_mhz``, MAC utilisation, groups and, for a
    layer on the CPU, why. Ops that stayed float QDQ on the CPU (``report["fallbacks"]`` entries that are not
    a layer of ``report["layers"]``) get a row each too, marked CPU, with no cycles (the cycle model
    counts the NPU only)."""
    rows = [("layer", "on", "cycles", "us", "MAC util", "groups", "CPU reason")]
    total = 0
    layers = report.get("layers", [])
    for lay in layers:
        cyc = lay.get("cycles")
        total += int(cyc or 0)
        util = lay.get("mac_utilisation", lay.get("mac_util"))
        groups = lay.get("isg_groups_used", lay.get("groups", "-"))
        device = str(lay.get("device", "npu")).upper()
        src = str(lay.get("source") or "")
        rows.append((str(lay.get("name", "?")) + (f" ({src})" if src else ""), device,
                     "-" if cyc is None else str(int(cyc)),
                     "-" if cyc is None else f"{int(cyc) / clock_mhz:.2f}",
                     "-" if util is None else f"{100 * float(util):.1f}%", str(groups),
                     _short(lay.get("cpu_reason")) if device == "CPU" else ""))
    names = {str(lay.get("name")) for lay in layers}
    for fb in report.get("fallbacks", []) or []:
        if not isinstance(fb, dict) or str(fb.get("op")) in names:
            continue  # a layer of the table already
        name = str(fb.get("tensor") or fb.get("op") or "?")
        rows.append((f"{name} ({fb.get('op', '?')})", "CPU", "-", "-", "-", "-", _short(fb.get("reason"))))
    rows.append(("total", "", str(total), f"{total / clock_mhz:.2f}", "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 or i == 6 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows)


def add_run_args(r: argparse.ArgumentParser) -> None:
    """The ``tvmc run`` arguments (upstream tvmc's names: -i/--inputs, -o/--outputs, --number, --repeat)."""
    r.add_argument("file", metavar="FILE", help="compiled model .tar from tvmc compile")
    r.add_argument("--device", choices=["cpu"], default="cpu", help="host device (cpu; the NPU is simulated)")
    r.add_argument("-i", "--inputs", metavar="NPZ", help="input tensors, one npz entry per input name")
    r.add_argument("--fill-mode", choices=["random", "zeros", "ones"], default="random",
                   help="fill inputs missing from --inputs (default: random, seeded by --seed)")
    r.add_argument("--seed", type=int, default=0, help="seed of --fill-mode random (default 0)")
    r.add_argument("-o", "--outputs", metavar="NPZ", help="write outputs as output_0, output_1, ... to this npz")
    r.add_argument("--print-top", type=int, metavar="N", help="print the top N classes of output 0")
    r.add_argument("--print-time", action="store_true", help="print host run time statistics (ms) over the "
                   "--repeat measurements")
    r.add_argument("--number", type=int, default=1, help="runs per measurement; a measurement is their mean "
                   "(default 1, as upstream)")
    r.add_argument("--repeat", type=int, default=1, help="measurements (default 1, as upstream); the model runs "
                   "number x repeat times")
    r.add_argument("--profile", action="store_true", help="print the per-layer cycle report (NPU and CPU layers)")
    r.add_argument("--profile-json", metavar="FILE", help="with --profile: write the report as JSON")
    r.add_argument("--profile-plot", metavar="PNG", help="with --profile: plot where the cycles go")
    r.add_argument("--trace", metavar="JSON", help="with --profile: write the NPU's timeline (one row per unit: "
                   "load, MAC, accumulator, post, store, ...; one event per instruction) as a Chrome trace-event "
                   "file for Perfetto or chrome://tracing (hw_model.trace)")
    r.add_argument("--trust-artifact", action="store_true",
                   help="load the artifact's native host library (runs code from the file; with "
                        "IOSO_NPU_ARTIFACT_KEY set its signature must verify). Default: rebuild the host part "
                        "from the stored Relax IR")


@contextlib.contextmanager
def without_torch() -> Iterator[None]:
    """While the block runs, ``import torch`` raises ImportError, unless torch (or tvm_ffi, which decides
    at its import whether torch is there) is already loaded. Restored afterwards, so a later import works."""
    if "torch" in sys.modules or "tvm_ffi" in sys.modules:
        yield
        return
    sys.modules["torch"] = None  # type: ignore[assignment]  # Python's "not importable" marker
    try:
        yield
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]


def cmd_run(args: argparse.Namespace) -> int:
    """``tvmc run``: run a compiled .tar on the NPU simulator (CPU part on the host), without torch."""
    with without_torch():
        return _cmd_run(args)


def _cmd_run(args: argparse.Namespace) -> int:
    threads = set_thread_count(args.threads)
    path = existing_file(args.file, "compiled model", (".tar",))
    if (args.profile_json or args.profile_plot or args.trace) and not args.profile:
        raise CLIError("--profile-json, --profile-plot and --trace need --profile")
    if args.print_top is not None and args.print_top <= 0:
        raise CLIError(f"--print-top must be positive, got {args.print_top}")
    for flag, value in (("--number", args.number), ("--repeat", args.repeat)):
        if value <= 0:
            raise CLIError(f"{flag} must be positive, got {value}")
    check_outputs({"--outputs": args.outputs, "--profile-json": args.profile_json,
                   "--profile-plot": args.profile_plot, "--trace": args.trace},
                  {"compiled model": path, "--inputs file": args.inputs},
                  {"--profile-plot": PLOT_SUFFIXES, "--trace": (".json",)})
    compiled = compile_api().load(path, trust=args.trust_artifact)
    inputs = make_inputs(_input_specs(compiled, path), args.inputs, args.fill_mode, args.seed)
    times = []  # upstream semantics: `repeat` measurements, each the mean of `number` runs
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        for _ in range(args.number):
            outs = compiled.run(inputs, mode="both" if args.profile else "func")
        times.append(1e3 * (time.perf_counter() - t0) / args.number)
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
        print(f"threads: {threads}")
        _profile(compiled, path, args)
    return 0


def _profile(compiled: Any, path: Path, args: argparse.Namespace) -> None:
    from target_npu.artifact import CONFIG, read_member_json

    report = compiled.report()
    cfg = NPUConfig.from_dict(read_member_json(path, CONFIG))
    print(format_profile(report, cfg.clock_mhz))
    if args.profile_json:
        write_atomic(args.profile_json, json.dumps(report, indent=1, default=str))
        print(f"profile -> {args.profile_json}")
    if args.profile_plot:
        plot_profile(report, args.profile_plot)
        print(f"profile plot -> {args.profile_plot}")
    if args.trace:
        from hw_model.trace import write_chrome_trace

        streams = list(getattr(compiled, "streams", []) or [])
        if not streams:
            raise CLIError(f"--trace: {path} has no NPU region, so there is no NPU timeline to write")
        write_chrome_trace(streams, args.trace, cfg)
        print(f"trace -> {args.trace} ({len(streams)} region stream(s); open it in ui.perfetto.dev)")


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
