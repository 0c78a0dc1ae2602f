"""Measurement of candidate schedules: ``measure(spec, tiling, cfg) -> cycles``, cached, in parallel.

Backends:
- ``"estimate"``: :func:`estimate_cycles`, a closed-form stand-in of the cycle model's ``perf``
  mode built from :func:`space.tile_stats` (DMA bytes / bandwidth, MAC waves, per-instruction
  overhead, ISG shift-add cycles), all numbers taken from :class:`NPUConfig`.
- ``"builder"``: ``hw_model.layers.build_conv`` program + ``hw_model.cycles.simulate`` in
  ``perf`` mode, when those modules exist (see :func:`builder_available`). Exact but ~0.1-1 s a call.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor

from hw_model.config import NPUConfig

from .space import ConvSpec, Tiling, tile_stats, why_invalid

MeasureFn = Callable[[ConvSpec, Tiling, NPUConfig], int]

ISG_EXTRA_CYCLES = 4
"""Extra cycles per accumulation pass with three ISG groups. DESIGN.md ("4 extra cycles per accumulation")."""


def estimate_cycles(spec: ConvSpec, t: Tiling, cfg: NPUConfig) -> int:
    """Closed-form cycle estimate of one conv layer under a tiling (core cycles, int).

    Without double buffering DMA and compute serialise; with it, the steady state costs
    max(compute, DMA) plus the first tile's load. Raises ValueError for an invalid tiling.
    """
    reason = why_invalid(spec, t, cfg)
    if reason is not None:
        raise ValueError(f"invalid tiling {t} for {spec}: {reason}")
    s = tile_stats(spec, t, cfg)
    bw = cfg.dram_bytes_per_cycle
    dma = (s.in_bytes + s.w_bytes + s.out_bytes) / bw
    compute = s.mac_cycles + s.n_oc * s.n_sp * s.n_ic * (ISG_EXTRA_CYCLES if cfg.num_groups > 1 else 0)
    issue = s.instructions * cfg.instr_overhead_cycles
    if t.double_buffer:
        fill = (s.in_tile_bytes + s.w_tile_bytes) / bw
        body = max(compute + issue, dma) + fill
    else:
        body = compute + issue + dma
    return int(round(body + s.post_cycles / cfg.pe_arrays))


def builder_available() -> bool:
    """True when ``hw_model.layers`` and ``hw_model.cycles`` can be imported."""
    try:
        importlib.import_module("hw_model.layers")
        importlib.import_module("hw_model.cycles")
    except ImportError:
        return False
    return True


def builder_cycles(spec: ConvSpec, t: Tiling, cfg: NPUConfig) -> int:
    """Cycles of the real program: ``hw_model.layers.build_conv`` with the builder's Tiling, then
    ``hw_model.cycles.simulate(..., mode="perf")`` (no values computed)."""
    from hw_model.cycles import simulate
    from hw_model.layers import build_conv

    from .bridge import _builder_spec, to_builder_tiling

    prog = build_conv(_builder_spec(spec), to_builder_tiling(t, cfg), cfg)
    return int(simulate(prog, None, cfg, mode="perf").report["cycles"])


def default_backend() -> str:
    """"builder" when hw_model's builder and cycle model are present, else "estimate"."""
    return "builder" if builder_available() else "estimate"


def get_measure(backend: str = "estimate") -> MeasureFn:
    """The measurement function of a backend name ("estimate" or "builder")."""
    if backend == "estimate":
        return estimate_cycles
    if backend == "builder":
        if not builder_available():
            raise ValueError("measure backend 'builder' needs hw_model.builder and hw_model.cycles, not present")
        return builder_cycles
    raise ValueError(f"unknown measure backend {backend!r}; use 'estimate' or 'builder'")


def _call(args: tuple[MeasureFn, ConvSpec, Tiling, NPUConfig]) -> int:
    fn, spec, t, cfg = args
    return int(fn(spec, t, cfg))


class Measurer:
    """Cached (and, with ``jobs > 1``, process-parallel) measurement of one layer's candidates."""

    def __init__(self, spec: ConvSpec, cfg: NPUConfig, fn: MeasureFn = estimate_cycles, jobs: int = 1) -> None:
        if not isinstance(jobs, int) or jobs < 1:
            raise ValueError(f"jobs must be a positive int, got {jobs!r}")
        self.spec, self.cfg, self.fn, self.jobs = spec, cfg, fn, jobs
        self.cache: dict[Tiling, int] = {}
        self.calls = 0
        """Number of measurements actually run (cache misses)."""

    def __call__(self, tilings: Iterable[Tiling]) -> list[int]:
        """Cycles of each tiling, in order; cached results are reused."""
        tilings = list(tilings)
        todo = [t for t in dict.fromkeys(tilings) if t not in self.cache]
        if todo:
            results = self._run(todo)
            self.cache.update(zip(todo, results))
            self.calls += len(todo)
        return [self.cache[t] for t in tilings]

    def _run(self, todo: Sequence[Tiling]) -> list[int]:
        args = [(self.fn, self.spec, t, self.cfg) for t in todo]
        if self.jobs == 1 or len(todo) == 1:
            return [_call(a) for a in args]
        with ProcessPoolExecutor(max_workers=min(self.jobs, len(todo))) as ex:
            return list(ex.map(_call, args))
