"""Integer deploy mode: the calibrated model run as the NPU computes it (``hw_model.reference``).

Activations are the stored integers; inside :class:`IntegerModel` they travel as float32 tensors
(8-bit values are exact), and :meth:`IntegerModel.run` hands them out as int64. MAC: float
convolution of integer values per ISG group, float32 when ``sum|w| * max|x - zp|`` (times the
shifter's growth) is below 2^24, else float64 (the bound ``< 2^53`` is asserted) with int32
overflow checks; group partial sums combined by the shifter rule ``d + sign * floor(d * 2^-n)``
in the contract's order; NORM in float32 as two separate in-place ops ``t *= m`` then ``t += b``
(two roundings); round half to even and clip in place. Pools run on float32 values.
All constants come once from ``hw_model.reference.*_constants`` on the float32 values that
``QLayer.integer_params`` / ``ActQuantizer.scale32`` give (the export writes the same values);
``QuantModel.deploy`` reuses one IntegerModel while :func:`state_key` is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hw_model import reference as ref

from .qmodules import QAdd, QFlatten, QGlobalAvgPool, QInput, QLayer, QMaxPool

FLOAT32_EXACT_BOUND = 2.0**24
"""float32 has a 24-bit significand: integers of magnitude below this are exact, and so are sums of them."""

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@dataclass
class QParams:
    """Quantization of one tensor: float32 scale, zero point, clip bounds, bits, signedness."""

    scale: np.float32
    zp: int
    lo: int
    hi: int
    bits: int
    signed: bool


def qparams(q) -> QParams:
    """QParams of an :class:`~ioso_tvm.calib.quantizers.ActQuantizer`."""
    lo, hi = q.bounds()
    return QParams(q.scale32(), int(q.zp), lo, hi, q.bits, q.signed)


def _check_int32(a: torch.Tensor, what: str) -> torch.Tensor:
    if a.numel() and (int(a.min()) < INT32_MIN or int(a.max()) > INT32_MAX):
        raise OverflowError(f"{what} leaves int32 (range {int(a.min())}..{int(a.max())})")
    return a


def _norm_act(acc: torch.Tensor, m: torch.Tensor, b: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """float32 NORM (multiply, then add: two roundings) + round half even + clip -> float32 values.
    Works in place on ``acc`` when it is already float32 (callers pass a fresh accumulator)."""
    return acc.to(torch.float32).mul_(m).add_(b).round_().clamp_(lo, hi)


def _values(x: torch.Tensor) -> torch.Tensor:
    """Stored integers as float32 (exact for the 8-bit range); int64 input is converted, float32 kept."""
    return x if x.dtype == torch.float32 else x.to(torch.float32)


class IntLayer:
    """Integer conv / linear: MAC per ISG group, shift-add, NORM, ACT + QUANT."""

    def __init__(self, op: QLayer, qin: QParams, qout: QParams) -> None:
        p = op.integer_params()
        self.op, self.qin, self.qout, self.p = op, qin, qout, p
        m, b = ref.norm_constants(qin.scale, p["s_w"], qout.scale, qout.zp, p["bias"], p["oso_scale"],
                                  p["oso_offset"])
        shape = (1, -1, 1, 1) if op.kind == "conv" else (1, -1)
        self.m = torch.from_numpy(m).view(shape)
        self.b = torch.from_numpy(b).view(shape)
        self.w = torch.from_numpy(p["w_int"].astype(np.float64))
        self.w32 = self.w.to(torch.float32)
        self.cfg = op.isg.cfg
        self.wabs = self.w.abs().reshape(self.w.shape[0], -1).sum(1).max().item()
        groups = torch.from_numpy(p["isg_groups"])
        signs = self.cfg.isg_group_signs
        order = [g for g, sg in enumerate(signs) if sg != 0] + [g for g, sg in enumerate(signs) if sg == 0]
        # (group, its input channels) in the contract's order; a grouped conv keeps all channels and masks
        self.parts = [(g, torch.nonzero(groups == g).flatten()) for g in order if bool((groups == g).any())]
        self.masked = op.kind == "conv" and op.groups > 1 and len(self.parts) > 1
        self.growth = 1.0 + 2.0 ** -self.cfg.isg_shift  # |shifted sums| and |D2| <= MAC bound x growth

    def acc(self, x: torch.Tensor) -> torch.Tensor:
        """D2 accumulator of integer input ``x`` (stored values), as exact integers in a float tensor.

        Every D1 / shifted / D2 value is an integer of magnitude <= (MAC bound) x growth, so float MACs
        are exact in any summation order: float32 below 2^24 (then int32 cannot overflow either), else
        float64 with the int32 checks of the contract. The shift ``d >> n`` is ``floor(d * 2^-n)``."""
        op, cfg = self.op, self.cfg
        xo = x - self.qin.zp if self.qin.zp else x
        lo, hi = (float(v) for v in torch.aminmax(xo)) if xo.numel() else (0.0, 0.0)
        amax = max(hi, -lo)
        if xo.dtype == torch.float32 and amax >= FLOAT32_EXACT_BOUND / 2:  # x - zp may have rounded: redo exactly
            xo = x.to(torch.float64) - self.qin.zp
            amax = float(xo.abs().max())
        bound = self.wabs * amax
        if bound >= 2.0**53:
            raise OverflowError(f"layer {op.name!r}: MAC bound exceeds 2^53, float64 MAC would not be exact")
        fast = bound * self.growth < FLOAT32_EXACT_BOUND
        xo, w = (xo.to(torch.float32), self.w32) if fast else (xo.to(torch.float64), self.w)
        check = (lambda t, what: t) if fast else (lambda t, what: _check_int32(t, f"layer {op.name!r}: {what}"))
        d2 = None
        for g, chans in self.parts:
            if len(self.parts) == 1:
                xg, wg = xo, w
            elif self.masked:
                mask = torch.zeros(xo.shape[1], dtype=xo.dtype)
                mask[chans] = 1
                xg, wg = xo * mask.view(1, -1, *([1] * (xo.dim() - 2))), w
            else:
                xg, wg = xo[:, chans], w[:, chans]
            if op.kind == "conv":
                d1 = F.conv2d(xg, wg, None, op.stride, op.padding, op.dilation, op.groups)
            else:
                d1 = F.linear(xg, wg)
            d1 = check(d1, f"D1 partial sum of group {g}")
            sign = cfg.isg_group_signs[g]
            sh = d1 if sign == 0 else check(d1 + sign * torch.floor(d1 * 2.0 ** -cfg.isg_shift),
                                            f"shifted partial sum of group {g}")
            d2 = sh if d2 is None else check(d2 + sh, "D2 accumulator")
        if d2 is None:  # no input channel at all cannot happen; keep shapes right
            raise ValueError(f"layer {op.name!r} has no input channels")
        return d2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _norm_act(self.acc(x), self.m, self.b, self.qout.lo, self.qout.hi)


class IntAdd:
    """Integer residual add: ``fl(fl(fl(xa*ma) + fl(xb*mb)) + bias)``, ACT + QUANT."""

    def __init__(self, qa: QParams, qb: QParams, qout: QParams) -> None:
        ma, mb, bias = ref.add_constants(qa.scale, qb.scale, qout.scale, qout.zp)
        self.qa, self.qb, self.qout = qa, qb, qout
        self.ma, self.mb, self.bias = (torch.tensor(float(v), dtype=torch.float32) for v in (ma, mb, bias))

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        t = (_values(a) - self.qa.zp).mul_(self.ma)  # fresh tensors: each op rounds to float32 once
        u = (_values(b) - self.qb.zp).mul_(self.mb)
        return t.add_(u).add_(self.bias).round_().clamp_(self.qout.lo, self.qout.hi)


class IntGap:
    """Integer global average pool: int32 sum of ``x - zp`` over H*W, NORM, ACT + QUANT."""

    def __init__(self, name: str, qin: QParams, qout: QParams, window: int) -> None:
        m, b = ref.avg_pool_constants(qin.scale, qout.scale, qout.zp, window)
        self.name, self.qin, self.qout = name, qin, qout
        self.m, self.b = torch.tensor(float(m), dtype=torch.float32), torch.tensor(float(b), dtype=torch.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        hw = x.shape[2] * x.shape[3]  # float64 sum of the stored integers: exact below 2^53
        acc = x.sum((2, 3), keepdim=True, dtype=torch.float64) - float(self.qin.zp) * hw
        acc = _check_int32(acc, f"{self.name!r}: average pool sum")
        return _norm_act(acc, self.m, self.b, self.qout.lo, self.qout.hi)


class IntegerModel:
    """The integer program of a QuantModel. ``__call__(x float32) -> dequantized float32 output``;
    ``run(x) -> {tensor name: int64 tensor}`` gives every intermediate integer tensor."""

    def __init__(self, qmodel) -> None:
        self.qmodel = qmodel
        self.qp: dict[str, QParams] = {}
        self.fns: list = []
        h, w = qmodel.input_shape[1:] if len(qmodel.input_shape) == 3 else (1, 1)
        shapes: dict[str, tuple[int, int]] = {"input": (h, w)}
        for st in qmodel.program:
            op = qmodel.ops[st.op]
            ins = [self.qp.get(t) for t in st.inputs]
            hw = shapes[st.inputs[0]]
            if isinstance(op, QInput):
                self.qp[st.out] = qparams(op.outq)
                fn = self._input_fn(self.qp[st.out])
            elif isinstance(op, QLayer):
                self.qp[st.out] = qparams(op.outq)
                fn = IntLayer(op, ins[0], self.qp[st.out])
                if op.kind == "conv":
                    hw = tuple((hw[i] + 2 * op.padding[i] - op.dilation[i] * (op.weight.shape[2 + i] - 1) - 1)
                               // op.stride[i] + 1 for i in range(2))
            elif isinstance(op, QAdd):
                self.qp[st.out] = qparams(op.outq)
                fn = IntAdd(ins[0], ins[1], self.qp[st.out])
            elif isinstance(op, QGlobalAvgPool):
                self.qp[st.out] = qparams(op.outq)
                fn = IntGap(op.name, ins[0], self.qp[st.out], hw[0] * hw[1])
                hw = (1, 1)
            elif isinstance(op, QMaxPool):
                self.qp[st.out] = ins[0]
                fn = self._maxpool_fn(op)
                hw = tuple((hw[i] + 2 * op.padding[i] - op.kernel[i]) // op.stride[i] + 1 for i in range(2))
            elif isinstance(op, QFlatten):
                self.qp[st.out] = ins[0]
                def fn(x):
                    return (torch.flatten(x, 1))
            else:
                raise TypeError(f"op {st.op!r}: {type(op).__name__} has no integer mode")
            shapes[st.out] = hw
            self.fns.append(fn)

    @staticmethod
    def _input_fn(q: QParams):
        s = torch.tensor(float(q.scale), dtype=torch.float32)

        def fn(x: torch.Tensor) -> torch.Tensor:
            return (x.to(torch.float32) / s).round_().add_(q.zp).clamp_(q.lo, q.hi)
        return fn

    @staticmethod
    def _maxpool_fn(op: QMaxPool):
        def fn(x: torch.Tensor) -> torch.Tensor:  # float32 holds 8-bit integers exactly; -inf padding never wins
            return F.max_pool2d(_values(x), op.kernel, op.stride, op.padding)
        return fn

    def _run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every tensor of the program as float32 stored integers (``input``: ``x`` itself)."""
        env = {"input": x}
        for st, fn in zip(self.qmodel.program, self.fns):
            env[st.out] = fn(*[env[t] for t in st.inputs])
        return env

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every tensor of the program: ``input`` is ``x``, the others int64 stored integers."""
        return {k: v if k == "input" else v.to(torch.int64) for k, v in self._run(x).items()}

    def output_qparams(self) -> QParams:
        return self.qp[self.qmodel.output]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        q = _values(self._run(x)[self.qmodel.output])
        qp = self.output_qparams()
        return (q - qp.zp) * torch.tensor(float(qp.scale), dtype=torch.float32)


def state_key(qmodel) -> tuple:
    """What the integer model is built from: every parameter and buffer (storage, version counter,
    shape, dtype; the values of the small ones: scales, zero points, steps, OSO, groups, biases) and the
    plain settings of every module (bits, modes, flags), plus the program. A change through ``.data`` of
    a large tensor bypasses its version counter: build a fresh ``QuantModel.integer_model()`` then."""
    tensors = tuple((n, t.data_ptr(), t._version, tuple(t.shape), t.dtype,
                     t.detach().cpu().numpy().tobytes() if t.numel() <= _SMALL else None)
                    for n, t in (*qmodel.named_parameters(), *qmodel.named_buffers()))
    plain = (bool, int, float, str, tuple, type(None))
    settings = tuple((n, tuple(sorted(((k, v) for k, v in vars(m).items() if not k.startswith("_")
                                       and isinstance(v, plain)), key=lambda kv: kv[0])))
                     for n, m in qmodel.named_modules())
    return tensors, settings, id(qmodel.program), len(qmodel.program), qmodel.output, qmodel.cfg


_SMALL = 4096
"""Tensors up to this many elements are compared by value in :func:`state_key` (chosen: covers
per-channel constants of layers up to 4096 channels; weights are compared by version counter)."""


def cached_integer_model(qmodel) -> IntegerModel:
    """The IntegerModel of ``qmodel``, built once and rebuilt when :func:`state_key` changes."""
    key = state_key(qmodel)
    cached = qmodel.__dict__.get("_deploy_cache")
    same = False
    if cached is not None:
        try:
            same = bool(cached[0] == key)
        except Exception:  # a setting that does not compare: rebuild
            same = False
    if not same:
        cached = (key, IntegerModel(qmodel))
        qmodel.__dict__["_deploy_cache"] = cached
    return cached[1]
