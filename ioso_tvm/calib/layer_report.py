"""Per-layer quantization error report of a calibrated :class:`~ioso_tvm.calib.qmodel.QuantModel`.

``layer_report(qmodel, data, compiled=None)`` gives one row (a dict) per quantized conv / linear
layer, in program order:

=================  ==========================================================================
key                value
=================  ==========================================================================
index, name, op    position among the quantized layers, module path, key in ``qmodel.ops``
kind               "conv", "dwconv" (grouped / depthwise conv) or "linear"
block              the reconstruction block holding the layer (whose loss the row shows)
wbits              weight bits
abits_in/out       bits of the layer's input / output activation
in/out_channels    input / output channels
isg_groups         channels per ISG group (list, one entry per ``NPUConfig.group_factors``);
                   sums to ``in_channels``
isg_factors        the groups' factors (``NPUConfig.group_factors``: 1, 1-2^-4, 1+2^-4)
sqnr_db            SQNR (dB) of the fake-quant model's output of the layer against the float
                   model's at the same layer: the error accumulated up to and including it
sqnr_local_db      SQNR (dB) of the quantized layer alone: fed the float model's input of the
                   layer, compared with the float layer on it (its own weight, ISG, OSO and
                   output quantization error); +inf where it is exact
rec_loss_before    the block's reconstruction loss before / after calibration (engine
rec_loss_after     ``history``: ``rec_loss_before`` / ``rec_loss_after``); None where not
                   recorded (method "rtn" and QFT do not reconstruct blocks)
cycles, us         the cycle model's static estimate of the layer (``CompiledModel.report()``,
                   its rows of kind "conv" matched by order); None without ``compiled``
worst              True on one row: the layer to keep at 8 bits (see :func:`worst_layer`)
=================  ==========================================================================

SQNR = 10 log10(sum f^2 / sum (q - f)^2) over every element of ``samples`` calibration inputs; the
outputs are caught with ``register_forward_hook`` on the quantized layers during
``QuantModel.forward``; the float activations come from ``QuantModel.run(..., quant=False)``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .device import module_device
from .qmodel import QuantModel, check_calib_data
from .qmodules import QLayer

REPORT_SAMPLES = 64
"""Calibration inputs the SQNR is measured on. Chosen: two of ``CalibConfig.batch_size`` (32), a few
seconds for ResNet-20 (measured: 4.8 s, one CPU thread); ``layer_report(..., samples=N)`` takes more."""
_CHUNK = 64  # samples per forward pass (memory bound only; the sums are the same)


def _sqnr_db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _kind(layer: QLayer) -> str:
    return "dwconv" if layer.depthwise else layer.kind


def _block_losses(qm: QuantModel, key: str) -> tuple[str, float | None, float | None]:
    """(block name, loss before, loss after) of the block holding op ``key``; AdaRound's blocks are ops."""
    hist = getattr(qm, "calib_history", None) or {}
    block = next((b.name for b in qm.blocks if key in b.layers), key)
    name = key if key in hist else block
    h = hist.get(name, {})
    return name, h.get("rec_loss_before"), h.get("rec_loss_after")


def _latencies(compiled: Any, n_layers: int) -> list[tuple[int, float]]:
    """(cycles, us) per quantized layer from ``compiled.report()["layers"]``, matched by order: the rows of
    kind "conv" (the compiler's kind for conv, depthwise conv and Gemm) follow the exported graph, which
    follows the QuantModel's program. Not by name: the compiler names layers by node ("conv5"), which can
    collide with module names of another layer. The counts must be equal."""
    picked = [r for r in compiled.report()["layers"] if r["kind"] == "conv"]
    if len(picked) != n_layers:
        raise ValueError(f"compiled model has {len(picked)} conv/linear layers, the QuantModel {n_layers}; "
                         "pass the CompiledModel of this QuantModel")
    return [(int(r["cycles"]), float(r["us"])) for r in picked]


def worst_layer(rows: list[dict[str, Any]]) -> int | None:
    """Index of the row with the lowest ``sqnr_local_db`` among layers below 8 bits (weights or output);
    the lowest of all rows when every layer is at 8 bits; None for no rows."""
    cand = [r for r in rows if r["wbits"] < 8 or r["abits_out"] < 8] or rows
    if not cand:
        return None
    return min(cand, key=lambda r: r["sqnr_local_db"])["index"]


