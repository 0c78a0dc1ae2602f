"""Instruction stream of a conv / linear layer emitted by walking its scheduled, tensorized TIR.

:class:`ConvEmitter` (geometry helpers in :mod:`target_npu.emit_boxes`) takes the walk of
:func:`target_npu.codegen.walk_nest` (tile loops; per block its loops, operand regions / copy boxes as
affine forms of the loops, copy guards, init blocks). :meth:`ConvEmitter.emit` enumerates the output
tiles in Python (the extents of the tile loops) and, per tile, runs the body in order: a loop around
copies and a call is a step loop (one pipeline step per iteration), each copy becomes a LOAD / STORE
whose DRAM box is the copy's region (clipped to what the clipped consumers read; guard bounds on rows /
columns become LOAD padding, other guard bounds clip the consumers' loops) and whose on-chip address
is a slot of a simple ``nbuf`` allocation per staged buffer; each call becomes one GEMM /
GROUP_SHIFT_ADD / NORM_ACT_QUANT (a depthwise conv's per-channel-sign shift-add: one GROUP_SHIFT_ADD
per run of one sign) whose loop fields are the extents of the loops between the step and the call
(clipped to the real output), whose strides are the coefficients of those loops in the operand
indices, checked against the instruction's address formula on the allocated tiles. Dependency tokens:
:class:`hw_model.builder.StepTokens`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from hw_model.builder import BLOCK, ProgramBuilder, StepTokens
from hw_model.isa import mem_size
from target_npu.codegen import Aff, Blk, Nest, at, blocks
from target_npu.emit_boxes import (
    PAD_DIMS,
    AccTile,
    Binding,
    EmitError,
    Staged,
    box,
    channel_signs,
    clip_exts,
    dense_strides,
    dram_box,
    mem_check,
    mem_of,
    moving_loop,
    op_point,
    pack_weights,
    sign_runs,
    src_box,
    src_point,
    tiles,
)


class ConvEmitter:
    """Emit one conv layer's program from its walked nest (see the module docstring)."""

    def __init__(self, nest: Nest, b: ProgramBuilder, binds: dict[str, Binding], nbuf: int,
                 consts: dict[str, Any]) -> None:
        self.nest, self.b, self.binds, self.nb, self.k = nest, b, binds, nbuf, consts
        self.mem = mem_of(nest)
        blks = blocks(nest.body)
        self.store = next(x for x in blks if x.dst in binds)
        self.size: dict[str, int] = {}
        for x in blks:  # slot size of a staged buffer: its largest (unclipped) box
            if x.dst and x.dst not in binds:
                self.size[x.dst] = max(self.size.get(x.dst, 0), int(np.prod([e for _, e in box(x, {})])))
            for buf, _, ext in x.ops.values():
                if self.mem.get(buf) == "acc" or buf == self.store.src:
                    self.size[buf] = max(self.size.get(buf, 0), int(np.prod(ext)) *
                                         int(np.prod([e for _, e in x.loops])))
        self.out_size = self.size[self.store.src]
        self.checked: set[Any] = set()  # call layouts whose strides were checked against the instruction
        self.n_out = 0  # STOREs emitted
        self._layout()

    def _layout(self) -> None:
        """Simple allocation: ``nbuf`` slots per group of staged buffers (activation tiles, weight tiles,
        NORM constants, output tiles, D2), one D1 region (the buffer of a MAC read by a shift-add)."""
        group: dict[str, list[str]] = {}
        for buf, mem in self.mem.items():
            if buf in self.size and mem != "acc" and buf != self.store.src:
                group.setdefault(mem, []).append(buf)
        self.slot_base: dict[str, tuple[int, int, int]] = {}  # buf -> (base, slot size, offset in slot)
        end = {"spad": 0, "wbuf": 0, "cbuf": 0}
        for mem, bufs in group.items():
            sizes = {bf: self.size[bf] for bf in bufs}
            extra = self.nb * self.out_size if mem == "spad" else 0
            if mem == "cbuf" or self.nb * sum(sizes.values()) + extra > mem_size(mem, self.b.cfg):
                # one slot set: NORM m and b side by side; tiles of one kind sharing slots when they do not fit
                slot, off = (sum(sizes.values()), True) if mem == "cbuf" else (max(sizes.values()), False)
                o = 0
                for bf in bufs:
                    self.slot_base[bf] = (end[mem], slot, o if off else 0)
                    o += sizes[bf]
                end[mem] += self.nb * slot
            else:  # its own nbuf slots per staged buffer (a group's tile stays while the others load)
                for bf in bufs:
                    self.slot_base[bf] = (end[mem], sizes[bf], 0)
                    end[mem] += self.nb * sizes[bf]
        self.out_base = end["spad"]
        end["spad"] += self.nb * self.out_size
        readers = {buf for x in blocks(self.nest.body) if x.extern.startswith("ioso_npu_shift_add")
                   for p, (buf, _, _) in x.ops.items() if p == "A"}
        self.d1 = readers
        for mem, n in end.items():
            mem_check(mem, n, self.b.cfg)
        mem_check("acc", (self.nb + (1 if readers else 0)) * self.out_size, self.b.cfg)

    # ------------------------------------------------------------------ planning: tiles -> steps
    def plan(self) -> list[dict[str, Any]]:
        """Steps of the whole layer: per step its copies and calls (with loop values), in program order.
        A copy joins the step of the first call that reads it; a call whose copies would write a slot
        already written in the current step starts a new step; a call after an init block of its output
        overwrites instead of accumulating."""
        steps: list[dict[str, Any]] = []
        shape = self.nest.shapes[self.store.dst]
        for u, env in enumerate(tiles(self.nest)):
            obox = [(lo, max(0, min(e, hi - lo))) for (lo, e), hi in zip(box(self.store, env), shape, strict=True)]
            st = {"steps": steps, "cur": None, "inits": set(), "pending": [], "tile": u, "obox": obox}
            self._run(self.nest.body, env, st)
            if st["pending"]:
                raise EmitError(f"copies {[c.name for c, _ in st['pending']]} have no reader in their tile")
        return steps

    def _run(self, items: list[Any], env: dict[str, int], st: dict[str, Any]) -> None:
        for it in items:
            if isinstance(it, tuple):
                for i in range(it[2]):
                    self._run(it[3], {**env, it[1]: i}, st)
            elif it.writes:
                st["inits"].add(it.writes)
            elif it.dst in self.binds:
                st["cur"]["store"] = (it, env)
            elif it.dst:
                st["pending"].append((it, env))
            elif it.extern:
                bufs = {buf for buf, _, _ in it.ops.values()}
                mine = [(c, e) for c, e in st["pending"] if c.dst in bufs]
                st["pending"] = [(c, e) for c, e in st["pending"] if c.dst not in bufs]
                grps = {(self.mem[c.dst], *self.slot_base[c.dst]) for c, _ in mine}
                if st["cur"] is None or grps & st["cur"]["groups"]:
                    if st["cur"] is None and not mine:
                        raise EmitError(f"call {it.name} runs before any copy of its tile")
                    st["cur"] = {"copies": [], "calls": [], "groups": set(), "store": None, "tile": st["tile"],
                                 "obox": st["obox"]}
                    st["steps"].append(st["cur"])
                st["cur"]["groups"] |= grps
                st["cur"]["copies"] += mine
                st["cur"]["calls"].append((it, env, not bufs & st["inits"]))
                st["inits"] -= bufs

    # ------------------------------------------------------------------ clipping
    def _bounds(self, c: Blk, obox: list[tuple[int, int]], staged: dict[str, Blk]) -> list[tuple[Aff, int]]:
        """Upper bounds on a call's operand indices: the real output tile (acc / output operands) and the
        non-padding guard bounds of the copies that staged its inputs."""
        out = []
        for buf, mins, _ in c.ops.values():
            if self.mem.get(buf) == "acc" or buf == self.store.src:
                out += [(a, lo + e) for a, (lo, e) in zip(mins, obox, strict=False)]
            elif buf in staged:
                cp = staged[buf]
                pads = PAD_DIMS if self.mem.get(buf) == "spad" else ()
                out += [(mins[d], hi) for d, (_, hi) in cp.guard.items() if hi is not None and d not in pads]
        return out

    @staticmethod
    def _reads(c: Blk, env: dict[str, int], exts: dict[str, int], buf: str) -> list[tuple[int, int]] | None:
        """Per dim [lo, hi) of what a (clipped) call reads of ``buf``."""
        for b2, mins, ext in c.ops.values():
            if b2 == buf:
                rng = []
                for a, e in zip(mins, ext, strict=True):
                    lo = at(a, env)
                    hi = lo + e - 1 + sum(co * (exts[v] - 1) for v, co in a[1].items() if v in exts)
                    rng.append((lo, hi + 1))
                return rng
        return None

    # ------------------------------------------------------------------ one step
    def _stage(self, cp: Blk, env: dict[str, int], reads: list[list[tuple[int, int]]], slot: int):
        """LOAD fields and the on-chip tile of one copy at one step (box clipped to what is read)."""
        dbox = box(cp, env)
        if reads:
            dbox = [(max(lo, min(r[d][0] for r in reads)), 0) for d, (lo, _) in enumerate(dbox)]
            dbox = [(lo, max(0, min(b0 + e, max(r[d][1] for r in reads)) - lo))
                    for d, ((lo, _), (b0, e)) in enumerate(zip(dbox, box(cp, env), strict=True))]
        dpads = [(0, 0)] * len(dbox)
        if self.mem[cp.dst] == "spad":
            for d in PAD_DIMS:
                glo, ghi = cp.guard.get(d, (None, None))
                lo, e = dbox[d]
                rlo = max(lo, glo) if glo is not None else lo
                rhi = min(lo + e, ghi) if ghi is not None else lo + e
                rhi = max(rhi, rlo)
                dpads[d] = (rlo - lo, lo + e - rhi)
                dbox[d] = (rlo, rhi - rlo)
        sbox = src_box(cp, dbox)
        spads, pad_src = [], set()
        for i, (_, co) in enumerate(cp.src_idx):
            ds = [int(v[1:]) for v in co]
            pd = dpads[ds[0]] if len(ds) == 1 else (0, 0)
            spads.append(pd)
            if len(ds) == 1 and ds[0] in PAD_DIMS and self.mem[cp.dst] == "spad":
                pad_src.add(i)
        lstr = dense_strides([pb + e + pa for (_, e), (pb, pa) in zip(sbox, spads, strict=True)])
        base0, size, off = self.slot_base[cp.dst]
        st = Staged(cp, sbox, spads, lstr, base0 + slot * size + off)
        bind = self.binds[cp.src]
        o, go, n0, n1, n2, s0, s1, dims = dram_box(bind, self.nest.shapes[cp.src], sbox, pad_src)
        pad = [0, 0, 0, 0]  # top, left, bottom, right
        for k, d in enumerate(dims):
            if d in pad_src:
                pad[k], pad[k + 2] = spads[d]
        if pad_src - set(dims):
            raise EmitError(f"padded dims of {cp.name} are not LOAD rows / columns")
        fields = dict(region=bind.region, dram_offset=o, mem=self.mem[cp.dst], sram_addr=st.base, n0=n0, n1=n1,
                      n2=n2, dram_stride0=s0, dram_stride1=s1, pad=tuple(pad),
                      pad_value=self.k["zp"] if self.mem[cp.dst] == "spad" else 0)
        if bind.gather:
            fields.update(gather=bind.gather, gather_offset=go)
        key = (cp.dst, slot)
        return st, fields, key, (cp.src, tuple(sbox), tuple(spads))

    def emit(self) -> None:
        steps = self.plan()
        nb = self.nb
        held: dict[Any, Any] = {}
        work = []
        for s, st in enumerate(steps):
            slot = s % nb
            by_buf = {cp.dst: cp for cp, _ in st["copies"]}
            calls = []
            for c, env, acc in st["calls"]:
                exts = clip_exts(c, env, self._bounds(c, st["obox"], by_buf))
                calls.append((c, env, acc, exts))
            staged, loads = {}, []
            for cp, env in st["copies"]:
                reads = [r for c, e, _, x in calls if (r := self._reads(c, e, x, cp.dst)) is not None]
                t, fields, key, val = self._stage(cp, env, reads, slot)
                staged[cp.dst] = t
                hk = (self.mem[cp.dst], self.slot_base[cp.dst][0], self.slot_base[cp.dst][2], slot)
                if held.get(hk) != val:
                    held[hk] = val
                    loads.append(fields)
            work.append((st, calls, staged, loads))
        out_steps = [s if w[0]["store"] is not None else None for s, w in enumerate(work)]
        tok = StepTokens([bool(w[3]) for w in work], out_steps, nb, nb)
        for s, (st, calls, staged, loads) in enumerate(work):
            for j, f in enumerate(loads):
                self.b.load(**f, pop_next=j == 0 and tok.load_pop(s), push_next=j == len(loads) - 1)
            u = st["tile"]
            acc = AccTile(st["obox"], (u % nb) * self.out_size, nb * self.out_size, self.d1,
                          self.out_base + (u % nb) * self.out_size, self.store.src)
            comp = [x for c, env, a, exts in calls for x in self._call(c, env, a, exts, staged, acc)]
            for j, (kind, f) in enumerate(comp):
                deps = dict(pop_prev=j == 0 and bool(loads), push_prev=j == len(comp) - 1 and tok.compute_push_prev(s),
                            pop_next=kind == "naq" and tok.out_pop(u), push_next=kind == "naq")
                {"gemm": self.b.gemm, "gsa": self.b.group_shift_add, "naq": self.b.norm_act_quant}[kind](**f, **deps)
            if st["store"] is not None:
                self._store(st, acc, tok)

    def _store(self, st: dict[str, Any], acc: AccTile, tok: StepTokens) -> None:
        cp, env = st["store"]
        shape = self.nest.shapes[cp.dst]
        dbox = [(lo, max(0, min(e, hi - lo))) for (lo, e), hi in zip(box(cp, env), shape, strict=True)]
        bind = self.binds[cp.dst]
        o, _, n0, n1, n2, s0, s1, _ = dram_box(bind, shape, dbox, {1, 2})
        self.b.store(acc.addr(cp.src, src_point(cp, [lo for lo, _ in dbox])), bind.region, o, n0, n1, n2, s0, s1,
                     pop_prev=True, push_prev=tok.store_push(self.n_out))
        self.n_out += 1

    # ------------------------------------------------------------------ one call -> one instruction
    def _call(self, c: Blk, env: dict[str, int], accumulate: bool, exts: dict[str, int],
              staged: dict[str, Staged], acc: AccTile) -> list[tuple[str, dict[str, Any]]]:
        inner = [v for v, _ in c.loops[c.step:]]

        memo: dict[tuple[str, str | None, int], int] = {}

        def addr(p: str, loop: str | None = None, dim: int = -1) -> int:
            """On-chip address of operand ``p``'s first element (loop ``loop`` at 1, index ``dim`` + 1)."""
            key = (p, loop, dim)
            if key not in memo:
                buf = c.ops[p][0]
                pt = op_point(c.ops[p], env if loop is None else {**env, loop: 1})
                if dim >= 0:
                    pt[dim] += 1
                memo[key] = staged[buf].addr(pt) if buf in staged else acc.addr(buf, pt)
            return memo[key]

        def step(p: str, loop: str | None) -> int:
            return 0 if loop is None else addr(p, loop) - addr(p)

        layout = (c.name, tuple(exts[v] for v in inner), tuple(tuple(staged[b].lstr) for b, _, _ in c.ops.values()
                                                                if b in staged), tuple(e for _, e in acc.obox))
        checked = layout in self.checked
        self.checked.add(layout)

        def loop_in(p: str, d: int, skip: tuple[str | None, ...] = ()) -> str | None:
            return moving_loop(c, p, d, inner, skip)

        def ext(v: str | None) -> int:
            return 1 if v is None else exts[v]

        def coef(p: str, d: int, v: str | None) -> int:
            return 1 if v is None else c.ops[p][1][d][1][v]

        ly, lx, lob = loop_in("C", 1), loop_in("C", 2), loop_in("C", 3)
        if c.extern.startswith(("ioso_npu_mac16x16", "ioso_npu_dwmac16")):
            dw = c.extern.startswith("ioso_npu_dwmac16")
            lkh, lkw = loop_in("A", 1, (ly,)), loop_in("A", 2, (lx,))
            lcb = lob if dw else loop_in("A", 3)
            f = dict(acc_addr=addr("C"), acc_stride=addr("C", dim=2) - addr("C"), in_addr=addr("A"),
                     in_row_stride=addr("A", dim=1) - addr("A"), in_pix_stride=addr("A", dim=2) - addr("A"),
                     w_addr=addr("B"), w_row_stride=addr("B", dim=2 if dw else 4) - addr("B"), n_ob=ext(lob),
                     n_cb=ext(lcb), kh=ext(lkh), kw=ext(lkw), oh=ext(ly), ow=ext(lx), stride_h=coef("A", 1, ly),
                     stride_w=coef("A", 2, lx), dil_h=coef("A", 1, lkh), dil_w=coef("A", 2, lkw),
                     zp=self.k["zp"], accumulate=accumulate, depthwise=dw)
            irs, ips, wrs, acs = f["in_row_stride"], f["in_pix_stride"], f["w_row_stride"], f["acc_stride"]
            kh, kw = f["kh"], f["kw"]
            want = {"A": {ly: f["stride_h"] * irs, lx: f["stride_w"] * ips, lkh: f["dil_h"] * irs,
                          lkw: f["dil_w"] * ips, lcb: BLOCK},
                    "B": ({lkh: kw * wrs, lkw: wrs, lob: BLOCK} if dw else
                          {lcb: kh * kw * BLOCK * wrs, lkh: kw * BLOCK * wrs, lkw: BLOCK * wrs, lob: BLOCK}),
                    "C": {ly: f["ow"] * acs, lx: acs, lob: BLOCK}}
            for p, w in ({} if checked else want).items():
                for v in inner:
                    if ext(v) > 1 and step(p, v) != w.get(v, 0):
                        raise EmitError(f"{c.name}: operand {p} moves {step(p, v)} per {v}, "
                                        f"the GEMM moves {w.get(v, 0)}")
            return [("gemm", f)]
        rows, cols = ext(ly) * ext(lx), ext(lob) * BLOCK
        for p in () if checked else ("A", "C"):
            pix = addr(p, dim=2) - addr(p)
            if (ext(ly) > 1 and step(p, ly) != ext(lx) * pix or ext(lx) > 1 and step(p, lx) != pix
                    or ext(lob) > 1 and step(p, lob) != BLOCK):
                raise EmitError(f"{c.name}: operand {p} is not a dense (pixels, channels) tile")
        if c.extern.startswith("ioso_npu_shift_add_ch"):  # one GROUP_SHIFT_ADD per run of one sign in G
            lo = at(c.ops["C"][1][3], env) * BLOCK
            d1, d2 = addr("A"), addr("C")
            return [("gsa", dict(d1_addr=d1 + a - lo, d1_stride=addr("A", dim=2) - d1, d2_addr=d2 + a - lo,
                                 d2_stride=addr("C", dim=2) - d2, rows=rows, cols=e - a, sign=sg, init=True))
                    for sg, a, e in sign_runs(self.k["signs"], lo, lo + cols)]
        if c.extern.startswith("ioso_npu_shift_add"):
            if "P" in c.ops and addr("P") != addr("C"):
                raise EmitError(f"{c.name}: the accumulator step must update D2 in place")
            *_, sign, init, _ = c.extern.split("_")
            return [("gsa", dict(d1_addr=addr("A"), d1_stride=addr("A", dim=2) - addr("A"), d2_addr=addr("C"),
                               d2_stride=addr("C", dim=2) - addr("C"), rows=rows, cols=cols,
                               sign={"neg": -1, "unit": 0, "pos": 1}[sign], init=init == "init"))]
        return [("naq", dict(acc_addr=addr("A"), acc_stride=addr("A", dim=2) - addr("A"), out_addr=addr("C"),
                             out_stride=addr("C", dim=2) - addr("C"), rows=rows, cols=cols, m_addr=addr("M"),
                             b_addr=addr("Bias"), lo=self.k["lo"], hi=self.k["hi"],
                             out_dtype=c.extern.rsplit("_", 1)[1]))]


