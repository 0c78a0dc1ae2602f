"""QFT initialisation: MMSE weight scales (PPQ, APQ), 4-bit adapted CLE, min-max activation ranges.

Paper: QFT (``papers/002``). PPQ = App. C Algorithm 1 (Eq. 13-14), APQ = App. C Algorithm 2
(Eq. 15), 4-bit adapted cross-layer equalisation = App. D Eq. 16, 19-21.

Weights are quantized symmetrically to ``[-(2^(b-1)-1), 2^(b-1)-1]`` (chosen: the symmetric
subset of the NPU's signed b-bit range, so that ``-W`` quantizes to ``-Q``). Conv weights are
(K, C/groups, KH, KW), linear weights (K, C); "right" scales are per output channel K, "left"
scales per input channel C (paper Eq. 9-12). All scales are float32 torch tensors, > 0.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import fx, nn

PPQ_ITERS = 20
"""PPQ iterations. Paper App. C: convergence "often after low single-digit number of iterations"; chosen 20."""
APQ_ITERS = 10
"""APQ alternations. Paper App. C: "even using 10 overall iterations"."""
CLE_BETA = 0.5
"""|beta| of Eq. 21 for a 4b/8b layer pair. Paper App. D: "we take beta = +-0.5 for 8b/4b layers pair"."""
_EPS = 1e-12


def qmax(bits: int) -> int:
    """Largest integer of the symmetric signed ``bits``-bit weight grid."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    return 2 ** (bits - 1) - 1


