"""``tvmc``: compile, run and tune models for the ioso_npu target, with upstream tvmc's flag names.

::

    tvmc --version
    tvmc compile model.onnx --target=ioso_npu [-o model.tar] [--input-shapes "input:[1,1,32,32]"]
                 [--tuning-records records.json] [--target-ioso_npu-<NPUConfig field>=VALUE ...]
                 [--pass-config KEY=VALUE] [--disabled-pass NAME] [--dump-code relax,npu,vm,asm,ll,tir]
                 [-O 3] [--threads N]
    tvmc run model.tar [-i in.npz] [--fill-mode random|zeros|ones] [-o out.npz] [--print-top N]
             [--print-time [--number N] [--repeat N]] [--profile [--profile-json F] [--profile-plot F.png]
             [--trace F.json]] [--threads N]
    tvmc tune model.onnx --target=ioso_npu [--trials N] [--tuner xgb|random|gridsearch] [--early-stopping N]
              [--tuning-records old.json] [--executor ray|serial] [--ray-address ADDR] -o records.json

Compile flags that follow upstream tvmc but act differently here are described in
``ioso_tvm.tvmc.cli_compile``; the ``tune`` measurement dispatch in ``target_npu.tuner.dispatch``.

Every ``NPUConfig`` field is a target option (``--target-ioso_npu-pe_arrays=2``, or inline
``--target="ioso_npu -pe_arrays=2, llvm"``), parsed by the field's type. ``--target=llvm``
compiles for the CPU only; ``ioso_npu`` alone means ``"ioso_npu, llvm"`` (what the NPU
cannot run falls back to the CPU). Every error is one line ``tvmc: error: ...`` on stderr
and a non-zero exit (2: bad command line, 1: the command failed); ``-vv`` shows tracebacks.
Output paths are checked before any work starts (never an input file, also through links;
an existing, writable folder; not a directory) and written through a temporary file + rename.

The command line is the top of the stack: the compile and run commands load the
``ioso_tvm`` compile API lazily, when they run.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import re
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hw_model.config import NPUConfig
from ioso_tvm.tvmc import cli_compile as cc
from ioso_tvm.tvmc.cli_common import (
    CLIError,
    Parser,
    check_output,
    check_outputs,
    compile_api,
    existing_file,
    one_line,
    run_main,
    set_thread_count,
)
from ioso_tvm.tvmc.cli_run import add_run_args, cmd_run

NPU_KIND, CPU_KIND = "ioso_npu", "llvm"
TUNER_CHOICES = ("xgb", "random", "gridsearch", "grid")
"""``tvmc tune --tuner`` names: upstream tvmc's (xgb, random, gridsearch) and the earlier alias grid."""
TARGET_KINDS = (NPU_KIND, CPU_KIND)
NPU_OPTIONS: dict[str, Any] = typing.get_type_hints(NPUConfig)
"""Target options of ioso_npu: NPUConfig field name -> type."""
LLVM_OPTIONS_WHY = ("the host part is built for the generic llvm target, and tvmc run rebuilds it from the "
                    "stored Relax IR on the machine that runs it, so llvm options (-mcpu, -mattr) chosen at "
                    "compile time would not reach the code that runs")
"""Why llvm target options (``llvm -mcpu=...``, ``--target-llvm-mcpu``) are refused."""
_OPT_RE = re.compile(r"^--target-([A-Za-z0-9_]+?)-([A-Za-z0-9_-]+)(?:=(.*))?$")


# ------------------------------------------------------------------------- parsing helpers
def parse_option_value(name: str, text: str) -> Any:
    """Parse the text of NPUConfig option ``name`` by the field's type (int, float, tuple of ints)."""
    if name not in NPU_OPTIONS:
        raise CLIError(f"unknown target option {name!r} for {NPU_KIND}; valid options: {', '.join(NPU_OPTIONS)}")
    typ = NPU_OPTIONS[name]
    try:
        if typ is int:
            return int(text)
        if typ is float:
            return float(text)
        if typing.get_origin(typ) is tuple:
            items = [s for s in re.split(r"[,\s]+", text.strip().strip("[]()")) if s]
            if not items:
                raise ValueError("empty")
            return tuple(int(s) for s in items)
    except ValueError:
        kind = {int: "an integer", float: "a number"}.get(typ, "a comma-separated list of integers")
        raise CLIError(f"target option {NPU_KIND}-{name} must be {kind}, got {text!r}") from None
    raise CLIError(f"target option {NPU_KIND}-{name} has unsupported type {typ}")  # pragma: no cover


