"""Compile API: ``compile(model) -> CompiledModel``; ``CompiledModel.run/report/export``; ``load``.

Pipeline for ``target="ioso_npu"`` (docs/compiler.md): ONNX import (``ioso_tvm.frontend``) ->
the pass pipeline ``target_npu.transform.pipeline.npu_pipeline`` (a ``tvm.transform.Sequential``: fold
the QDQ chains into integer layer markers, plan the group permutation, BYOC partition with
``target_npu.partition``: pattern table with pure NPU checks, ``FuseOpsByPattern``, ``RunCodegen``
with ``relax.ext.ioso_npu`` linking each region into one instruction stream) ->
``tvm.compile(mod, "llvm")`` for the host part -> Relax VM.
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

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax

from hw_model.config import NPUConfig
from hw_model.cycles import instr_cost, simulate
from hw_model.isa import Load, Program
from target_npu import runtime
from target_npu.layer import Layer, layer_from_record, layer_record
from target_npu.regions import Region

log = logging.getLogger("ioso_tvm.compiler")
TARGETS = ("ioso_npu", "llvm")
LOW_OFFLOAD = 0.5
"""Share of the MACs on the NPU below which compile() warns with the top CPU reasons. Chosen."""


def _to_onnx(model: Any, input_shapes: dict[str, list[int]] | None) -> Any:
    import onnx

    from ioso_tvm.frontend import load_onnx

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
    raise TypeError(f"model must be an ONNX path, onnx.ModelProto, a Relax IRModule from ioso_tvm.frontend."
                    f"import_onnx or a calibrated torch model, "
                    f"got {type(model).__name__}")


class CompiledModel:
    """A compiled model: a Relax VM whose NPU regions call their linked instruction streams."""

    def __init__(self, executable: Any, layers: list[Layer], prefix: str, config: NPUConfig,
                 inputs: list[dict[str, Any]], target: str, fallbacks: list[tuple[str, str]],
                 permutes: dict[str, int] | None = None, tilings: list[Any] | None = None,
                 cpu_reasons: dict[int, str] | None = None, regions: list[Region] | None = None,
                 streams: list[Program] | None = None) -> None:
        self.executable, self.layers, self.prefix, self.config = executable, layers, prefix, config
        self.inputs, self.target, self.fallbacks = inputs, target, fallbacks
        self.permutes = permutes or {"permutes_needed": 0, "gathered_loads": 0, "permuted_tensors": 0}
        self.profile = runtime.Profile()
        self.tilings = list(tilings) if tilings is not None else [None] * len(layers)
        self.cpu_reasons = dict(cpu_reasons or {})
        self.regions, self.streams = list(regions or []), list(streams or [])
        for i, ly in enumerate(layers):
            runtime.register_layer(f"{prefix}.{i}", ly, config, self.profile)
        for stream in self.streams:
            runtime.register_region(stream, config, self.profile)
        self.npu = [False] * len(layers)
        for stream in self.streams:
            for sec in stream.meta["layers"]:
                self.npu[sec["index"]] = True
        self._static: list[list[dict[str, Any]]] | None = None
        self.ir_module: tvm.IRModule | None = None
        self._vm: relax.VirtualMachine | None = None

    @property
    def vm(self) -> relax.VirtualMachine:
        """The Relax VM, made on first use (making it fills the executable's constants' memory scopes, which
        TVM then logs as "Scope Saving" lines when the executable is saved: an export before any run is quiet)."""
        if self._vm is None:
            self._vm = relax.VirtualMachine(self.executable, tvm.cpu())
        return self._vm

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

    def layer_instructions(self, i: int) -> list[Any] | None:
        """The instructions of layer ``i`` in its region's stream (None: the layer is not on the NPU)."""
        for stream in self.streams:
            secs = [s for s in stream.meta["layers"] if s["index"] == i]
            if secs:
                return [ins for s in secs for ins in stream.instrs[s["start"]:s["end"]]]
        return None

    def _section_reports(self) -> list[list[dict[str, Any]]]:
        """Per stream, the cycle model's static (perf mode) report of each section; computed once."""
        if self._static is None:
            self._static = [simulate(st, None, self.config, mode="perf").report["sections"] for st in self.streams]
        return self._static

    def _stream_sections(self) -> dict[int, dict[str, Any]]:
        """Per NPU layer index: its sections of the stream summed (a layer's explicit PERMUTE section counts
        for the layer)."""
        out: dict[int, dict[str, Any]] = {}
        for stream, reps in zip(self.streams, self._section_reports()):
            for sec, r in zip(stream.meta["layers"], reps):
                row = out.setdefault(sec["index"], {"cycles": 0, "instructions": 0, "gathered_loads": 0,
                                                    "permutes": 0})
                row["cycles"] += r["cycles"]
                row["instructions"] += sec["end"] - sec["start"]
                row["gathered_loads"] += sec["gathered_loads"]
                row["permutes"] += bool(sec.get("permute"))
                if not sec.get("permute"):
                    row["lowering"] = sec["lowering"]
        return out

    def report(self) -> dict[str, Any]:
        """Per-layer device, cycles (the cycle model's static estimate of the stream), µs, MAC utilisation,
        ``lowering`` ("tir": through target_npu.codegen, "build_layer": hw_model directly, None: CPU),
        and per region its stream: instructions, gathered loads and their cycles, DRAM bytes."""
        secs = self._stream_sections()
        rows = []
        for i, ly in enumerate(self.layers):
            sec = secs.get(i)
            cyc = 0 if sec is None else int(sec["cycles"])
            macs = ly.macs()
            gvec = ly.isg_groups
            # a layer in no stream and not kept on the CPU was removed from the graph (dead code)
            device = "npu" if sec is not None else "cpu" if i in self.cpu_reasons or ly.kind == "input" else "removed"
            rows.append({"name": ly.name, "source": ly.source, "kind": ly.kind, "device": device,
                         "instructions": 0 if sec is None else sec["instructions"],
                         "out_shape": list(ly.out_shape), "macs": macs, "cycles": cyc,
                         "us": cyc / self.config.clock_mhz,
                         "mac_utilisation": macs / (cyc * self.config.macs_per_cycle) if macs and cyc else 0.0,
                         "cpu_reason": self.cpu_reasons.get(i) if device == "cpu" else None,
                         "isg_groups_used": 0 if gvec is None else int(len(np.unique(gvec))),
                         "gathered_loads": 0 if sec is None else sec["gathered_loads"],
                         "permutes": 0 if sec is None else sec["permutes"],
                         "lowering": None if sec is None else sec["lowering"]})
        total = sum(r["cycles"] for r in rows)
        streams = [stream_summary(st, reps, self.config) for st, reps in zip(self.streams, self._section_reports())]
        return {"target": self.target, "layers": rows, "total_cycles": total,
                "total_us": total / self.config.clock_mhz,
                "fallbacks": [{"tensor": n, "op": "qdq", "reason": r} for n, r in self.fallbacks]
                + [{"tensor": self.layers[i].out_name or self.layers[i].name, "op": self.layers[i].name, "reason": r}
                   for i, r in sorted(self.cpu_reasons.items())],
                "permutes": dict(self.permutes), "streams": streams,
                "stream_instructions": sum(s["instructions"] for s in streams),
                "explicit_permutes": sum(s["permutes"] + s["gathering_layers"] for s in streams),
                "explicit_permute_cycles": sum(s["reorder_cycles"] for s in streams),
                "dram_peak_bytes": sum(s["memory"].get("dram_bytes", 0) for s in streams)}

    def offload_summary(self) -> dict[str, Any]:
        """How much of the model the NPU runs: layers and MACs on the NPU of those folded (the input quantizer
        excluded), the share of MACs, and the CPU reasons ranked by the MACs they keep off the NPU."""
        # from the partition alone (no cycle simulation): a layer is on the NPU, on the CPU with a reason, or
        # removed from the graph (dead code), as report() classifies it
        kept = [i for i, ly in enumerate(self.layers) if ly.kind != "input" and (self.npu[i] or i in self.cpu_reasons)]
        macs = sum(self.layers[i].macs() for i in kept)
        npu = [i for i in kept if self.npu[i]]
        npu_macs = sum(self.layers[i].macs() for i in npu)
        reasons: dict[str, list] = {}
        for i in kept:
            if not self.npu[i]:
                entry = reasons.setdefault(str(self.cpu_reasons[i]), [0, []])
                entry[0] += self.layers[i].macs()
                entry[1].append(self.layers[i].source or self.layers[i].name)
        n_qdq = len(self.fallbacks)
        share = npu_macs / macs if macs else 0.0
        line = (f"{len(npu)} of {len(kept)} layers ({100 * share:.1f} % of MACs) on the NPU"
                + (f"; {n_qdq} QDQ chain(s) left in float on the CPU" if n_qdq else ""))
        return {"npu_layers": len(npu), "layers": len(kept), "npu_macs": npu_macs, "macs": macs, "mac_share": share,
                "qdq_fallbacks": n_qdq, "line": line,
                "top_reasons": sorted(([m, why, names] for why, (m, names) in reasons.items()), reverse=True)}

    def export(self, path: str | Path) -> Path:
        """Write a ``.tar`` (see ``target_npu.artifact``): the region streams as stored, the layer
        descriptions (CPU layers, report), the host executable."""
        from target_npu.artifact import save_artifact

        descs, constants = [], {}
        for i, ly in enumerate(self.layers):
            desc, arrays = layer_record(ly)
            constants.update({f"{i}.{k}": v for k, v in arrays.items()})
            descs.append({**desc, "tiling": None if self.tilings[i] is None else self.tilings[i].to_dict()})
        programs = {"regions": [{"region": r.to_dict(), "stream": json.loads(st.to_json())}
                                for r, st in zip(self.regions, self.streams)]}
        meta = {"inputs": self.inputs, "prefix": self.prefix, "target": self.target,
                "fallbacks": [list(f) for f in self.fallbacks], "layers": descs,
                "permutes": self.permutes, "cpu_reasons": {str(k): v for k, v in self.cpu_reasons.items()}}
        host_ir = None if self.ir_module is None else tvm.ir.save_json(self.ir_module)
        return save_artifact(path, config=self.config, meta=meta, programs=programs, constants=constants,
                             report=self.report(), executable=self.executable, host_ir=host_ir)


