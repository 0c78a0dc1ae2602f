"""``tvmc compile`` options that follow upstream tvmc: ``--version``, ``-O``, ``--pass-config``,
``--disabled-pass``, ``--desired-layout``, ``--dump-code``, and the help text of the
``--target-ioso_npu-*`` options (read from the ``NPUConfig`` field docstrings).

What each flag does here (docs: README "tvmc flags"):

- ``--pass-config KEY=VALUE``: TVM's keys (``tvm.transform.PassContext.list_configs()``, e.g.
  ``tirx.disable_assert=1``) go to the ``PassContext`` the compile runs in; the project's keys
  ``ioso_npu.offload``, ``ioso_npu.permute_groups`` and ``ioso_npu.memory_reuse`` (bool) set the
  ``ioso_tvm.compile`` options of the same name.
- ``--disabled-pass NAME[,NAME]``: disables passes in that ``PassContext`` (TVM's names or
  ``ioso_npu.PlanGroupPermutation``); the two NPU passes nothing can run without are refused.
- ``-O/--opt-level``: only 3 (upstream's default) is accepted; TVM 0.27's Relax build for llvm gives the
  same executable at every level and the NPU pipeline has no optional pass, so another level would be
  a flag that silently does nothing.
- ``--desired-layout``: refused: the NPU's layout is fixed and the CPU part keeps the ONNX layout.
- ``--dump-code relax,npu,vm,asm,ll,tir``: text files next to the output (``<output>.<format>``).
"""
from __future__ import annotations

import ast
import inspect
import json
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from hw_model.config import NPUConfig
from ioso_tvm.tvmc.cli_common import CLIError, one_line, write_atomic

NPU_PASS_CONFIG = {"ioso_npu.offload": "offload", "ioso_npu.permute_groups": "permute_groups",
                   "ioso_npu.memory_reuse": "memory_reuse"}
"""``--pass-config`` keys of the project -> ``ioso_tvm.compile`` keyword (all bool)."""
REQUIRED_PASSES = {
    "ioso_npu.FoldQDQ": "it turns the QDQ chains into the integer layers every later pass works on "
                        "(for a float CPU compile use --target=llvm)",
    "ioso_npu.PartitionForNPU": "it builds the NPU regions the compile reads back "
                                "(to keep every layer on the CPU use --pass-config ioso_npu.offload=0)",
    "ioso_npu.pipeline": "it is the whole NPU pipeline (use --target=llvm for a CPU-only compile)",
}
"""NPU passes ``--disabled-pass`` refuses, with the reason."""
DUMP_FORMATS = ("relax", "npu", "vm", "asm", "ll", "tir")
"""``--dump-code`` formats: partitioned Relax module, NPU instruction streams, Relax VM bytecode, host
assembly, host LLVM IR, scheduled TIR of each NPU conv layer."""
OPT_LEVEL = 3
"""The only ``-O`` accepted: upstream tvmc's default (see the module docstring for why)."""