def fake_quant(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``scale * clip(round(w / scale))`` on the symmetric grid; ``scale`` broadcasts against ``w``."""
    q = qmax(bits)
    return scale * torch.clamp(torch.round(w / scale), -q, q)


def _check_weight(w: torch.Tensor, name: str = "w") -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() < 2 or w.numel() == 0:
        raise ValueError(f"{name} must be a non-empty weight with >= 2 dims (K, C, ...), got shape {tuple(w.shape)}")
    return w.detach().to(torch.float64)


# ------------------------------------------------------------------------------------- PPQ
def ppq_scale(w: torch.Tensor, bits: int, per_channel: bool = False, iters: int = PPQ_ITERS) -> torch.Tensor:
    """MMSE scale by progressive projection (Algorithm 1): s <- <x, q> / <q, q>, q = clip(round(x / s)).

    ``per_channel=False``: one scale (shape ()); ``True``: one per output channel (shape (K,)).
    Starts at max|x| / qmax and keeps the best iterate, so the MSE is never worse than min-max.
    """
    x = _check_weight(w)
    rows = x.reshape(x.shape[0], -1) if per_channel else x.reshape(1, -1)
    q = qmax(bits)
    s = rows.abs().amax(dim=1) / q
    s = torch.where(s > 0, s, torch.ones_like(s))
    best_s = s.clone()
    best_e = ((rows - fake_quant(rows, s[:, None], bits)) ** 2).sum(dim=1)
    for _ in range(iters):
        qi = torch.clamp(torch.round(rows / s[:, None]), -q, q)
        den = (qi * qi).sum(dim=1)
        s_new = (qi * rows).sum(dim=1) / torch.clamp(den, min=_EPS)
        s = torch.where((den > 0) & (s_new > 0), s_new, s)
        e = ((rows - fake_quant(rows, s[:, None], bits)) ** 2).sum(dim=1)
        better = e < best_e
        best_s, best_e = torch.where(better, s, best_s), torch.where(better, e, best_e)
    out = best_s.to(torch.float32)
    return out if per_channel else out.reshape(())


def minmax_scale(w: torch.Tensor, bits: int, per_channel: bool = False) -> torch.Tensor:
    """Naive max|x| / qmax scale (the baseline PPQ and APQ must beat)."""
    x = _check_weight(w)
    rows = x.reshape(x.shape[0], -1) if per_channel else x.reshape(1, -1)
    s = rows.abs().amax(dim=1) / qmax(bits)
    s = torch.where(s > 0, s, torch.ones_like(s)).to(torch.float32)
    return s if per_channel else s.reshape(())


# ------------------------------------------------------------------------------------- APQ
def _lr_view(w: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
    """Broadcast shapes of a right (K,) and a left (C,) scale against a (K, C, ...) weight."""
    shape_r = [w.shape[0]] + [1] * (w.dim() - 1)
    shape_l = [1, w.shape[1]] + [1] * (w.dim() - 2)
    return w, shape_r, shape_l


def apq_scales(w: torch.Tensor, bits: int, iters: int = APQ_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """Doubly channel-wise MMSE scales (Algorithm 2, alternating column / row projections).

    Returns ``(left (C,), right (K,))`` with ``w ~ left[c] * right[k] * clip(round(w / (left * right)))``.
    Two starts are run, Algorithm 2's max-based one and (chosen) per-channel PPQ with left = 1;
    the best iterate over both is kept, so the MSE is <= per-channel PPQ by construction.
    Left scales are normalised to geometric mean 1 (the scalar is movable between the two, App. C).
    """
    x, shape_r, shape_l = _lr_view(_check_weight(w))
    q = qmax(bits)
    red_r = [d for d in range(x.dim()) if d != 0]
    red_l = [d for d in range(x.dim()) if d != 1]

    def err(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return ((x - fake_quant(x, left.reshape(shape_l) * right.reshape(shape_r), bits)) ** 2).sum()

    def safe(s: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.isfinite(s) & (s > 0), s, fallback)

    t0 = safe(x.abs().amax(dim=red_r) / q, torch.ones(x.shape[0], dtype=x.dtype))
    s0 = safe((x / t0.reshape(shape_r)).abs().amax(dim=red_l) / q, torch.ones(x.shape[1], dtype=x.dtype))
    starts = [(s0, t0), (torch.ones(x.shape[1], dtype=x.dtype), ppq_scale(w, bits, per_channel=True).double())]
    best = min(starts, key=lambda lr: float(err(*lr)))
    best_e = err(*best)
    for left, right in starts:
        for _ in range(iters):
            xl = x / left.reshape(shape_l)
            qi = torch.clamp(torch.round(xl / right.reshape(shape_r)), -q, q)
            right = safe((qi * xl).sum(dim=red_r) / (qi * qi).sum(dim=red_r), right)
            xr = x / right.reshape(shape_r)
            qi = torch.clamp(torch.round(xr / left.reshape(shape_l)), -q, q)
            left = safe((qi * xr).sum(dim=red_l) / (qi * qi).sum(dim=red_l), left)
            e = err(left, right)
            if e < best_e:
                best, best_e = (left.clone(), right.clone()), e
    left, right = best
    g = torch.exp(torch.log(left).mean())
    return (left / g).to(torch.float32), (right * g).to(torch.float32)


def quant_mse(w: torch.Tensor, bits: int, right: torch.Tensor, left: torch.Tensor | None = None) -> float:
    """Mean squared weight error of the fake-quantized ``w`` with right (() or (K,)) and left (C,) scales."""
    x, shape_r, shape_l = _lr_view(_check_weight(w))
    s = right.double().reshape(shape_r) if right.dim() else right.double()
    if left is not None:
        s = s * left.double().reshape(shape_l)
    return float(((x - fake_quant(x, s, bits)) ** 2).mean())


# ------------------------------------------------------------------------------------- CLE
def find_cle_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(producer, consumer) module names of ``conv/linear -> ReLU -> conv/linear`` chains where the
    producer output reaches only that consumer (no fan-out, no residual) and the consumer has groups=1.

    ReLU is positively homogeneous, so scaling the producer's output channel m by C_m > 0 and
    the consumer's input channel m by 1 / C_m keeps the float function (App. D, footnote 5).
    ReLU6 is not homogeneous and is not crossed (chosen: keep the float function exact).
    """
    gm = fx.symbolic_trace(model)
    mods = dict(gm.named_modules())
    layer = (nn.Conv2d, nn.Linear)
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods[node.target], layer) or len(node.users) != 1:
            continue
        nxt = next(iter(node.users))
        while (nxt.op == "call_module" and isinstance(mods[nxt.target], (nn.Identity,))) and len(nxt.users) == 1:
            nxt = next(iter(nxt.users))
        is_relu = (nxt.op == "call_module" and isinstance(mods[nxt.target], nn.ReLU)) or \
                  (nxt.op == "call_function" and nxt.target in (torch.relu, nn.functional.relu))
        if not is_relu or len(nxt.users) != 1:
            continue
        cons = next(iter(nxt.users))
        if cons.op != "call_module" or not isinstance(mods[cons.target], layer):
            continue
        c = mods[cons.target]
        if isinstance(c, nn.Conv2d) and c.groups != 1:
            continue
        pairs.append((str(node.target), str(cons.target)))
    return pairs


def cle_factors(w_prev: torch.Tensor, w_next: torch.Tensor, bits_prev: int, bits_next: int,
                beta: float | None = None) -> torch.Tensor:
    """Cross-layer factors C_m (shape (M,)) of Eq. 19-21 from MMSE (PPQ) slice and tensor scales.

    Applied as ``W_prev[m] *= C_m``, ``W_next[:, m] /= C_m`` (Eq. 16). Chosen orientation: C_m brings
    each slice's MMSE range towards its layer's, as in the worked example of Eq. 17 (a narrow
    producer slice and a wide consumer slice give C_m > 1):
    ``2 log C_m = (1 + beta) log(s_prev / S_prev[m]) + (1 - beta) log(S_next[m] / s_next)``.
    ``beta`` defaults to +0.5 if the producer has fewer bits, -0.5 if more, 0 if equal (Eq. 21).
    """
    wp, wn = _check_weight(w_prev, "w_prev"), _check_weight(w_next, "w_next")
    if wp.shape[0] != wn.shape[1]:
        raise ValueError(f"w_prev has {wp.shape[0]} output channels but w_next has {wn.shape[1]} input channels")
    if beta is None:
        beta = 0.0 if bits_prev == bits_next else (CLE_BETA if bits_prev < bits_next else -CLE_BETA)
    s_prev = ppq_scale(wp, bits_prev).double()
    s_next = ppq_scale(wn, bits_next).double()
    sl_prev = ppq_scale(wp, bits_prev, per_channel=True).double()
    sl_next = ppq_scale(wn.transpose(0, 1), bits_next, per_channel=True).double()
    dead = (wp.reshape(wp.shape[0], -1).abs().amax(1) == 0) | \
        (wn.transpose(0, 1).reshape(wn.shape[1], -1).abs().amax(1) == 0)
    log_c = 0.5 * ((1 + beta) * torch.log(s_prev / sl_prev) + (1 - beta) * torch.log(sl_next / s_next))
    log_c = torch.where(dead | ~torch.isfinite(log_c), torch.zeros_like(log_c), log_c)
    return torch.exp(log_c).to(torch.float32)


