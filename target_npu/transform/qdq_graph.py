"""The graph of an imported QDQ module as ``FoldQDQ`` reads it: bound values, constants, dequantized tensors.

Shared by ``fold_qdq`` (conv / Gemm / add) and ``fold_ops`` (pools, activations between quantizers):
:class:`Graph` maps a Relax var to its bound value and reads constants, per-tensor ``dequantize``
(integer var, scale, zero point) and the clip / relu ops above a quantizer; :class:`NotFoldable` is a
chain that stays on the CPU with the reason.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import tvm
from tvm import relax

from target_npu.layer import Layer


class NotFoldable(Exception):
    """A chain that stays on the CPU; the message says why."""


def is_op(e: Any, name: str) -> bool:
    """``e`` is a call of the Relax op ``name`` (``"relax.add"``)."""
    return isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == name


class Graph:
    """Var -> bound value of ``main``'s bindings, with constant readers."""

    def __init__(self, func: relax.Function) -> None:
        self.bind = {b.var: b.value for blk in func.body.blocks for b in blk.bindings}
        self.params = set(func.params)

    def prod(self, e: Any) -> Any:
        while isinstance(e, relax.Var) and e in self.bind:
            e = self.bind[e]
        return e

    def const(self, e: Any, what: str) -> np.ndarray:
        e = self.prod(e)
        if is_op(e, "relax.reshape"):
            return self.const(e.args[0], what)
        data = getattr(e, "value", None) if isinstance(e, tvm.ir.GenericConst) else None
        if data is None:
            raise NotFoldable(f"{what} is not a constant")
        return data.numpy()

    def is_const(self, e: Any) -> bool:
        try:
            self.const(e, "")
            return True
        except NotFoldable:
            return False

    def value(self, e: Any) -> np.ndarray | None:
        """A constant, or ``dequantize`` of an integer constant (a bias as DequantizeLinear(int32)) evaluated
        as ONNX does in float32; None for anything else."""
        d = self.prod(e)
        if is_op(d, "relax.reshape"):
            return self.value(d.args[0])
        if not is_op(d, "relax.dequantize"):
            return self.const(e, "") if self.is_const(e) else None
        if not all(self.is_const(a) for a in d.args[:3]):
            return None
        q, s, zp = (self.const(a, "") for a in d.args[:3])
        shape = [1] * q.ndim
        if s.size > 1:
            shape[int(d.attrs.axis) % q.ndim] = -1
        diff = (q.astype(np.int64) - zp.astype(np.int64).reshape(shape if zp.size > 1 else ())).astype(np.float32)
        return (diff * s.astype(np.float32).reshape(shape if s.size > 1 else ())).astype(np.float32)

    def dq(self, e: Any, what: str) -> tuple[Any, float, int]:
        """(integer var, scale, zp) of a per-tensor ``dequantize``."""
        d = self.prod(e)
        if not is_op(d, "relax.dequantize"):
            raise NotFoldable(f"{what} is not a dequantized tensor")
        s, zp = self.const(d.args[1], "scale"), self.const(d.args[2], "zero point")
        if s.size != 1 or zp.size != 1:
            raise NotFoldable(f"{what} has a per-channel activation scale")
        return d.args[0], float(np.float32(s.reshape(()))), int(zp.reshape(()))

    def strip_clip(self, e: Any) -> tuple[Any, float, float]:
        """Peel relu / clip (maximum, minimum) ops: (inner expr, float lo, float hi)."""
        lo, hi = -math.inf, math.inf
        while True:
            c = self.prod(e)
            if is_op(c, "relax.nn.relu"):
                lo, e = max(lo, 0.0), c.args[0]
            elif is_op(c, "relax.call_tir") and isinstance(c.args[0], relax.GlobalVar) \
                    and c.args[0].name_hint.startswith(("maximum", "minimum")):
                x, bound = c.args[1].fields
                w = self.prod(bound)
                v = float(self.const(w.args[2] if is_op(w, "relax.where") else bound, "clip bound").reshape(()))
                if c.args[0].name_hint.startswith("maximum"):
                    lo = max(lo, v)
                else:
                    hi = min(hi, v)
                e = x
            else:
                return e, lo, hi


def step(v: float, s: float) -> int:
    """round(v / s) in float32, clamped to +-2^20 (a bound beyond float32 or far outside the dtype)."""
    with np.errstate(over="ignore"):
        return int(np.clip(np.rint(np.float32(v) / np.float32(s)), -(1 << 20), 1 << 20))


def int_bounds(lo_f: float, hi_f: float, s: float, zp: int, dtype: str) -> tuple[int, int]:
    """Integer clip bounds [lo, hi] of float bounds for scale ``s`` / zero point ``zp`` in ``dtype``."""
    info = np.iinfo(np.dtype(dtype))
    lo, hi = int(info.min), int(info.max)
    if lo_f > -math.inf:
        lo = max(lo, step(lo_f, s) + zp)
    if hi_f < math.inf:
        hi = min(hi, step(hi_f, s) + zp)
    # an empty range (lo > hi: a clip bound rounds past the other) gives hi everywhere under the
    # contract's clip = min(max(t, lo), hi); lo = hi is the same function and a valid NPU clip
    return min(lo, hi), hi


def finite(name: str, **consts: Any) -> None:
    """ValueError naming the layer when a float32 constant it derived from the file's scales is not finite."""
    for key, v in consts.items():
        a = np.asarray(v, np.float32)
        if not np.isfinite(a).all():
            raise ValueError(f"layer {name}: constant {key} = {a.reshape(-1)[~np.isfinite(a.reshape(-1))][0]} is "
                             f"not finite in float32 (a scale ratio or bias of the model overflows float32)")


def make_layer(kind: str, name: str, spec: Any, inputs: list[Any], q: Any) -> Layer:
    """A :class:`Layer` over the integer ``inputs`` (Relax vars) replacing quantizer ``q``."""
    return Layer(kind, name, spec, [tuple(int(d) for d in v.ty.shape) for v in inputs],
                 [str(v.ty.dtype) for v in inputs], tuple(int(v) for v in q.ty.shape), str(q.ty.dtype),
                 inputs=list(inputs), quant=q)
