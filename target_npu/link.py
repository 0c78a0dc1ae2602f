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

from hw_model.builder import identity_slots
from hw_model.isa import Load, Program, Region, Store, Sync
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
                return tuple(int(d) for d in (ly.consts["in_shape"] if pos == 0 else ly.out_shape))
    raise LinkError(f"region {region.symbol}: input {ref} is read by no layer")


def _stored_size(shape: tuple[int, ...], slots: np.ndarray) -> int:
    return int(np.prod((shape[0], *shape[2:]))) * int(slots.size)


def _rename(ins: Any, names: dict[str, str]) -> Any:
    if isinstance(ins, Load):
        return dataclasses.replace(ins, region=names[ins.region], gather=names[ins.gather] if ins.gather else "")
    if isinstance(ins, Store):
        return dataclasses.replace(ins, region=names[ins.region])
    return dataclasses.replace(ins)


def link_region(region: NPURegion, layers: list[Any], build: Callable[[int, list[np.ndarray]], Program],
                reuse: bool = True) -> Program:
    """The one program of ``region``; ``build(layer_index, in_slots)`` makes a layer's program for the
    stored layouts of its inputs (raises ValueError when a layer cannot be built)."""
    tensors: dict[str, tuple[str, np.ndarray, tuple[int, ...], str]] = {}  # ref -> (dram name, slots, shape, dtype)
    regions: dict[str, Region] = {}
    instrs: list[Any] = []
    sections: list[dict[str, Any]] = []
    inputs: dict[str, Any] = {}
    outputs_of = set(region.outputs)
    for j, step in enumerate(region.steps):
        ly = layers[step.layer]
        for pos, ref in enumerate(step.inputs):
            if ref not in tensors:  # a region input: the host writes it in channel order, padded
                shape = ref_shape(region, ref, layers)
                dtype = ly.consts["in_dtypes"][pos]
                name = f"in{ref.partition(':')[2]}"
                tensors[ref] = (name, identity_slots(shape[1]), shape, dtype)
                inputs[name] = {"shape": list(shape), "dtype": dtype, "slots": tensors[ref][1].tolist()}
        prog = build(step.layer, [tensors[r][1] for r in step.inputs])
        names: dict[str, str] = {}
        for (rname, info), ref in zip(prog.meta["inputs"].items(), step.inputs, strict=True):
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
        shape = tuple(int(d) for d in ly.out_shape)
        tensors[f"step:{j}"] = (tname, np.asarray(out["slots"], np.int64), shape, ly.out_dtype)
        for rname, r in prog.regions.items():
            if rname not in names:
                names[rname] = f"L{j}.{rname}"
            new = names[rname]
            if new in regions:
                continue
            kind = r.kind if r.kind in ("const", "scratch") else \
                "input" if new.startswith("in") else "output" if f"step:{j}" in outputs_of else "scratch"
            regions[new] = Region(new, r.dtype, r.size, kind, r.data)
        start = len(instrs)
        body = [_rename(i, names) for i in prog.instrs]
        if instrs:  # barrier: layer j reads nothing before layer j-1 has stored everything
            last_store = max(k for k, i in enumerate(instrs) if isinstance(i, Store))
            first_load = next(k for k, i in enumerate(body) if isinstance(i, Load))
            if instrs[last_store].push_prev or body[first_load].pop_next:
                raise LinkError(f"region {region.symbol}: layer {ly.name} uses the barrier's token flags")
            instrs[last_store] = dataclasses.replace(instrs[last_store], push_prev=True)
            body[first_load] = dataclasses.replace(body[first_load], pop_next=True)
            body.insert(0, Sync(pop_next=True, push_prev=True))
        instrs += body
        sections.append({"name": ly.name, "index": step.layer, "start": start, "end": len(instrs),
                         "macs": int(prog.meta.get("macs", 0)), "groups": int(prog.meta.get("groups", 0)),
                         "gathered_loads": int(prog.meta.get("gathered_loads", 0)),
                         "lowering": "tir" if "tir" in prog.meta else "build_layer"})
    outputs = []
    for ref in region.outputs:
        tname, slots, shape, dtype = tensors[ref]
        if regions[tname].kind != "output":
            raise LinkError(f"region {region.symbol}: output {ref} is not a layer output of the region")
        outputs.append({"region": tname, "shape": list(shape), "dtype": dtype, "slots": slots.tolist()})
    meta = {"layer": "region", "symbol": region.symbol, "inputs": inputs, "outputs": outputs, "layers": sections,
            "macs": sum(s["macs"] for s in sections),
            "gathered_loads": sum(s["gathered_loads"] for s in sections)}
    linked = Program(instrs, regions, meta)
    linked.meta["memory"] = plan_memory(linked, reuse).to_dict()
    return linked


def pack(x: np.ndarray, info: dict[str, Any]) -> np.ndarray:
    """Host -> DRAM at the region boundary: (N, C, H, W) or (N, C) -> flat NHWC in the stored slots."""
    from hw_model.builder import pack_nhwc

    x = np.asarray(x)
    if list(x.shape) != list(info["shape"]) or str(x.dtype) != info["dtype"]:
        raise ValueError(f"region input: expected {info['dtype']}{info['shape']}, got {x.dtype}{list(x.shape)}")
    x4 = x if x.ndim == 4 else x.reshape(*x.shape, 1, 1)
    return pack_nhwc(x4, np.asarray(info["slots"], np.int64))


def unpack(flat: np.ndarray, info: dict[str, Any]) -> np.ndarray:
    """DRAM -> host at the region boundary: flat NHWC in the stored slots -> the logical shape."""
    from hw_model.builder import unpack_nhwc

    shape = list(info["shape"])
    shape4 = shape if len(shape) == 4 else [*shape, 1, 1]
    return unpack_nhwc(flat, tuple(shape4), np.asarray(info["slots"], np.int64)).reshape(shape)
