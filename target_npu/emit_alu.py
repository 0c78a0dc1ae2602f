"""Instruction stream of an element-wise add or a pool emitted by walking its scheduled, tensorized TIR
(:mod:`target_npu.schedule_alu`), in the style of :mod:`target_npu.emit` (conv).

:class:`AluEmitter` takes the walk of :func:`target_npu.codegen.walk_nest` and enumerates the output
tiles (the tile loops' extents); one tile is one pipeline step:

- each copy under the tile loops is one LOAD per step whose DRAM box is what the step's (clipped) calls
  read, except along the column dim of a window op's input (dim 2 of ``(n, row, col, block, lane)``),
  which is copied whole (the LOAD moves whole padded rows); the guard bounds on rows / columns of a
  window input become the LOAD's padding, the guard's else value its pad value; a copy read by an op
  whose stored input layout differs is gathered (``Binding.gather``);
- each copy before the tile loops (the PrimFunc's prologue: constants that every step reads) is loaded
  once, with the first step, into one slot; contiguous ones (in DRAM and on chip) are one LOAD;
- each intrinsic call site is one instruction per step (``ALU_ADD``, ``ALU_MAX``, ``ALU_SUM``,
  ``NORM_ACT_QUANT``), whose loop fields are the extents of the loops around the call, clipped to the
  real output tile, and whose strides are the coefficients of those loops in the operand indices,
  checked against the instruction's address formula on the allocated tiles;
- the output copy is one STORE per step.

On-chip layout (as hw_model's builder lays these layers out, so the streams are the same): spad holds
``nbuf`` slots of each staged tile, either per slot ``[a | b | out]`` (``interleave``, the add) or all input
slots then all output slots (pools); cbuf holds per slot the step's constants back to back at their
clipped sizes, the prologue's at 0; acc holds one int32 tile (the window sums) dense over the real tile.
Dependency tokens: :class:`hw_model.builder.StepTokens` (every step loads and stores).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from hw_model.builder import BLOCK, ProgramBuilder, StepTokens
from target_npu.codegen import Blk, Nest, at
from target_npu.emit_boxes import (
    Binding,
    EmitError,
    Staged,
    box,
    clip_exts,
    dense_strides,
    dram_box,
    mem_check,
    moving_loop,
    src_box,
    tiles,
)

WINDOW_EXTERNS = ("ioso_npu_max16_", "ioso_npu_sum16_")
ROW, COL = 1, 2
"""Dims (row, column) of a window op's input ``(n, row, col, block, lane)``: LOAD padding goes there."""
OPERAND_MEM = {"A": "spad", "B": "spad", "M": "cbuf", "Bias": "cbuf", "MA": "cbuf", "MB": "cbuf"}
"""Memory of a staged (copied) operand of an ALU intrinsic, by parameter name."""


