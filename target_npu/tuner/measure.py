"""Measurement of candidate schedules: ``fn(spec, tiling, cfg) -> cycles``, cached, in parallel processes.

Backends (core cycles of ``hw_model.cycles.simulate(prog, None, cfg, mode="perf")``, no values computed):
- ``"tir"`` (default): the program the compiler runs, ``target_npu.codegen.conv_program`` (as
  ``target_npu.runtime.make_program``): ``lower_conv`` (TIR schedule + tensorize + walk + emit), or,
  for the layers it raises ``NotLowerable`` on (depthwise with scaled ISG groups), ``build_conv``.
- ``"builder"``: ``hw_model.layers.build_conv`` for every layer (no TIR); the tests check it equals ``"tir"``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor

from hw_model.config import NPUConfig

from .space import ConvSpec, Tiling, TKey, tkey, why_invalid

MeasureFn = Callable[[ConvSpec, Tiling, NPUConfig], int]


def _check(spec: ConvSpec, t: Tiling, cfg: NPUConfig) -> None:
    why = why_invalid(spec, t, cfg)
    if why is not None:
        raise ValueError(f"invalid tiling {t} for conv {spec.c}->{spec.k} @{spec.h}x{spec.w}: {why}")


def _cycles(prog: object, cfg: NPUConfig) -> int:
    from hw_model.cycles import simulate

    return int(simulate(prog, None, cfg, mode="perf").report["cycles"])


def tir_cycles(spec: ConvSpec, t: Tiling, cfg: NPUConfig) -> int:
    """Cycles of the compiler's program for this tiling (the TIR path unless the layer is not lowerable).
    ValueError if the tiling is invalid."""
    from target_npu.codegen import conv_program

    _check(spec, t, cfg)
    return _cycles(conv_program(spec, t, cfg), cfg)


def builder_cycles(spec: ConvSpec, t: Tiling, cfg: NPUConfig) -> int:
    """Cycles of ``hw_model.layers.build_conv``'s program for this tiling. ValueError if invalid."""
    from hw_model.layers import build_conv

    _check(spec, t, cfg)
    return _cycles(build_conv(spec, t, cfg), cfg)


MEASURES: dict[str, MeasureFn] = {"tir": tir_cycles, "builder": builder_cycles}


def get_measure(backend: str = "tir") -> MeasureFn:
    """The measurement function of a backend name ("tir" or "builder")."""
    if backend not in MEASURES:
        raise ValueError(f"unknown measure backend {backend!r}; use one of {sorted(MEASURES)}")
    return MEASURES[backend]


def _call(args: tuple[MeasureFn, ConvSpec, Tiling, NPUConfig]) -> int:
    fn, spec, t, cfg = args
    return int(fn(spec, t, cfg))


class Measurer:
    """Cached (and, with ``jobs > 1``, process-parallel) measurement of one layer's candidates.

    The worker processes are started on the first parallel batch and kept until :meth:`close`
    (or the end of a ``with`` block): each one imports TVM once.
    """

    def __init__(self, spec: ConvSpec, cfg: NPUConfig, fn: MeasureFn = tir_cycles, jobs: int = 1,
                 pool: ProcessPoolExecutor | None = None) -> None:
        if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
            raise ValueError(f"jobs must be a positive int, got {jobs!r}")
        if not isinstance(cfg, NPUConfig):
            raise TypeError(f"cfg must be an NPUConfig, got {type(cfg).__name__}")
        self.spec, self.cfg, self.fn, self.jobs = spec, cfg, fn, jobs
        self.cache: dict[TKey, int] = {}
        self.calls = 0
        """Number of measurements actually run (cache misses)."""
        self._pool, self._own_pool = pool, pool is None

    def __call__(self, tilings: Iterable[Tiling]) -> list[int]:
        """Cycles of each tiling, in order; cached results are reused."""
        tilings = list(tilings)
        todo = list({tkey(t): t for t in tilings if tkey(t) not in self.cache}.values())
        if todo:
            self.cache.update(zip(map(tkey, todo), self._run(todo)))
            self.calls += len(todo)
        return [self.cache[tkey(t)] for t in tilings]

    def _run(self, todo: Sequence[Tiling]) -> list[int]:
        args = [(self.fn, self.spec, t, self.cfg) for t in todo]
        if (self.jobs == 1 and self._pool is None) or len(todo) == 1:
            return [_call(a) for a in args]
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.jobs)
        return list(self._pool.map(_call, args))

    def close(self) -> None:
        """Stop the worker processes this Measurer started (a pool passed in is left to its owner)."""
        if self._pool is not None and self._own_pool:
            self._pool.shutdown()
        self._pool = None if self._own_pool else self._pool

    def __enter__(self) -> Measurer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