def parse_target(text: str) -> tuple[list[str], dict[str, Any]]:
    """``"ioso_npu -pe_arrays=2, llvm"`` -> (["ioso_npu", "llvm"], {"pe_arrays": 2}).

    Kinds are ``ioso_npu`` and ``llvm``; inline ``-key=value`` options belong to ioso_npu.
    """
    kinds: list[str] = []
    options: dict[str, Any] = {}
    for part in [p.strip() for p in text.split(",")]:
        tokens = part.split()
        if not tokens:
            raise CLIError(f"empty target in --target={text!r}; valid kinds: {', '.join(TARGET_KINDS)}")
        kind = tokens[0]
        if kind not in TARGET_KINDS:
            raise CLIError(f"unknown target {kind!r}; valid targets: {', '.join(TARGET_KINDS)} "
                           f"(e.g. --target=\"{NPU_KIND}, {CPU_KIND}\")")
        if kind in kinds:
            raise CLIError(f"target {kind!r} given twice in --target={text!r}")
        kinds.append(kind)
        for tok in tokens[1:]:
            m = re.match(r"^--?([A-Za-z0-9_-]+)=(.*)$", tok)
            if not m:
                raise CLIError(f"bad target option {tok!r} in --target={text!r}; write -name=value")
            if kind != NPU_KIND:
                raise CLIError(f"target {kind!r} takes no options here, got {tok!r}: {LLVM_OPTIONS_WHY}")
            name = m.group(1).replace("-", "_")
            options[name] = parse_option_value(name, m.group(2))
    return kinds, options


