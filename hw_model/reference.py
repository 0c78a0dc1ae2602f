"""The numeric contract of the NPU, as plain numpy: the oracle every other path must equal.

Every path that claims to compute what the NPU computes agrees with these functions bit
for bit: the torch deploy mode after calibration, the functional simulator running a
compiled program, and a compiled model run through ``tvmc run``.

Tensors
    Activations are integers of 2..8 bits stored in 8 (``np.uint8`` or ``np.int8``) with a
    per-tensor float32 ``scale`` and integer zero point ``zp``: real = scale * (q - zp).
    Weights are signed integers of 2..8 bits stored in ``np.int8`` with a per output channel
    scale and zero point 0. Layouts here are NCHW / (K, C/groups, KH, KW) / (N, C) / (K, C).
    On the NPU tensors are blocked by 16 channels; padding channels are zero.

MAC operand
    The staging buffer feeds the MAC with ``x - zp`` (9-bit signed); spatial padding
    therefore contributes 0. Products ``(x - zp) * w`` are summed exactly.

ISG (input-channel scale groups)
    Every input channel c (of the layer's input tensor) has a group ``g[c]`` in
    ``0..cfg.num_groups-1``; group g scales by ``1 + cfg.isg_group_signs[g] * 2**-cfg.isg_shift``
    (default x1, x(1-2^-4), x(1+2^-4)). Per output element the partial sum of each group is
    formed in D1 (int32) and moved to D2 through the fixed shifter, :func:`group_shift_add`:
    sign 0 -> ``d``, sign -1 -> ``d - (d >> n)``, sign +1 -> ``d + (d >> n)`` with ``>>``
    an arithmetic (flooring) shift on int32. D2 = sum over groups. Order: scaled groups
    first (by index), then unity groups; every D1 value, every shifted value and every
    running D2 sum must fit int32, otherwise the layer is invalid (``OverflowError``; the
    compiler proves the bound statically and never emits such a layer).
    Granularity: after permutation a group covers whole 16-channel blocks; a group's
    channel count is a multiple of ``cfg.granularity`` except for one group, which takes
    the remainder ``C mod granularity`` and is placed last (its tail block is zero padded).
    Depthwise / grouped convs accept a group vector too (per input channel).

NORM
    float32 ``t = fl(fl(float32(acc) * m[k]) + b[k])`` per output channel k: int32 -> float32
    conversion rounds to nearest even, then multiply, round, add, round. No fused
    multiply-add. ``m`` and ``b`` come from :func:`norm_constants` (one formula for all paths).

ACT + QUANT
    ``q = clip(round_half_even(t), lo, hi)`` stored in the output dtype. ReLU and ReLU6
    are clip bounds (:func:`clip_bounds`): ReLU raises ``lo`` to ``zp``; ReLU6 lowers ``hi``
    to ``zp + round_half_even(6 / scale)``. Other activations run on the CPU.

Element-wise add (residual)
    ``xa = float32(a - zp_a)``, ``xb = float32(b - zp_b)`` (exact),
    ``t = fl(fl(fl(xa * ma) + fl(xb * mb)) + bias)``, then ACT + QUANT, with
    ``ma = s_a / s_out``, ``mb = s_b / s_out``, ``bias = zp_out`` (see :func:`add_constants`).

Pooling
    Max pool works on the stored integers (monotone, same scale / zp out as in); spatial
    padding never wins (it is the dtype's minimum). Average pool (no padding) and global
    average pool sum ``x - zp`` over the window in int32, then NORM with
    ``m = s_in / (s_out * window)``, ``b = zp_out``, then ACT + QUANT (:func:`avg_pool_constants`).

Linear
    A 1x1 convolution on a 1x1 image: same MAC, ISG, NORM, ACT + QUANT.

Input quantization (CPU side, ONNX QuantizeLinear)
    ``q = clip(round_half_even(fl(float32(x) / float32(scale))) + zp, lo, hi)``.
    Non-finite inputs: +Inf (and any ``x / scale`` that overflows float32) saturates to ``hi``,
    -Inf to ``lo``, exactly as onnxruntime's QuantizeLinear (followed by the exported Clip)
    gives. NaN is refused with a ValueError naming the tensor and the first position: ONNX
    leaves it undefined and onnxruntime 1.32 is not consistent (a one-element tensor gives the
    dtype maximum, longer ones the minimum), so no integer would be the right one.

Accumulator bound (proved by the compiler)
    ``target_npu.transform.fold_qdq`` bounds every D1 partial sum, every shifted group sum and the
    D2 sum of each conv / linear layer (and the window sum of a global average pool) at compile
    time from its weights, its ISG groups and the full range of its input dtype minus the zero
    point. A layer whose worst case leaves int32 is not folded: it stays a float QDQ chain on the
    CPU, and the report gives the reason with the bound. The checks in this module
    (``OverflowError``) never fire for a folded layer.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hw_model.config import DEFAULT_CONFIG, NPUConfig

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

Pads = tuple[int, int, int, int]  # (top, left, bottom, right), the ONNX order


# ---------------------------------------------------------------------------------- scalars
def round_half_even(t: np.ndarray) -> np.ndarray:
    """Round to nearest, ties to even (IEEE default), keeping the float dtype."""
    return np.rint(t)


def clip_bounds(bits: int, signed: bool, act: str | None = None,
                scale: float | None = None, zp: int = 0) -> tuple[int, int]:
    """Integer clip bounds (lo, hi) of a ``bits``-bit tensor, narrowed by a ReLU / ReLU6."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if act in ("relu", "relu6"):
        lo = max(lo, int(zp))
    if act == "relu6":
        if scale is None:
            raise ValueError("relu6 clip bounds need the output scale")
        hi = min(hi, int(zp) + int(round_half_even(np.float32(6.0) / np.float32(scale))))
    elif act not in (None, "relu"):
        raise ValueError(f"activation {act!r} is not a clip on the NPU (only relu, relu6)")
    return lo, hi


