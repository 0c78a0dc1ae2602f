"""Geometry of the TIR emitter (:mod:`target_npu.emit`): copy boxes as affine images of the loops, DRAM
bindings of the PrimFunc's arguments and their 3-D DMA fields, on-chip tiles and their addresses."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from hw_model.isa import mem_size
from target_npu.codegen import Aff, Blk, Nest, at, blocks
from target_npu.schedule import NotLowerable


class EmitError(NotLowerable):
    """The TIR does not have the shape the emitter maps onto instructions."""


def box(b: Blk, env: dict[str, int]) -> list[tuple[int, int]]:
    """(start, extent) per destination dim of a copy at ``env`` (the tile and step loops bound)."""
    exts = dict(b.loops[b.step:])
    out = []
    for a in b.dst_idx:
        lo = at(a, env)
        out.append((lo, 1 + sum(c * (exts[v] - 1) for v, c in a[1].items() if v in exts)))
    return out


def src_box(b: Blk, dbox: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Image of a destination box in the source buffer's coordinates (coefficients are non-negative)."""
    out = []
    for const, co in b.src_idx:
        lo = const + sum(c * dbox[int(v[1:])][0] for v, c in co.items())
        hi = const + sum(c * (dbox[int(v[1:])][0] + dbox[int(v[1:])][1] - 1) for v, c in co.items())
        out.append((lo, hi - lo + 1))
    return out


def src_point(b: Blk, point: list[int]) -> list[int]:
    return [const + sum(c * point[int(v[1:])] for v, c in co.items()) for const, co in b.src_idx]


def dense_strides(exts: list[int]) -> list[int]:
    out, s = [], 1
    for e in reversed(exts):
        out.append(s)
        s *= e
    return out[::-1]


def tiles(nest: Nest) -> list[dict[str, int]]:
    """Every output tile as the tile loops' values, in loop order."""
    names = [n for n, _ in nest.tile_loops]
    return [dict(zip(names, v, strict=True)) for v in itertools.product(*(range(e) for _, e in nest.tile_loops))]