# ------------------------------------------------------------------------------ --version
def version_text() -> str:
    """``ioso_npu X (apache-tvm Y, apache-tvm-ffi Z)`` from the installed distributions (imports no TVM)."""
    def ver(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"
    return f"ioso_npu {ver('ioso_npu')} (apache-tvm {ver('apache-tvm')}, apache-tvm-ffi {ver('apache-tvm-ffi')})"


# ------------------------------------------------------------------- target option help
def npu_field_docs() -> dict[str, str]:
    """NPUConfig field -> its docstring (the string literal after the field in hw_model/config.py),
    read with ``ast`` so the help text never drifts from the source."""
    tree = ast.parse(inspect.getsource(NPUConfig))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def option_help(name: str, default: Any, docs: dict[str, str]) -> str:
    """Help of ``--target-ioso_npu-<name>``: the field's docstring and its default (``%`` escaped for argparse)."""
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{docs.get(name, 'NPUConfig field')} (default {shown})".replace("%", "%%")


# ------------------------------------------------------------------------ pass context
def _parse_bool(text: str, key: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise CLIError(f"--pass-config {key} takes a boolean (1/0/true/false), got {text!r}")


def parse_pass_config(items: Sequence[str] | None) -> tuple[dict[str, Any], dict[str, bool]]:
    """``KEY=VALUE`` items -> (TVM PassContext config, ioso_tvm.compile keywords). Unknown keys, values
    of the wrong type and config types the command line cannot express are refused in one line."""
    tvm_cfg: dict[str, Any] = {}
    npu_kw: dict[str, bool] = {}
    known: dict[str, str] | None = None
    for item in [p for text in (items or []) for p in text.split(",") if p.strip()]:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CLIError(f"--pass-config must be KEY=VALUE, got {item!r}")
        if key in NPU_PASS_CONFIG:
            npu_kw[NPU_PASS_CONFIG[key]] = _parse_bool(value, key)
            continue
        if known is None:
            import tvm

            known = {k: str(dict(v)["type"]) for k, v in tvm.transform.PassContext.list_configs().items()}
        if key not in known:
            raise CLIError(f"--pass-config: unknown key {key!r}; valid: {', '.join(sorted(NPU_PASS_CONFIG))} "
                           f"and TVM's {', '.join(sorted(k for k, t in known.items() if t in ('bool', 'int')))}")
        typ = known[key]
        if typ == "bool":
            tvm_cfg[key] = _parse_bool(value, key)
        elif typ == "int":
            try:
                tvm_cfg[key] = int(value)
            except ValueError:
                raise CLIError(f"--pass-config {key} takes an integer, got {value!r}") from None
        else:
            raise CLIError(f"--pass-config {key} has type {typ}, which the command line cannot express "
                           "(only bool and int keys)")
    return tvm_cfg, npu_kw


def parse_disabled_passes(items: Sequence[str] | None) -> list[str]:
    """``--disabled-pass`` names (comma-separated, repeatable); the NPU passes every compile needs are refused."""
    names = [p.strip() for text in (items or []) for p in text.split(",") if p.strip()]
    for name in names:
        if name in REQUIRED_PASSES:
            raise CLIError(f"--disabled-pass {name} is not allowed: {REQUIRED_PASSES[name]}")
    return names


def check_opt_level(level: int | None) -> None:
    """CLIError unless ``level`` is None or 3 (see the module docstring)."""
    if level is not None and level != OPT_LEVEL:
        raise CLIError(f"-O/--opt-level {level} is not supported: TVM 0.27's Relax build for llvm gives the same "
                       f"executable at every level and the NPU pipeline has no optional pass; only "
                       f"-O{OPT_LEVEL} (the default) is accepted. To leave a pass out use --disabled-pass")


def check_desired_layout(layout: str | None) -> None:
    """``--desired-layout`` is refused with the reason (one line)."""
    if layout is not None:
        raise CLIError("--desired-layout does not apply to this target: the NPU's layout is fixed by the hardware "
                       "(NHWC in 16-channel blocks, converted at region borders by host ops) and the CPU part "
                       "keeps the ONNX layout (NCHW)")


def parse_dump_formats(text: str | None) -> list[str]:
    """``--dump-code relax,npu`` -> ["relax", "npu"]; unknown formats are refused."""
    if text is None:
        return []
    fmts = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in fmts if f not in DUMP_FORMATS]
    if bad or not fmts:
        raise CLIError(f"--dump-code: unknown format(s) {bad or [text]}; valid: {', '.join(DUMP_FORMATS)}")
    return list(dict.fromkeys(fmts))


def dump_paths(output: Path, fmts: Sequence[str]) -> dict[str, Path]:
    """Format -> file next to ``output``: ``<output>.<format>`` (e.g. ``model.tar.relax``)."""
    return {f: output.with_name(f"{output.name}.{f}") for f in fmts}


# -------------------------------------------------------------------------------- dumps
def _host_lib(executable: Any) -> Any:
    """The llvm module of the host part (searched through wrappers such as TVM's const_loader module)."""
    todo = list(getattr(executable.mod, "imports", None) or getattr(executable.mod, "imported_modules", []))
    while todo:
        lib = todo.pop(0)
        if lib.kind == "llvm":
            return lib
        todo += list(getattr(lib, "imports", None) or getattr(lib, "imported_modules", []))
    raise CLIError("--dump-code: the host executable has no llvm library to dump")


def _npu_text(compiled: Any) -> str:
    lines = []
    for stream in getattr(compiled, "streams", []):
        meta = stream.meta
        lines.append(f"# region {meta.get('symbol')}: {len(stream.instrs)} instructions, "
                     f"memory {json.dumps(meta.get('memory', {}), default=str)}")
        starts = {s["start"]: s for s in meta.get("layers", [])}
        for k, ins in enumerate(stream.instrs):
            if k in starts:
                sec = starts[k]
                name = "permute" if sec.get("permute") else compiled.layers[sec["index"]].name
                lines.append(f"## section {name} (layer {sec['index']})")
            lines.append(f"{k:6d}  {ins!r}")
    return "\n".join(lines) + "\n" if lines else "# no NPU region\n"


def _tir_text(compiled: Any) -> str:
    from hw_model.layers import default_tiling
    from target_npu import runtime
    from target_npu.schedule import schedule_conv

    parts = []
    npu = getattr(compiled, "npu", [False] * len(compiled.layers))
    for i, ly in enumerate(compiled.layers):
        if not npu[i] or ly.kind != "conv":
            continue
        try:
            spec = runtime.to_spec(ly)
            tiling = compiled.tilings[i] or default_tiling(spec, compiled.config)
            parts.append(f"# layer {ly.name} (index {i}), tiling {tiling.to_dict()}\n"
                         + schedule_conv(spec, tiling, compiled.config).mod.script())
        except Exception as e:  # noqa: BLE001 - a layer without TIR (built by hw_model directly) is noted
            parts.append(f"# layer {ly.name} (index {i}): no TIR ({one_line(e)})")
    return "\n\n".join(parts) + "\n" if parts else "# no NPU conv layer\n"


def dump_code(compiled: Any, paths: dict[str, Path]) -> list[Path]:
    """Write each requested dump (format -> path) atomically; returns the paths written."""
    makers = {
        "relax": lambda: compiled.ir_module.script(show_meta=False),
        "npu": lambda: _npu_text(compiled),
        "vm": lambda: compiled.executable.as_text(),
        "asm": lambda: _host_lib(compiled.executable).inspect_source("asm"),
        "ll": lambda: _host_lib(compiled.executable).inspect_source("ll"),
        "tir": lambda: _tir_text(compiled),
    }
    done = []
    for fmt, path in paths.items():
        if fmt == "relax" and getattr(compiled, "ir_module", None) is None:
            raise CLIError("--dump-code relax: the compiled model holds no Relax module")
        done.append(write_atomic(path, makers[fmt]()))
    return done
