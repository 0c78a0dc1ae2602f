"""Network-level cycle report: per-layer reports (from :func:`hw_model.cycles.layer_report`) summed,
written as JSON, and a stacked-bar plot of where the cycles go (matplotlib, Agg backend)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hw_model.config import DEFAULT_CONFIG, NPUConfig
from hw_model.cycles import UNITS


def network_report(layers: list[dict[str, Any]], cfg: NPUConfig = DEFAULT_CONFIG) -> dict[str, Any]:
    """Sum of per-layer reports (layers run one after another): cycles, us, MACs, utilisation."""
    if not isinstance(layers, list) or not all(isinstance(r, dict) and "cycles" in r for r in layers):
        raise ValueError("network_report: layers must be a list of layer reports (dicts with 'cycles')")
    cycles = sum(r["cycles"] for r in layers)
    macs = sum(r["macs"] for r in layers)
    peak = cfg.macs_per_cycle
    return {"cycles": cycles, "us": cycles / cfg.clock_mhz, "macs": macs,
            "mac_utilisation": macs / (cycles * peak) if cycles else 0.0, "layers": layers,
            "config": cfg.to_dict()}


def save_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write a report as indented JSON."""
    path = Path(path)
    path.write_text(json.dumps(report, indent=1))
    return path


def plot_breakdown(layers: list[dict[str, Any]], path: str | Path, title: str = "cycles per layer") -> Path:
    """Stacked bars per layer: busy cycles of each unit (load, mac, acc, post, alu, store) and the
    layer's total (line markers) -- overlap shows as bars taller than the total."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not layers:
        raise ValueError("plot_breakdown: no layers to plot")
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers)), 4))
    xs = range(len(layers))
    bottom = [0] * len(layers)
    for unit in UNITS:
        vals = [r["busy"].get(unit, 0) for r in layers]
        ax.bar(xs, vals, bottom=bottom, label=unit)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.plot(xs, [r["cycles"] for r in layers], "k_", markersize=14, label="total (overlapped)")
    ax.set_xticks(list(xs), [f"{i}:{r.get('layer', '?')}" for i, r in enumerate(layers)], rotation=90, fontsize=7)
    ax.set_ylabel("cycles")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
