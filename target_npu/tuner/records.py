"""Tuning records: JSON lines, one measured schedule per line.

A record is ``{"version": 2, "layer_key": str, "config": <hw_model Tiling.to_dict()>, "cycles": int,
"npu_config_hash": str, "tuner": str}``. Reading never raises on a bad record: a corrupt, foreign,
other-version (version 1 held the tuner's own channel-count knobs) or other-NPUConfig record, or one whose
tiling ``hw_model.layers.check_tiling`` rejects for the layer, gives a ``warnings.warn`` naming it and is
skipped, so the caller falls back to the default schedule. Output stays bounded under junk: up to
``MAX_WARNINGS`` bad records of one file (or one ``best_tiling`` call) warn one by one, more give ONE
summary warning (the count, the first bad line and why). JSON nested too deeply is a bad line.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
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
MAX_WARNINGS = 10
"""Bad records of one source that warn one by one; more give one summary warning."""
MAX_LINE_CHARS = 1 << 20
"""A record line longer than this (1 MiB; a real one is ~250 characters) is a bad line, not parsed."""


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
    """Write records as JSON lines (appending by default); returns the path.

    Atomic: the old content (when appending) and the new lines go to a temporary file in the same
    folder, renamed onto ``path``; a failure leaves ``path`` as it was.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"tuning records path {str(path)!r} is a directory")
    old = path.read_bytes() if append and path.is_file() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(old)
            for r in records:
                f.write((json.dumps(r, sort_keys=True) + "\n").encode())
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.is_file() else 0o666 & ~mask)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


class _Warnings:
    """Collects the bad records of one source; :meth:`flush` warns each (few) or once in summary (many)."""

    def __init__(self, source: str) -> None:
        self.source, self.bad, self.count = source, [], 0

    def __call__(self, where: str, why: str) -> None:
        self.count += 1
        if len(self.bad) <= MAX_WARNINGS:
            self.bad.append((where, _short(why)))

    def flush(self) -> None:
        if self.count > MAX_WARNINGS:
            where, why = self.bad[0]
            warnings.warn(f"tuning records {self.source}: {self.count} bad records ignored; the first, {where}: "
                          f"{why}", TuningRecordWarning, stacklevel=3)
        else:
            for where, why in self.bad:
                warnings.warn(f"tuning record {where} ignored: {why}", TuningRecordWarning, stacklevel=3)
        self.bad, self.count = [], 0


def _warn(where: str, why: str) -> None:
    warnings.warn(f"tuning record {where} ignored: {_short(why)}", TuningRecordWarning, stacklevel=3)


def _check(rec: Any, where: str, warn: Any = _warn) -> dict[str, Any] | None:
    if not isinstance(rec, dict):
        warn(where, f"not a JSON object ({type(rec).__name__})")
        return None
    if "version" in rec and rec["version"] != RECORD_VERSION:
        warn(where, f"version {rec['version']!r}, this tuner reads version {RECORD_VERSION}")
        return None
    if set(rec) != _KEYS:
        warn(where, f"foreign record: keys {sorted(rec)}, expected {sorted(_KEYS)}")
        return None
    try:
        tiling = tiling_from_dict(rec["config"])
    except (TypeError, ValueError) as e:
        warn(where, f"bad config: {e}")
        return None
    c = rec["cycles"]
    if not isinstance(c, int) or isinstance(c, bool) or c <= 0:
        warn(where, f"cycles must be a positive int, got {c!r}")
        return None
    if not isinstance(rec["layer_key"], str) or not isinstance(rec["npu_config_hash"], str):
        warn(where, "layer_key and npu_config_hash must be strings")
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
        name = str(path)
        warn = _Warnings(name)
        try:
            with path.open("rb") as f:  # streamed: a huge file is not read into memory at once
                for i, raw in enumerate(f, 1):
                    r = _parse_line(raw, name, i, warn)
                    if r is not None:
                        out.append(r)
        except OSError as e:
            warn(str(path), f"cannot read the file ({e})")
        warn.flush()
        return out
    warn = _Warnings("given")
    for i, rec in enumerate(source):
        try:
            r = _check(rec, f"record #{i}", warn)
        except RecursionError:
            warn(f"record #{i}", "nested too deeply")
            continue
        if r is not None:
            out.append(r)
    warn.flush()
    return out


def _parse_line(raw: bytes, name: str, i: int, warn: _Warnings) -> dict[str, Any] | None:
    """The checked record of line ``i`` of file ``name``, or None (blank or bad: reported to ``warn``)."""
    start = raw.lstrip()[:1]
    if start != b"{":  # fast path for junk: a record is a JSON object
        if start:
            warn(f"{name}:{i}", f"not a JSON object (the line starts with {start.decode('latin-1')!r})")
        return None
    where = f"{name}:{i}"
    if len(raw) > MAX_LINE_CHARS:
        warn(where, f"line of {len(raw)} bytes, longer than {MAX_LINE_CHARS}")
        return None
    try:
        line = raw.decode()
    except UnicodeDecodeError as e:
        warn(where, f"not UTF-8 text ({e.reason} at byte {e.start})")
        return None
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        warn(where, f"corrupt JSON ({e.msg})")
        return None
    except RecursionError:
        warn(where, "JSON nested too deeply")
        return None
    try:
        return _check(rec, where, warn)
    except RecursionError:
        warn(where, "JSON nested too deeply")
        return None


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
    warn = _Warnings(f"of layer {key}")
    for r in records:
        if r["layer_key"] != key:
            continue
        if r["npu_config_hash"] != h:
            warn(r["where"], f"made for another NPUConfig (hash {r['npu_config_hash']}, this one {h})")
            continue
        why = why_invalid(spec, r["config"], cfg)
        if why is not None:
            warn(r["where"], f"tiling invalid for {key}: {why}")
            continue
        if best is None or r["cycles"] < best[0]:
            best = (r["cycles"], canonical(spec, r["config"], cfg))
    warn.flush()
    return None if best is None else best[1]
