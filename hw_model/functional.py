"""Functional simulator: executes a validated Program bit-exactly per ``hw_model.reference``.

DRAM is one byte image per Machine (:class:`hw_model.dram.DramImage`); ``Machine.dram[name]`` is a
typed view of a region's bytes, so regions that share bytes alias as on the device.

On-chip memories are numpy arrays indexed in elements, allocated once per program run (one
Machine runs a whole region stream). Scratchpad and weight buffer hold their bytes as float32
(exact), the accumulator its integers as float64 (exact below 2^53), the constant buffer float32.
One GEMM instruction is one BLAS matmul over its whole tile (one im2col copy of its kernel taps);
large stride-1 tiles with many input channels run one BLAS call per kernel tap on a strided view
instead (no copy; measured faster there, see ``_TAPS_MIN_*``). The matmul runs in the cheapest
exact dtype: float32 when ``reduction x 255 x max|w|`` < 2^24 (every partial sum, in any order, is
an exact float32 integer; ``max|w|`` is tracked per weight-buffer LOAD), else float64, whose
2^53 bound is asserted from the reduction length. The zero point is applied as
``A @ W - zp * colsum(W)`` in float64 (equal to ``(A - zp) @ W`` in exact arithmetic; spatial
padding holds ``zp`` and so contributes 0). Accumulator values are checked against int32 where
the contract says so (D1 read, shifted value, D2, NORM input): ``OverflowError``.
The program is validated once (:meth:`hw_model.program.Program.ensure_valid`: again only if it
was changed since).
"""
from __future__ import annotations

import numpy as np

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
F32_EXACT_BOUND = 2.0**24
"""float32 has a 24-bit significand: integers below this magnitude, and sums of them that stay below, are exact."""
_OPERAND_MAX = 255  # |x - zp| of an 8-bit activation, and |x| of a stored byte
_WEIGHT_MAX = 128  # |w| of an int8 weight
_TAPS_MIN_PIXELS, _TAPS_MIN_CIN, _TAPS_MAX_WASTE = 256, 64, 1.1
"""Per-tap BLAS calls instead of one im2col GEMM when a stride-1 tile has >= 256 output pixels, >= 64 input
channels and the padded row width wastes <= 10 % (chosen from timings of ResNet-18 tiles, one thread: the
copy costs more than the small per-tap calls there; elsewhere the single GEMM wins)."""


def _view(arr: np.ndarray, base: int, shape: tuple[int, ...], strides: tuple[int, ...]) -> np.ndarray:
    """Strided view of a flat array (strides in elements, non-negative); writable. Raises TypeError if the
    view would leave ``arr`` (validated programs never do)."""
    isz = arr.itemsize
    return np.ndarray(shape, arr.dtype, buffer=arr, offset=base * isz, strides=tuple(st * isz for st in strides))


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


def _live_channels(w: np.ndarray, i: Gemm) -> int:
    """1 + the last input channel (0..15) of a one-block GEMM with a nonzero weight (weight rows (ky, kx, ic))."""
    nz = np.flatnonzero(np.any(w.reshape(i.kh * i.kw, BLOCK, -1) != 0, axis=(0, 2)))
    return int(nz[-1]) + 1 if nz.size else 1