def split_target_options(extra: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Take ``--target-ioso_npu-<field>=VALUE`` (or ``... VALUE``) out of unparsed arguments.

    Returns (options, the arguments left over). Unknown kinds/fields raise CLIError listing
    the valid ones.
    """
    options: dict[str, Any] = {}
    rest: list[str] = []
    args = list(extra)
    i = 0
    while i < len(args):
        m = _OPT_RE.match(args[i])
        if not m:
            rest.append(args[i])
            i += 1
            continue
        kind, name, value = m.group(1), m.group(2).replace("-", "_"), m.group(3)
        if kind == CPU_KIND:
            raise CLIError(f"target option {args[i].split('=')[0]!r} is not supported: {LLVM_OPTIONS_WHY}")
        if kind != NPU_KIND:
            raise CLIError(f"unknown target option {args[i].split('=')[0]!r}: only {NPU_KIND} has options; "
                           f"valid: {', '.join(f'--target-{NPU_KIND}-' + n for n in NPU_OPTIONS)}")
        if name not in NPU_OPTIONS:
            parse_option_value(name, "")  # raises: unknown option, listing the valid ones
        if value is None:
            if i + 1 >= len(args):
                raise CLIError(f"target option --target-{kind}-{name} needs a value")
            value, i = args[i + 1], i + 1
        options[name] = parse_option_value(name, value)
        i += 1
    return options, rest


def parse_input_shapes(text: str | None) -> dict[str, tuple[int, ...]] | None:
    """``"input:[1,1,32,32] other:[1,10]"`` -> {"input": (1, 1, 32, 32), "other": (1, 10)}."""
    if text is None:
        return None
    items = re.findall(r"\s*([^\s:\[\]]+)\s*:\s*\[([^\]]*)\]\s*", text)
    rebuilt = re.sub(r"\s*([^\s:\[\]]+)\s*:\s*\[([^\]]*)\]\s*", "", text)
    if not items or rebuilt.strip(" ,"):
        raise CLIError(f"--input-shapes must look like \"input:[1,1,32,32]\" (name:[dims], space separated), "
                       f"got {text!r}")
    shapes: dict[str, tuple[int, ...]] = {}
    for name, dims in items:
        try:
            shape = tuple(int(d) for d in dims.split(",") if d.strip())
        except ValueError:
            raise CLIError(f"--input-shapes: dims of {name!r} must be integers, got [{dims}]") from None
        if not shape or any(d <= 0 for d in shape):
            raise CLIError(f"--input-shapes: dims of {name!r} must be positive integers, got [{dims}]")
        if name in shapes:
            raise CLIError(f"--input-shapes: input {name!r} given twice")
        shapes[name] = shape
    return shapes


def make_config(options: dict[str, Any]) -> NPUConfig:
    """NPUConfig from target options; its own validation errors become one CLI line."""
    try:
        return NPUConfig(**options)
    except (TypeError, ValueError) as e:
        raise CLIError(f"bad target option for {NPU_KIND}: {e}") from None


# ------------------------------------------------------------------------------- commands
def _target_and_config(args: argparse.Namespace) -> tuple[str, NPUConfig]:
    kinds, inline = parse_target(args.target)
    options = {**inline, **args.target_options}
    if options and NPU_KIND not in kinds:
        raise CLIError(f"target options {sorted(options)} need the {NPU_KIND} target, but --target={args.target!r}")
    return (NPU_KIND if NPU_KIND in kinds else CPU_KIND), make_config(options)


def check_model_inputs(model: Path, shapes: dict[str, tuple[int, ...]] | None) -> None:
    """Check ``--input-shapes`` against the ONNX graph inputs: known names, same rank, static dims."""
    import onnx

    try:
        graph = onnx.load(str(model), load_external_data=False).graph
    except Exception as e:  # noqa: BLE001 - protobuf raises several kinds
        raise CLIError(f"model file '{model}' is not a valid ONNX file ({one_line(e)})") from None
    inits = {t.name for t in graph.initializer}
    dims = {i.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                     for d in i.type.tensor_type.shape.dim] for i in graph.input if i.name not in inits}
    unknown = sorted(set(shapes or {}) - set(dims))
    if unknown:
        raise CLIError(f"--input-shapes names unknown input(s) {unknown}; the model's inputs are {sorted(dims)}")
    for name, ds in dims.items():
        given = (shapes or {}).get(name)
        if given is not None and len(given) != len(ds):
            raise CLIError(f"--input-shapes: input {name!r} has rank {len(ds)} {ds}, got {list(given)}")
        if given is None and any(not isinstance(d, int) or d <= 0 for d in ds):
            example = ",".join(str(d) if isinstance(d, int) and d > 0 else "1" for d in ds)
            raise CLIError(f"model input {name!r} has a dynamic shape {ds}; give --input-shapes \"{name}:[{example}]\"")


def cmd_compile(args: argparse.Namespace) -> int:
    """``tvmc compile``: ONNX -> compiled-model .tar (upstream flags: ioso_tvm.tvmc.cli_compile)."""
    set_thread_count(args.threads)
    target, config = _target_and_config(args)
    cc.check_opt_level(args.opt_level)
    cc.check_desired_layout(args.desired_layout)
    tvm_cfg, npu_kw = cc.parse_pass_config(args.pass_config)
    if npu_kw and target != NPU_KIND:
        raise CLIError(f"--pass-config {', '.join(k for k in cc.NPU_PASS_CONFIG if cc.NPU_PASS_CONFIG[k] in npu_kw)} "
                       f"needs the {NPU_KIND} target, but --target={args.target!r}")
    disabled = cc.parse_disabled_passes(args.disabled_pass)
    fmts = cc.parse_dump_formats(args.dump_code)
    shapes = parse_input_shapes(args.input_shapes)
    model = existing_file(args.model, "model file", (".onnx",))
    records = existing_file(args.tuning_records, "tuning records file") if args.tuning_records else None
    inputs = {"model file": model, "tuning records file": records}
    output = check_output(args.output, "-o/--output", inputs, (".tar",))
    dumps = cc.dump_paths(output, fmts)
    check_outputs({f"--dump-code {f}": p for f, p in dumps.items()}, {**inputs, "-o/--output": output})
    check_model_inputs(model, shapes)
    ctx = contextlib.nullcontext()
    if tvm_cfg or disabled:
        import tvm

        ctx = tvm.transform.PassContext(opt_level=cc.OPT_LEVEL, config=tvm_cfg, disabled_pass=disabled)
    with ctx:
        compiled = compile_api().compile(str(model), target=target, input_shapes=shapes, config=config,
                                          tuning_records=None if records is None else str(records), **npu_kw)
    written = cc.dump_code(compiled, dumps)  # before export: a saved host library has no asm/ll source left
    compiled.export(output)  # save_artifact writes <output>.partial and renames it: atomic
    print(f"compiled {model} for {args.target!r} -> {output}")
    if target == NPU_KIND:
        print(compiled.offload_summary()["line"])
    for path in written:
        print(f"code -> {path}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """``tvmc tune``: search schedule knobs per layer and write tuning records (JSON lines)."""
    set_thread_count(args.threads)
    target, config = _target_and_config(args)
    model = existing_file(args.model, "model file", (".onnx",))
    if target != NPU_KIND:
        raise CLIError(f"tvmc tune needs the {NPU_KIND} target (there is nothing to tune for {CPU_KIND})")
    for flag, value in (("--trials", args.trials), ("--early-stopping", args.early_stopping),
                        ("--jobs", args.jobs)):
        if value is not None and value <= 0:
            raise CLIError(f"{flag} must be positive, got {value}")
    if args.executor is None:  # Ray when it is installed (pip install ioso_npu[sweep]), else this process
        args.executor = "ray" if importlib.util.find_spec("ray") is not None else "serial"
    elif args.executor == "ray":
        if importlib.util.find_spec("ray") is None:
            raise CLIError("--executor ray needs Ray: pip install 'ioso_npu[sweep]' (or ray), or use --executor serial")
    if args.ray_address and args.executor != "ray":
        raise CLIError("--ray-address needs --executor ray (and Ray installed)")
    shapes = parse_input_shapes(args.input_shapes)
    warm = existing_file(args.tuning_records, "tuning records file") if args.tuning_records else None
    # the output may be the warm-start file itself (records are read first, then replaced atomically)
    output = check_output(args.output, "-o/--output", {"model file": model})
    try:
        tuner = importlib.import_module("target_npu.tuner")
    except ImportError as e:
        raise CLIError(f"tvmc tune is not available: the tuner cannot be imported ({one_line(e)})") from None
    if not hasattr(tuner, "tune_model"):
        raise CLIError("tvmc tune is not available: the tuner has no tune_model()")
    check_model_inputs(model, shapes)
    tuner.tune_model(str(model), trials=args.trials, output=output, cfg=config, tuner=args.tuner,
                     input_shapes=shapes, warm_start=None if warm is None else str(warm),
                     early_stopping=args.early_stopping, executor=args.executor, ray_address=args.ray_address,
                     jobs=args.jobs or 1)
    print(f"tuning records for {model} -> {output}")
    return 0


# --------------------------------------------------------------------------------- parser
def _add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help=f'compilation target: "{NPU_KIND}", "{CPU_KIND}" or '
                   f'"{NPU_KIND}, {CPU_KIND}" (NPU with CPU fallback, the same as "{NPU_KIND}")')
    g = p.add_argument_group(f"target {NPU_KIND}", "NPUConfig fields (help: the field's documentation in "
                             "hw_model/config.py, with its unit and source)")
    default, docs = NPUConfig(), cc.npu_field_docs()
    for name, typ in NPU_OPTIONS.items():
        g.add_argument(f"--target-{NPU_KIND}-{name}", metavar={int: "INT", float: "FLOAT"}.get(typ, "INTS"),
                       dest=f"_opt_{name}", help=cc.option_help(name, getattr(default, name), docs))


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, metavar="N", help="threads of torch, BLAS/OpenMP and the TVM runtime "
                   "(target_npu.threads.set_threads; default: its measured DEFAULT_THREADS)")


def build_parser() -> Parser:
    """The ``tvmc`` argument parser (subcommands compile, run, tune)."""
    parser = Parser(prog="tvmc", allow_abbrev=False, description="TVM command line for the ioso_npu target.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging; -vv shows tracebacks")
    parser.add_argument("--version", action="version", version=cc.version_text(),
                        help="print the ioso_npu and TVM versions and exit")
    sub = parser.add_subparsers(dest="command", metavar="{compile,run,tune}")

    c = sub.add_parser("compile", help="compile an ONNX model into a .tar artifact", allow_abbrev=False)
    c.add_argument("model", metavar="MODEL", help="ONNX file (as written by ioso-calibrate)")
    c.add_argument("-o", "--output", default="module.tar", help="output .tar (default: module.tar)")
    c.add_argument("--input-shapes", help='shapes of the inputs, e.g. "input:[1,1,32,32]"')
    c.add_argument("--tuning-records", metavar="FILE", help="tuning records from tvmc tune (JSON lines)")
    c.add_argument("--model-format", choices=["onnx"], default="onnx", help="input model format (onnx)")
    c.add_argument("-O", "--opt-level", type=int, metavar="N", help=f"optimisation level; only {cc.OPT_LEVEL} "
                   "(the default) is accepted, see ioso_tvm/tvmc/cli_compile.py")
    c.add_argument("--pass-config", action="append", metavar="KEY=VALUE",
                   help="a PassContext config (TVM's bool/int keys, e.g. tirx.disable_assert=1) or a compile option "
                        f"({', '.join(cc.NPU_PASS_CONFIG)}=0/1); repeatable or comma-separated")
    c.add_argument("--disabled-pass", action="append", metavar="NAME",
                   help="passes to disable (TVM's names or ioso_npu.PlanGroupPermutation); repeatable or "
                        "comma-separated")
    c.add_argument("--desired-layout", metavar="LAYOUT", help="refused: the NPU's layout is fixed (NHWC in "
                   "16-channel blocks) and the CPU part keeps the ONNX layout")
    c.add_argument("--dump-code", metavar="FORMATS", help=f"write code next to the output as <output>.<format>: "
                   f"{', '.join(cc.DUMP_FORMATS)} (Relax module, NPU instruction streams, VM bytecode, host "
                   "assembly, host LLVM IR, TIR of each NPU conv layer)")
    _add_threads_arg(c)
    _add_target_args(c)
    c.set_defaults(func=cmd_compile)

    r = sub.add_parser("run", help="run a compiled .tar on the NPU simulator", allow_abbrev=False)
    add_run_args(r)
    _add_threads_arg(r)
    r.set_defaults(func=cmd_run)

    t = sub.add_parser("tune", help="tune schedule knobs and write tuning records", allow_abbrev=False)
    t.add_argument("model", metavar="MODEL", help="ONNX file")
    t.add_argument("-o", "--output", required=True, help="tuning records to write (JSON lines)")
    t.add_argument("--trials", type=int, default=64, help="measured candidates per layer (default 64)")
    t.add_argument("--tuner", choices=TUNER_CHOICES, default="xgb",
                   help="search: xgb, random, gridsearch (upstream names; grid is an alias of gridsearch); default xgb")
    t.add_argument("--early-stopping", type=int, metavar="N",
                   help="stop a layer after N measurements without a better schedule (default: never)")
    t.add_argument("--tuning-records", metavar="FILE", help="warm start: records of an earlier tvmc tune; their "
                   "measurements count as done and are written to -o with the new ones")
    t.add_argument("--executor", choices=["ray", "serial"], default=None,
                   help="where candidates are measured: ray (Ray tasks on a local Ray started in-process, or the "
                        "cluster of --ray-address) or serial (this process); default: ray when Ray is installed")
    t.add_argument("--ray-address", metavar="ADDR", help="connect to this Ray cluster (e.g. ray://host:10001 "
                   "or auto) instead of starting a local one")
    t.add_argument("--jobs", type=int, metavar="N", help="CPUs of the local Ray (default: all)")
    t.add_argument("--input-shapes", help='shapes of the inputs, e.g. "input:[1,1,32,32]"')
    _add_threads_arg(t)
    _add_target_args(t)
    t.set_defaults(func=cmd_tune)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``tvmc`` arguments, folding every ``--target-ioso_npu-*`` into ``target_options``."""
    parser = build_parser()
    ns, extra = parser.parse_known_args(list(argv))
    if getattr(ns, "command", None) is None:
        raise CLIError("a command is required: compile, run or tune (see 'tvmc --help')")
    options, rest = split_target_options(extra)
    if rest:
        raise CLIError(f"unrecognized arguments: {' '.join(rest)} (see 'tvmc {ns.command} --help')")
    for name in NPU_OPTIONS:
        text = getattr(ns, f"_opt_{name}", None)
        if text is not None:
            options[name] = parse_option_value(name, text)
    ns.target_options = options
    return ns


# ----------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tvmc`` console script; returns the exit status."""
    return run_main("tvmc", parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