def quantize(x: np.ndarray, scale: float, zp: int, lo: int, hi: int, dtype=np.int8,
             what: str = "input") -> np.ndarray:
    """Float -> integer, as ONNX QuantizeLinear with float32 division; +-Inf saturate, NaN is refused."""
    x = np.asarray(x, np.float32)
    nan = np.isnan(x)
    if nan.any():
        at = tuple(int(i) for i in np.argwhere(nan)[0])
        raise ValueError(f"{what} holds {int(nan.sum())} NaN value(s) (first at index {at}); QuantizeLinear "
                         f"of NaN is undefined: replace them before running (+-Inf saturate to {lo}/{hi})")
    with np.errstate(over="ignore"):  # x / scale beyond float32 is +-Inf: saturates like onnxruntime
        t = x / np.float32(scale)
    return np.clip(round_half_even(t) + zp, lo, hi).astype(dtype)


def _check_int32(a: np.ndarray, what: str) -> np.ndarray:
    if a.size and (a.min() < INT32_MIN or a.max() > INT32_MAX):
        raise OverflowError(f"{what} leaves int32 (range {a.min()}..{a.max()})")
    return a


def group_shift_add(d: np.ndarray, sign: int, shift: int) -> np.ndarray:
    """The fixed shifter between D1 and D2: d, d - (d >> n) or d + (d >> n); int64 in/out."""
    d = np.asarray(d, np.int64)
    if sign == 0:
        return d
    return d + sign * (d >> shift)


# --------------------------------------------------------------------- NORM and constants
def norm(acc: np.ndarray, m: np.ndarray | float, b: np.ndarray | float, axis: int = 1) -> np.ndarray:
    """float32 t = fl(fl(float32(acc) * m) + b), m and b per channel along ``axis`` (or scalars)."""
    a = np.asarray(acc).astype(np.float32)
    shape = [1] * a.ndim
    if a.ndim:
        shape[axis] = -1
    m = np.asarray(m, np.float32).reshape(shape if np.ndim(m) else ())
    b = np.asarray(b, np.float32).reshape(shape if np.ndim(b) else ())
    return (a * m).astype(np.float32) + b


def act_quant(t: np.ndarray, lo: int, hi: int, dtype=np.int8) -> np.ndarray:
    """ACT + QUANT: round half to even, clip to [lo, hi], store in ``dtype``."""
    return np.clip(round_half_even(np.asarray(t, np.float32)), lo, hi).astype(dtype)


