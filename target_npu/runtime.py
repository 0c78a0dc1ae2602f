"""Runtime of offloaded layers: global functions that the Relax VM calls (``call_dps_packed``).

Each folded layer (``ioso_tvm.passes.fold_qdq.Layer``) becomes one global function
``<prefix>.<index>`` registered with ``tvm_ffi.register_global_func``. At registration
(compile or load time) the layer's spec is made (``hw_model.layer_specs``) and its NPU
program is built once: conv (dense, grouped, depthwise) / linear layers through TIR
(``target_npu.codegen.lower_conv``: schedule with the layer's ``Tiling`` knobs, tensorize, walk,
emit), depthwise convs with scaled ISG groups, adds and pools with ``hw_model.layers_alu.build_layer`` (default knobs
``hw_model.layers.default_tiling``); constants are packed into the program. A call
packs the inputs into the program's DRAM layout, runs it on the functional simulator
(``hw_model.cycles.simulate``) and unpacks the output.

Modes: ``func`` runs the functional simulator only; ``perf`` and ``both`` run it with the
cycle model (mode ``both``: outputs are always needed by later layers) and record the cycles
per layer in the :class:`Profile`.

A layer whose spec or program ``hw_model`` rejects (for example a conv whose smallest tile
does not fit the accumulator) is computed with ``hw_model.reference`` on the CPU; :func:`make_program` returns the
reason, which the compile report lists.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm_ffi

from hw_model import reference as ref
from hw_model.config import NPUConfig
from hw_model.cycles import simulate
from hw_model.layer_specs import AddSpec, ConvSpec, LinearSpec, PoolSpec, Tiling
from hw_model.layers import default_tiling
from hw_model.layers_alu import build_layer, pack_inputs, unpack_output
from target_npu.codegen import conv_program

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


def to_spec(layer: Any) -> Any:
    """The ``hw_model.layer_specs`` spec of a folded layer (None for the CPU input quantizer)."""
    c, dt, ins = layer.consts, layer.out_dtype, c_shape(layer)
    if layer.kind == "conv" and len(layer.out_shape) == 2:
        n, k = layer.out_shape
        return LinearSpec(n, int(np.prod(ins[1:])), k, c["w"][:, :, 0, 0], c["m"], c["b"], c["lo"], c["hi"],
                          x_zp=c["x_zp"], in_dtype=c["in_dtypes"][0], out_dtype=dt, isg_groups=c["isg_groups"])
    if layer.kind == "conv":
        n, cin, h, w = ins
        return ConvSpec(n, cin, h, w, layer.out_shape[1], c["w"], c["m"], c["b"], c["lo"], c["hi"],
                        stride=tuple(c["stride"]), pads=tuple(c["pads"]), groups=c["groups"], x_zp=c["x_zp"],
                        in_dtype=c["in_dtypes"][0], out_dtype=dt, isg_groups=c["isg_groups"])
    if layer.kind == "add":
        return AddSpec(*ins, c["a_zp"], c["b_zp"], c["ma"], c["mb"], c["bias"], c["lo"], c["hi"],
                       a_dtype=c["in_dtypes"][0], b_dtype=c["in_dtypes"][1], out_dtype=dt)
    if layer.kind == "maxpool":
        return PoolSpec("max", *ins, kernel=tuple(c["kernel"]), stride=tuple(c["stride"]), pads=tuple(c["pads"]),
                        lo=c["lo"], hi=c["hi"], in_dtype=c["in_dtypes"][0], out_dtype=dt)
    if layer.kind == "gap":
        return PoolSpec("global_avg", *ins, x_zp=c["x_zp"], m=float(c["m"]), b=float(c["b"]), lo=c["lo"],
                        hi=c["hi"], in_dtype=c["in_dtypes"][0], out_dtype=dt)
    return None


def c_shape(layer: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in layer.consts.get("in_shape", ()))


def make_program(layer: Any, cfg: NPUConfig, tiling: Tiling | None = None) -> tuple[Any, str | None]:
    """(NPU program or None, reason it runs on the CPU or None)."""
    if layer.kind == "input":
        return None, "input quantizer (CPU side of the contract)"
    try:
        spec = to_spec(layer)
        if isinstance(spec, (LinearSpec, ConvSpec)):
            return conv_program(spec, tiling, cfg), None  # through TIR (target_npu.codegen)
        return build_layer(spec, tiling or default_tiling(spec, cfg), cfg), None
    except (ValueError, TypeError) as e:
        return None, f"hw_model rejects the layer: {e}"


def layer_cycles(layer: Any, cfg: NPUConfig, prog: Any = None) -> int:
    """Cycles of one layer from the cycle model (``hw_model.cycles``, perf mode); 0 on the CPU."""
    if prog is None:
        prog, _ = make_program(layer, cfg)
    return 0 if prog is None else int(simulate(prog, None, cfg, mode="perf").report["cycles"])


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


def run_layer(layer: Any, prog: Any, xs: list[np.ndarray], cfg: NPUConfig, profile: Profile) -> np.ndarray:
    """Output of ``layer`` for integer inputs ``xs``: its NPU program on the simulator (``prog``) or
    ``hw_model.reference`` (``prog`` None); records calls and, in perf/both mode, cycles in ``profile``."""
    cycles = 0
    if prog is None:
        y = execute(layer, xs, cfg)
    else:
        if len(layer.out_shape) == 2:
            xs = [xs[0].reshape(xs[0].shape[0], -1)]
        res = simulate(prog, pack_inputs(prog, *xs), cfg, mode="func" if profile.mode == "func" else "both")
        y = unpack_output(prog, res.outputs["out"]).astype(layer.out_dtype)
        cycles = 0 if res.report is None else int(res.report["cycles"])
    profile.calls[layer.name] = profile.calls.get(layer.name, 0) + 1
    if profile.mode in ("perf", "both"):
        profile.cycles[layer.name] = profile.cycles.get(layer.name, 0) + cycles
    return y


def _tensors(args: tuple[Any, ...]) -> list[Any]:
    return [a for a in args if hasattr(a, "numpy") and hasattr(a, "copyfrom")]


def _write(out: Any, y: np.ndarray, what: str) -> None:
    if tuple(y.shape) != tuple(out.shape):
        raise ValueError(f"{what}: output shape {y.shape}, VM buffer {tuple(out.shape)}")
    out.copyfrom(np.ascontiguousarray(y))


def register_layer(fname: str, layer: Any, cfg: NPUConfig, profile: Profile | None,
                   tiling: Tiling | None = None, on_npu: bool = True, program: Any = None) -> Any:
    """Register ``fname`` as the DPS function of ``layer``. Returns the program (None: CPU).

    Arguments of a call: the layer's input tensors then the output tensor; anything else (the
    layer-index constant of a CPU call) is ignored. ``on_npu=False`` computes the layer with
    ``hw_model.reference``; ``program`` skips the build.
    """
    prog = None if not on_npu else program if program is not None else make_program(layer, cfg, tiling)[0]
    n_in = len(layer.consts.get("in_dtypes", [])) or 1
    profile = Profile() if profile is None else profile

    def run(*args: Any) -> None:
        tensors = _tensors(args)
        y = run_layer(layer, prog, [a.numpy() for a in tensors[:n_in]], cfg, profile)
        _write(tensors[-1], y, f"layer {layer.name}")

    tvm_ffi.register_global_func(fname, run, override=True)
    return prog


def register_region(region: Any, layers: list[Any], programs: list[Any], cfg: NPUConfig,
                    profile: Profile) -> None:
    """Register the DPS function of an NPU region (:class:`target_npu.regions.Region`): its inputs,
    then its outputs; the layer programs run in order, intermediate tensors never reach the host."""

    def run(*args: Any) -> None:
        tensors = _tensors(args)
        if len(tensors) != region.num_inputs + len(region.outputs):
            raise ValueError(f"region {region.symbol}: called with {len(tensors)} tensors, expected "
                             f"{region.num_inputs} inputs + {len(region.outputs)} outputs")
        env = {f"in:{k}": t.numpy() for k, t in enumerate(tensors[:region.num_inputs])}
        for j, step in enumerate(region.steps):
            ly = layers[step.layer]
            env[f"step:{j}"] = run_layer(ly, programs[step.layer], [env[r] for r in step.inputs], cfg, profile)
        for out, r in zip(tensors[region.num_inputs:], region.outputs, strict=True):
            _write(out, env[r], f"region {region.symbol}")

    tvm_ffi.register_global_func(region.symbol, run, override=True)
