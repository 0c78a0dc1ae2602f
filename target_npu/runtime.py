"""Runtime of the compiled model: the global functions the Relax VM calls (``call_dps_packed``).

- One function per NPU region, ``<prefix>.npu.r<k>`` (:func:`register_region`): it writes the region's
  inputs (already in the NPU layout: the host graph converts at the boundary) into the DRAM image,
  runs the region's ONE linked instruction stream (``target_npu.link``) on the functional simulator
  (``hw_model.cycles.simulate``) and reads the region's outputs back. Nothing between the layers of a
  region reaches the host.
- One function per layer left on the CPU, ``<prefix>.<index>`` (:func:`register_layer`): the
  contract itself (``hw_model.reference``), exact.

Layer programs are made by :func:`make_program` for the stored layout of their inputs, every kind
(conv, depthwise, linear, add, pools) emitted from its scheduled, tensorized TIR
(``target_npu.codegen.layer_program``); ``hw_model``'s builder only if a lowering fails, with a
warning. :func:`check_layer` is the pure
check the partition uses (spec and tiling, no program).

Modes: ``func`` runs the functional simulator only; ``perf`` and ``both`` run it with the cycle model
and record the cycles per layer (the sections of the stream) in the :class:`Profile`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import tvm_ffi

from hw_model import reference as ref
from hw_model.builder import identity_slots
from hw_model.config import NPUConfig
from hw_model.cycles import simulate
from hw_model.isa import Program
from hw_model.layer_specs import AddSpec, ConvSpec, LinearSpec, PoolSpec, QuantizeSpec, Tiling
from hw_model.layers import check_tiling, default_tiling
from hw_model.layers_alu import build_layer

log = logging.getLogger("target_npu.runtime")
MODES = ("func", "perf", "both")


@dataclass
class Profile:
    """Per-layer call counts and cycles of the last runs (keyed by layer name)."""

    mode: str = "func"
    cycles: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    host_transfers: int = 0  # region boundary tensors the host wrote or read

    def reset(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.cycles.clear()
        self.calls.clear()
        self.host_transfers = 0


def to_spec(layer: Any, in_slots: list[np.ndarray] | None = None) -> Any:
    """The ``hw_model.layer_specs`` spec the NPU builds ``layer`` from (None for the CPU input quantizer).

    ``in_slots``: the stored channel layout of each input in DRAM (None: channel order). It matters
    only for a linear layer reading a (N, C, H, W) tensor with H*W > 1: the NPU stores that tensor
    NHWC with padded channels, so the weight columns are reordered to that layout at compile time
    (zero columns for the padding), and the layer reads N rows of H*W*Cpad values."""
    spec, ins = layer.spec, tuple(layer.in_shape)
    if isinstance(spec, QuantizeSpec):
        return None
    if isinstance(spec, LinearSpec) and len(ins) == 4 and ins[2] * ins[3] > 1:
        w, gvec = _flatten_columns(np.asarray(spec.weight), spec.isg_groups, ins,
                                   None if in_slots is None else in_slots[0])
        return replace(spec, c=w.shape[1], weight=w, isg_groups=gvec)
    return spec


def _flatten_columns(w: np.ndarray, gvec: np.ndarray | None, ins: tuple[int, ...],
                     slots: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(K, C*H*W) weights in NCHW-flatten order -> (K, H*W*Cpad) in the stored NHWC order (``slots``:
    the stored channel of each padded position); padding columns are zero and join the most common
    ISG group, so they cost no extra group block."""
    _, ch, h, wd = ins
    slots = identity_slots(ch) if slots is None else np.asarray(slots, np.int64)
    pix = np.arange(h * wd)
    src = slots[None, :] * (h * wd) + pix[:, None]  # (H*W, Cpad): flatten index of each stored column
    used = np.broadcast_to(slots[None, :] >= 0, src.shape).reshape(-1)
    src = src.reshape(-1)
    w2 = np.zeros((w.shape[0], src.size), w.dtype)
    w2[:, used] = w[:, src[used]]
    g2 = None
    if gvec is not None:
        gvec = np.asarray(gvec, np.int64)
        g2 = np.full(src.size, int(np.bincount(gvec).argmax()), np.int64)
        g2[used] = gvec[src[used]]
    return w2, g2


