"""Bridge to ``hw_model``'s program builder: its ``Tiling`` knobs and its buffer check.

The tuner's :class:`space.Tiling` counts channels (multiples of 16); the builder's
``hw_model.layer_specs.Tiling`` counts 16-channel blocks and names the loop order by blocks.
When the builder is not importable these helpers say so (``None`` / ``False``) instead of failing.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from typing import Any

import numpy as np

from hw_model.config import NPUConfig

from .records import TuningRecordWarning, best_tiling, layer_key
from .space import ConvSpec, Tiling

_ORDER = {"oc_outer": "ob_outer", "sp_outer": "sp_outer"}


def _builder() -> tuple[Any, Any] | None:
    try:
        return importlib.import_module("hw_model.layer_specs"), importlib.import_module("hw_model.layers")
    except ImportError:
        return None


def builder_available() -> bool:
    """True when ``hw_model.layer_specs`` and ``hw_model.layers`` import."""
    return _builder() is not None


def to_builder_tiling(t: Tiling, cfg: NPUConfig) -> Any:
    """The builder's Tiling (blocks of ``cfg.granularity`` channels) for a tuner Tiling."""
    mod = _builder()
    if mod is None:
        raise ValueError("to_builder_tiling: hw_model.layer_specs is not available")
    g = cfg.granularity
    return mod[0].Tiling(ob_tile=t.oc_tile // g, rows=t.sp_tile, cb_tile=t.ic_tile // g,
                         loop_order=_ORDER[t.order], nbuf=2 if t.double_buffer else 1)


def from_builder_spec(spec: Any) -> ConvSpec:
    """Tuner ConvSpec (shape only) of a builder ``hw_model.layer_specs.ConvSpec`` with symmetric pads/stride."""
    pads, stride = tuple(spec.pads), tuple(spec.stride)
    if len(set(pads)) != 1 or len(set(stride)) != 1 or tuple(spec.dilation) != (1, 1):
        raise ValueError(f"layer with pads {pads}, stride {stride}, dilation {spec.dilation} is not tunable")
    return ConvSpec(in_ch=int(spec.c), out_ch=int(spec.k), in_h=int(spec.h), in_w=int(spec.w), kh=spec.kh,
                    kw=spec.kw, stride=stride[0], pad=pads[0], groups=int(spec.groups))


def builder_check(spec: ConvSpec, t: Tiling, cfg: NPUConfig) -> str | None:
    """The builder's own buffer check (``hw_model.layers.check_tiling``) of a tuner point: reason or None.

    None also when the builder is not available (the tuner's own check still applies).
    """
    mod = _builder()
    if mod is None or not hasattr(mod[1], "check_tiling"):
        return None
    try:
        mod[1].check_tiling(_builder_spec(spec), to_builder_tiling(t, cfg), cfg)
    except ValueError as e:
        return f"builder: {e}"
    return None


@functools.lru_cache(maxsize=64)
def _builder_spec(spec: ConvSpec) -> Any:
    """Shape-only builder ConvSpec (zero weights) of a tuner ConvSpec."""
    ls = _builder()[0]
    z = np.zeros
    return ls.ConvSpec(n=1, c=spec.in_ch, h=spec.in_h, w=spec.in_w, k=spec.out_ch,
                        weight=z((spec.out_ch, spec.in_ch, spec.kh, spec.kw), np.int8),
                        m=z(spec.out_ch, np.float32), b=z(spec.out_ch, np.float32),
                        stride=(spec.stride, spec.stride), pads=(spec.pad,) * 4)


def best_builder_tiling(records: Any, spec: Any, cfg: NPUConfig) -> Any | None:
    """Hook for the compiler: the builder Tiling recorded fastest for a builder ConvSpec, or None
    (then use ``hw_model.layers.default_tiling``). Untunable layers and tilings the builder rejects
    give None (the latter with a :class:`TuningRecordWarning`)."""
    try:
        tspec = from_builder_spec(spec)
    except ValueError:
        return None
    t = best_tiling(records, layer_key(tspec, cfg), cfg, spec=tspec)
    if t is None:
        return None
    why = builder_check(tspec, t, cfg)
    if why is not None:
        warnings.warn(f"tuning record for {layer_key(tspec, cfg)} ignored: {why}", TuningRecordWarning, stacklevel=2)
        return None
    return to_builder_tiling(t, cfg)
