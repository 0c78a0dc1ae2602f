"""The host part of a compiled model as DATA: its partitioned Relax module, checked and compiled on load.

An artifact stores the host graph twice: ``host_ir.json`` (the Relax ``IRModule`` in TVM's JSON
format) and, optionally, ``host.so`` (the native VM executable). Loading a native library runs code
from the file (its constructors run at ``dlopen``), so by default :func:`build_host` rebuilds the
executable from ``host_ir.json`` with TVM's own compiler for llvm, after checking that the module
can call nothing but the model's own runtime functions:

- every ``ExternFunc`` (``call_dps_packed`` target) is ``<prefix>.<layer>`` or ``<prefix>.npu.r<k>``
  of this model (``prefix`` from ``meta.json``);
- no PrimFunc calls an extern or packed function (``tirx.call_extern``, ``call_packed``, ...);
- the module has a ``main`` Relax function.

``host.so`` is loaded only with ``trust=True`` (``tvmc run --trust-artifact``), and then, when the
environment holds ``IOSO_NPU_ARTIFACT_KEY``, only if the manifest's HMAC signature verifies
(``target_npu.artifact``). ``benchmarks/load_time.py`` measures both ways: ResNet-18 at 224 loads in
0.56 s rebuilt vs 0.33 s trusted (1.7x; ``benchmarks/out/load_time.json``, shared 2-core machine).
"""
from __future__ import annotations

import re
from typing import Any

_FORBIDDEN_TIR_OPS = ("tirx.call_extern", "tirx.call_pure_extern", "tirx.call_packed", "tirx.call_cpacked",
                      "tirx.tvm_call_packed", "tirx.tvm_call_cpacked", "tirx.call_llvm_intrin",
                      "tirx.call_llvm_pure_intrin", "tirx.tvm_call_packed_lowered", "tirx.tvm_call_cpacked_lowered")


class HostIRError(ValueError):
    """The stored host graph is not one this compiler could have written."""


def _extern_ok(symbol: str, prefix: str) -> bool:
    rest = symbol[len(prefix) + 1:] if symbol.startswith(prefix + ".") else None
    return rest is not None and re.fullmatch(r"\d+|npu\.r\d+", rest) is not None


def check_host_ir(mod: Any, prefix: str) -> None:
    """HostIRError naming the function and symbol if ``mod`` can reach code outside this model."""
    import tvm
    import tvm_ffi
    from tvm import relax, tirx

    if not isinstance(mod, tvm.IRModule):
        raise HostIRError(f"host_ir.json holds a {type(mod).__name__}, not an IRModule")
    if not re.fullmatch(r"ioso_npu\.[A-Za-z0-9_]+", prefix or ""):
        raise HostIRError(f"meta.json prefix {prefix!r} is not a runtime prefix this compiler writes")
    names = [gv.name_hint for gv in mod.get_global_vars()]
    if "main" not in names or not isinstance(mod["main"], relax.Function):
        raise HostIRError("host_ir.json has no Relax function 'main'")
    for gv, func in mod.functions.items():
        bad: list[str] = []
        if isinstance(func, relax.Function):
            def on_expr(e: Any, bad: list[str] = bad) -> None:
                if isinstance(e, relax.ExternFunc) and not _extern_ok(str(e.global_symbol), prefix):
                    bad.append(str(e.global_symbol))
            relax.analysis.post_order_visit(func, on_expr)
        elif isinstance(func, tirx.PrimFunc):
            def on_call(c: Any, bad: list[str] = bad) -> None:
                if isinstance(c.op, tvm.ir.Op) and c.op.name in _FORBIDDEN_TIR_OPS:
                    bad.append(c.op.name)
            tvm_ffi.structural_walk(func.body, callbacks=[(tvm.ir.Call, on_call)], order="pre")
        else:
            bad.append(type(func).__name__)
        if bad:
            raise HostIRError(f"host_ir.json: function {gv.name_hint!r} calls {sorted(set(bad))[0]!r}, which is "
                              f"not a runtime function of this model ({prefix}.<layer> / {prefix}.npu.r<k>)")


def build_host(ir_json: bytes, prefix: str) -> tuple[Any, Any]:
    """(Relax VM executable, IRModule) rebuilt from the stored host IR after :func:`check_host_ir`."""
    import tvm

    try:
        mod = tvm.ir.load_json(ir_json.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RuntimeError, TypeError, KeyError) as e:
        raise HostIRError(f"host_ir.json is not a TVM IRModule ({str(e).splitlines()[0][:200]})") from None
    check_host_ir(mod, prefix)
    return tvm.compile(mod, target="llvm"), mod