def emit_conv(spec: Any, nest: Nest, nbuf: int, cfg: Any, in_slots: list[np.ndarray] | None,
              meta: dict[str, Any]) -> Any:
    """The program of a conv layer from its walked nest: DRAM regions (x, out, w, norm, gather_x), the
    constants packed in the PrimFunc's buffer layouts, then :class:`ConvEmitter`."""
    from hw_model.builder import channel_slots, gather_table, identity_slots
    from hw_model.layers import stored_layouts

    dw = spec.is_depthwise
    slots_in, _ = channel_slots(spec.c, spec.isg_groups, cfg)
    stored = stored_layouts(in_slots, [spec.c])[0]
    if dw:  # one group per channel: run in the stored order, nothing gathered
        slots_in = stored
    gathered = not np.array_equal(stored, slots_in)
    slots_out = slots_in if dw else identity_slots(spec.k)
    cp, kp = slots_in.size, slots_out.size
    sh = nest.shapes
    n, h, w_, cbn, _ = sh["x"]
    _, oh, ow, kb, _ = sh["store_out"]
    if kb * BLOCK != kp or cbn * BLOCK != cp:
        raise EmitError("PrimFunc buffers do not match the layer's channel layouts")
    b = ProgramBuilder(cfg)
    b.alloc("x", spec.in_dtype, n * h * w_ * stored.size, "input")
    b.alloc("out", spec.out_dtype, n * oh * ow * kp, "output")
    if gathered:
        b.const("gather_x", gather_table(slots_in, stored), "int32")
    wd = pack_weights(spec, slots_in, slots_out, sh["w"])
    b.const("w", wd, "int8")
    mlen = int(np.prod(sh["m"]))
    mb, used_out = np.zeros(2 * mlen, np.float32), slots_out >= 0
    mb[:kp][used_out] = np.asarray(spec.m, np.float32)[slots_out[used_out]]
    mb[mlen:mlen + kp][used_out] = np.asarray(spec.b, np.float32)[slots_out[used_out]]
    b.const("norm", mb, "float32")
    xs = dense_strides([n, h, w_, stored.size])[:3] + [BLOCK, 1] if gathered else dense_strides(list(sh["x"]))
    binds = {"x": Binding("x", 0, xs, "gather_x" if gathered else "", 2 if gathered else 0),
             "w": Binding("w", 0, dense_strides(list(sh["w"]))),
             "m": Binding("norm", 0, dense_strides(list(sh["m"]))),
             "b": Binding("norm", mlen, dense_strides(list(sh["b"]))),
             "store_out": Binding("out", 0, dense_strides(list(sh["store_out"])))}
    signs = channel_signs(stored, spec.isg_groups, cfg) if dw else None  # G of a depthwise conv's shift_add_ch
    ConvEmitter(nest, b, binds, nbuf, {"zp": spec.x_zp, "lo": spec.lo, "hi": spec.hi, "signs": signs}).emit()
    meta = {"layer": "conv", "inputs": {"x": {"shape": [spec.n, spec.c, spec.h, spec.w], "slots": stored.tolist(),
                                              "dtype": spec.in_dtype}},
            "output": {"region": "out", "shape": [spec.n, spec.k, oh, ow], "slots": slots_out.tolist(),
                       "dtype": spec.out_dtype},
            **meta, "gathered_loads": sum(bool(getattr(i, "gather", "")) for i in b.instrs)}
    return b.finish(meta)
