"""Tuning records: JSON lines, one measured schedule per line.

A record is ``{"version": 1, "layer_key": str, "config": <Tiling dict>, "cycles": int,
"npu_config_hash": str, "tuner": str}``. Reading never raises on a bad record: a corrupt,
foreign, other-version or other-NPUConfig record, or one whose tiling is invalid for the
layer, gives a ``warnings.warn`` naming it and is skipped, so the caller falls back to the
default schedule.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hw_model.config import NPUConfig

from .space import ConvSpec, Tiling, why_invalid

RECORD_VERSION = 1
"""Format version of a record line; bump when the knobs or the key change."""
_KEYS = {"version", "layer_key", "config", "cycles", "npu_config_hash", "tuner"}


class TuningRecordWarning(UserWarning):
    """A tuning record was ignored (corrupt, foreign, other version or other NPUConfig)."""


def config_hash(cfg: NPUConfig) -> str:
    """First 16 hex digits of the sha256 of the NPUConfig as sorted JSON."""
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def layer_key(spec: ConvSpec, cfg: NPUConfig | None = None) -> str:
    """Stable key of a conv layer's shape, e.g. ``conv2d_ic64_oc64_h56_w56_k3x3_s1_p1_g1``.

    ``cfg`` is accepted for symmetry; the NPUConfig is checked by each record's hash.
    """
    if not isinstance(spec, ConvSpec):
        raise TypeError(f"layer_key: spec must be a ConvSpec, got {type(spec).__name__}")
    return (f"conv2d_ic{spec.in_ch}_oc{spec.out_ch}_h{spec.in_h}_w{spec.in_w}_k{spec.kh}x{spec.kw}"
            f"_s{spec.stride}_p{spec.pad}_g{spec.groups}")


def make_record(key: str, tiling: Tiling, cycles: int, cfg: NPUConfig, tuner: str) -> dict[str, Any]:
    """One record as a dict."""
    return {"version": RECORD_VERSION, "layer_key": key, "config": tiling.to_dict(), "cycles": int(cycles),
            "npu_config_hash": config_hash(cfg), "tuner": tuner}


def save_records(path: str | Path, records: Iterable[dict[str, Any]], append: bool = True) -> Path:
    """Write records as JSON lines (appending by default); returns the path."""
    path = Path(path)
    with path.open("a" if append else "w") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    return path


def _warn(where: str, why: str) -> None:
    warnings.warn(f"tuning record {where} ignored: {why}", TuningRecordWarning, stacklevel=3)


def _check(rec: Any, where: str) -> dict[str, Any] | None:
    if not isinstance(rec, dict):
        _warn(where, f"not a JSON object ({type(rec).__name__})")
        return None
    if "version" in rec and rec["version"] != RECORD_VERSION:
        _warn(where, f"version {rec['version']!r}, this tuner reads version {RECORD_VERSION}")
        return None
    if set(rec) != _KEYS:
        _warn(where, f"foreign record: keys {sorted(rec)}, expected {sorted(_KEYS)}")
        return None
    try:
        tiling = Tiling.from_dict(rec["config"])
    except (TypeError, ValueError) as e:
        _warn(where, f"bad config: {e}")
        return None
    c = rec["cycles"]
    if not isinstance(c, int) or isinstance(c, bool) or c <= 0:
        _warn(where, f"cycles must be a positive int, got {c!r}")
        return None
    if not isinstance(rec["layer_key"], str) or not isinstance(rec["npu_config_hash"], str):
        _warn(where, "layer_key and npu_config_hash must be strings")
        return None
    return {**rec, "config": tiling, "where": where}


def load_records(source: str | Path | Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Valid records of a JSON-lines file (or of an iterable of dicts), ``config`` parsed to a Tiling.

    Each parsed record gains ``"where"`` (``file:line`` or ``record #i``). Bad lines warn and are skipped;
    a missing or unreadable file warns and gives no records.
    """
    out: list[dict[str, Any]] = []
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            _warn(str(path), f"cannot read the file ({e})")
            return out
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                _warn(where, f"corrupt JSON ({e.msg})")
                continue
            r = _check(rec, where)
            if r is not None:
                out.append(r)
        return out
    for i, rec in enumerate(source):
        r = _check(rec, f"record #{i}")
        if r is not None:
            out.append(r)
    return out


def best_tiling(records: str | Path | Iterable[dict[str, Any]], layer_key: str, cfg: NPUConfig,
                spec: ConvSpec | None = None) -> Tiling | None:
    """Fastest recorded tiling of ``layer_key`` for this NPUConfig, or None (use the default schedule).

    ``records``: a path, or the output of :func:`load_records`, or raw record dicts. Records of
    another NPUConfig, and (when ``spec`` is given) tilings invalid for the layer, warn and are skipped.
    """
    if not isinstance(records, list) or any("where" not in r for r in records if isinstance(r, dict)):
        records = load_records(records)
    h = config_hash(cfg)
    best: tuple[int, Tiling] | None = None
    for r in records:
        if r["layer_key"] != layer_key:
            continue
        if r["npu_config_hash"] != h:
            _warn(r["where"], f"made for another NPUConfig (hash {r['npu_config_hash']}, this one {h})")
            continue
        if spec is not None:
            why = why_invalid(spec, r["config"], cfg)
            if why is not None:
                _warn(r["where"], f"tiling invalid for {layer_key}: {why}")
                continue
        if best is None or r["cycles"] < best[0]:
            best = (r["cycles"], r["config"])
    return None if best is None else best[1]