def check_layer(layer: Any, cfg: NPUConfig, tiling: Tiling | None = None) -> str | None:
    """Why ``layer`` cannot run on the NPU (None: it can). Pure: checks the spec and that a tiling fits
    the on-chip memories, builds no program."""
    if layer.kind == "input":
        return "input quantizer (CPU side of the contract)"
    try:
        spec = to_spec(layer)
        conv = spec.as_conv() if isinstance(spec, LinearSpec) else spec
        conv.check(cfg) if isinstance(conv, ConvSpec) else conv.check()
        check_tiling(spec, tiling or default_tiling(spec, cfg), cfg)
    except (ValueError, TypeError) as e:
        return f"hw_model rejects the layer: {e}"
    return None


def make_program(layer: Any, cfg: NPUConfig, tiling: Tiling | None = None,
                 in_slots: list[np.ndarray] | None = None) -> tuple[Any, str | None]:
    """(NPU program or None, reason it runs on the CPU or None); ``in_slots``: stored input layouts."""
    if layer.kind == "input":
        return None, "input quantizer (CPU side of the contract)"
    try:
        spec = to_spec(layer, in_slots)
        if isinstance(spec, LinearSpec) and in_slots is not None and len(layer.in_shape) == 4 \
                and layer.in_shape[2] * layer.in_shape[3] > 1:
            in_slots = None  # the flatten remap already put the columns in the stored order
        from target_npu.codegen import layer_program  # compile-time only (TIR): a loaded artifact runs without it
        from target_npu.schedule import NotLowerable

        try:
            return layer_program(spec, tiling, cfg, in_slots), None  # through TIR (target_npu.codegen)
        except NotLowerable as e:  # a TIR lowering failure must not fail a compile: the builder is exact
            log.warning("layer %s: TIR lowering failed (%s); its program comes from hw_model's builder",
                        layer.name, e)
        return build_layer(spec, tiling, cfg, in_slots), None
    except (ValueError, TypeError) as e:
        return None, f"hw_model rejects the layer: {e}"


def execute(layer: Any, xs: list[np.ndarray], cfg: NPUConfig) -> np.ndarray:
    """Outputs of ``layer`` for integer inputs ``xs`` (numpy), bit exact with the contract (CPU path)."""
    s, dt = layer.spec, np.dtype(layer.out_dtype)
    if isinstance(s, QuantizeSpec):
        return ref.quantize(xs[0], s.scale, s.zp, s.lo, s.hi, dt,
                            what=f"model input {layer.name.removeprefix('quantize_')!r}")
    if isinstance(s, LinearSpec):
        return ref.linear(xs[0].reshape(xs[0].shape[0], -1), s.x_zp, s.weight, s.m, s.b, s.lo, s.hi, dt,
                          isg_groups=s.isg_groups, cfg=cfg)
    if isinstance(s, ConvSpec):
        return ref.conv2d(xs[0], s.x_zp, s.weight, s.m, s.b, s.lo, s.hi, dt, stride=tuple(s.stride),
                          pads=tuple(s.pads), groups=s.groups, isg_groups=s.isg_groups, cfg=cfg)
    if isinstance(s, AddSpec):
        return ref.add(xs[0], s.a_zp, s.ma, xs[1], s.b_zp, s.mb, s.bias, s.lo, s.hi, dt)
    if isinstance(s, PoolSpec) and s.kind == "max":
        y = ref.max_pool2d(xs[0], tuple(s.kernel), tuple(s.stride), tuple(s.pads))
        return np.clip(y, s.lo, s.hi).astype(dt)
    if isinstance(s, PoolSpec) and s.kind == "global_avg":  # (N, C, 1, 1), or (N, C) for ReduceMean(keepdims=0)
        return ref.global_avg_pool(xs[0], s.x_zp, s.m, s.b, s.lo, s.hi, dt).reshape(layer.out_shape)
    if isinstance(s, PoolSpec) and s.kind == "avg":
        return ref.avg_pool2d(xs[0], s.x_zp, tuple(s.kernel), tuple(s.stride), s.m, s.b, s.lo, s.hi, dt)
    raise ValueError(f"layer {layer.name}: no CPU path for a {type(s).__name__}")