def clip_exts(b: Blk, env: dict[str, int], bounds: list[tuple[Aff, int]]) -> dict[str, int]:
    """Extents of ``b``'s loops, each clipped so that every bounded index (affine form, exclusive upper
    bound) stays below its bound (the index at the loop's value with the other loops at 0)."""
    exts = dict(b.loops[b.step:])
    for aff, hi in bounds:
        base = at(aff, env)
        for v, c in aff[1].items():
            if v in exts and c > 0:
                exts[v] = max(0, min(exts[v], (hi - 1 - base) // c + 1))
    return exts


def mem_check(mem: str, need: int, cfg: Any) -> None:
    if need > mem_size(mem, cfg):
        raise EmitError(f"staged buffers need {need} elements of {mem}, it holds {mem_size(mem, cfg)}")


# ------------------------------------------------------------------------------------------ emission
PAD_DIMS = (1, 2)
"""Guard bounds on these dims of a MAC's activation stage (n, row, column, block, lane) are the LOAD's
padding (rows, columns); guard bounds elsewhere clip the consumers' loops (a group's real blocks)."""
OPERAND_MEM = {"ioso_npu_mac16x16": {"A": "spad", "B": "wbuf"}, "ioso_npu_dwmac16": {"A": "spad", "B": "wbuf"},
               "ioso_npu_norm_act_quant": {"M": "cbuf", "Bias": "cbuf", "C": "spad"}}
"""Memory of each staged operand of an intrinsic (everything else of a call is in acc)."""


@dataclass
class Binding:
    """A PrimFunc argument in DRAM: region, element offset, strides per dim; ``gather`` = table region
    (the innermost ``gdims`` dims are gathered through it)."""

    region: str
    offset: int
    strides: list[int]
    gather: str = ""
    gdims: int = 0


@dataclass
class Staged:
    """A copy's tile on chip at one step: the copy, its source box (padded), local strides, base address."""

    blk: Blk
    sbox: list[tuple[int, int]]
    pads: list[tuple[int, int]]
    lstr: list[int]
    base: int

    def addr(self, point: list[int]) -> int:
        src = src_point(self.blk, point)
        return self.base + sum((p - (lo - pb)) * s for p, (lo, _), (pb, _), s
                               in zip(src, self.sbox, self.pads, self.lstr, strict=True))


def mem_of(nest: Nest) -> dict[str, str]:
    """On-chip memory of every staged buffer, from the operands that read it."""
    out: dict[str, str] = {}
    for b in blocks(nest.body):
        if b.extern:
            key = next((k for k in OPERAND_MEM if b.extern.startswith(k)), "")
            for p, (buf, _, _) in b.ops.items():
                if buf in nest.params:
                    continue
                out.setdefault(buf, OPERAND_MEM.get(key, {}).get(p, "acc"))
    return out


def moving_loop(b: Blk, operand: str, dim: int, loops: Any, skip: tuple[str | None, ...] = ()) -> str | None:
    """The one loop of ``loops`` (minus ``skip``) that moves dim ``dim`` of ``operand`` of call site ``b``
    (None: no such loop); EmitError if two do."""
    vs = [v for v in b.ops[operand][1][dim][1] if v in loops and v not in skip]
    if len(vs) > 1:
        raise EmitError(f"{b.name}: dim {dim} of {operand} moves with loops {vs}")
    return vs[0] if vs else None


def op_point(op: tuple[str, list[Aff], list[int]], env: dict[str, int]) -> list[int]:
    return [at(a, env) for a in op[1]]


def dram_box(bind: Binding, shape: tuple[int, ...], sbox: list[tuple[int, int]], pad_dims: set[int]):
    """3-D DMA fields of a source box: (offset, gather_offset, n0, n1, n2, stride0, stride1, pad dims)."""
    nd = len(sbox)
    i = nd - 1
    run = sbox[i][1]
    stop = nd - bind.gdims if bind.gdims else 0
    while i > 0 and sbox[i][1] == shape[i] and i - 1 not in pad_dims and (not bind.gdims or i - 1 >= stop):
        i -= 1
        run *= sbox[i][1]
    if bind.gdims and i != nd - bind.gdims:
        raise EmitError("a gathered run must cover exactly the channel dims")
    outer = [[d] for d in range(i) if sbox[d][1] > 1 or d in pad_dims]
    k = len(outer) - 1
    while k > 0:  # merge contiguous neighbours without padding, innermost first
        a, b = outer[k - 1][-1], outer[k][0]
        inner = int(np.prod([sbox[d][1] for d in outer[k]])) * bind.strides[outer[k][-1]]
        if not {a, b} & pad_dims and bind.strides[a] == inner:
            outer[k - 1:k + 1] = [outer[k - 1] + outer[k]]
        k -= 1
    if len(outer) > 2:
        raise EmitError(f"box {sbox} is not a 3-D DMA")
    ns = [int(np.prod([sbox[d][1] for d in g])) for g in outer] + [1] * (2 - len(outer))
    st = [bind.strides[g[-1]] for g in outer] + [0] * (2 - len(outer))
    # a dim with no real rows (the box is all padding) reads nothing: its start counts as 0, so the offset
    # stays inside the region (as the builder writes it)
    start = [lo if ext > 0 else 0 for lo, ext in sbox]
    goff = sum(start[d] * bind.strides[d] for d in range(i, nd)) if bind.gdims else 0
    off = bind.offset + sum(start[d] * bind.strides[d] for d in range(nd)) - goff
    return off, goff, ns[0], ns[1], run, st[0], st[1], [g[0] if len(g) == 1 else -1 for g in outer]


@dataclass
class AccTile:
    """The output tile's accumulator (D2 slot, D1 region) and spad output slot: dense over the real tile."""

    obox: list[tuple[int, int]]
    d2: int
    d1: int
    d1_bufs: set[str]
    out: int
    out_buf: str

    def addr(self, buf: str, point: list[int]) -> int:
        base = self.out if buf == self.out_buf else self.d1 if buf in self.d1_bufs else self.d2
        st = dense_strides([e for _, e in self.obox])
        return base + sum((p - lo) * s for p, (lo, _), s in zip(point, self.obox, st, strict=False))


def sign_runs(signs: np.ndarray, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """(sign, first, end) of each maximal run of one value in ``signs[lo:hi]`` (channel positions)."""
    out: list[tuple[int, int, int]] = []
    for p in range(lo, hi):
        if out and out[-1][0] == int(signs[p]):
            out[-1] = (out[-1][0], out[-1][1], p + 1)
        else:
            out.append((int(signs[p]), p, p + 1))
    return out


def channel_signs(stored: np.ndarray, isg_groups: np.ndarray | None, cfg: Any) -> np.ndarray:
    """Factor sign of the ISG group of every stored channel position (a padding position takes the sign of
    the run before it, as ``hw_model.layers.channel_group_runs`` joins it): a depthwise conv's G table."""
    from hw_model.layers import channel_group_runs
    return np.array([cfg.isg_group_signs[g] for g, a, e in channel_group_runs(stored, isg_groups)
                     for _ in range(e - a)], np.int64)


def pack_weights(spec: Any, slots_in: np.ndarray, slots_out: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A conv's int8 weights in the PrimFunc's ``w`` layout ``shape``: rows (input block, ky, kx, 16) of the
    padded output channels, depthwise (ky, kx, channel); channels in the given layouts (-1: zeros)."""
    wq = spec.dense_weight()
    used_in, used_out = slots_in >= 0, slots_out >= 0
    cp, kp = slots_in.size, slots_out.size
    wd = np.zeros(shape, np.int8)
    if spec.is_depthwise:
        wd[:, :, :cp][:, :, used_in] = wq[slots_in[used_in], 0].transpose(1, 2, 0)
        return wd
    full = np.zeros((cp, spec.kh, spec.kw, kp), np.int8)
    full[np.ix_(used_in, np.arange(spec.kh), np.arange(spec.kw), used_out)] = \
        wq[slots_out[used_out]][:, slots_in[used_in]].transpose(1, 2, 3, 0)
    wd[..., :kp] = full.reshape(cp // 16, 16, spec.kh, spec.kw, kp).transpose(0, 2, 3, 1, 4)
    return wd
