"""Link the layers of an NPU region into ONE instruction stream over one DRAM image.

A region (:class:`target_npu.regions.Region`) is a dataflow of layers. :func:`link_region` builds
each layer's program for the channel layout its inputs really have in DRAM (the producer's output
layout: ``Program.meta["output"]["slots"]``; a consumer that needs another order reads it with a
gathered LOAD, which the layer emitter adds and the cycle model charges), then joins the programs:

- DRAM regions are renamed: the region's inputs ``in<k>``, the output of step j ``t<j>`` (the
  producer's STORE and the consumers' LOADs name the same tensor), constants ``L<j>.<name>``;
- between two layers a barrier: the last STORE of layer j pushes to the compute queue, a ``SYNC``
  pops it and pushes to the load queue, whose first LOAD of layer j+1 pops it, so no layer reads a
  tensor before it is in DRAM (the cycle model sees the drain);
- :func:`target_npu.memory_plan.plan_memory` gives every tensor a byte address (reuse by liveness).

``meta`` of the linked program: ``inputs`` (``in<k>`` -> shape, dtype, stored slots; what the host
writes), ``outputs`` (one record per region output: DRAM region, shape, dtype, slots; what the host
reads), ``layers`` (per layer its instruction range ``[start, end)``: the sections of the cycle
report), ``memory`` (the planner's report) and ``gathered_loads``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from hw_model.builder import ProgramBuilder, gather_table, identity_slots
from hw_model.config import NPUConfig
from hw_model.cycles import simulate
from hw_model.isa import Load, Program, Region, Store, Sync, mem_size
from target_npu.memory_plan import plan_memory
from target_npu.regions import Region as NPURegion

LinkError = ValueError


def ref_shape(region: NPURegion, ref: str, layers: list[Any]) -> tuple[int, ...]:
    """Logical (NCHW or (N, C)) shape of a region tensor ref ``in:<k>`` / ``step:<j>``."""
    kind, _, k = ref.partition(":")
    if kind == "step":
        return tuple(int(d) for d in layers[region.steps[int(k)].layer].out_shape)
    for step in region.steps:
        ly = layers[step.layer]
        for pos, r in enumerate(step.inputs):
            if r == ref:
                return tuple(int(d) for d in (ly.in_shapes[pos]))
    raise LinkError(f"region {region.symbol}: input {ref} is read by no layer")


def _stored_size(shape: tuple[int, ...], slots: np.ndarray) -> int:
    return int(np.prod((shape[0], *shape[2:]))) * int(slots.size)


def permute_program(pixels: int, stored: np.ndarray, need: np.ndarray, dtype: str, cfg: NPUConfig) -> Program:
    """An explicit PERMUTE of a DRAM tensor: ``x`` (``pixels`` x stored slots) -> ``out`` (``pixels`` x needed
    slots), as gathered LOADs into the scratchpad and plain STOREs, double buffered (a SYNC per chunk is
    the compute step between them)."""
    b = ProgramBuilder(cfg)
    b.alloc("x", dtype, pixels * stored.size, "input")
    b.alloc("out", dtype, pixels * need.size, "output")
    b.const("gather_x", gather_table(need, stored), "int32")
    chunk = max(1, min(pixels, mem_size("spad", cfg) // (2 * need.size)))
    steps = -(-pixels // chunk)
    for s in range(steps):
        p0, n = s * chunk, min(chunk, pixels - s * chunk)
        addr = (s % 2) * chunk * need.size
        b.load("x", p0 * stored.size, "spad", addr, 1, n, need.size, 0, stored.size, gather="gather_x",
               pop_next=s >= 2, push_next=True)
        b.sync(pop_prev=True, push_next=True, pop_next=s >= 2, push_prev=s + 2 < steps)
        b.store(addr, "out", p0 * need.size, 1, 1, n * need.size, 0, 0, pop_prev=True, push_prev=s + 2 < steps)
    return b.finish({"layer": "permute", "macs": 0, "groups": 0, "gathered_loads": steps,
                     "inputs": {"x": {"slots": stored.tolist(), "dtype": dtype}},
                     "output": {"region": "out", "slots": need.tolist(), "dtype": dtype}})


def _cycles(prog: Program, cfg: NPUConfig) -> int:
    return int(simulate(prog, None, cfg, mode="perf").report["cycles"])


def _rename(ins: Any, names: dict[str, str]) -> Any:
    if isinstance(ins, Load):
        return dataclasses.replace(ins, region=names[ins.region], gather=names[ins.gather] if ins.gather else "")
    if isinstance(ins, Store):
        return dataclasses.replace(ins, region=names[ins.region])
    return dataclasses.replace(ins)


class _Stream:
    """The stream under construction: DRAM regions, instructions with barriers, sections."""

    def __init__(self) -> None:
        self.regions: dict[str, Region] = {}
        self.instrs: list[Any] = []
        self.sections: list[dict[str, Any]] = []

    def append(self, prog: Program, names: dict[str, str], kinds: dict[str, str], section: dict[str, Any]) -> None:
        """Add ``prog`` with its regions renamed (``names``; unnamed ones get ``<prefix>.<name>`` from the
        section) after a barrier; ``kinds`` gives the kind of each activation tensor."""
        names = dict(names)
        for rname, r in prog.regions.items():
            new = names.setdefault(rname, f"{section['prefix']}.{rname}")
            if new not in self.regions:
                self.regions[new] = Region(new, r.dtype, r.size, kinds.get(new, r.kind), r.data)
        start = len(self.instrs)
        body = [_rename(i, names) for i in prog.instrs]
        if self.instrs:  # barrier: nothing is read before the previous layer has stored everything
            last_store = max(k for k, i in enumerate(self.instrs) if isinstance(i, Store))
            first_load = next(k for k, i in enumerate(body) if isinstance(i, Load))
            if self.instrs[last_store].push_prev or body[first_load].pop_next:
                raise LinkError(f"{section['name']}: a program uses the barrier's token flags")
            self.instrs[last_store] = dataclasses.replace(self.instrs[last_store], push_prev=True)
            body[first_load] = dataclasses.replace(body[first_load], pop_next=True)
            body.insert(0, Sync(pop_next=True, push_prev=True))
        self.instrs += body
        sec = {k: v for k, v in section.items() if k != "prefix"}
        self.sections.append({**sec, "start": start, "end": len(self.instrs),
                              "macs": int(prog.meta.get("macs", 0)), "groups": int(prog.meta.get("groups", 0)),
                              "gathered_loads": int(prog.meta.get("gathered_loads", 0))})


def _need_of(prog: Program, rname: str, stored: np.ndarray) -> np.ndarray | None:
    """The channel order a program gathers input ``rname`` into (None: it reads it as stored)."""
    table = prog.regions.get(f"gather_{rname}")
    if table is None:
        return None
    t = np.asarray(table.data, np.int64)
    return np.where(t >= 0, stored[np.maximum(t, 0)], -1)


def link_region(region: NPURegion, layers: list[Any], build: Callable[[int, list[np.ndarray]], Program],
                cfg: NPUConfig, reuse: bool = True) -> Program:
    """The one program of ``region``; ``build(layer_index, in_slots)`` makes a layer's program for the
    stored layouts of its inputs (raises ValueError when a layer cannot be built).

    A layer that gathers an input is compared, by the cycle model, with an explicit PERMUTE of that
    tensor into the order it needs (:func:`permute_program`) followed by the layer with plain loads; the
    cheaper one is linked (a layer re-reading its input per output-block tile favours the permute)."""
    tensors: dict[str, tuple[str, np.ndarray, tuple[int, ...], str]] = {}  # ref -> (dram name, slots, shape, dtype)
    st = _Stream()
    inputs: dict[str, Any] = {}
    outputs_of = set(region.outputs)
    kinds: dict[str, str] = {}
    for j, step in enumerate(region.steps):
        ly = layers[step.layer]
        for pos, ref in enumerate(step.inputs):
            if ref not in tensors:  # a region input: the host writes it in channel order, padded
                shape = ref_shape(region, ref, layers)
                dtype = ly.in_dtypes[pos]
                name = f"in{ref.partition(':')[2]}"
                tensors[ref] = (name, identity_slots(shape[1]), shape, dtype)
                kinds[name] = "input"
                inputs[name] = {"shape": list(shape), "dtype": dtype, "slots": tensors[ref][1].tolist()}
        refs = list(step.inputs)
        prog = build(step.layer, [tensors[r][1] for r in refs])
        for pos, rname in enumerate(prog.meta["inputs"]):
            tname, stored, shape, dtype = tensors[refs[pos]]
            need = _need_of(prog, rname, stored)
            if need is None or len(prog.meta["inputs"][rname]["slots"]) != stored.size:
                continue  # read as stored, or a flatten-remapped linear (its table indexes H*W*Cpad columns)
            alt = build(step.layer, [need if k == pos else tensors[r][1] for k, r in enumerate(refs)])
            pixels = int(np.prod((shape[0], *shape[2:])))
            perm = permute_program(pixels, stored, need, dtype, cfg)
            if _cycles(perm, cfg) + _cycles(alt, cfg) < _cycles(prog, cfg):
                new = f"{tname}.p{j}"
                kinds[new] = "scratch"
                st.append(perm, {"x": tname, "out": new}, kinds,
                          {"name": f"{ly.name}.permute", "index": step.layer, "prefix": f"L{j}p{pos}",
                           "lowering": "permute", "permute": True})
                tensors[f"{refs[pos]}@{j}"] = (new, need, shape, dtype)
                refs[pos] = f"{refs[pos]}@{j}"
                prog = alt
        names: dict[str, str] = {}
        for (rname, info), ref in zip(prog.meta["inputs"].items(), refs, strict=True):
            tname, slots, shape, dtype = tensors[ref]
            r = prog.regions[rname]
            want = _stored_size(shape, slots)
            same_slots = len(info["slots"]) != slots.size or list(info["slots"]) == slots.tolist()  # flatten: remapped
            if r.size != want or r.dtype != dtype or not same_slots:
                raise LinkError(f"region {region.symbol}: layer {ly.name} reads {ref} as {r.size} x {r.dtype} "
                                f"in another layout than stored ({want} x {dtype})")
            names[rname] = tname
        out = prog.meta["output"]
        tname = f"t{j}"
        names[out["region"]] = tname
        kinds[tname] = "output" if f"step:{j}" in outputs_of else "scratch"
        tensors[f"step:{j}"] = (tname, np.asarray(out["slots"], np.int64), tuple(int(d) for d in ly.out_shape),
                                ly.out_dtype)
        st.append(prog, names, kinds, {"name": ly.name, "index": step.layer, "prefix": f"L{j}",
                                       "lowering": "tir" if "tir" in prog.meta else "build_layer"})
    outputs = []
    for ref in region.outputs:
        tname, slots, shape, dtype = tensors[ref]
        if st.regions[tname].kind != "output":
            raise LinkError(f"region {region.symbol}: output {ref} is not a layer output of the region")
        outputs.append({"region": tname, "shape": list(shape), "dtype": dtype, "slots": slots.tolist()})
    meta = {"layer": "region", "symbol": region.symbol, "inputs": inputs, "outputs": outputs,
            "layers": st.sections, "macs": sum(s["macs"] for s in st.sections),
            "gathered_loads": sum(s["gathered_loads"] for s in st.sections),
            "permutes": sum(bool(s.get("permute")) for s in st.sections)}
    linked = Program(st.instrs, st.regions, meta)
    linked.meta["memory"] = plan_memory(linked, reuse).to_dict()
    return linked