def _tensors(args: tuple[Any, ...]) -> list[Any]:
    return [a for a in args if hasattr(a, "numpy") and hasattr(a, "copyfrom")]


def register_layer(fname: str, layer: Any, cfg: NPUConfig, profile: Profile | None) -> None:
    """Register ``fname`` as the DPS function of ``layer`` on the CPU (``hw_model.reference``): a layer
    outside every NPU region. Arguments: the layer's input tensors then the output tensor; anything
    else (the layer-index constant) is ignored."""
    n_in = len(layer.in_dtypes) or 1
    profile = Profile() if profile is None else profile

    def run(*args: Any) -> None:
        tensors = _tensors(args)
        y = execute(layer, [a.numpy() for a in tensors[:n_in]], cfg)
        profile.calls[layer.name] = profile.calls.get(layer.name, 0) + 1
        if tuple(y.shape) != tuple(tensors[-1].shape):
            raise ValueError(f"layer {layer.name}: output shape {y.shape}, VM buffer {tuple(tensors[-1].shape)}")
        tensors[-1].copyfrom(np.ascontiguousarray(y))

    tvm_ffi.register_global_func(fname, run, override=True)


def stored_shape(info: dict[str, Any]) -> tuple[int, ...]:
    """Shape of a region boundary tensor as the NPU stores it: (N, H, W, Cpad) or (N, Cpad)."""
    shape, cp = list(info["shape"]), len(info["slots"])
    return (shape[0], *shape[2:], cp)


def run_region(prog: Program, feeds: dict[str, np.ndarray], cfg: NPUConfig, profile: Profile) -> list[np.ndarray]:
    """Run a linked region stream (``target_npu.link``) on the simulator: ``feeds`` are the input regions
    in stored layout; returns the output regions (flat, stored layout) in ``meta["outputs"]`` order and
    records per-layer calls and, in perf/both mode, cycles (the stream's sections) in ``profile``."""
    res = simulate(prog, feeds, cfg, mode="func" if profile.mode == "func" else "both")
    profile.host_transfers += len(feeds) + len(prog.meta["outputs"])
    for k, sec in enumerate(prog.meta["layers"]):
        profile.calls[sec["name"]] = profile.calls.get(sec["name"], 0) + 1
        if res.report is not None:
            profile.cycles[sec["name"]] = profile.cycles.get(sec["name"], 0) + int(res.report["sections"][k]["cycles"])
    return [res.outputs[o["region"]] for o in prog.meta["outputs"]]


def register_region(prog: Program, cfg: NPUConfig, profile: Profile) -> None:
    """Register the DPS function ``prog.meta["symbol"]`` of a linked NPU region: its arguments are the
    region inputs then outputs, each already in the stored layout (the host graph converts at the
    boundary); the stream runs as stored, nothing inside it reaches the host."""
    symbol, inputs, outputs = prog.meta["symbol"], prog.meta["inputs"], prog.meta["outputs"]

    def run(*args: Any) -> None:
        tensors = _tensors(args)
        if len(tensors) != len(inputs) + len(outputs):
            raise ValueError(f"region {symbol}: called with {len(tensors)} tensors, expected "
                             f"{len(inputs)} inputs + {len(outputs)} outputs")
        feeds = {}
        for (name, info), t in zip(inputs.items(), tensors):
            a = t.numpy()
            if a.shape != stored_shape(info) or str(a.dtype) != info["dtype"]:
                raise ValueError(f"region {symbol}: input {name} is {a.dtype}{list(a.shape)}, expected "
                                 f"{info['dtype']}{list(stored_shape(info))}")
            feeds[name] = a.reshape(-1)
        for t, info, y in zip(tensors[len(inputs):], outputs, run_region(prog, feeds, cfg, profile)):
            t.copyfrom(np.ascontiguousarray(y.reshape(stored_shape(info))))

    tvm_ffi.register_global_func(symbol, run, override=True)