@torch.no_grad()
def layer_report(qmodel: QuantModel, data: torch.Tensor | np.ndarray, compiled: Any = None,
                 samples: int = REPORT_SAMPLES) -> list[dict[str, Any]]:
    """One row per quantized layer of ``qmodel`` (module docstring), measured on the first ``samples`` of
    ``data`` (float32 (N, C, H, W) model inputs). ``compiled``: its ``CompiledModel`` (adds cycles, us)."""
    if not isinstance(qmodel, QuantModel):
        raise TypeError(f"qmodel must be a calibrated QuantModel (ioso_tvm.calibrate), got {type(qmodel).__name__}")
    if int(samples) < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    x = check_calib_data(data, qmodel.input_shape, 1)[: int(samples)]
    steps = {st.op: st for st in qmodel.program}
    layers = [(k, m) for k, m in qmodel.ops.items() if isinstance(m, QLayer)]
    for k, m in layers:
        if not m.isg.hard:
            raise ValueError(f"layer {k!r}: ISG groups are not hardened; report a calibrated model")
    energy = {k: np.zeros(4) for k, _ in layers}  # signal, noise, local signal, local noise (float64)
    caught: dict[str, torch.Tensor] = {}
    device = module_device(qmodel)
    was_training = qmodel.training
    qmodel.eval()
    for i in range(0, x.shape[0], _CHUNK):
        xb = x[i:i + _CHUNK]
        hooks = [m.register_forward_hook(lambda _m, _i, out, k=k: caught.__setitem__(k, out)) for k, m in layers]
        try:
            qmodel(xb)
        finally:
            for h in hooks:
                h.remove()
        env = qmodel.run({"input": xb.to(device)}, quant=False)
        for k, m in layers:
            f = env[steps[k].out].double()
            local = m(env[steps[k].inputs[0]]).double()
            energy[k] += [f.pow(2).sum().item(), (caught[k].double() - f).pow(2).sum().item(),
                          f.pow(2).sum().item(), (local - f).pow(2).sum().item()]
    qmodel.train(was_training)
    lat = _latencies(compiled, len(layers)) if compiled is not None else [(None, None)] * len(layers)
    rows = []
    for idx, ((k, m), (cyc, us)) in enumerate(zip(layers, lat)):
        block, before, after = _block_losses(qmodel, k)
        e = energy[k]
        n_groups = len(m.isg.cfg.group_factors)
        rows.append({
            "index": idx, "name": m.name, "op": k, "kind": _kind(m), "block": block,
            "wbits": int(m.wq.bits), "abits_in": int(qmodel.tensor_quantizer(steps[k].inputs[0]).bits),
            "abits_out": int(m.outq.bits), "in_channels": int(m.in_channels), "out_channels": int(m.weight.shape[0]),
            "isg_groups": [int(c) for c in torch.bincount(m.isg.groups.cpu(), minlength=n_groups)],
            "isg_factors": [float(f) for f in m.isg.cfg.group_factors],
            "sqnr_db": _sqnr_db(e[0], e[1]), "sqnr_local_db": _sqnr_db(e[2], e[3]),
            "rec_loss_before": before, "rec_loss_after": after, "cycles": cyc, "us": us, "worst": False})
    w = worst_layer(rows)
    if w is not None:
        rows[w]["worst"] = True
    return rows


def _num(v: float | None, fmt: str) -> str:
    if v is None:
        return "-"
    return ("inf" if v > 0 else "-inf") if math.isinf(v) else format(v, fmt)


def format_layer_report(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of ``rows``; the worst layer is marked ``<- keep at 8 bit``."""
    head = ["#", "layer", "kind", "W", "A in/out", "ISG groups", "SQNR dB", "local dB", "rec loss before -> after",
            "cycles", "us"]
    body = []
    for r in rows:
        loss = "-" if r["rec_loss_before"] is None else \
            f"{_num(r['rec_loss_before'], '.4g')} -> {_num(r['rec_loss_after'], '.4g')}"
        body.append([str(r["index"]), r["name"], r["kind"], str(r["wbits"]), f"{r['abits_in']}/{r['abits_out']}",
                     "/".join(map(str, r["isg_groups"])), _num(r["sqnr_db"], ".2f"), _num(r["sqnr_local_db"], ".2f"),
                     loss, _num(r["cycles"], "d"), _num(r["us"], ".2f")])
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r, cells in zip(rows, body):
        line = "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
        lines.append(line + ("  <- keep at 8 bit" if r["worst"] else ""))
    return "\n".join(lines)


def layer_report_json(rows: list[dict[str, Any]]) -> str:
    """``rows`` as strict JSON text: a non-finite SQNR (exact layer) becomes null."""
    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v
    return json.dumps([{k: clean(v) for k, v in r.items()} for r in rows], indent=1, allow_nan=False)


def plot_layer_report(rows: list[dict[str, Any]], png: str | Path) -> Path:
    """Write a PNG: SQNR bars per layer (local, with the accumulated SQNR as a line), a star on the
    worst layer, and below the ISG channels per group stacked. Matplotlib's Agg canvas (no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("no rows to plot")
    png = Path(png)
    names = [r["name"] for r in rows]
    pos = np.arange(len(rows))

    def finite(vals: list[float]) -> np.ndarray:  # +inf (exact) drawn at the highest finite value
        a = np.array(vals, dtype=np.float64)
        top = np.nanmax(np.where(np.isfinite(a), a, np.nan)) if np.isfinite(a).any() else 0.0
        return np.where(np.isposinf(a), top, np.where(np.isneginf(a), 0.0, a))

    local, acc = finite([r["sqnr_local_db"] for r in rows]), finite([r["sqnr_db"] for r in rows])
    fig = Figure(figsize=(max(6.0, 0.45 * len(rows) + 2), 6.5), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax, axg = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    ax.bar(pos, local, color="tab:blue", label="layer alone (float input)")
    ax.plot(pos, acc, "o-", color="tab:orange", label="whole model up to the layer")
    w = next((r["index"] for r in rows if r["worst"]), None)
    if w is not None:
        ax.plot([w], [local[w]], marker="*", markersize=16, color="tab:red", linestyle="none",
                label=f"worst: {names[w]} (keep at 8 bit)")
    ax.set_ylabel("SQNR vs float (dB)")
    ax.legend(fontsize=8)
    counts = np.array([r["isg_groups"] for r in rows], dtype=np.float64)
    bottom = np.zeros(len(rows))
    for g in range(counts.shape[1]):
        axg.bar(pos, counts[:, g], bottom=bottom, label=f"group {g} (x{rows[0]['isg_factors'][g]:g})")
        bottom += counts[:, g]
    axg.set_ylabel("input channels per ISG group")
    axg.legend(fontsize=8)
    axg.set_xticks(pos, [f"{n}\nW{r['wbits']}A{r['abits_out']}" for n, r in zip(names, rows)], rotation=60,
                   fontsize=7, ha="right")
    fig.savefig(png, format="png", dpi=100)
    return png
