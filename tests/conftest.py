"""Shared test set-up: the hypothesis profiles.

Test helpers shared with the benchmarks (the QDQ ONNX builders and their integer reference) are a
package module, :mod:`ioso_tvm.testing`: import them from there (no ``sys.path`` edits).

Hypothesis profiles (a test's own ``@settings(max_examples=...)`` wins over a profile's count):

- ``ci`` (default): no deadline (the machines are shared, timings vary), no example database on disk.
- ``thorough``: 500 examples for tests that do not fix their own count, random seeds. Loaded for
  ``pytest -m slow``, or with ``--hypothesis-profile=thorough`` / ``HYPOTHESIS_PROFILE=thorough``.
  500: chosen, 5x hypothesis' default of 100.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import settings

settings.register_profile("ci", deadline=None, database=None)
settings.register_profile("thorough", deadline=None, database=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config: pytest.Config) -> None:
    """``-m slow`` without an explicit profile runs the thorough one."""
    explicit = config.getoption("hypothesis_profile", None) or "HYPOTHESIS_PROFILE" in os.environ
    if config.getoption("markexpr", "") == "slow" and not explicit:
        settings.load_profile("thorough")
