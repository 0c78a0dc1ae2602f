"""ONNX import: load a model in the format of docs/onnx_format.md into Relax and read its IOSO metadata."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import tvm
from tvm.relax.frontend.onnx import from_onnx

from hw_model.config import NPUConfig


def load_onnx(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as a ModelProto (from a path or as is); errors name the file."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, Path)):
        p = Path(model)
        if not p.is_file():
            raise FileNotFoundError(f"model file {str(p)!r} does not exist")
        try:
            return onnx.load(str(p))
        except Exception as e:  # onnx raises DecodeError and friends
            raise ValueError(f"model file {str(p)!r} is not a readable ONNX model ({e})") from None
    raise TypeError(f"model must be an ONNX path or onnx.ModelProto, got {type(model).__name__}")


def ioso_metadata(model: onnx.ModelProto, cfg: NPUConfig) -> dict[str, Any]:
    """The ``ioso_npu`` metadata JSON ({} for plain QDQ files), checked against ``cfg``."""
    props = {p.key: p.value for p in model.metadata_props}
    if "ioso_npu" not in props:
        return {}
    try:
        meta = json.loads(props["ioso_npu"])
    except json.JSONDecodeError as e:
        raise ValueError(f"metadata_props['ioso_npu'] is not JSON ({e})") from None
    if meta.get("format_version") != 1:
        raise ValueError(f"metadata_props['ioso_npu']: format_version {meta.get('format_version')!r} unsupported (1)")
    for key, want in (("isg_group_signs", list(cfg.isg_group_signs)), ("isg_shift", cfg.isg_shift),
                      ("granularity", cfg.granularity)):
        if key in meta and meta[key] != want:
            raise ValueError(f"model metadata {key}={meta[key]!r} does not match NPUConfig.{key}={want!r}")
    return meta


def import_onnx(model: str | Path | onnx.ModelProto, cfg: NPUConfig,
                input_shapes: dict[str, list[int]] | None = None) -> tuple[tvm.IRModule, dict[str, Any]]:
    """(Relax module with constants inlined, IOSO metadata) of an ONNX model."""
    proto = load_onnx(model)
    meta = ioso_metadata(proto, cfg)
    try:
        mod = from_onnx(proto, shape_dict=input_shapes, keep_params_in_input=False)
    except Exception as e:
        raise ValueError(f"ONNX import failed: {type(e).__name__}: {str(e).splitlines()[-1][:300]}") from None
    return mod, meta