@torch.no_grad()
def apply_cle(model: nn.Module, wbits: int | dict[str, int] = 4,
              pairs: Iterable[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """4-bit adapted CLE in place on a BN-folded ``model``; returns the pairs it equalised.

    ``wbits``: weight bits of every layer, or a dict layer name -> bits (missing names: 8).
    """
    mods = dict(model.named_modules())
    pairs = find_cle_pairs(model) if pairs is None else list(pairs)
    done = []
    for prev_name, next_name in pairs:
        if prev_name not in mods or next_name not in mods:
            raise ValueError(f"CLE pair ({prev_name!r}, {next_name!r}) names a module not in the model")
        prev, nxt = mods[prev_name], mods[next_name]
        bp = wbits if isinstance(wbits, int) else wbits.get(prev_name, 8)
        bn = wbits if isinstance(wbits, int) else wbits.get(next_name, 8)
        c = cle_factors(prev.weight, nxt.weight, bp, bn)
        prev.weight.mul_(c.reshape([-1] + [1] * (prev.weight.dim() - 1)))
        if prev.bias is not None:
            prev.bias.mul_(c)
        nxt.weight.div_(c.reshape([1, -1] + [1] * (nxt.weight.dim() - 2)))
        done.append((prev_name, next_name))
    return done


# ------------------------------------------------------------------------ activation ranges
@torch.no_grad()
def minmax_ranges(model: nn.Module, data: torch.Tensor, names: Iterable[str] | None = None,
                  batch_size: int = 64) -> dict[str, tuple[float, float]]:
    """Min and max (floats) of the output of each named module over ``data`` (N, ...) float32.

    ``names=None``: every Conv2d, Linear, ReLU, ReLU6 and the model input (key ``""``).
    """
    if not isinstance(data, torch.Tensor) or data.dim() < 2 or data.shape[0] == 0:
        raise ValueError("data must be a non-empty float tensor (N, ...)")
    mods = dict(model.named_modules())
    if names is None:
        names = [""] + [n for n, m in mods.items() if isinstance(m, (nn.Conv2d, nn.Linear, nn.ReLU, nn.ReLU6))]
    names = list(names)
    missing = [n for n in names if n and n not in mods]
    if missing:
        raise ValueError(f"modules not found in the model: {missing}")
    ranges: dict[str, list[float]] = {}

    def record(name: str, t: torch.Tensor) -> None:
        lo, hi = float(t.min()), float(t.max())
        r = ranges.setdefault(name, [math.inf, -math.inf])
        r[0], r[1] = min(r[0], lo), max(r[1], hi)

    hooks = [mods[n].register_forward_hook(lambda _m, _i, out, n=n: record(n, out)) for n in names if n]
    try:
        for i in range(0, data.shape[0], batch_size):
            xb = data[i:i + batch_size]
            if "" in names:
                record("", xb)
            model(xb)
    finally:
        for h in hooks:
            h.remove()
    return {k: (v[0], v[1]) for k, v in ranges.items()}


def act_qparams(lo: float, hi: float, bits: int = 8, signed: bool | None = None,
                symmetric: bool = False) -> tuple[float, int]:
    """Per-tensor (scale, zero point) covering [min(lo, 0), max(hi, 0)].

    ``signed=None``: unsigned when lo >= 0 (after ReLU, zp = 0), else signed. ``symmetric``:
    zp = 0 and the scale covers max(|lo|, |hi|) (signed) or hi (unsigned; lo is then clipped to 0).
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"activation bits must be in 2..8, got {bits}")
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if signed is None:
        signed = lo < 0
    qlo, qhi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    if symmetric:
        r = max(-lo, hi) if signed else hi
        scale = r / qhi if r > 0 else 1.0
        return float(torch.tensor(scale, dtype=torch.float32)), 0
    scale = (hi - lo) / (qhi - qlo) if hi > lo else 1.0
    zp = int(round(qlo - lo / scale))
    return float(torch.tensor(scale, dtype=torch.float32)), max(qlo, min(qhi, zp))
