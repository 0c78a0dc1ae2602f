"""Weight and activation quantizers (fake-quant, float32 torch).

Weights: signed, per output channel, zero point 0, 2..8 bits. The scale is initialised by an
MSE search; rounding is round-to-nearest or AdaRound's learned ``floor(W/s) + h(V)``.
Activations: per tensor, zero point 0 (unsigned after ReLU/ReLU6, signed symmetric
otherwise), LSQ step size trained with the straight-through estimator.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from hw_model import reference as ref

# AdaRound rectified sigmoid stretch (Nagel et al. 2020, Eq. 23; IOSO conference Eq. 8,
# journal Eq. 13: zeta = 1.1, gamma = -0.1).
ZETA, GAMMA = 1.1, -0.1
# MSE scale search grid: clip ratios 1.00, 0.99, ..., 0.21 of the max |value| (80 candidates),
# the grid of BRECQ's UniformAffineQuantizer 'mse' initialisation (yhhhli/BRECQ quant_layer.py).
MSE_RATIOS = tuple(1.0 - 0.01 * i for i in range(80))
# Values used by the activation MSE search. Chosen: 2^16 keeps the search well under a second
# per tensor; the error estimate of an evenly strided subset of this size is stable.
MSE_MAX_SAMPLES = 2**16


def check_bits(bits: int, what: str) -> int:
    """Validate a bit width (2..8) and return it as int."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= int(bits) <= 8:
        raise ValueError(f"{what} must be an integer in 2..8, got {bits!r}")
    return int(bits)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity gradient (straight-through estimator)."""
    return (torch.round(x) - x).detach() + x


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """AdaRound h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def mse_weight_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per output channel scale (K,) float32 minimising ||W - Q(W)||^2 over ``MSE_RATIOS`` of max|W|."""
    k = w.shape[0]
    flat = w.detach().reshape(k, -1).double()
    qmax = 2 ** (bits - 1) - 1
    amax = flat.abs().amax(1).clamp_min(1e-8)
    best_err = torch.full((k,), float("inf"), dtype=torch.float64, device=w.device)
    best = amax / qmax
    for r in MSE_RATIOS:
        s = amax * r / qmax
        q = torch.clamp(torch.round(flat / s[:, None]), -qmax - 1, qmax) * s[:, None]
        err = (q - flat).pow(2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best.float()


def mse_act_scale(x: torch.Tensor, bits: int, signed: bool) -> float:
    """Per tensor scale minimising the quantization MSE of samples ``x`` over ``MSE_RATIOS``."""
    x = x.detach().reshape(-1)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    amax = float(x.abs().max()) if signed else float(x.clamp_min(0).max())
    if x.numel() > MSE_MAX_SAMPLES:  # evenly strided subset, the max above still sees every value
        x = x[:: -(-x.numel() // MSE_MAX_SAMPLES)]
    x = x.double()
    amax = max(amax, 1e-8)
    best, best_err = amax / hi, math.inf
    for r in MSE_RATIOS:
        s = amax * r / hi
        err = float((torch.clamp(torch.round(x / s), lo, hi) * s - x).pow(2).sum())
        if err < best_err:
            best, best_err = s, err
    return float(np.float32(best))


class WeightQuantizer(nn.Module):
    """Signed per output channel weight quantizer: scale (K,) float32 buffer, optional AdaRound V.

    ``mode``: ``"nearest"`` (round to nearest even), ``"soft"`` (floor + h(V), training) or
    ``"hard"`` (floor + [h(V) >= 0.5], after AdaRound).
    """

    def __init__(self, weight: torch.Tensor, bits: int) -> None:
        super().__init__()
        self.bits = check_bits(bits, "weight bits")
        self.register_buffer("scale", mse_weight_scale(weight, self.bits))
        self.v: nn.Parameter | None = None
        self.mode = "nearest"

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def _s(self, w: torch.Tensor) -> torch.Tensor:
        return self.scale.view(-1, *([1] * (w.dim() - 1)))

    def init_adaround(self, w: torch.Tensor) -> None:
        """Create V so that h(V) equals the fractional part of W/s (AdaRound initialisation)."""
        frac = (w.detach() / self._s(w)) - torch.floor(w.detach() / self._s(w))
        frac = frac.clamp(1e-4, 1 - 1e-4)  # chosen: keeps the logit finite
        v = -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1)
        self.v = nn.Parameter(v.float())
        self.mode = "soft"

    def integer(self, w: torch.Tensor, hard: bool = False) -> torch.Tensor:
        """Integer weights (float tensor holding ints), same shape as ``w``; ``hard`` rounds h(V)."""
        s = self._s(w)
        if self.mode == "nearest" or self.v is None:
            q = torch.round(w / s)
        elif self.mode == "soft" and not hard:
            q = torch.floor(w / s) + rectified_sigmoid(self.v)
        else:
            q = torch.floor(w / s) + (rectified_sigmoid(self.v) >= 0.5).to(w.dtype)
        return torch.clamp(q, self.qmin, self.qmax)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """Fake-quantized weights s * W_int (differentiable in V when ``mode == "soft"``)."""
        return self.integer(w) * self._s(w)

    def round_reg(self, beta: float) -> torch.Tensor:
        """AdaRound regulariser sum(1 - |2 h(V) - 1|^beta) (IOSO conference Eq. 11)."""
        if self.v is None:
            return torch.zeros((), device=self.scale.device)
        return (1 - (2 * rectified_sigmoid(self.v) - 1).abs().pow(beta)).sum()


class ActQuantizer(nn.Module):
    """Per tensor activation quantizer with an LSQ step size; applies the layer's ReLU/ReLU6 as a clip.

    ``act`` is ``None``, ``"relu"`` or ``"relu6"``; the output is unsigned (zp 0) after a ReLU,
    signed symmetric (zp 0) otherwise. When ``enabled`` is False it only applies ``act`` in float.
    """

    zp = 0

    def __init__(self, bits: int, act: str | None = None) -> None:
        super().__init__()
        self.bits = check_bits(bits, "activation bits")
        self.act = act
        self.step = nn.Parameter(torch.tensor(1.0))
        self.enabled = True
        self.initialised = False

    @property
    def signed(self) -> bool:
        return self.act is None

    def scale32(self) -> np.float32:
        """The scale as the float32 value that deploy mode and the export use."""
        return np.float32(self.step.detach().abs().item())

    def bounds(self) -> tuple[int, int]:
        """Integer clip bounds (lo, hi) from ``hw_model.reference.clip_bounds``."""
        return ref.clip_bounds(self.bits, self.signed, self.act, float(self.scale32()), self.zp)

    def float_act(self, x: torch.Tensor) -> torch.Tensor:
        if self.act == "relu":
            return torch.relu(x)
        if self.act == "relu6":
            return torch.clamp(x, 0.0, 6.0)
        return x

    def init_scale(self, x: torch.Tensor) -> None:
        """MSE initialisation of the step from float samples ``x`` (before the activation)."""
        s = mse_act_scale(self.float_act(x), self.bits, self.signed)
        self.step.data.fill_(s)
        self.initialised = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.float_act(x)
        lo, hi = self.bounds()
        # LSQ gradient scale 1/sqrt(N * Qp) (Esser et al. 2020, Sec. 2.2).
        g = 1.0 / math.sqrt(max(x.numel() / max(x.shape[0], 1), 1) * max(hi, 1))
        s = self.step.abs()
        s = (s - s * g).detach() + s * g
        return torch.clamp(round_ste(x / s), lo, hi) * s
