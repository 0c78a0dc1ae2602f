"""Functional simulator: executes a validated Program bit-exactly per ``hw_model.reference``.

DRAM is one byte image per Machine (:class:`hw_model.dram.DramImage`); ``Machine.dram[name]`` is a
typed view of a region's bytes, so regions that share bytes alias as on the device.

On-chip memories are numpy arrays indexed in elements. Scratchpad, weight buffer and accumulator
hold their integers as float64 (exact below 2^53), so one GEMM instruction is one BLAS matmul
over its whole tile (im2col copy), or for stride-1 kernels one BLAS call per kernel tap on a
strided view (no copy); every GEMM asserts the 2^53 bound from its reduction length. The zero point is
applied as ``A @ W - zp * colsum(W)`` (equal to ``(A - zp) @ W`` in exact arithmetic; spatial
padding holds ``zp`` and so contributes 0). Accumulator values are checked against int32 where
the contract says so (D1 read, shifted value, D2, NORM input): ``OverflowError``.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from hw_model import reference as ref
from hw_model.config import DEFAULT_CONFIG, NPUConfig
from hw_model.dram import DramImage
from hw_model.isa import (
    BLOCK,
    AluAdd,
    AluMax,
    AluSum,
    Gemm,
    GroupShiftAdd,
    Load,
    NormActQuant,
    Program,
    Store,
    Sync,
    mem_size,
)

EXACT_BOUND = 2.0**53
_OPERAND_MAX = 255  # |x - zp| of an 8-bit activation
_WEIGHT_MAX = 128  # |w| of an int8 weight


def _view(arr: np.ndarray, base: int, shape: tuple[int, ...], strides: tuple[int, ...]) -> np.ndarray:
    """Strided view of a flat array (strides in elements); writable."""
    isz = arr.itemsize
    return as_strided(arr[base:], shape=shape, strides=tuple(s * isz for s in strides), writeable=True)


def _mat(arr: np.ndarray, base: int, rows: int, cols: int, stride: int) -> np.ndarray:
    if stride == cols:
        return arr[base:base + rows * cols].reshape(rows, cols)
    return _view(arr, base, (rows, cols), (stride, 1))


def _check32(a: np.ndarray, what: str, k: int) -> None:
    if a.size and (a.min() < ref.INT32_MIN or a.max() > ref.INT32_MAX):
        raise OverflowError(f"instruction #{k}: {what} leaves int32 (range {a.min():.0f}..{a.max():.0f})")


def _as_bytes(vals: np.ndarray, dtype: str) -> np.ndarray:
    """Scratchpad values read as the 8-bit ``dtype`` the instruction names (the byte is reinterpreted,
    as the hardware would: a uint8 200 read as int8 is -56)."""
    return vals.astype(np.int64).astype(np.uint8).view(dtype)


class Machine:
    """The NPU state: the DRAM image (``image``; ``dram[name]`` = typed views of its regions) and the four
    on-chip memories."""

    def __init__(self, prog: Program, inputs: dict[str, np.ndarray], cfg: NPUConfig = DEFAULT_CONFIG) -> None:
        prog.validate(cfg)
        self.prog, self.cfg = prog, cfg
        self.image = DramImage(prog)
        self.dram: dict[str, np.ndarray] = {name: self.image.view(name) for name in prog.regions}
        need = {n for n, r in prog.regions.items() if r.kind == "input"}
        unknown = set(inputs) - need
        if unknown:
            raise ValueError(f"inputs {sorted(unknown)} are not input regions of the program ({sorted(need)})")
        for name, r in prog.regions.items():
            if r.kind == "input":
                if name not in inputs:
                    raise ValueError(f"missing input region {name!r}")
                a = np.asarray(inputs[name])
                if a.dtype != np.dtype(r.dtype) or a.size != r.size:
                    raise ValueError(f"input {name!r}: expected {r.size} elements of {r.dtype}, "
                                     f"got {a.size} of {a.dtype}")
                self.dram[name][...] = a.reshape(-1)
        self.mem = {m: np.zeros(mem_size(m, cfg), np.float32 if m == "cbuf" else np.float64)
                    for m in ("spad", "wbuf", "cbuf", "acc")}

    # ------------------------------------------------------------------ instructions
    def load(self, i: Load, k: int) -> None:
        if i.gather:
            src = self._gathered(i)
        else:
            src = _view(self.dram[i.region], i.dram_offset, (i.n0, i.n1, i.n2), (i.dram_stride0, i.dram_stride1, 1))
        r, c, n = i.dst_shape()
        dst = self.mem[i.mem][i.sram_addr:i.sram_addr + r * c * n].reshape(r, c, n)
        if i.pad_top or i.pad_bottom or i.pad_left or i.pad_right:
            dst[:i.pad_top] = i.pad_value
            dst[i.pad_top + i.n0:] = i.pad_value
            dst[:, :i.pad_left] = i.pad_value
            dst[:, i.pad_left + i.n1:] = i.pad_value
        dst[i.pad_top:i.pad_top + i.n0, i.pad_left:i.pad_left + i.n1] = src

    def _gathered(self, i: Load) -> np.ndarray:
        """(n0, n1, n2) source of a gathered LOAD: one fancy-indexing read, -1 table entries -> pad_value."""
        t = self.dram[i.gather][i.gather_offset:i.gather_offset + i.n2].astype(np.int64)
        base = (i.dram_offset + np.arange(i.n0)[:, None, None] * i.dram_stride0
                + np.arange(i.n1)[None, :, None] * i.dram_stride1)
        vals = self.dram[i.region][base + np.maximum(t, 0)]
        if (t < 0).any():
            vals = np.where(t < 0, np.float64(i.pad_value), vals)  # as the padding rows: written as a value
        return vals

    def store(self, i: Store, k: int) -> None:
        n = i.n0 * i.n1 * i.n2
        src = self.mem["spad"][i.sram_addr:i.sram_addr + n].reshape(i.n0, i.n1, i.n2)
        reg = self.dram[i.region]
        dst = _view(reg, i.dram_offset, (i.n0, i.n1, i.n2), (i.dram_stride0, i.dram_stride1, 1))
        dst[...] = src.astype(reg.dtype)

    def gemm(self, i: Gemm, k: int) -> None:
        spad, wbuf, acc = self.mem["spad"], self.mem["wbuf"], self.mem["acc"]
        p, ncol = i.oh * i.ow, i.n_ob * BLOCK
        rs, ps = i.in_row_stride, i.in_pix_stride
        red = i.w_rows()
        if 2.0 * red * _OPERAND_MAX * _WEIGHT_MAX >= EXACT_BOUND:
            raise OverflowError(f"instruction #{k} (GEMM): reduction of {red} terms may exceed 2^53 in float64")
        w = _mat(wbuf, i.w_addr, i.w_rows(), ncol, i.w_row_stride)
        if i.depthwise:
            x = _view(spad, i.in_addr, (i.oh, i.ow, i.kh, i.kw, ncol),
                      (i.stride_h * rs, i.stride_w * ps, i.dil_h * rs, i.dil_w * ps, 1))
            wt = w.reshape(i.kh, i.kw, ncol)
            res = np.zeros((i.oh, i.ow, ncol))
            for a in range(i.kh):
                for b in range(i.kw):
                    res += x[:, :, a, b] * wt[a, b]
            res = res.reshape(p, ncol)
        else:
            cin = i.n_cb * BLOCK
            if i.kh == i.kw == 1 and i.stride_h == i.stride_w == 1 and ps == cin and rs == i.ow * ps:
                a = spad[i.in_addr:i.in_addr + p * cin].reshape(p, cin)
            elif i.stride_h == i.stride_w == 1 and rs % ps == 0 and i.kh * i.kw > 1:
                res = self._gemm_taps(i, w)
                a = None
            else:
                a = _view(spad, i.in_addr, (i.oh, i.ow, i.n_cb, i.kh, i.kw, BLOCK),
                          (i.stride_h * rs, i.stride_w * ps, BLOCK, i.dil_h * rs, i.dil_w * ps, 1))
                a = np.ascontiguousarray(a).reshape(p, -1)  # one im2col copy; BLAS needs contiguous rows
            if a is not None:
                res = a @ w
        if i.zp:
            res -= i.zp * w.sum(axis=0)
        d1 = _mat(acc, i.acc_addr, p, ncol, i.acc_stride)
        if i.accumulate:
            d1 += res
        else:
            d1[...] = res

    def _gemm_taps(self, i: Gemm, w: np.ndarray) -> np.ndarray:
        """Stride-1 GEMM without im2col: per kernel tap one BLAS call on a strided (pixels, cin) view
        that runs over the padded row width (``rs / ps`` pixels); the extra columns are dropped."""
        rs, ps, cin, ncol = i.in_row_stride, i.in_pix_stride, i.n_cb * BLOCK, i.n_ob * BLOCK
        wp = rs // ps
        rows = (i.oh - 1) * wp + i.ow  # last needed pixel: stays inside the validated input span
        full = np.zeros((i.oh * wp, ncol))
        wt = w.reshape(i.n_cb, i.kh, i.kw, BLOCK, ncol)
        for ky in range(i.kh):
            for kx in range(i.kw):
                a = _view(self.mem["spad"], i.in_addr + ky * i.dil_h * rs + kx * i.dil_w * ps, (rows, cin), (ps, 1))
                full[:rows] += a @ wt[:, ky, kx].reshape(cin, ncol)
        return full.reshape(i.oh, wp, ncol)[:, :i.ow].reshape(i.oh * i.ow, ncol)

    def group_shift_add(self, i: GroupShiftAdd, k: int) -> None:
        acc = self.mem["acc"]
        d1 = _mat(acc, i.d1_addr, i.rows, i.cols, i.d1_stride)
        _check32(d1, "D1 partial sum", k)
        d = ref.group_shift_add(d1.astype(np.int64), i.sign, self.cfg.isg_shift)
        _check32(d, "shifted partial sum", k)
        d2 = _mat(acc, i.d2_addr, i.rows, i.cols, i.d2_stride)
        new = d if i.init else d2.astype(np.int64) + d
        _check32(new, "D2 accumulator", k)
        d2[...] = new

    def norm_act_quant(self, i: NormActQuant, k: int) -> None:
        d2 = _mat(self.mem["acc"], i.acc_addr, i.rows, i.cols, i.acc_stride)
        _check32(d2, "D2 accumulator", k)
        cb = self.mem["cbuf"]
        t = ref.norm(d2.astype(np.int64).astype(np.int32), cb[i.m_addr:i.m_addr + i.cols],
                     cb[i.b_addr:i.b_addr + i.cols], axis=1)
        q = ref.act_quant(t, i.lo, i.hi, np.dtype(i.out_dtype))
        _mat(self.mem["spad"], i.out_addr, i.rows, i.cols, i.out_stride)[...] = q

    def alu_add(self, i: AluAdd, k: int) -> None:
        spad, cb = self.mem["spad"], self.mem["cbuf"]
        n = i.rows * i.cols
        a = _as_bytes(spad[i.a_addr:i.a_addr + n], i.a_dtype).reshape(i.rows, i.cols)
        b = _as_bytes(spad[i.b_addr:i.b_addr + n], i.b_dtype).reshape(i.rows, i.cols)
        c = [cb[x:x + i.cols] for x in (i.ma_addr, i.mb_addr, i.bias_addr)]
        q = ref.add(a, i.a_zp, c[0], b, i.b_zp, c[1], c[2], i.lo, i.hi, np.dtype(i.out_dtype))
        spad[i.out_addr:i.out_addr + n] = q.reshape(-1)

    def _window(self, i: AluMax | AluSum) -> np.ndarray:
        rs, ps = i.in_row_stride, i.in_pix_stride
        return _view(self.mem["spad"], i.in_addr, (i.oh, i.ow, i.kh, i.kw, i.cols),
                     (i.stride_h * rs, i.stride_w * ps, rs, ps, 1))

    def alu_max(self, i: AluMax, k: int) -> None:
        n = i.oh * i.ow * i.cols
        self.mem["spad"][i.out_addr:i.out_addr + n] = self._window(i).max(axis=(2, 3)).reshape(-1)

    def alu_sum(self, i: AluSum, k: int) -> None:
        n = i.oh * i.ow * i.cols
        s = self._window(i).sum(axis=(2, 3)) - float(i.zp) * i.kh * i.kw
        _check32(s, "average pool sum", k)
        self.mem["acc"][i.out_addr:i.out_addr + n] = s.reshape(-1)

    def sync(self, i: Sync, k: int) -> None:
        """SYNC moves no data: the functional model runs in issue order anyway."""

    def run(self, on_instr=None) -> dict[str, np.ndarray]:
        """Execute every instruction in issue order (``on_instr(k, ins)`` after each); returns output regions."""
        table = {Load: self.load, Store: self.store, Gemm: self.gemm, GroupShiftAdd: self.group_shift_add,
                 NormActQuant: self.norm_act_quant, AluAdd: self.alu_add, AluMax: self.alu_max,
                 AluSum: self.alu_sum, Sync: self.sync}
        for k, ins in enumerate(self.prog.instrs):
            table[type(ins)](ins, k)
            if on_instr is not None:
                on_instr(k, ins)
        return {n: self.dram[n].copy() for n, r in self.prog.regions.items() if r.kind == "output"}


def run_program(prog: Program, inputs: dict[str, np.ndarray], cfg: NPUConfig = DEFAULT_CONFIG) -> dict[str, np.ndarray]:
    """Validate and execute ``prog`` on ``inputs`` (region name -> flat array); returns output regions."""
    if not isinstance(prog, Program):
        raise TypeError(f"run_program: expected a Program, got {type(prog).__name__}")
    return Machine(prog, inputs, cfg).run()