def stream_summary(stream: Program, rep: list[dict[str, Any]], cfg: NPUConfig) -> dict[str, Any]:
    """What a region's stream holds and costs (``rep``: its section reports, perf mode): instructions; the
    explicit channel reorders (PERMUTE sections, and layers that gather an input) with their cycles (a
    PERMUTE's whole section, a gathered LOAD's extra over a plain LOAD of the same bytes); the DRAM plan."""
    secs = stream.meta["layers"]
    perm_cycles = sum(r["cycles"] for s, r in zip(secs, rep) if s.get("permute"))
    gathers = [i for s in secs if not s.get("permute") for i in stream.instrs[s["start"]:s["end"]]
               if isinstance(i, Load) and i.gather]
    extra = sum(instr_cost(i, stream, cfg)[1] - instr_cost(dataclasses.replace(i, gather=""), stream, cfg)[1]
                for i in gathers)
    return {"symbol": stream.meta["symbol"], "layers": sum(not s.get("permute") for s in secs),
            "instructions": len(stream.instrs), "permutes": sum(bool(s.get("permute")) for s in secs),
            "gathering_layers": sum(s["gathered_loads"] > 0 for s in secs if not s.get("permute")),
            "gathered_loads": len(gathers), "reorder_cycles": int(perm_cycles + extra),
            "memory": dict(stream.meta.get("memory", {}))}