class Machine:
    """The NPU state: the DRAM image (``image``; ``dram[name]`` = typed views of its regions) and the four
    on-chip memories."""

    def __init__(self, prog: Program, inputs: dict[str, np.ndarray], cfg: NPUConfig = DEFAULT_CONFIG) -> None:
        prog.ensure_valid(cfg)
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
        self.mem = {m: np.zeros(mem_size(m, cfg), np.float64 if m == "acc" else np.float32)
                    for m in ("spad", "wbuf", "cbuf", "acc")}
        self._wmax: list[tuple[int, int, float, int]] = []  # (lo, hi, max |value| written, load #) per wbuf LOAD
        self._live: dict[tuple, int] = {}  # _live_channels per (GEMM weight fields, wbuf LOADs it reads)
        self._nloads = 0

    def _note_wbuf(self, lo: int, hi: int, vals: np.ndarray, pad: float | None) -> None:
        """Remember max |value| a LOAD wrote to wbuf[lo:hi] (older records it covers are dropped)."""
        m = float(max(int(vals.max()), -int(vals.min()))) if vals.size else 0.0
        if pad is not None:
            m = max(m, abs(float(pad)))
        self._nloads += 1
        self._wmax = [r for r in self._wmax if not (lo <= r[0] and r[1] <= hi)] + [(lo, hi, m, self._nloads)]

    def _wbuf_loads(self, lo: int, hi: int) -> tuple[float, tuple[int, ...]]:
        """(an upper bound of |wbuf[lo:hi]|, the numbers of the LOADs whose data it holds); 0 where nothing
        was loaded (the memory starts at zero)."""
        ov = [(m, n) for a, b, m, n in self._wmax if a < hi and lo < b]
        return max((m for m, _ in ov), default=0.0), tuple(n for _, n in ov)

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
        if i.mem == "wbuf":
            padded = i.pad_top or i.pad_bottom or i.pad_left or i.pad_right
            self._note_wbuf(i.sram_addr, i.sram_addr + r * c * n, src, i.pad_value if padded else None)

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
        w = _mat(wbuf, i.w_addr, red, ncol, i.w_row_stride)
        wmax, loads = self._wbuf_loads(i.w_addr, i.w_addr + (red - 1) * i.w_row_stride + ncol)
        fast = red * _OPERAND_MAX * wmax < F32_EXACT_BOUND
        dt = np.float32 if fast else np.float64
        wd = w if fast else w.astype(np.float64)
        if i.depthwise:
            x = _view(spad, i.in_addr, (i.oh, i.ow, i.kh, i.kw, ncol),
                      (i.stride_h * rs, i.stride_w * ps, i.dil_h * rs, i.dil_w * ps, 1))
            wt = wd.reshape(i.kh, i.kw, ncol)
            res = np.zeros((i.oh, i.ow, ncol), dt)
            for a in range(i.kh):
                for b in range(i.kw):
                    res += x[:, :, a, b] * wt[a, b]
            res = res.reshape(p, ncol)
        else:
            cin = i.n_cb * BLOCK
            if i.kh == i.kw == 1 and i.stride_h == i.stride_w == 1 and ps == cin and rs == i.ow * ps:
                a = spad[i.in_addr:i.in_addr + p * cin].reshape(p, cin)
                res = (a if fast else a.astype(np.float64)) @ wd
            elif (i.stride_h == i.stride_w == 1 and rs % ps == 0 and i.kh * i.kw > 1 and p >= _TAPS_MIN_PIXELS
                  and cin >= _TAPS_MIN_CIN and rs // ps <= _TAPS_MAX_WASTE * i.ow):
                res = self._gemm_taps(i, wd, dt)
            else:
                # channels j >= c of a single input block with all-zero weights (a model input of 3 channels
                # padded to 16) add exact zeros: leave them out of the copy and the matmul
                c = BLOCK
                if i.n_cb == 1 and p >= _TAPS_MIN_PIXELS:
                    key = (i.w_addr, i.w_row_stride, i.kh, i.kw, ncol, loads)
                    c = self._live.get(key) or self._live.setdefault(key, _live_channels(wd, i))
                a = _view(spad, i.in_addr, (i.oh, i.ow, i.n_cb, i.kh, i.kw, c),
                          (i.stride_h * rs, i.stride_w * ps, BLOCK, i.dil_h * rs, i.dil_w * ps, 1))
                if c < BLOCK:
                    wd = wd.reshape(i.kh * i.kw, BLOCK, ncol)[:, :c]
                res = a.astype(dt, order="C").reshape(p, -1) @ wd.reshape(-1, ncol)  # one im2col copy (in dt)
        d1 = _mat(acc, i.acc_addr, p, ncol, i.acc_stride)
        if i.accumulate:
            d1 += res
        else:
            d1[...] = res
        if i.zp:  # float64: exact (integers below 2^53)
            d1 -= i.zp * w.sum(axis=0, dtype=np.float64)

    def _gemm_taps(self, i: Gemm, w: np.ndarray, dt: type) -> np.ndarray:
        """Stride-1 GEMM without im2col: per kernel tap one BLAS call on a strided (pixels, cin) view
        that runs over the padded row width (``rs / ps`` pixels); the extra columns are dropped."""
        rs, ps, cin, ncol = i.in_row_stride, i.in_pix_stride, i.n_cb * BLOCK, i.n_ob * BLOCK
        wp = rs // ps
        rows = (i.oh - 1) * wp + i.ow  # last needed pixel: stays inside the validated input span
        full = np.zeros((i.oh * wp, ncol), dt)
        wt = w.reshape(i.n_cb, i.kh, i.kw, BLOCK, ncol)
        spad = self.mem["spad"]
        for ky in range(i.kh):
            for kx in range(i.kw):
                a = _view(spad, i.in_addr + ky * i.dil_h * rs + kx * i.dil_w * ps, (rows, cin), (ps, 1))
                full[:rows] += (a if dt is np.float32 else a.astype(dt)) @ wt[:, ky, kx].reshape(cin, ncol)
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
        # ref.norm + ref.act_quant in place: float64 -> float32 rounds an integer as int32 -> float32 does;
        # multiply, then add (two float32 roundings); round half to even; clip (spad holds the byte's value)
        t = d2.astype(np.float32)
        t *= cb[i.m_addr:i.m_addr + i.cols]
        t += cb[i.b_addr:i.b_addr + i.cols]
        np.clip(np.rint(t, out=t), i.lo, i.hi, out=t)
        _mat(self.mem["spad"], i.out_addr, i.rows, i.cols, i.out_stride)[...] = t

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
        s = self._window(i).sum(axis=(2, 3), dtype=np.float64) - float(i.zp) * i.kh * i.kw
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