def norm_constants(s_x: float, s_w: np.ndarray, s_out: float, zp_out: int,
                   bias: np.ndarray | None = None, oso_scale: np.ndarray | None = None,
                   oso_offset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """NORM (m, b) of a conv / linear, both float32 (K,), computed in float64 and rounded once.

    Real output before the activation: ``oso_scale * (s_x * s_w * acc + bias) + oso_offset``;
    divided by ``s_out`` and shifted by ``zp_out`` it is the quantizer's input.
    """
    s_w = np.asarray(s_w, np.float64).reshape(-1)
    k = s_w.size
    bias = np.zeros(k) if bias is None else np.asarray(bias, np.float64).reshape(-1)
    g = np.ones(k) if oso_scale is None else np.asarray(oso_scale, np.float64).reshape(-1)
    phi = np.zeros(k) if oso_offset is None else np.asarray(oso_offset, np.float64).reshape(-1)
    s_x, s_out = float(np.float32(s_x)), float(np.float32(s_out))
    m = g * s_w * s_x / s_out
    b = (g * bias + phi) / s_out + zp_out
    return m.astype(np.float32), b.astype(np.float32)


def add_constants(s_a: float, s_b: float, s_out: float, zp_out: int) -> tuple[np.float32, np.float32, np.float32]:
    """(ma, mb, bias) of the residual add, float32, computed in float64 and rounded once."""
    s_a, s_b, s_out = (float(np.float32(v)) for v in (s_a, s_b, s_out))
    return np.float32(s_a / s_out), np.float32(s_b / s_out), np.float32(zp_out)


def avg_pool_constants(s_in: float, s_out: float, zp_out: int, window: int) -> tuple[np.float32, np.float32]:
    """(m, b) of an average pool over ``window`` elements."""
    return np.float32(float(np.float32(s_in)) / (float(np.float32(s_out)) * window)), np.float32(zp_out)


# ----------------------------------------------------------------------------- MAC layers
def _operand(x: np.ndarray, zp: int) -> np.ndarray:
    return np.asarray(x).astype(np.int64) - int(zp)


def _im2col(xo: np.ndarray, kh: int, kw: int, stride: tuple[int, int], pads: Pads,
            dilation: tuple[int, int]) -> tuple[np.ndarray, int, int]:
    """(N, C, H, W) int64 -> (N, C, KH, KW, OH, OW) windows of the zero-padded operand."""
    n, c, h, w = xo.shape
    pt, pl, pb, pr = pads
    xp = np.pad(xo, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    oh = (h + pt + pb - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + pl + pr - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if oh <= 0 or ow <= 0:
        raise ValueError(f"conv2d output would be empty: input {h}x{w}, kernel {kh}x{kw}, pads {pads}")
    cols = np.empty((n, c, kh, kw, oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            y0, x0 = i * dilation[0], j * dilation[1]
            cols[:, :, i, j] = xp[:, :, y0:y0 + stride[0] * oh:stride[0], x0:x0 + stride[1] * ow:stride[1]]
    return cols, oh, ow


def conv2d_acc(x: np.ndarray, x_zp: int, w: np.ndarray, *, stride: Sequence[int] = (1, 1),
               pads: Pads = (0, 0, 0, 0), dilation: Sequence[int] = (1, 1), groups: int = 1,
               isg_groups: np.ndarray | None = None, cfg: NPUConfig = DEFAULT_CONFIG) -> np.ndarray:
    """int32 accumulator D2 of a conv: x (N, C, H, W) int, w (K, C/groups, KH, KW) int8 -> (N, K, OH, OW) int32."""
    x, w = np.asarray(x), np.asarray(w)
    n, c, h, wd = x.shape
    k, cg, kh, kw = w.shape
    if c % groups or k % groups or cg != c // groups:
        raise ValueError(f"conv2d shapes do not match: input C={c}, weight {w.shape}, groups={groups}")
    gvec = np.zeros(c, np.int64) if isg_groups is None else np.asarray(isg_groups, np.int64).reshape(-1)
    if gvec.size != c or (gvec.size and (gvec.min() < 0 or gvec.max() >= cfg.num_groups)):
        raise ValueError(f"isg_groups must hold {c} values in 0..{cfg.num_groups - 1}")
    cols, oh, ow = _im2col(_operand(x, x_zp), kh, kw, tuple(stride), tuple(pads), tuple(dilation))
    wo = w.astype(np.int64)
    kpg = k // groups
    partial = np.zeros((cfg.num_groups, n, k, oh, ow), np.int64)
    for grp in range(groups):
        cs = slice(grp * cg, (grp + 1) * cg)
        for g in range(cfg.num_groups):
            mask = (gvec[cs] == g)
            if not mask.any():
                continue
            a = cols[:, cs][:, mask].transpose(0, 4, 5, 1, 2, 3).reshape(n, oh, ow, -1)
            b = wo[grp * kpg:(grp + 1) * kpg][:, mask].reshape(kpg, -1)
            partial[g, :, grp * kpg:(grp + 1) * kpg] = np.matmul(a, b.T).transpose(0, 3, 1, 2)
    return accumulate_groups(partial, cfg)


def accumulate_groups(partial: np.ndarray, cfg: NPUConfig = DEFAULT_CONFIG) -> np.ndarray:
    """D1 partial sums per group (G, ...) int64 -> D2 int32, in the contract's order with overflow checks."""
    d2 = np.zeros(partial.shape[1:], np.int64)
    for g in cfg.accumulation_order:
        d1 = _check_int32(partial[g], f"D1 partial sum of group {g}")
        d2 = _check_int32(d2 + _check_int32(group_shift_add(d1, cfg.isg_group_signs[g], cfg.isg_shift),
                                            f"shifted partial sum of group {g}"), "D2 accumulator")
    return d2.astype(np.int32)


def conv2d(x: np.ndarray, x_zp: int, w: np.ndarray, m: np.ndarray, b: np.ndarray, lo: int, hi: int,
           out_dtype=np.int8, **conv_args) -> np.ndarray:
    """A whole NPU conv layer: MAC + ISG -> NORM -> ACT + QUANT. Returns (N, K, OH, OW) ``out_dtype``."""
    return act_quant(norm(conv2d_acc(x, x_zp, w, **conv_args), m, b), lo, hi, out_dtype)


def linear(x: np.ndarray, x_zp: int, w: np.ndarray, m: np.ndarray, b: np.ndarray, lo: int, hi: int,
           out_dtype=np.int8, isg_groups: np.ndarray | None = None,
           cfg: NPUConfig = DEFAULT_CONFIG) -> np.ndarray:
    """A fully connected layer: x (N, C), w (K, C) -> (N, K), as a 1x1 conv on a 1x1 image."""
    x, w = np.asarray(x), np.asarray(w)
    y = conv2d(x[:, :, None, None], x_zp, w[:, :, None, None], m, b, lo, hi, out_dtype,
               isg_groups=isg_groups, cfg=cfg)
    return y[:, :, 0, 0]


# -------------------------------------------------------------------------- ALU layers
def add(a: np.ndarray, a_zp: int, ma, b: np.ndarray, b_zp: int, mb, bias, lo: int, hi: int,
        out_dtype=np.int8) -> np.ndarray:
    """Residual add with requantization; ma, mb, bias scalars or per channel (axis 1)."""
    xa = _operand(a, a_zp).astype(np.float32)
    xb = _operand(b, b_zp).astype(np.float32)
    shape = [1] * xa.ndim
    shape[1] = -1
    ma, mb, bias = (np.asarray(v, np.float32).reshape(shape if np.ndim(v) else ()) for v in (ma, mb, bias))
    t = ((xa * ma).astype(np.float32) + (xb * mb).astype(np.float32)).astype(np.float32) + bias
    return act_quant(t, lo, hi, out_dtype)


def max_pool2d(x: np.ndarray, kernel: Sequence[int], stride: Sequence[int],
               pads: Pads = (0, 0, 0, 0)) -> np.ndarray:
    """Max pool on the stored integers; padding is the dtype minimum. (N, C, H, W) -> same dtype."""
    x = np.asarray(x)
    pt, pl, pb, pr = pads
    lowest = np.iinfo(x.dtype).min
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=lowest)
    kh, kw = kernel
    oh = (xp.shape[2] - kh) // stride[0] + 1
    ow = (xp.shape[3] - kw) // stride[1] + 1
    out = np.full(x.shape[:2] + (oh, ow), lowest, x.dtype)
    for i in range(kh):
        for j in range(kw):
            out = np.maximum(out, xp[:, :, i:i + stride[0] * oh:stride[0], j:j + stride[1] * ow:stride[1]])
    return out


def avg_pool_acc(x: np.ndarray, x_zp: int, kernel: Sequence[int], stride: Sequence[int]) -> np.ndarray:
    """int32 window sums of ``x - zp`` (no padding): (N, C, H, W) -> (N, C, OH, OW)."""
    xo = _operand(x, x_zp)
    kh, kw = kernel
    oh = (xo.shape[2] - kh) // stride[0] + 1
    ow = (xo.shape[3] - kw) // stride[1] + 1
    acc = np.zeros(xo.shape[:2] + (oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            acc += xo[:, :, i:i + stride[0] * oh:stride[0], j:j + stride[1] * ow:stride[1]]
    return _check_int32(acc, "average pool sum").astype(np.int32)


def avg_pool2d(x: np.ndarray, x_zp: int, kernel: Sequence[int], stride: Sequence[int], m, b,
               lo: int, hi: int, out_dtype=np.int8) -> np.ndarray:
    """Average pool without padding: int32 window sum -> NORM -> ACT + QUANT."""
    return act_quant(norm(avg_pool_acc(x, x_zp, kernel, stride), m, b), lo, hi, out_dtype)


def global_avg_pool(x: np.ndarray, x_zp: int, m, b, lo: int, hi: int, out_dtype=np.int8) -> np.ndarray:
    """Global average pool: (N, C, H, W) -> (N, C, 1, 1)."""
    h, w = np.asarray(x).shape[2:]
    return avg_pool2d(x, x_zp, (h, w), (1, 1), m, b, lo, hi, out_dtype)


def acc_overflow(w: np.ndarray, gvec: np.ndarray, groups: int, in_dtype: str, zp: int,
                 cfg: NPUConfig = DEFAULT_CONFIG) -> str | None:
    """Why a conv's int32 accumulator could leave int32 (None: proven in range), by the contract's order.

    Per weight the product with ``x - zp`` (x over the whole input dtype) lies in [lo, hi] with lo <= 0
    <= hi, so per output channel the sums of the lows / highs bound every D1 partial sum in any order; the
    fixed shifter is monotone, so the shifted bounds and their sum bound the running D2 sum."""
    info = np.iinfo(np.dtype(in_dtype))
    w64 = w.astype(np.int64)
    ends = (w64 * (int(info.min) - zp), w64 * (int(info.max) - zp))
    hi_t, lo_t = np.maximum(*ends).sum(axis=(2, 3)), np.minimum(*ends).sum(axis=(2, 3))  # (K, C/groups)
    k, cg = w.shape[:2]
    gidx = np.asarray(gvec, np.int64)[(np.arange(k)[:, None] // (k // groups)) * cg + np.arange(cg)[None, :]]
    d2_hi, d2_lo = np.zeros(k, np.int64), np.zeros(k, np.int64)
    for g, sign in enumerate(cfg.isg_group_signs):
        d1_hi, d1_lo = (hi_t * (gidx == g)).sum(1), (lo_t * (gidx == g)).sum(1)
        d2_hi += group_shift_add(d1_hi, sign, cfg.isg_shift)
        d2_lo += group_shift_add(d1_lo, sign, cfg.isg_shift)
        for what, hi, lo in ((f"the D1 partial sum of ISG group {g}", d1_hi, d1_lo), ("the D2 sum", d2_hi, d2_lo)):
            if hi.max() > INT32_MAX or lo.min() < INT32_MIN:
                ch = int(np.argmax(np.maximum(hi, -lo)))
                return (f"worst-case int32 accumulator leaves int32: {what} of output channel {ch} can reach "
                        f"{int(lo[ch])}..{int(hi[ch])} (weights {list(w.shape)}, {in_dtype} input, zero point {zp}); "
                        f"the layer stays a float QDQ chain on the CPU")
    return None
