"""Where the tuner's candidate measurements run: this process, a local process pool, or Ray tasks.

Every executor has ``map(fn, items) -> list`` (results in the order of ``items``) and ``shutdown()``,
the interface of ``concurrent.futures.ProcessPoolExecutor`` that :class:`target_npu.tuner.Measurer`
already takes. Measurements are deterministic (the cycle model of the compiler's program), so every
executor gives the same cycles; ``tests/test_tuner_dispatch.py`` checks that Ray's equal the serial ones.

- ``SerialExecutor``: ``map`` in this process (the reference, and what a test of the dispatch uses).
- ``RayExecutor``: one Ray task per candidate. A local Ray is started in-process (``ray.init``) unless
  Ray is already initialised or ``address`` names a cluster (``"auto"``, ``"ray://host:10001"``); it
  is shut down by ``shutdown()`` only if this executor started it. Workers import ``target_npu`` from
  the installed package. Starting a local Ray costs about 8 s on the project's 2-core machine
  (measured: ``ray.init`` + 4 trivial tasks + ``ray.shutdown``, 8.2-9.4 s), so it pays off on long tunes.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


class SerialExecutor:
    """``map`` in this process."""

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        return [fn(x) for x in items]

    def shutdown(self) -> None:
        """Nothing to stop."""


class RayExecutor:
    """``map`` as one Ray task per item (``ray.get`` keeps the order).

    ``address``: a Ray cluster to connect to (None: start a local Ray with ``num_cpus`` CPUs, None = all).
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        try:
            import ray
        except ImportError as e:
            raise RuntimeError(f"Ray is not installed ({e}); pip install ray, or tune with the serial "
                               "executor (tvmc tune --executor serial)") from None
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                     log_to_driver=False)
        self._tasks: dict[Callable[[Any], Any], Any] = {}

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        task = self._tasks.get(fn)
        if task is None:
            task = self._tasks[fn] = self._ray.remote(fn)
        return list(self._ray.get([task.remote(x) for x in items]))

    def shutdown(self) -> None:
        """Stop the local Ray if this executor started it (a cluster or an earlier ``ray.init`` is left)."""
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = False


EXECUTORS = ("serial", "ray")
"""Names ``make_executor`` takes."""


def make_executor(name: str, jobs: int = 1, address: str | None = None) -> Any:
    """An executor by name: "serial" (a process pool of ``jobs`` workers when jobs > 1, else None: the
    Measurer runs in this process) or "ray" (``RayExecutor(address, num_cpus=jobs if jobs > 1 else None)``)."""
    if name == "serial":
        if address is not None:
            raise ValueError("ray_address needs executor='ray'")
        if jobs > 1:
            from concurrent.futures import ProcessPoolExecutor

            return ProcessPoolExecutor(max_workers=jobs)
        return None
    if name == "ray":
        return RayExecutor(address, num_cpus=jobs if jobs > 1 else None)
    raise ValueError(f"executor must be one of {EXECUTORS}, got {name!r}")
