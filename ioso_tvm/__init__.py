"""ioso_npu's user-facing library: calibrate in torch, export to ONNX, compile for the NPU, run.

Public API (``__all__``; ``help(name)`` for each):

- ``calibrate(model, data, method=..., wbits=..., abits=..., config=CalibConfig(...))``: PTQ in torch
  (``ioso_tvm.calib``);
- ``export_onnx(qmodel, path, input_shape)``: the calibrated model as QDQ ONNX (``ioso_tvm.export``);
- ``compile(model, target="ioso_npu", ...) -> CompiledModel`` and ``load(path)``: compile for the NPU /
  read a compiled ``.tar`` (``ioso_tvm.compiler``); ``CompiledModel.run/report/export``.

The public names load their submodules on first use, so ``import ioso_tvm`` stays cheap (no torch,
no TVM); ``dir(ioso_tvm)`` and ``help(ioso_tvm)`` list them (the latter imports them).
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "calibrate": "ioso_tvm.calib",
    "CalibConfig": "ioso_tvm.calib",
    "export_onnx": "ioso_tvm.export",
    "compile": "ioso_tvm.compiler",
    "CompiledModel": "ioso_tvm.compiler",
    "load": "ioso_tvm.compiler",
}

__all__ = sorted(_LAZY)


def __dir__() -> list[str]:
    """Module attributes plus the lazily loaded public API (what ``dir(ioso_tvm)`` shows)."""
    return sorted(set(globals()) | set(__all__))


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ioso_tvm' has no attribute {name!r}")
