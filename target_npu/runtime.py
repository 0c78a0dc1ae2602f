"""Runtime of offloaded layers: global functions that the Relax VM calls (``call_dps_packed``).

Each folded layer (``ioso_tvm.passes.fold_qdq.Layer``) becomes one global function
``<prefix>.<index>`` registered with ``tvm_ffi.register_global_func``. Its constants are
bound once at registration (compile or load time), not passed per call. A call computes the
layer with the numeric contract (``hw_model.reference``: the functional simulator and the
instruction-level program are not part of the tree yet, so the contract itself is the
functional model) and records its cycles in a :class:`Profile`.

Modes: ``func`` computes outputs; ``perf`` and ``both`` also record cycles per call (outputs
are always computed because later layers need them).

Cycles (until ``hw_model.cycles`` exists): MAC layers ``ceil(MACs / cfg.macs_per_cycle)``
plus ``cfg.instr_overhead_cycles``; ALU layers ``ceil(elements / cfg.post_lanes)`` plus the
overhead. This is the ideal-utilisation bound of NPUConfig's arrays, not a fitted model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm_ffi

from hw_model import reference as ref
from hw_model.config import NPUConfig

MODES = ("func", "perf", "both")


@dataclass
class Profile:
    """Per-layer call counts and cycles of the last runs (keyed by layer name)."""

    mode: str = "func"
    cycles: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def reset(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.cycles.clear()
        self.calls.clear()


def layer_cycles(layer: Any, cfg: NPUConfig) -> int:
    """Ideal cycles of one layer on ``cfg`` (see the module docstring)."""
    if layer.kind == "input":
        return 0  # runs on the CPU
    macs = layer.macs()
    if macs:
        return math.ceil(macs / cfg.macs_per_cycle) + cfg.instr_overhead_cycles
    return math.ceil(int(np.prod(layer.out_shape)) / cfg.post_lanes) + cfg.instr_overhead_cycles


def execute(layer: Any, xs: list[np.ndarray], cfg: NPUConfig) -> np.ndarray:
    """Outputs of ``layer`` for integer inputs ``xs`` (numpy), bit exact with the contract."""
    c, dt = layer.consts, np.dtype(layer.out_dtype)
    if layer.kind == "input":
        return ref.quantize(xs[0], c["scale"], c["zp"], c["lo"], c["hi"], dt)
    if layer.kind == "conv":
        x = xs[0] if xs[0].ndim == 4 else xs[0].reshape(xs[0].shape[0], -1, 1, 1)  # linear: 1x1 conv
        return ref.conv2d(x, c["x_zp"], c["w"], c["m"], c["b"], c["lo"], c["hi"], dt,
                          stride=tuple(c["stride"]), pads=tuple(c["pads"]), groups=c["groups"],
                          isg_groups=c["isg_groups"], cfg=cfg).reshape(layer.out_shape)
    if layer.kind == "add":
        return ref.add(xs[0], c["a_zp"], c["ma"], xs[1], c["b_zp"], c["mb"], c["bias"], c["lo"], c["hi"], dt)
    if layer.kind == "maxpool":
        y = ref.max_pool2d(xs[0], tuple(c["kernel"]), tuple(c["stride"]), tuple(c["pads"]))
        return np.clip(y, c["lo"], c["hi"]).astype(dt)
    if layer.kind == "gap":
        return ref.global_avg_pool(xs[0], c["x_zp"], c["m"], c["b"], c["lo"], c["hi"], dt)
    raise ValueError(f"layer {layer.name}: unknown kind {layer.kind!r}")


def register_layer(fname: str, layer: Any, cfg: NPUConfig, profile: Profile) -> None:
    """Register ``fname`` as the DPS function of ``layer``: f(*inputs, out)."""
    cycles = layer_cycles(layer, cfg)

    def run(*args: Any) -> None:
        xs, out = [a.numpy() for a in args[:-1]], args[-1]
        y = execute(layer, xs, cfg)
        if tuple(y.shape) != tuple(out.shape):
            raise ValueError(f"layer {layer.name}: output shape {y.shape}, VM buffer {tuple(out.shape)}")
        out.copyfrom(np.ascontiguousarray(y))
        profile.calls[layer.name] = profile.calls.get(layer.name, 0) + 1
        if profile.mode in ("perf", "both"):
            profile.cycles[layer.name] = profile.cycles.get(layer.name, 0) + cycles

    tvm_ffi.register_global_func(fname, run, override=True)
