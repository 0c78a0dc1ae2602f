"""The NPU's parameters: one frozen dataclass, the single source of hardware numbers.

Every field says where its value comes from. "Journal" is the WAPS-Quant paper
(`papers/001`). Fields marked "fitted to Table 7" come from the grid fit of
`benchmarks/latency_table7.py --fit` on ResNet-50 (the journal's Table 7); `docs/cycle_model.md`
gives the result and what it does not explain (MobileNetV2).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

MAC_BLOCK = 16
"""Channels per MAC block, fixed by the ISA (``hw_model.instructions.BLOCK``): ``mac_rows`` and
``mac_cols`` must equal it until the instructions are parameterised."""


def _number(name: str, v: Any, typ: Any) -> int | float:
    """A count (int field: a real int, not bool / float) or a finite real (float field), > 0."""
    if typ in (float, "float"):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
            raise ValueError(f"NPUConfig.{name} must be a finite positive number, got {v!r}")
        v = float(v)
    else:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"NPUConfig.{name} must be a positive int, got {v!r} ({type(v).__name__})")
        v = int(v)
    if v <= 0:
        raise ValueError(f"NPUConfig.{name} must be positive, got {v!r}")
    return v


@dataclass(frozen=True)
class NPUConfig:
    """Hardware description shared by the compiler, the simulator and the cycle model."""

    # --- compute ---------------------------------------------------------------------------
    pe_arrays: int = 4
    """Number of PE arrays working in parallel. Journal Sec. V-D / Table 7: "four 16x16 PE arrays"."""
    mac_rows: int = 16
    """Input channels reduced per cycle by one array (MAC rows). Journal App. A-D: 16 (input channel)."""
    mac_cols: int = 16
    """Output channels produced per cycle by one array (MAC columns). Journal App. A-D: 16 (output channel)."""
    post_lanes: int = 8
    """Values per cycle through WAPS shift-add, NORM, ACT and QUANT. Journal App. A-D: "8 data in 1 cycle"."""
    clock_mhz: float = 800.0
    """Core clock in MHz. Journal Sec. V-D: "synthesized at 800 MHz"."""
    acc_bits: int = 32
    """Accumulator (D1/D2) width in bits. Chosen: int32, the usual int8 MAC accumulator (DESIGN numeric contract)."""

    # --- input-channel scale groups (ISG) ----------------------------------------------------
    isg_group_signs: tuple[int, ...] = (0, -1, 1)
    """Group g scales by 1 + sign_g * 2**-isg_shift: x1, x(1-2^-4), x(1+2^-4).
    Journal Eq. 14 ("1.0 +- 2^-n"), DESIGN."""
    isg_shift: int = 4
    """n of the fixed shifter (arithmetic right shift of the int32 partial sum). DESIGN: 2^-4."""
    granularity: int = 16
    """Channels per group must come in multiples of this. Journal App. A-C; = mac_rows so groups fill whole blocks."""

    # --- memories (not given by the papers: chosen, then fitted) ----------------------------
    scratchpad_kib: int = 512
    """Activation scratchpad in KiB. Chosen: a typical edge-NPU SRAM; the fit keeps it (Table 7 needs no spills)."""
    weight_buf_kib: int = 256
    """Weight buffer in KiB. Chosen: holds the largest ResNet-50 3x3 filter tile (256 oc x 16 ic x 9)
    many times over."""
    acc_buf_kib: int = 256
    """Accumulator (D2) buffer, int32, in KiB. Fitted to Table 7 by benchmarks/latency_table7.py
    (grid 64/128/256; the journal gives no size)."""
    isg_d1_kib: int = 256
    """ISG D1 partial-sum bank (int32) in KiB, beside the D2 accumulator. Journal App. A-A, Fig. 5: D2 is
    the baseline accumulator register, ISG adds D1 registers "necessary for accumulation"; chosen equal
    to ``acc_buf_kib`` (one D1 per D2; fitted with it). Only programs with scaled groups use it."""
    const_buf_kib: int = 32
    """NORM / ALU constant buffer (float32) in KiB. Chosen: ma, mb, bias of a 2048-channel add (ResNet-50) = 24 KiB."""
    pixels_per_cycle: int = 8
    """Output pixels one PE array serves per cycle (each with its own 16x16 MAC slice sharing the weights).
    Fitted to Table 7 by benchmarks/latency_table7.py (grid 4/8): ResNet-50 (4.1 GMAC) at 4 arrays x 256 MAC
    x 800 MHz alone would take ~5 ms > 1762 us, so the journal's arrays must do more than 256 MAC/cycle
    (docs/cycle_model.md)."""
    dram_bytes_per_cycle: float = 64.0
    """DRAM bandwidth in bytes per core cycle (64 = 51.2 GB/s at 800 MHz). Fitted to Table 7 by
    benchmarks/latency_table7.py (grid 32/48/64/96); high for an edge part: it also stands for the
    on-chip reuse between layers that the per-layer model does not capture (docs/cycle_model.md)."""
    instr_overhead_cycles: int = 16
    """Fixed issue/setup cycles per instruction. Fitted to Table 7 by benchmarks/latency_table7.py
    (grid 4/8/16)."""
    dma_burst_cycles: int = 8
    """Setup cycles of one extra DRAM burst: a gathered LOAD pays it once per run of consecutive
    channel-table entries beyond the first, per (i, j) row. Chosen: ~10 ns at 800 MHz, a DRAM burst's
    setup; no paper gives a number, and it is not fitted (Table 7's layers need no gather)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "isg_group_signs":
                if isinstance(v, list):
                    v = tuple(v)
                    object.__setattr__(self, f.name, v)
                if not isinstance(v, tuple) or not v or any(type(s) is not int or s not in (-1, 0, 1) for s in v):
                    raise ValueError(f"NPUConfig.isg_group_signs must be a non-empty tuple of -1/0/+1 ints, got {v!r}")
                continue
            object.__setattr__(self, f.name, _number(f.name, v, f.type))
        for name in ("mac_rows", "mac_cols"):
            if getattr(self, name) != MAC_BLOCK:
                raise ValueError(f"NPUConfig.{name} must be {MAC_BLOCK}: the ISA's channel block "
                                 f"(hw_model.instructions.BLOCK) is fixed at {MAC_BLOCK}, got {getattr(self, name)!r}")
        if self.acc_bits != 32:
            raise ValueError(f"NPUConfig.acc_bits must be 32: the numeric contract (hw_model.reference) accumulates "
                             f"in int32, got {self.acc_bits!r}")
        if not 1 <= self.isg_shift < self.acc_bits:
            raise ValueError(f"NPUConfig.isg_shift must be in 1..{self.acc_bits - 1}, got {self.isg_shift}")

    @property
    def num_groups(self) -> int:
        """Number of ISG groups (3 by default)."""
        return len(self.isg_group_signs)

    @property
    def group_factors(self) -> tuple[float, ...]:
        """Real scale of each group, e.g. (1.0, 0.9375, 1.0625)."""
        return tuple(1.0 + s * 2.0 ** -self.isg_shift for s in self.isg_group_signs)

    def group_of_factor(self, gamma: Any) -> np.ndarray:
        """ISG group index (int64) of each value of ``gamma`` (the exported ``Mul`` constant, float32); a value
        that is not one of :attr:`group_factors` is a ValueError naming it."""
        g = np.asarray(gamma, np.float32).reshape(-1)
        hit = g[:, None] == np.asarray(self.group_factors, np.float32)[None, :]
        if not hit.any(axis=1).all():
            raise ValueError(f"ISG gamma value {float(g[~hit.any(axis=1)][0])} is not one of the group factors "
                             f"{self.group_factors}")
        return np.argmax(hit, axis=1).astype(np.int64)

    @property
    def accumulation_order(self) -> tuple[int, ...]:
        """ISG group indices in the contract's accumulation order (``hw_model.reference``): the scaled
        groups by index, then the unity groups, e.g. (1, 2, 0). DESIGN "Accumulation order per output tile"
        (journal paper's timing: scaled groups first, the unity group last)."""
        signs = self.isg_group_signs
        return tuple([g for g, s in enumerate(signs) if s != 0] + [g for g, s in enumerate(signs) if s == 0])

    @property
    def macs_per_cycle(self) -> int:
        """Peak int8 MACs per cycle of the whole NPU (every array, every pixel slice)."""
        return self.pe_arrays * self.pixels_per_cycle * self.mac_rows * self.mac_cols

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["isg_group_signs"] = list(self.isg_group_signs)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NPUConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown NPUConfig field(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        d = dict(d)
        if "isg_group_signs" in d:
            signs = d["isg_group_signs"]
            if not isinstance(signs, (list, tuple)):
                raise ValueError(f"NPUConfig.isg_group_signs must be a list of -1/0/+1 ints, got {signs!r}")
            d["isg_group_signs"] = tuple(signs)
        return cls(**d)

    def replace(self, **changes: Any) -> NPUConfig:
        """A copy with some fields changed (validated)."""
        return replace(self, **changes)


DEFAULT_CONFIG = NPUConfig()
