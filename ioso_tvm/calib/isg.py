"""Input-channel scale groups (ISG): rectified-softmax group logits, regulariser, hardening.

Journal (WAPS-Quant, papers/001) Eq. 14-15: per input channel i and group p,
``s(R_ip) = clamp(softmax-like sigma(R_ip) / sum_j sigma(R_ij) * (zeta - gamma) + gamma, 0, 1)`` and
``gamma_i = sum_p gamma_p^G s(R_ip) / sum_j s(R_ij)``; the group factors gamma^G are
``NPUConfig.group_factors`` (1, 1-2^-4, 1+2^-4). Regulariser: journal reg formula with beta.
Hardening (journal App. A-C): every group's channel count becomes a multiple of the
granularity except one group that takes ``C mod granularity``; channels that settled first
keep their learned group.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hw_model.config import DEFAULT_CONFIG, NPUConfig

from .quantizers import GAMMA, ZETA

# Initial logit of group 0 (unity) against 0 for the others. Chosen: the layer starts close
# to the plain (one group) quantized layer; softmax weight 0.78 -> s = 0.83 for unity.
INIT_UNITY_LOGIT = 2.0


def shift_add_ste(d: torch.Tensor, sign: int, shift: int) -> torch.Tensor:
    """The NPU's group shifter on partial sums ``d`` (integer-valued float): ``d + sign * floor(d * 2^-shift)``
    (``d >> shift`` is the floor), with the straight-through gradient of ``d * (1 + sign * 2^-shift)``."""
    if sign == 0:
        return d
    t = d * 2.0 ** -shift
    return d + sign * (t + (torch.floor(t) - t).detach())


def rectified_softmax(r: torch.Tensor) -> torch.Tensor:
    """Journal Eq. 15 on logits (C, G) -> probabilities s (C, G) in [0, 1]."""
    sig = torch.sigmoid(r)
    return torch.clamp(sig / sig.sum(1, keepdim=True) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


class ISG(nn.Module):
    """Per input channel group choice of one conv / linear layer with ``channels`` inputs.

    Soft (training): ``gamma()`` mixes the factors by Eq. 14. Hard: ``groups`` (C,) int64 buffer.
    """

    def __init__(self, channels: int, cfg: NPUConfig = DEFAULT_CONFIG) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("factors", torch.tensor(cfg.group_factors, dtype=torch.float32))
        self.register_buffer("groups", torch.zeros(channels, dtype=torch.int64))
        self.register_buffer("settled_at", torch.full((channels,), -1, dtype=torch.int64))
        self.r: nn.Parameter | None = None
        self.hard = True

    @property
    def channels(self) -> int:
        return int(self.groups.numel())

    def init_soft(self) -> None:
        """Create the logits R (C, G) and switch to soft mode."""
        r = torch.zeros(self.channels, self.cfg.num_groups, device=self.groups.device)
        r[:, 0] = INIT_UNITY_LOGIT
        self.r = nn.Parameter(r)
        self.hard = False
        self.settled_at.fill_(-1)

    def probs(self) -> torch.Tensor:
        if self.r is None:
            raise RuntimeError("ISG has no logits (call init_soft first)")
        return rectified_softmax(self.r)

    def gamma(self) -> torch.Tensor:
        """Per input channel factor (C,) float32."""
        if self.hard or self.r is None:
            return self.factors[self.groups]
        s = self.probs()
        return (s * self.factors).sum(1) / s.sum(1).clamp_min(1e-12)

    def reg(self, beta: float) -> torch.Tensor:
        """Group regulariser sum_i sum_p (1 - |2 s(R_ip) - 1|^beta) (journal f_reg, second term)."""
        if self.hard or self.r is None:
            return torch.zeros((), device=self.groups.device)
        return (1 - (2 * self.probs() - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def track(self, iteration: int) -> None:
        """Record, per channel, the iteration since which one group has probability 1."""
        if self.hard or self.r is None:
            return
        settled = self.probs().amax(1) >= 1.0
        self.settled_at[~settled] = -1
        self.settled_at[settled & (self.settled_at < 0)] = iteration

    @torch.no_grad()
    def harden(self, granularity: int) -> None:
        """Fix the groups: argmax of s, then :func:`granular_assignment`; switch to hard mode."""
        if self.r is None:
            self.hard = True
            return
        s = self.probs().cpu().numpy()
        order = self.settled_at.cpu().numpy().astype(np.float64)
        order[order < 0] = np.inf  # never settled: last
        g = granular_assignment(s, order, granularity)
        self.groups.copy_(torch.from_numpy(g))
        self.hard = True
        self.r = None


def granular_assignment(prob: np.ndarray, settle_order: np.ndarray, granularity: int) -> np.ndarray:
    """Groups (C,) int64 from probabilities (C, G) so that every group's count is a multiple of
    ``granularity`` except one (the "remainder" group, ``C mod granularity`` extra channels).

    Targets: each group's learned count rounded down to the granularity; the missing channels
    go, one granule at a time, to the groups with the largest rounded-off part, and the final
    ``C mod granularity`` to the group with the largest rest. Then each group keeps its
    earliest-settled channels (ties: higher probability) up to its target; the others move to
    the open group they like most. ``granularity`` 1 keeps the argmax.
    """
    c, ng = prob.shape
    if granularity < 1:
        raise ValueError(f"granularity must be >= 1, got {granularity}")
    learned = prob.argmax(1)
    if granularity == 1:
        return learned.astype(np.int64)
    counts = np.bincount(learned, minlength=ng)
    target = counts // granularity * granularity
    rest = counts - target
    missing = c - target.sum()
    for gi in np.argsort(-rest, kind="stable"):
        if missing >= granularity:
            target[gi] += granularity
            rest[gi] = max(rest[gi] - granularity, 0)
            missing -= granularity
    if missing:
        target[int(np.argmax(rest))] += missing
    out = np.full(c, -1, np.int64)
    best_p = prob[np.arange(c), learned]
    keys = np.lexsort((-best_p, settle_order))  # settle order first, then probability
    fill = np.zeros(ng, np.int64)
    for i in keys:
        gi = learned[i]
        if fill[gi] < target[gi]:
            out[i] = gi
            fill[gi] += 1
    for i in keys:
        if out[i] >= 0:
            continue
        open_groups = [gj for gj in np.argsort(-prob[i], kind="stable") if fill[gj] < target[gj]]
        out[i] = open_groups[0]
        fill[open_groups[0]] += 1
    return out