class AluEmitter:
    """Emit one add / pool layer's program from its walked nest (see the module docstring)."""

    def __init__(self, nest: Nest, b: ProgramBuilder, binds: dict[str, Binding], nbuf: int,
                 consts: dict[str, Any], interleave: bool) -> None:
        self.nest, self.b, self.binds, self.nb, self.k = nest, b, binds, nbuf, consts
        self.copies = [x for x in nest.body if x.dst and x.dst not in binds]
        self.calls = [x for x in nest.body if x.extern]
        stores = [x for x in nest.body if x.dst in binds]
        if len(stores) != 1 or any(isinstance(x, tuple) for x in nest.body):
            raise EmitError("an ALU nest has one output copy and no step loops inside its tile loops")
        self.store = stores[0]
        self.mem: dict[str, str] = {}
        for c in self.calls:
            for p, (buf, _, _) in c.ops.items():
                if buf not in nest.params:
                    self.mem.setdefault(buf, OPERAND_MEM.get(p, "acc") if buf != self.store.src else "spad")
        self.window = {c.ops["A"][0] for c in self.calls if c.extern.startswith(WINDOW_EXTERNS)}
        self._layout(interleave)

    def _box(self, cp: Blk, env: dict[str, int]) -> list[tuple[int, int]]:
        """The copy's box at ``env``; a window input's whole padded rows (columns of the buffer, not only
        those read)."""
        out = box(cp, env)
        if cp.dst in self.window:
            out[COL] = (0, self.nest.shapes[cp.dst][COL])
        return out

    def _layout(self, interleave: bool) -> None:
        size = {x.dst: int(np.prod([e for _, e in self._box(x, {})])) for x in self.copies + self.nest.prologue}
        size[self.store.src] = int(np.prod([e for _, e in box(self.store, {})]))
        spad = [x.dst for x in self.copies if self.mem[x.dst] == "spad"] + [self.store.src]
        self.base: dict[str, tuple[int, int]] = {}  # buf -> (address of slot 0, distance between slots)
        if interleave:
            per, o = sum(size[bf] for bf in spad), 0
            for bf in spad:
                self.base[bf], o = (o, per), o + size[bf]
        else:
            o = 0
            for bf in spad:
                self.base[bf], o = (o, size[bf]), o + self.nb * size[bf]
        mem_check("spad", self.nb * sum(size[bf] for bf in spad), self.b.cfg)
        o = 0
        for x in self.nest.prologue:
            if self.mem.get(x.dst) != "cbuf":
                raise EmitError(f"prologue copy {x.name} does not feed the constant buffer")
            self.base[x.dst], o = (o, 0), o + size[x.dst]
        self.cslot = (o, sum(size[x.dst] for x in self.copies if self.mem[x.dst] == "cbuf"))
        mem_check("cbuf", o + self.nb * self.cslot[1], self.b.cfg)
        acc = [bf for bf, m in self.mem.items() if m == "acc"]
        mem_check("acc", sum(size[self.store.src] for _ in acc), self.b.cfg)

    # ------------------------------------------------------------------ one copy
    def _reads(self, c: Blk, env: dict[str, int], exts: dict[str, int], buf: str) -> list[tuple[int, int]] | None:
        for b2, mins, ext in c.ops.values():
            if b2 == buf:
                return [(at(a, env), at(a, env) + e + sum(co * (exts[v] - 1) for v, co in a[1].items() if v in exts))
                        for a, e in zip(mins, ext, strict=True)]
        return None

    def _load(self, cp: Blk, env: dict[str, int], reads: list[list[tuple[int, int]]], addr: int) -> tuple[Staged, dict]:
        """LOAD fields and the on-chip tile of one copy at one step."""
        win = cp.dst in self.window
        dbox = self._box(cp, env)
        if reads:
            dbox = [(lo, e) if win and d == COL else
                    (max(lo, min(r[d][0] for r in reads)), min(lo + e, max(r[d][1] for r in reads)))
                    for d, (lo, e) in enumerate(dbox)]
            dbox = [x if win and d == COL else (x[0], max(0, x[1] - x[0])) for d, x in enumerate(dbox)]
        dpads, empty = [(0, 0)] * len(dbox), set()
        for d in (ROW, COL) if win else ():
            glo, ghi = cp.guard.get(d, (None, None))
            lo, e = dbox[d]
            rlo = lo if glo is None else max(lo, glo)
            rhi = lo + e if ghi is None else min(lo + e, ghi)
            if rhi <= rlo:  # all padding: the LOAD reads nothing (from row 0), the whole tile is its top padding
                dpads[d], dbox[d] = (e, 0), (lo + e, 0)
                empty.add(d)
            else:
                dpads[d], dbox[d] = (rlo - lo, lo + e - rhi), (rlo, rhi - rlo)
        sbox = src_box(cp, dbox)
        spads, pad_src, dma = [], set(), list(sbox)
        for i, (_, co) in enumerate(cp.src_idx):
            ds = [int(v[1:]) for v in co]
            spads.append(dpads[ds[0]] if len(ds) == 1 else (0, 0))
            if len(ds) == 1 and ds[0] in empty:
                dma[i] = (0, 0)
            if win and len(ds) == 1 and ds[0] in (ROW, COL):
                pad_src.add(i)
        lstr = dense_strides([pb + e + pa for (_, e), (pb, pa) in zip(sbox, spads, strict=True)])
        bind = self.binds[cp.src]
        if bind.gather:
            pad_src.add(0)  # a gathered LOAD moves one run per pixel: the pixel dim is its own DMA dim
        o, go, n0, n1, n2, s0, s1, dims = dram_box(bind, self.nest.shapes[cp.src], dma, pad_src)
        pad = [0, 0, 0, 0]  # top, left, bottom, right
        for j, d in enumerate(dims):
            if d in pad_src and win:
                pad[j], pad[j + 2] = spads[d]
        fields = dict(region=bind.region, dram_offset=o, mem=self.mem[cp.dst], sram_addr=addr, n0=n0, n1=n1, n2=n2,
                      dram_stride0=s0, dram_stride1=s1, pad=tuple(pad), pad_value=cp.fill if cp.guard and win else
                      self.k.get("pad", 0))
        if bind.gather:
            fields.update(gather=bind.gather, gather_offset=go)
        return Staged(cp, sbox, spads, lstr, addr), fields

    # ------------------------------------------------------------------ the stream
    def emit(self) -> None:
        shape = self.nest.shapes[self.store.dst]
        envs = tiles(self.nest)
        tok = StepTokens([True] * len(envs), list(range(len(envs))), self.nb, self.nb)
        staged: dict[str, Staged] = {}
        for s, env in enumerate(envs):
            slot = s % self.nb
            obox = [(lo, max(0, min(e, hi - lo))) for (lo, e), hi in zip(box(self.store, env), shape, strict=True)]
            calls = []
            for c in self.calls:
                bounds = [(a, lo + e) for buf, mins, _ in c.ops.values() if self.mem.get(buf) in ("acc", "spad")
                          and buf not in self.window and not any(cp.dst == buf for cp in self.copies)
                          for a, (lo, e) in zip(mins, obox, strict=True)]
                calls.append((c, clip_exts(c, env, bounds)))
            loads, coff = [], self.cslot[0] + slot * self.cslot[1]
            for cp in self.copies:
                reads = [r for c, x in calls if (r := self._reads(c, env, x, cp.dst)) is not None]
                cb = self.mem[cp.dst] == "cbuf"
                addr = coff if cb else self.base[cp.dst][0] + slot * self.base[cp.dst][1]
                staged[cp.dst], f = self._load(cp, env, reads, addr)
                coff += int(np.prod([e for _, e in staged[cp.dst].sbox])) if cb else 0
                loads.append(f)
            if s == 0:
                loads += self._prologue(staged)
            for j, f in enumerate(loads):
                self.b.load(**f, pop_next=j == 0 and tok.load_pop(s), push_next=j == len(loads) - 1)
            out = self.base[self.store.src][0] + slot * self.base[self.store.src][1]
            comp = [self._call(c, env, x, staged, obox, out) for c, x in calls]
            emit = {"alu_add": self.b.alu_add, "alu_max": self.b.alu_max, "alu_sum": self.b.alu_sum,
                    "naq": self.b.norm_act_quant}
            for j, (kind, f, writes_out) in enumerate(comp):
                emit[kind](**f, pop_prev=j == 0, push_prev=j == len(comp) - 1 and tok.compute_push_prev(s),
                           pop_next=writes_out and tok.out_pop(s), push_next=writes_out)
            self._store(env, shape, out, tok, s)

    def _prologue(self, staged: dict[str, Staged]) -> list[dict[str, Any]]:
        """The once-loaded constants: one LOAD per run of copies contiguous in DRAM and on chip."""
        out: list[dict[str, Any]] = []
        for cp in self.nest.prologue:
            st, f = self._load(cp, {}, [], self.base[cp.dst][0])
            staged[cp.dst] = st
            prev = out[-1] if out else None
            if prev and prev["region"] == f["region"] and prev["n0"] == prev["n1"] == f["n0"] == f["n1"] == 1 \
                    and "gather" not in f and "gather" not in prev and prev["mem"] == f["mem"] \
                    and prev["dram_offset"] + prev["n2"] == f["dram_offset"] \
                    and prev["sram_addr"] + prev["n2"] == f["sram_addr"]:
                prev["n2"] += f["n2"]
            else:
                out.append(f)
        return out

    def _store(self, env: dict[str, int], shape: tuple[int, ...], out: int, tok: StepTokens, s: int) -> None:
        cp = self.store
        dbox = [(lo, max(0, min(e, hi - lo))) for (lo, e), hi in zip(box(cp, env), shape, strict=True)]
        bind = self.binds[cp.dst]
        o, _, n0, n1, n2, s0, s1, _ = dram_box(bind, shape, dbox, {ROW, COL} if len(shape) == 5 else set())
        self.b.store(out, bind.region, o, n0, n1, n2, s0, s1, pop_prev=True, push_prev=tok.store_push(s))

    # ------------------------------------------------------------------ one call -> one instruction
    def _call(self, c: Blk, env: dict[str, int], exts: dict[str, int], staged: dict[str, Staged],
              obox: list[tuple[int, int]], out: int) -> tuple[str, dict[str, Any], bool]:
        own = [v for v, _ in c.loops]
        ost = dense_strides([e for _, e in obox])

        def addr(p: str, dim: int = -1, move: str | None = None) -> int:
            """On-chip address of operand ``p`` at the call's first element (index ``dim`` + 1, loop ``move`` at 1)."""
            buf, mins, _ = c.ops[p]
            pt = [at(a, env if move is None else {**env, move: 1}) for a in mins]
            if dim >= 0:
                pt[dim] += 1
            if buf in staged:
                return staged[buf].addr(pt)
            base = out if buf == self.store.src else 0  # the output tile in spad, else the acc tile
            return base + sum((q - lo) * s for q, (lo, _), s in zip(pt, obox, ost, strict=True))

        def moves(p: str, v: str | None) -> int:
            return 0 if v is None else addr(p, move=v) - addr(p)

        def loop_in(p: str, d: int, skip: tuple[str | None, ...] = ()) -> str | None:
            return moving_loop(c, p, d, own, skip)

        def ext(v: str | None) -> int:
            return 1 if v is None else exts[v]

        def coef(p: str, d: int, v: str | None) -> int:
            return 0 if v is None else c.ops[p][1][d][1][v]

        writes_out = c.ops["C"][0] == self.store.src
        if c.extern.startswith("ioso_npu_alu_add_"):
            lp, lcb = loop_in("C", 0), loop_in("C", 1)
            rows, cols = ext(lp), ext(lcb) * BLOCK
            for p in ("A", "B", "C"):
                if ext(lp) > 1 and moves(p, lp) != cols or ext(lcb) > 1 and moves(p, lcb) != BLOCK:
                    raise EmitError(f"{c.name}: operand {p} is not a dense (pixels, channels) tile")
            a_dt, b_dt, o_dt = c.extern.split("_")[-3:]
            return "alu_add", dict(a_addr=addr("A"), b_addr=addr("B"), out_addr=addr("C"), rows=rows, cols=cols,
                                   a_zp=self.k["a_zp"], b_zp=self.k["b_zp"], ma_addr=addr("MA"), mb_addr=addr("MB"),
                                   bias_addr=addr("Bias"), lo=self.k["lo"], hi=self.k["hi"], out_dtype=o_dt,
                                   a_dtype=a_dt, b_dtype=b_dt), writes_out
        ly, lx, lcb = loop_in("C", 1), loop_in("C", 2), loop_in("C", 3)
        rows, cols = ext(ly) * ext(lx), ext(lcb) * BLOCK
        if c.extern.startswith(WINDOW_EXTERNS):
            lr, ls = loop_in("A", ROW, (ly,)), loop_in("A", COL, (lx,))
            f = dict(in_addr=addr("A"), in_row_stride=addr("A", ROW) - addr("A"),
                     in_pix_stride=addr("A", COL) - addr("A"), out_addr=addr("C"), oh=ext(ly), ow=ext(lx), cols=cols,
                     kh=ext(lr), kw=ext(ls), stride_h=coef("A", ROW, ly) or self.k["stride"][0],
                     stride_w=coef("A", COL, lx) or self.k["stride"][1])  # no loop (one output row): moves nothing
            if (ext(lr) > 1 and coef("A", ROW, lr) != 1) or (ext(ls) > 1 and coef("A", COL, ls) != 1) \
                    or (ext(lcb) > 1 and moves("A", lcb) != BLOCK):
                raise EmitError(f"{c.name}: the window is dilated or its blocks are not adjacent (ALU windows are not)")
            if c.extern.startswith("ioso_npu_max16_"):
                return "alu_max", f, writes_out
            return "alu_sum", {**f, "zp": self.k["zp"]}, writes_out
        for p in ("A", "C"):
            pix = addr(p, COL) - addr(p)
            if ext(ly) > 1 and moves(p, ly) != ext(lx) * pix or ext(lx) > 1 and moves(p, lx) != pix \
                    or ext(lcb) > 1 and moves(p, lcb) != BLOCK:
                raise EmitError(f"{c.name}: operand {p} is not a dense (pixels, channels) tile")
        return "naq", dict(acc_addr=addr("A"), acc_stride=addr("A", COL) - addr("A"), out_addr=addr("C"),
                           out_stride=addr("C", COL) - addr("C"), rows=rows, cols=cols, m_addr=addr("M"),
                           b_addr=addr("Bias"), lo=self.k["lo"], hi=self.k["hi"],
                           out_dtype=c.extern.rsplit("_", 1)[1]), writes_out
