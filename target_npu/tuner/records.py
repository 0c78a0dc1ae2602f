"""Tuning records: JSON lines, one measured schedule per line.

A record is ``{"version": 2, "layer_key": str, "config": <hw_model Tiling.to_dict()>, "cycles": int,
"npu_config_hash": str, "tuner": str}``. Reading never raises on a bad record: a corrupt, foreign,
other-version (version 1 held the tuner's own channel-count knobs) or other-NPUConfig record, or one whose
tiling ``hw_model.layers.check_tiling`` rejects for the layer, gives a ``warnings.warn`` naming it and is
skipped, so the caller falls back to the default schedule.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hw_model.config import DEFAULT_CONFIG, NPUConfig

from .space import ORDERS, ConvSpec, Tiling, canonical, group_blocks, tunable, why_invalid

RECORD_VERSION = 2
"""Format version of a record line; bump when the knobs or the key change (2: hw_model Tiling knobs)."""
_KEYS = {"version", "layer_key", "config", "cycles", "npu_config_hash", "tuner"}
_TILING_KEYS = {"ob_tile", "rows", "cb_tile", "loop_order", "nbuf"}


class TuningRecordWarning(UserWarning):
    """A tuning record was ignored (corrupt, foreign, other version or other NPUConfig)."""


def config_hash(cfg: NPUConfig) -> str:
    """First 16 hex digits of the sha256 of the NPUConfig as sorted JSON."""
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def layer_key(spec: ConvSpec, cfg: NPUConfig = DEFAULT_CONFIG) -> str:
    """Stable key of a conv layer's shape, e.g. ``conv2d_n1_c64_h56_w56_k64_3x3_s1x1_p1x1x1x1_d1x1_g1``,
    plus, when its input channels are not all in ISG group 0, the input blocks per group in layout
    order (``_isg1x2.2x1.0x1``: 2 blocks of group 1, 1 of group 2, 1 of group 0), which changes the program.
    """
    if not isinstance(spec, ConvSpec):
        raise TypeError(f"layer_key: spec must be a hw_model.layer_specs.ConvSpec, got {type(spec).__name__}")
    j = lambda v: "x".join(str(int(x)) for x in v)  # noqa: E731
    gb = group_blocks(spec, cfg)
    isg = "" if all(g == 0 for g, _ in gb) else "_isg" + ".".join(f"{g}x{n}" for g, n in gb)
    return (f"conv2d_n{spec.n}_c{spec.c}_h{spec.h}_w{spec.w}_k{spec.k}_{spec.kh}x{spec.kw}_s{j(spec.stride)}"
            f"_p{j(spec.pads)}_d{j(spec.dilation)}_g{spec.groups}{isg}")


def tiling_from_dict(d: Any) -> Tiling:
    """A ``hw_model`` Tiling from its ``to_dict()``; ValueError/TypeError naming the bad field."""
    if not isinstance(d, dict):
        raise TypeError(f"tiling must be a dict, got {type(d).__name__}")
    if set(d) != _TILING_KEYS:
        raise ValueError(f"tiling keys must be {sorted(_TILING_KEYS)}, got {sorted(d)}")
    for k in ("ob_tile", "rows", "cb_tile", "nbuf"):
        if not isinstance(d[k], int) or isinstance(d[k], bool):
            raise ValueError(f"tiling.{k} must be an int, got {d[k]!r}")
    if d["loop_order"] not in ORDERS:
        raise ValueError(f"tiling.loop_order must be one of {ORDERS}, got {d['loop_order']!r}")
    t = Tiling(**d)
    t.check()
    return t


def make_record(spec: ConvSpec, tiling: Tiling, cycles: int, cfg: NPUConfig, tuner: str) -> dict[str, Any]:
    """One record (a dict) of a measured tiling of ``spec``."""
    return {"version": RECORD_VERSION, "layer_key": layer_key(spec, cfg), "config": tiling.to_dict(),
            "cycles": int(cycles), "npu_config_hash": config_hash(cfg), "tuner": tuner}

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
        tiling = tiling_from_dict(rec["config"])
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


def best_tiling(records: str | Path | Iterable[dict[str, Any]], spec: ConvSpec, cfg: NPUConfig) -> Tiling | None:
    """Fastest recorded tiling of the layer ``spec`` for this NPUConfig, or None (use the default schedule).

    ``records``: a path, the output of :func:`load_records`, or raw record dicts. Records of another
    NPUConfig, and tilings ``check_tiling`` rejects for ``spec``, warn and are skipped. Layers the tuner
    does not tune give None.
    """
    if tunable(spec) is not None:
        return None
    if not isinstance(records, list) or any("where" not in r for r in records if isinstance(r, dict)):
        records = load_records(records)
    key, h = layer_key(spec, cfg), config_hash(cfg)
    best: tuple[int, Tiling] | None = None
    for r in records:
        if r["layer_key"] != key:
            continue
        if r["npu_config_hash"] != h:
            _warn(r["where"], f"made for another NPUConfig (hash {r['npu_config_hash']}, this one {h})")
            continue
        why = why_invalid(spec, r["config"], cfg)
        if why is not None:
            _warn(r["where"], f"tiling invalid for {key}: {why}")
            continue
        if best is None or r["cycles"] < best[0]:
            best = (r["cycles"], canonical(spec, r["config"], cfg))
    return None if best is None else best[1]
