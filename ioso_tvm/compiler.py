"""Compile API: ``compile(model) -> CompiledModel``; ``CompiledModel.run/report/export``; ``load``.

Pipeline for ``target="ioso_npu"`` (docs/compiler.md): ONNX import (``ioso_tvm.frontend``) ->
fold the QDQ chains into integer layer markers (``ioso_tvm.passes.fold_qdq``) -> group
permutation (``ioso_tvm.passes.permute_groups``) -> BYOC partition (``target_npu.partition``:
pattern table with NPU checks, ``FuseOpsByPattern``, ``RunCodegen`` with ``relax.ext.ioso_npu``,
dense convs lowered through TIR) -> ``tvm.compile(mod, "llvm")`` for the host part -> Relax VM.
Chains that cannot be folded stay float QDQ ops run by the VM on the CPU; layers failing a
partition check run on the CPU with ``hw_model.reference``; the log (``logging`` name
``ioso_tvm.compiler``) and :meth:`CompiledModel.report` ``["fallbacks"]`` name both with the reason.

Function names: ``ioso_npu.m<hash of model and config>.npu.<layer index>`` (NPU) and
``ioso_npu.m<hash>.<layer index>`` (the same layer on the CPU). The Relax VM looks
its packed functions up when it is created (checked on TVM 0.27), so two models compiled or
loaded from the same file each keep the closures registered just before their VM was made.

``target="llvm"``: the imported QDQ graph is compiled as is and runs in float on the CPU
(TVM's quantize/dequantize); it is the ONNX semantics, not the integer contract, so it may
differ from ``hw_model.reference`` by rounding.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import tvm
from tvm import relax

from hw_model.config import NPUConfig
from ioso_tvm.frontend import import_onnx, load_onnx
from ioso_tvm.passes.fold_qdq import Layer, find_layers, fold_qdq
from ioso_tvm.passes.permute_groups import apply_plan, plan_permutations
from target_npu import runtime
from target_npu.partition import partition
from target_npu.patterns import PartitionContext
from target_npu.regions import Region

log = logging.getLogger("ioso_tvm.compiler")
TARGETS = ("ioso_npu", "llvm")


def _to_onnx(model: Any, input_shapes: dict[str, list[int]] | None) -> onnx.ModelProto:
    if isinstance(model, (str, Path, onnx.ModelProto)):
        return load_onnx(model)
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(model, torch.nn.Module):
        try:
            from ioso_tvm.export import export_onnx
        except ImportError:
            raise TypeError("compiling a torch model needs ioso_tvm.export.export_onnx, which is not available; "
                            "export the model to ONNX first") from None
        shape = list(input_shapes.values())[0] if input_shapes else (1, *getattr(model, "input_shape", ()))
        return export_onnx(model, None, tuple(int(d) for d in shape))
    raise TypeError(f"model must be an ONNX path, onnx.ModelProto or a calibrated torch model, "
                    f"got {type(model).__name__}")


class CompiledModel:
    """A compiled model: a Relax VM whose NPU layers call registered runtime functions."""

    def __init__(self, executable: Any, layers: list[Layer], prefix: str, config: NPUConfig,
                 inputs: list[dict[str, Any]], target: str, fallbacks: list[tuple[str, str]],
                 permutes: dict[str, int] | None = None, tilings: list[Any] | None = None,
                 npu: list[bool] | None = None, cpu_reasons: dict[int, str] | None = None,
                 programs: dict[int, Any] | None = None, regions: list[Region] | None = None) -> None:
        self.executable, self.layers, self.prefix, self.config = executable, layers, prefix, config
        self.inputs, self.target, self.fallbacks = inputs, target, fallbacks
        self.permutes = permutes or {"permutes_needed": 0, "gathered_loads": 0, "permuted_tensors": 0}
        self.profile = runtime.Profile()
        self.tilings = list(tilings) if tilings is not None else [None] * len(layers)
        self.npu = list(npu) if npu is not None else [ly.kind != "input" for ly in layers]
        self.cpu_reasons = dict(cpu_reasons or {})
        self.programs = []
        for i, (ly, t) in enumerate(zip(layers, self.tilings)):
            runtime.register_layer(f"{prefix}.{i}", ly, config, self.profile, t, on_npu=False)
            self.programs.append(runtime.register_layer(f"{prefix}.npu.{i}", ly, config, self.profile, t,
                                                        program=(programs or {}).get(i)) if self.npu[i] else None)
        self.regions = list(regions or [])
        for region in self.regions:
            runtime.register_region(region, layers, self.programs, config, self.profile)
        self._cycles: list[int] | None = None
        self.vm = relax.VirtualMachine(executable, tvm.cpu())

    def run(self, inputs: dict[str, np.ndarray] | np.ndarray, mode: str = "func") -> np.ndarray | list[np.ndarray]:
        """Run on float32 inputs (by name, or one array for a one-input model); outputs as numpy."""
        self.profile.reset(mode)
        names = [s["name"] for s in self.inputs]
        if isinstance(inputs, np.ndarray):
            if len(names) != 1:
                raise ValueError(f"inputs: the model has {len(names)} inputs {names}; pass a dict")
            inputs = {names[0]: inputs}
        if not isinstance(inputs, dict) or set(inputs) != set(names):
            raise ValueError(f"inputs must name exactly the model inputs {names}")
        args = []
        for s in self.inputs:
            x = np.asarray(inputs[s["name"]])
            if list(x.shape) != list(s["shape"]) or str(x.dtype) != s["dtype"]:
                raise ValueError(f"input {s['name']!r} is {x.dtype}{list(x.shape)}, expected {s['dtype']}{s['shape']}")
            args.append(tvm.runtime.tensor(np.ascontiguousarray(x)))
        out = self.vm["main"](*args)
        if isinstance(out, tvm.runtime.Tensor):
            return out.numpy()
        return [o.numpy() for o in out]

    def report(self) -> dict[str, Any]:
        """Per-layer device, cycles (last perf/both run, else the static estimate), µs, MAC utilisation,
        ``lowering`` ("tir": through target_npu.codegen, "build_layer": hw_model directly, None: CPU)."""
        if self._cycles is None:
            self._cycles = [runtime.layer_cycles(ly, self.config, p) for ly, p in zip(self.layers, self.programs)]
        rows = []
        for i, (ly, prog, cyc) in enumerate(zip(self.layers, self.programs, self._cycles)):
            macs = ly.macs()
            gvec = ly.consts.get("isg_groups")
            rows.append({"name": ly.name, "kind": ly.kind, "device": "cpu" if prog is None else "npu",
                         "instructions": 0 if prog is None else len(prog.instrs),
                         "out_shape": list(ly.out_shape), "macs": macs, "cycles": cyc,
                         "us": cyc / self.config.clock_mhz,
                         "mac_utilisation": macs / (cyc * self.config.macs_per_cycle) if macs and cyc else 0.0,
                         "cpu_reason": None if prog is None and ly.kind == "input" else
                         (self.cpu_reasons.get(i) or runtime.make_program(ly, self.config)[1]
                          if prog is None else None),
                         "isg_groups_used": 0 if gvec is None else int(len(np.unique(gvec))),
                         "lowering": None if prog is None else "tir" if "tir" in prog.meta else "build_layer"})
        total = sum(r["cycles"] for r in rows)
        return {"target": self.target, "layers": rows, "total_cycles": total,
                "total_us": total / self.config.clock_mhz,
                "fallbacks": [{"tensor": n, "op": "qdq", "reason": r} for n, r in self.fallbacks]
                + [{"tensor": self.layers[i].out_name or self.layers[i].name, "op": self.layers[i].name, "reason": r}
                   for i, r in sorted(self.cpu_reasons.items())],
                "permutes": dict(self.permutes)}

    def export(self, path: str | Path) -> Path:
        """Write a ``.tar`` (JSON + npz + VM library; see ``target_npu.artifact``)."""
        from target_npu.artifact import save_artifact

        programs, constants = {}, {}
        for i, ly in enumerate(self.layers):
            scal = {}
            for k, v in ly.consts.items():
                if isinstance(v, np.ndarray):
                    constants[f"{i}.{k}"] = v
                else:
                    scal[k] = v.item() if isinstance(v, np.generic) else v
            programs[str(i)] = {"kind": ly.kind, "name": ly.name, "out_shape": list(ly.out_shape),
                                "out_dtype": ly.out_dtype, "consts": scal,
                                "tiling": None if self.tilings[i] is None else self.tilings[i].to_dict()}
        meta = {"inputs": self.inputs, "prefix": self.prefix, "target": self.target,
                "fallbacks": [list(f) for f in self.fallbacks], "num_layers": len(self.layers),
                "permutes": self.permutes, "npu": self.npu, "regions": [r.to_dict() for r in self.regions],
                "cpu_reasons": {str(k): v for k, v in self.cpu_reasons.items()}}
        return save_artifact(path, config=self.config, meta=meta, programs=programs, constants=constants,
                             report=self.report(), executable=self.executable)


def load(path: str | Path) -> CompiledModel:
    """Read a model written by :meth:`CompiledModel.export` and register its runtime functions."""
    from target_npu.artifact import load_artifact

    art = load_artifact(path)
    from hw_model.layer_specs import Tiling

    layers, tilings = [], []
    for i in range(int(art.meta["num_layers"])):
        p = art.programs[str(i)]
        consts = dict(p["consts"])
        consts.update({k.split(".", 1)[1]: v for k, v in art.constants.items() if k.split(".", 1)[0] == str(i)})
        layers.append(Layer(p["kind"], p["name"], [], tuple(p["out_shape"]), p["out_dtype"], consts))
        tilings.append(None if p.get("tiling") is None else Tiling(**p["tiling"]))
    cm = CompiledModel(art.load_host_module(), layers, art.meta["prefix"], art.config, art.meta["inputs"],
                       art.meta["target"], [tuple(f) for f in art.meta["fallbacks"]], art.meta.get("permutes"), tilings,
                       art.meta.get("npu"), {int(k): v for k, v in art.meta.get("cpu_reasons", {}).items()},
                       regions=[Region.from_dict(r) for r in art.meta.get("regions", [])])
    cm._artifact = art  # keeps the extracted host library alive
    return cm


def compile(model: Any, target: str = "ioso_npu", input_shapes: dict[str, list[int]] | None = None,
            config: NPUConfig | None = None, tuning_records: str | Path | None = None,
            offload: bool = True) -> CompiledModel:
    """Compile an ONNX path / ModelProto / calibrated torch model for ``target`` (ioso_npu or llvm).

    ``offload=False`` (ioso_npu only) skips the partition: every folded layer runs on the CPU with
    ``hw_model.reference`` (the contract itself, for three-way comparisons).
    """
    config = NPUConfig() if config is None else config
    if not isinstance(config, NPUConfig):
        raise TypeError(f"config must be an NPUConfig, got {type(config).__name__}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if tuning_records is not None and not Path(tuning_records).is_file():
        raise FileNotFoundError(f"tuning_records {str(tuning_records)!r} does not exist")
    proto = _to_onnx(model, input_shapes)
    mod, meta = import_onnx(proto, config, input_shapes)
    params = mod["main"].params
    inputs = []
    for p in params:
        try:
            shape = [int(d) for d in p.ty.shape]
        except TypeError:
            raise ValueError(f"input {p.name!r} has a dynamic shape {p.ty.shape}; give input_shapes="
                             f"{{{p.name!r}: [...]}}") from None
        inputs.append({"name": p.name, "shape": shape, "dtype": str(p.ty.dtype)})
    layers, fallbacks = [], []
    if target == "ioso_npu":
        wbits = {"*": max([v.get("wbits", 8) for v in meta.get("layers", {}).values()], default=8)}
        layers, fallbacks = find_layers(mod, config, wbits)
        for name, why in fallbacks:
            log.info("CPU fallback for %s: %s", name, why)
        h = hashlib.sha256(proto.SerializeToString() + repr(config.to_dict()).encode()).hexdigest()[:16]
        prefix = f"ioso_npu.m{h}"
        mod = fold_qdq(mod, layers, prefix)
        plan = plan_permutations(layers, external_tensors(mod), {s["name"] for s in inputs}, config)
        if plan.granularity_violations:
            raise ValueError(f"layers {plan.granularity_violations}: more than one ISG group is not a multiple "
                             f"of the granularity {config.granularity}")
        layers, permutes = apply_plan(layers, plan), plan.counts()
        log.info("group permutation: %s", permutes)
        tilings = _tilings(layers, tuning_records, config)
        ctx = PartitionContext(layers, config, tilings, profile=runtime.Profile())
        mod = partition(mod, ctx, prefix) if offload else mod
        if not offload:
            ctx.rejected.update({i: "offload=False" for i, ly in enumerate(layers) if ly.kind != "input"})
        for i, why in sorted(ctx.rejected.items()):
            log.info("CPU fallback for layer %s: %s", layers[i].name, why)
        # a layer absent from the partitioned graph (dead, removed by DCE) keeps its NPU program
        npu = [i in ctx.symbols or (i not in ctx.rejected and ly.kind != "input") for i, ly in enumerate(layers)]
        reasons, programs, regions = ctx.rejected, ctx.programs, ctx.regions
    else:
        prefix, permutes, tilings, npu, reasons, programs, regions = "ioso_npu.cpu", None, [], [], {}, {}, []
    ex = tvm.compile(mod, target="llvm")
    log.info("compiled %d NPU layer(s), %d CPU fallback(s)", sum(npu), len(fallbacks) + len(reasons))
    return CompiledModel(ex, layers, prefix, config, inputs, target, fallbacks, permutes, tilings, npu, reasons,
                         programs, regions)


def _tilings(layers: list[Layer], records: str | Path | None, config: NPUConfig) -> list[Any]:
    """Per layer the tuned ``hw_model`` Tiling from ``records`` (None: default tiling)."""
    if records is None:
        return [None] * len(layers)
    from target_npu.tuner.records import best_tiling, load_records

    recs = load_records(records)
    out = []
    for ly in layers:
        spec = runtime.to_spec(ly) if ly.kind == "conv" and len(ly.out_shape) == 4 else None
        out.append(None if spec is None else best_tiling(recs, spec, config))
    log.info("tuning records: %d of %d layer(s) tuned", sum(t is not None for t in out), len(layers))
    return out


def external_tensors(mod: tvm.IRModule) -> set[str]:
    """Names of the vars of ``main`` read by anything but a packed NPU call (CPU ops, outputs)."""
    func = mod["main"]
    used: set[str] = set()
    for blk in func.body.blocks:
        for b in blk.bindings:
            v = b.value
            if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and v.op.name == "relax.call_dps_packed":
                continue
            used |= {x.name for x in relax.analysis.free_vars(v)}
    used |= {x.name for x in relax.analysis.free_vars(func.body.body)}
    return used
