"""ioso_npu's user-facing library: calibrate in torch, export to ONNX, compile for the NPU, run.

The public functions load their submodules on first use, so ``import ioso_tvm`` stays cheap.
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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ioso_tvm' has no attribute {name!r}")