def load(path: str | Path, trust: bool = False) -> CompiledModel:
    """Read a model written by :meth:`CompiledModel.export`: the streams are run as stored (validated
    against the artifact's ``NPUConfig`` and their memory map), never rebuilt. The host graph is
    rebuilt from the stored Relax IR after checking it calls only this model's functions (no code from
    the file runs); ``trust=True`` loads the stored native ``host.so`` instead (faster, runs its code)."""
    from hw_model.layer_specs import Tiling
    from target_npu.artifact import ArtifactError, load_artifact

    art = load_artifact(path, trust=trust)
    layers, tilings = [], []
    try:
        for i, p in enumerate(art.meta["layers"]):
            arrays = {k.split(".", 1)[1]: v for k, v in art.constants.items() if k.split(".", 1)[0] == str(i)}
            layers.append(layer_from_record(p, arrays))
            tilings.append(None if p.get("tiling") is None else Tiling(**p["tiling"]))
        regions, streams = [], []
        for k, rec in enumerate(art.programs["regions"]):
            region = Region.from_dict(rec["region"])
            stream = Program.from_json(json.dumps(rec["stream"]))
            stream.validate(art.config)
            if stream.meta.get("symbol") != region.symbol or \
                    [s["index"] for s in stream.meta["layers"] if not s.get("permute")] != region.layers:
                raise ValueError(f"stream {k} does not match region {region.symbol}")
            regions.append(region)
            streams.append(stream)
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: the stored NPU streams are invalid: {e}") from None
    if trust:
        host, ir_module = art.load_host_module(), None
    else:
        host, ir_module = art.build_host_module()
    cm = CompiledModel(host, layers, art.meta["prefix"], art.config, art.meta["inputs"],
                       art.meta["target"], [tuple(f) for f in art.meta["fallbacks"]], art.meta.get("permutes"),
                       tilings, {int(k): v for k, v in art.meta.get("cpu_reasons", {}).items()},
                       regions=regions, streams=streams)
    cm._artifact = art  # keeps a trusted, extracted host library alive
    cm.ir_module = ir_module
    try:
        cm.vm  # noqa: B018  (made now: a host library that is no Relax executable fails at load, not at run)
    except Exception as e:  # noqa: BLE001  (whatever TVM raises for a foreign library)
        raise ArtifactError(f"{path}: the host part is not a Relax VM executable: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
    return cm


def compile(model: Any, target: str = "ioso_npu", input_shapes: dict[str, list[int]] | None = None,
            config: NPUConfig | None = None, tuning_records: str | Path | None = None,
            offload: bool = True, permute_groups: bool = True, memory_reuse: bool = True) -> CompiledModel:
    """Compile an ONNX path / ModelProto / Relax ``IRModule`` (as ``ioso_tvm.frontend.import_onnx`` makes it,
    e.g. after a user's own passes) / calibrated torch model for ``target`` (ioso_npu or llvm).

    ``offload=False`` (ioso_npu only) skips the partition: every folded layer runs on the CPU with
    ``hw_model.reference`` (the contract itself, for three-way comparisons). ``permute_groups=False``
    turns the group-permutation planner off (no producer is permuted; consumers gather their groups,
    slower) and ``memory_reuse=False`` gives every tensor its own DRAM bytes: both for measurements.
    """
    config = NPUConfig() if config is None else config
    if not isinstance(config, NPUConfig):
        raise TypeError(f"config must be an NPUConfig, got {type(config).__name__}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if tuning_records is not None and not Path(tuning_records).is_file():
        raise FileNotFoundError(f"tuning_records {str(tuning_records)!r} does not exist")
    from ioso_tvm.frontend import import_onnx, quantizer_sources  # compile-time only (a loaded artifact skips it)
    from target_npu.transform.pipeline import NPUCompileState, npu_pipeline

    if isinstance(model, tvm.IRModule):  # already imported (ioso_tvm.frontend.import_onnx): no IOSO metadata
        if "main" not in [gv.name_hint for gv in model.get_global_vars()]:
            raise ValueError("the IRModule has no 'main' function (pass the module ioso_tvm.frontend.import_onnx made)")
        proto, mod, meta = None, model, {}
        identity = tvm.ir.save_json(model).encode()
    else:
        proto = _to_onnx(model, input_shapes)
        mod, meta = import_onnx(proto, config, input_shapes)
        identity = proto.SerializeToString()
    quants = [b.var.name for blk in mod["main"].body.blocks for b in blk.bindings
              if isinstance(b.value, relax.Call) and getattr(b.value.op, "name", "") == "relax.quantize"]
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
        h = hashlib.sha256(identity + repr(config.to_dict()).encode()).hexdigest()[:16]
        prefix = f"ioso_npu.m{h}"
        state = NPUCompileState(config, prefix, {s["name"] for s in inputs}, wbits, offload=offload,
                                permute=permute_groups, tilings_of=lambda ls: _tilings(ls, tuning_records, config),
                                ctx_options={"memory_reuse": memory_reuse})
        mod = npu_pipeline(state)(mod)
        layers, fallbacks, permutes, ctx = state.layers, state.fallbacks, state.permutes, state.ctx
        _name_sources(layers, quants, [] if proto is None else quantizer_sources(proto))
        for name, why in fallbacks:
            log.info("CPU fallback for %s: %s", name, why)
        log.info("group permutation: %s", permutes)
        for i, why in sorted(ctx.rejected.items()):
            log.info("CPU fallback for layer %s: %s", layers[i].name, why)
        tilings = ctx.tilings
        reasons, regions, streams = ctx.rejected, ctx.regions, ctx.streams
        if not any(ly.kind != "input" for ly in layers):
            log.warning("no quantized layer in the model: nothing runs on the NPU (%d QDQ chain(s) could not be "
                        "folded). A float model must be quantized first: ioso-calibrate / ioso_tvm.calibrate, or "
                        "onnxruntime.quantization.quantize_static with QuantFormat.QDQ", len(fallbacks))
    else:
        prefix, permutes, tilings, reasons, regions, streams = "ioso_npu.cpu", None, [], {}, [], []
    ex = tvm.compile(mod, target="llvm")
    log.info("compiled %d NPU region(s) of %d layer(s), %d CPU fallback(s)", len(regions),
             sum(len(r.steps) for r in regions), len(fallbacks) + len(reasons))
    cm = CompiledModel(ex, layers, prefix, config, inputs, target, fallbacks, permutes, tilings, reasons,
                       regions, streams)
    cm.ir_module = mod  # the partitioned Relax module that was compiled (for inspection; not in the artifact)
    if target == "ioso_npu":
        summary = cm.offload_summary()
        log.info("%s", summary["line"])
        if layers and summary["mac_share"] < LOW_OFFLOAD:
            top = "; ".join(f"{why} ({m} MACs: {', '.join(names[:3])})" for m, why, names in summary["top_reasons"][:3])
            log.warning("only %.1f %% of the MACs run on the NPU; top reasons: %s", 100 * summary["mac_share"],
                        top or "no layer folded")
    return cm


def _name_sources(layers: list[Layer], quants: list[str], sources: list[str]) -> None:
    """Set each layer's ``source`` (the ONNX node it comes from, ``frontend.quantizer_sources``) from the order
    of the imported ``relax.quantize`` bindings; left empty when the counts disagree (an importer that folded
    a quantizer away)."""
    if len(quants) != len(sources):
        log.info("%d quantizers in Relax, %d in the ONNX graph: layers keep no ONNX names", len(quants), len(sources))
        return
    by_var = dict(zip(quants, sources))
    for ly in layers:
        ly.source = by_var.get(ly.out_name, "")


def _tilings(layers: list[Layer], records: str | Path | None, config: NPUConfig) -> list[Any]:
    """Per layer the tuned ``hw_model`` Tiling from ``records`` (None: default tiling)."""
    if records is None:
        return [None] * len(layers)
    from target_npu.tuner.records import best_tiling, load_records

    recs = load_records(records)
    out = []
    for ly in layers:
        spec = ly.spec if ly.kind == "conv" and not ly.is_linear else None
        out.append(None if spec is None else best_tiling(recs, spec, config))
    log.info("tuning records: %d of %d layer(s) tuned", sum(t is not None for t in out), len(layers))
    return out
