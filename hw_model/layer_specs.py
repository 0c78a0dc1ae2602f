"""Layer descriptions for the builder: ConvSpec, LinearSpec, AddSpec, PoolSpec, and the Tiling knobs.

Shapes follow ``hw_model.reference``: NCHW activations, (K, C/groups, KH, KW) int8 weights,
pads (top, left, bottom, right). m, b are the float32 NORM constants per output channel.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from hw_model.config import DEFAULT_CONFIG, NPUConfig

_ACT_DTYPES = ("int8", "uint8")


def _check_dtype(what: str, dt: str) -> None:
    if dt not in _ACT_DTYPES:
        raise ValueError(f"{what} must be int8 or uint8, got {dt!r}")


def _check_clip(layer: str, lo: int, hi: int, dt: str) -> None:
    info = np.iinfo(dt)
    if not info.min <= lo <= hi <= info.max:
        raise ValueError(f"{layer}: clip bounds lo={lo}, hi={hi} outside {dt} or lo > hi")


@dataclass
class ConvSpec:
    """One conv layer (N, C, H, W) -> (N, K, OH, OW); groups == C == K is depthwise."""

    n: int
    c: int
    h: int
    w: int
    k: int
    weight: np.ndarray
    m: np.ndarray
    b: np.ndarray
    lo: int = -128
    hi: int = 127
    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    x_zp: int = 0
    in_dtype: str = "int8"
    out_dtype: str = "int8"
    isg_groups: np.ndarray | None = None

    @property
    def kh(self) -> int:
        return int(np.shape(self.weight)[2])

    @property
    def kw(self) -> int:
        return int(np.shape(self.weight)[3])

    @property
    def is_depthwise(self) -> bool:
        return self.groups == self.c == self.k and self.groups > 1

    def check(self, cfg: NPUConfig = DEFAULT_CONFIG) -> None:
        """ValueError naming the field on any inconsistent value."""
        for f in ("n", "c", "h", "w", "k", "groups"):
            v = getattr(self, f)
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"ConvSpec.{f} must be a positive int, got {v!r}")
        w = np.asarray(self.weight)
        if w.dtype != np.int8 or w.ndim != 4:
            raise ValueError(f"ConvSpec.weight must be int8 (K, C/groups, KH, KW), got {w.dtype} {w.shape}")
        if self.c % self.groups or self.k % self.groups or w.shape[:2] != (self.k, self.c // self.groups):
            raise ValueError(f"ConvSpec.weight shape {w.shape} does not match C={self.c}, K={self.k}, "
                             f"groups={self.groups}")
        for f in ("m", "b"):
            if np.shape(getattr(self, f)) != (self.k,):
                raise ValueError(f"ConvSpec.{f} must have shape ({self.k},), got {np.shape(getattr(self, f))}")
        if len(self.stride) != 2 or len(self.dilation) != 2 or len(self.pads) != 4 or \
                min(*self.stride, *self.dilation) < 1 or min(self.pads) < 0:
            raise ValueError(f"ConvSpec stride {self.stride} / dilation {self.dilation} must be >= 1 pairs, "
                             f"pads {self.pads} a non-negative 4-tuple")
        _check_dtype("ConvSpec.in_dtype", self.in_dtype)
        _check_dtype("ConvSpec.out_dtype", self.out_dtype)
        _check_clip("ConvSpec", self.lo, self.hi, self.out_dtype)
        info = np.iinfo(self.in_dtype)
        if not info.min <= self.x_zp <= info.max:
            raise ValueError(f"ConvSpec.x_zp={self.x_zp} outside {self.in_dtype}")
        conv_geometry(self)

    def dense_weight(self) -> np.ndarray:
        """(K, C, KH, KW) int8: grouped weights expanded block-diagonally; depthwise kept as (K, 1, KH, KW)."""
        w = np.asarray(self.weight, np.int8)
        if self.groups == 1 or self.is_depthwise:
            return w
        full = np.zeros((self.k, self.c, self.kh, self.kw), np.int8)
        cg, kg = self.c // self.groups, self.k // self.groups
        for g in range(self.groups):
            full[g * kg:(g + 1) * kg, g * cg:(g + 1) * cg] = w[g * kg:(g + 1) * kg]
        return full

    def macs(self) -> int:
        oh, ow, _, _ = conv_geometry(self)
        return self.n * oh * ow * self.k * (self.c // self.groups) * self.kh * self.kw


def conv_geometry(spec: ConvSpec) -> tuple[int, int, int, int]:
    """(OH, OW, output blocks, input blocks) of a conv."""
    pt, pl, pb, pr = spec.pads
    oh = (spec.h + pt + pb - spec.dilation[0] * (spec.kh - 1) - 1) // spec.stride[0] + 1
    ow = (spec.w + pl + pr - spec.dilation[1] * (spec.kw - 1) - 1) // spec.stride[1] + 1
    if oh <= 0 or ow <= 0:
        raise ValueError(f"ConvSpec: output would be empty (input {spec.h}x{spec.w}, kernel {spec.kh}x{spec.kw}, "
                         f"pads {spec.pads}, dilation {spec.dilation})")
    return oh, ow, -(-spec.k // 16), -(-spec.c // 16)


@dataclass
class LinearSpec:
    """Fully connected (N, C) -> (N, K), weight (K, C) int8: built as a 1x1 conv over N pixels."""

    n: int
    c: int
    k: int
    weight: np.ndarray
    m: np.ndarray
    b: np.ndarray
    lo: int = -128
    hi: int = 127
    x_zp: int = 0
    in_dtype: str = "int8"
    out_dtype: str = "int8"
    isg_groups: np.ndarray | None = None

    def as_conv(self) -> ConvSpec:
        w = np.asarray(self.weight)
        if w.ndim != 2:
            raise ValueError(f"LinearSpec.weight must be (K, C), got shape {w.shape}")
        return ConvSpec(1, self.c, self.n, 1, self.k, w[:, :, None, None], self.m, self.b, self.lo, self.hi,
                        x_zp=self.x_zp, in_dtype=self.in_dtype, out_dtype=self.out_dtype, isg_groups=self.isg_groups)


@dataclass
class AddSpec:
    """Residual add of two (N, C, H, W) tensors; ma, mb, bias scalars or per channel (C,).

    a_dtype and b_dtype may differ (ResNet: a ReLU branch in uint8 plus a signed shortcut in int8):
    the ALU reads each operand with its own signedness (``AluAdd.a_dtype`` / ``b_dtype``)."""

    n: int
    c: int
    h: int
    w: int
    a_zp: int
    b_zp: int
    ma: np.ndarray | float
    mb: np.ndarray | float
    bias: np.ndarray | float
    lo: int = -128
    hi: int = 127
    a_dtype: str = "int8"
    b_dtype: str = "int8"
    out_dtype: str = "int8"

    def check(self) -> None:
        for f in ("n", "c", "h", "w"):
            if not isinstance(getattr(self, f), (int, np.integer)) or getattr(self, f) <= 0:
                raise ValueError(f"AddSpec.{f} must be a positive int, got {getattr(self, f)!r}")
        for f in ("a_dtype", "b_dtype", "out_dtype"):
            _check_dtype(f"AddSpec.{f}", getattr(self, f))
        for zp, dt in (("a_zp", self.a_dtype), ("b_zp", self.b_dtype)):
            info = np.iinfo(dt)
            if not info.min <= getattr(self, zp) <= info.max:
                raise ValueError(f"AddSpec.{zp}={getattr(self, zp)} outside {dt}")
        for f in ("ma", "mb", "bias"):
            if np.ndim(getattr(self, f)) and np.shape(getattr(self, f)) != (self.c,):
                raise ValueError(f"AddSpec.{f} must be a scalar or shape ({self.c},)")
        _check_clip("AddSpec", self.lo, self.hi, self.out_dtype)


@dataclass
class PoolSpec:
    """Pooling: kind ``max`` (integers, pads allowed), ``avg`` (no pads) or ``global_avg`` (kernel = H x W)."""

    kind: str
    n: int
    c: int
    h: int
    w: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    x_zp: int = 0
    m: float = 1.0
    b: float = 0.0
    lo: int = -128
    hi: int = 127
    in_dtype: str = "int8"
    out_dtype: str = "int8"

    @property
    def window(self) -> tuple[int, int]:
        return (self.h, self.w) if self.kind == "global_avg" else tuple(self.kernel)

    def check(self) -> None:
        if self.kind not in ("max", "avg", "global_avg"):
            raise ValueError(f"PoolSpec.kind must be max, avg or global_avg, got {self.kind!r}")
        for f in ("n", "c", "h", "w"):
            if not isinstance(getattr(self, f), (int, np.integer)) or getattr(self, f) <= 0:
                raise ValueError(f"PoolSpec.{f} must be a positive int, got {getattr(self, f)!r}")
        if self.kind != "max" and any(self.pads):
            raise ValueError("PoolSpec: average pooling takes no padding (contract)")
        if self.kind == "max" and self.out_dtype != self.in_dtype:
            raise ValueError("PoolSpec: max pool keeps the input dtype (out_dtype must equal in_dtype)")
        _check_dtype("PoolSpec.in_dtype", self.in_dtype)
        _check_clip("PoolSpec", self.lo, self.hi, self.out_dtype)
        pool_geometry(self)


def pool_geometry(spec: PoolSpec) -> tuple[int, int]:
    kh, kw = spec.window
    pt, pl, pb, pr = spec.pads
    oh = (spec.h + pt + pb - kh) // spec.stride[0] + 1
    ow = (spec.w + pl + pr - kw) // spec.stride[1] + 1
    if oh <= 0 or ow <= 0 or min(*spec.stride, kh, kw) < 1:
        raise ValueError(f"PoolSpec: bad window {spec.window} / stride {spec.stride} for {spec.h}x{spec.w}")
    return oh, ow


@dataclass
class QuantizeSpec:
    """The input quantizer (CPU side of the contract, ``reference.quantize``): float32 -> ``out_dtype``."""

    scale: float
    zp: int
    lo: int
    hi: int
    out_dtype: str = "int8"


@dataclass
class Tiling:
    """Schedule knobs: output blocks per tile, output rows per tile, input blocks per tile,
    loop order (``ob_outer``: weights stay, ``sp_outer``: input tile stays), buffers per slot (1 or 2).
    For add, ``rows`` counts pixels."""

    ob_tile: int = 4
    rows: int = 8
    cb_tile: int = 64
    loop_order: str = "sp_outer"
    nbuf: int = 2

    def check(self) -> None:
        for f in ("ob_tile", "rows", "cb_tile"):
            if not isinstance(getattr(self, f), (int, np.integer)) or getattr(self, f) <= 0:
                raise ValueError(f"Tiling.{f} must be a positive int, got {getattr(self, f)!r}")
        if self.loop_order not in ("ob_outer", "sp_outer"):
            raise ValueError(f"Tiling.loop_order must be ob_outer or sp_outer, got {self.loop_order!r}")
        if self.nbuf not in (1, 2):
            raise ValueError(f"Tiling.nbuf must be 1 or 2, got {self.nbuf!r}")

    def to_dict(self) -> dict:
        return asdict(self)
