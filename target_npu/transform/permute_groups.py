"""Group permutation planning: make each layer's ISG groups contiguous in whole 16-channel blocks.

Contract (``hw_model.reference``): after permutation the scaled groups come first (by
index), then the unity groups; every group covers whole ``cfg.granularity`` blocks except
one, which holds the remainder and is placed last.

Planning works on channel spaces: tensors joined by per-channel-transparent layers
(max pool, global average pool, residual add, depthwise conv) share one channel order, so
they form one class (union-find). A dense conv / linear output starts a new class whose
order its producer may choose freely by permuting its output channels (weights, NORM m, b).
Per class the planner takes the wish (stable sort by group rank) of the consumer with the
most MACs; every other ISG consumer whose groups are not contiguous under that order reads
its input with a gathered load (channel-index list; counted in ``gathered_loads``). A class
holding a graph input or a tensor read by the CPU (graph outputs, fallbacks) keeps the
original order, so no explicit permute is ever inserted (``permutes_needed`` counts the
classes that would have needed one and were served with gathered loads instead).

:func:`apply_plan` rewrites the layers' constants; the permuted layers compute exactly what
the unpermuted ones do (tested in tests/test_passes_permute.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import tvm
from tvm import relax

from hw_model.config import NPUConfig

TRANSPARENT = ("maxpool", "gap", "add")


@dataclass
class Plan:
    """Per tensor (Relax var name) the channel order: ``perm[i]`` = original channel at position i."""

    perms: dict[str, np.ndarray] = field(default_factory=dict)
    gathered: set[str] = field(default_factory=set)  # consumer layer names with a gathered load
    permutes_needed: int = 0
    granularity_violations: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"permutes_needed": self.permutes_needed, "gathered_loads": len(self.gathered),
                "permuted_tensors": sum(not np.array_equal(p, np.arange(p.size)) for p in self.perms.values())}


def external_tensors(mod: tvm.IRModule, layers: list) -> set[str]:
    """Names of the vars of ``main`` read by anything but the layers' integer forms (CPU ops, outputs)."""
    func = mod["main"]
    roots = {ly.out_name for ly in layers}
    prefixes = tuple(f"{ly.name}_" for ly in layers)
    used: set[str] = set()
    for blk in func.body.blocks:
        for b in blk.bindings:
            name = b.var.name
            if name in roots or name.startswith(prefixes):
                continue
            used |= {x.name for x in relax.analysis.free_vars(b.value)}
    used |= {x.name for x in relax.analysis.free_vars(func.body.body)}
    return used


def group_rank(cfg: NPUConfig) -> np.ndarray:
    """Rank of each group in ``cfg.accumulation_order`` (scaled groups by index, then unity)."""
    order = list(cfg.accumulation_order)
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return rank


def wished_order(gvec: np.ndarray, cfg: NPUConfig) -> np.ndarray:
    """Channel order that puts the groups in accumulation order, remainder group last."""
    gvec = np.asarray(gvec)
    rank = group_rank(cfg)[gvec]
    counts = np.bincount(gvec, minlength=cfg.num_groups)
    rem = [g for g in range(cfg.num_groups) if counts[g] % cfg.granularity]
    if len(rem) == 1:
        rank = np.where(gvec == rem[0], cfg.num_groups, rank)  # the remainder group goes last
    return np.argsort(rank, kind="stable")


def is_contiguous(gvec: np.ndarray, cfg: NPUConfig) -> bool:
    """True if ``gvec`` (in stored order) already has the contract's block layout."""
    gvec = np.asarray(gvec)
    return np.array_equal(gvec, gvec[wished_order(gvec, cfg)])


def _dense(ly) -> bool:
    return ly.kind == "conv" and (ly.is_linear or ly.spec.groups == 1)


def _depthwise(ly) -> bool:
    return ly.kind == "conv" and not ly.is_linear and ly.spec.groups > 1 \
        and ly.spec.groups == np.shape(ly.spec.weight)[0] and np.shape(ly.spec.weight)[1] == 1


def _spatial(ly) -> int:
    """Input pixels per channel a linear layer flattens (1 for convs)."""
    shape = [int(d) for d in ly.inputs[0].ty.shape]
    return int(np.prod(shape[2:])) if len(ly.out_shape) == 2 and len(shape) == 4 else 1


def plan_permutations(layers: list, external: set[str], input_names: set[str], cfg: NPUConfig) -> Plan:
    """Choose one channel order per tensor; ``external``: tensors read outside the NPU layers."""
    parent: dict[str, str] = {}

    def find(t: str) -> str:
        parent.setdefault(t, t)
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    names = {id(v): v.name for ly in layers for v in ly.inputs}
    fixed_t = set(external) | set(input_names)
    for ly in layers:
        find(ly.out_name)
        if ly.kind in TRANSPARENT or _depthwise(ly):
            for v in ly.inputs:
                parent[find(names[id(v)])] = find(ly.out_name)
        elif ly.kind == "input":
            fixed_t.add(ly.out_name)
        elif ly.kind == "conv" and not _dense(ly):  # grouped (not depthwise): keep both orders
            fixed_t |= {ly.out_name, names[id(ly.inputs[0])]}
        elif _dense(ly) and _spatial(ly) > 1:  # linear on a flattened C x H x W input
            fixed_t.add(names[id(ly.inputs[0])])
    fixed = {find(t) for t in fixed_t}
    plan = Plan()
    classes: dict[str, list] = {}
    for ly in layers:
        if _dense(ly):
            classes.setdefault(find(names[id(ly.inputs[0])]), []).append(ly)
        if ly.kind == "conv":
            counts = np.bincount(ly.isg_groups, minlength=cfg.num_groups)
            if sum(c % cfg.granularity != 0 for c in counts) > 1:
                plan.granularity_violations.append(ly.name)
    chosen: dict[str, np.ndarray] = {}
    for root, consumers in classes.items():
        isg = [c for c in consumers if len(np.unique(c.isg_groups)) > 1]
        if not isg:
            continue
        best = max(isg, key=lambda c: c.macs())
        perm = wished_order(best.isg_groups, cfg)
        if root in fixed:
            perm = np.arange(perm.size)
            if not is_contiguous(best.isg_groups, cfg):
                plan.permutes_needed += 1
        chosen[root] = perm
        for c in isg:
            if not is_contiguous(c.isg_groups[perm], cfg):
                plan.gathered.add(c.name)
    for ly in layers:
        r = find(ly.out_name)
        if r in chosen and r not in fixed:
            plan.perms[ly.out_name] = chosen[r]
    return plan


def apply_plan(layers: list, plan: Plan) -> list:
    """Layers with permuted specs (new objects); each consumer keeps its own original order."""
    names = {id(v): v.name for ly in layers for v in ly.inputs}
    out = []
    for ly in layers:
        spec = ly.spec
        po = plan.perms.get(ly.out_name)
        if ly.kind == "conv":
            pin = plan.perms.get(names[id(ly.inputs[0])])
            gvec = ly.isg_groups
            if pin is not None and _dense(ly):
                spec = replace(spec, weight=np.asarray(spec.weight)[:, pin], isg_groups=gvec[pin])
            elif pin is not None:  # depthwise: input and output share the order
                spec = replace(spec, isg_groups=gvec[pin])
            if po is not None:
                spec = replace(spec, weight=np.asarray(spec.weight)[po], m=np.asarray(spec.m)[po],
                               b=np.asarray(spec.b)[po])
        out.append(replace(ly, spec=spec))
    return out
