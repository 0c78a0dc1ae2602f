"""target_npu.threads.set_threads: torch, BLAS/OpenMP and TVM thread counts set together."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from target_npu import threads


@pytest.fixture
def restore():
    """Put back torch's thread count and the environment variables after the test."""
    before, env = torch.get_num_threads(), {k: os.environ.get(k) for k in threads.ENV_VARS}
    yield
    torch.set_num_threads(before)
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    threadpoolctl = pytest.importorskip("threadpoolctl")
    threadpoolctl.threadpool_limits(before)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_sets_torch_blas_and_environment_together(restore, n):
    assert threads.set_threads(n) == n
    assert torch.get_num_threads() == n
    assert all(os.environ[k] == str(n) for k in threads.ENV_VARS)
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import numpy  # noqa: F401 - its BLAS must be among the limited pools

    threads.set_threads(n)
    info = threadpoolctl.threadpool_info()
    assert any(i["user_api"] == "blas" for i in info)
    assert {i["num_threads"] for i in info} == {n}


def test_none_is_the_measured_default(restore):
    assert threads.set_threads(None) == threads.DEFAULT_THREADS == torch.get_num_threads()


def test_without_threadpoolctl_the_environment_is_still_set(restore, monkeypatch):
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import fails
    assert threads.set_threads(2) == 2
    assert torch.get_num_threads() == 2 and os.environ["OPENBLAS_NUM_THREADS"] == "2"


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True, [1]])
def test_bad_counts_are_one_line_errors(bad):
    with pytest.raises(ValueError) as info:
        threads.set_threads(bad)
    msg = str(info.value)
    assert "\n" not in msg and re.match(r"threads must be (a positive integer or None|at least 1), got", msg), msg


def _python(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in threads.ENV_VARS}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_imports_neither_torch_nor_tvm():
    got = _python("import sys; from target_npu.threads import set_threads; print(set_threads(2)); "
                  "print('torch' in sys.modules, 'tvm' in sys.modules, 'numpy' in sys.modules)")
    assert got == ["2", "False", "False", "False"]


def test_tvm_runtime_follows_before_and_after_import():
    got = _python("from target_npu.threads import set_threads; set_threads(2); import tvm; "
                  "print(tvm.runtime.num_threads()); set_threads(1); print(tvm.runtime.num_threads())")
    assert got[-2:] == ["2", "1"]
