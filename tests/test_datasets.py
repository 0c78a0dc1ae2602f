"""Fashion-MNIST IDX reader, model-input transform, shipped subsets and their provenance."""
from __future__ import annotations

import gzip
import hashlib
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ioso_tvm import datasets
from ioso_tvm.datasets import (
    balanced_selection,
    load_fashion_mnist,
    load_subset,
    load_test_set,
    read_idx,
    subset_path,
    to_model_input,
)

HAVE_PACKAGE = all((datasets.DEFAULT_ROOT / f).is_file() for pair in datasets._FILES.values() for f in pair)


def _idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    """IDX encoding written independently of the reader: magic, big-endian dims, big-endian data."""
    header = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def _write(path: Path, data: bytes) -> Path:
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(0, 7), min_size=1, max_size=3), seed=st.integers(0, 2**31 - 1),
       gz=st.booleans(), code=st.sampled_from([0x08, 0x0C]))
def test_read_idx_roundtrip(tmp_path_factory, shape, seed, gz, code) -> None:
    rng = np.random.default_rng(seed)
    dtype = np.uint8 if code == 0x08 else np.int32
    arr = rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, size=shape, dtype=dtype, endpoint=True)
    path = _write(tmp_path_factory.mktemp("idx") / ("a.idx.gz" if gz else "a.idx"), _idx_bytes(arr, code))
    out = read_idx(path)
    assert out.shape == arr.shape and out.dtype == arr.dtype
    assert np.array_equal(out, arr)


def test_read_idx_bad_magic(tmp_path) -> None:
    data = bytearray(_idx_bytes(np.zeros((2, 3), np.uint8)))
    data[0] = 1
    with pytest.raises(ValueError, match="magic"):
        read_idx(_write(tmp_path / "bad.idx", bytes(data)))
    data[0], data[2] = 0, 0x42  # unknown dtype code
    with pytest.raises(ValueError, match="magic"):
        read_idx(_write(tmp_path / "bad2.idx", bytes(data)))


@pytest.mark.parametrize("cut", [1, 5, 7])
def test_read_idx_truncated(tmp_path, cut) -> None:
    data = _idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    with pytest.raises(ValueError, match="bad.idx"):
        read_idx(_write(tmp_path / "bad.idx", data[:-cut]))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(_write(tmp_path / "bad.idx", data[:9]))  # inside the 16-byte header


def test_load_fashion_mnist_from_root(tmp_path) -> None:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    lbls = rng.integers(0, 10, 5, dtype=np.uint8)
    _write(tmp_path / "t10k-images-idx3-ubyte.gz", _idx_bytes(imgs))
    _write(tmp_path / "t10k-labels-idx1-ubyte.gz", _idx_bytes(lbls))
    x, y = load_fashion_mnist("test", root=tmp_path)
    assert x.dtype == np.uint8 and y.dtype == np.int64
    assert np.array_equal(x, imgs) and np.array_equal(y, lbls)
    _write(tmp_path / "t10k-labels-idx1-ubyte.gz", _idx_bytes(lbls[:4]))
    with pytest.raises(ValueError, match="labels"):
        load_fashion_mnist("test", root=tmp_path)


def test_missing_files_error_names_install_and_root(tmp_path) -> None:
    with pytest.raises(FileNotFoundError) as e:
        load_fashion_mnist("train", root=tmp_path)
    assert "apt-get install -y dataset-fashion-mnist" in str(e.value) and "root=" in str(e.value)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val", root=tmp_path)


def test_load_test_set_falls_back_to_subset(tmp_path) -> None:
    x, y, source = load_test_set(root=tmp_path, verbose=False)
    sx, sy = load_subset("test")
    assert source == "subset" and np.array_equal(x, sx) and np.array_equal(y, sy)


@given(n=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=20, deadline=None)
def test_to_model_input(n, seed) -> None:
    imgs = np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    x = to_model_input(imgs)
    assert x.shape == (n, 1, 32, 32) and x.dtype == np.float32
    bg = np.float32((0 - datasets.MEAN) / datasets.STD)
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert np.allclose(x[:, 0][:, border], bg)
    np.testing.assert_allclose(x[:, 0, 2:30, 2:30] * datasets.STD + datasets.MEAN, imgs / 255.0, atol=1e-6)


def test_to_model_input_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="uint8"):
        to_model_input(np.zeros((1, 28, 28), np.float32))
    with pytest.raises(ValueError, match="28, 28"):
        to_model_input(np.zeros((1, 32, 32), np.uint8))


@pytest.mark.parametrize("kind,n", [("calib", 1024), ("test", 2000)])
def test_shipped_subsets(kind, n) -> None:
    x, y = load_subset(kind)
    assert x.shape == (n, 28, 28) and x.dtype == np.uint8
    assert y.shape == (n,) and y.dtype == np.int64
    counts = np.bincount(y, minlength=10)
    assert len(counts) == 10 and counts.max() - counts.min() <= 1 and counts.sum() == n
    assert len({x[i].tobytes() for i in range(n)}) > 0.99 * n  # distinct images, not one repeated


def test_subset_sha256_matches_provenance() -> None:
    text = (datasets.DATA_DIR / "PROVENANCE.md").read_text()
    for kind in ("calib", "test"):
        path = subset_path(kind)
        m = re.search(rf"`{path.name}`.*`([0-9a-f]{{64}})`", text)
        assert m, f"{path.name} has no sha256 in PROVENANCE.md"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == m.group(1)


@pytest.mark.skipif(not HAVE_PACKAGE, reason="dataset-fashion-mnist not installed")
def test_subsets_are_the_documented_selection() -> None:
    for kind, split, n, seed in (("calib", "train", 1024, 20240), ("test", "test", 2000, 20241)):
        x, y = load_fashion_mnist(split)
        idx = balanced_selection(y, n, seed)
        sx, sy = load_subset(kind)
        assert np.array_equal(sx, x[idx]) and np.array_equal(sy, y[idx])


def test_balanced_selection() -> None:
    y = np.repeat(np.arange(10), 30)
    idx = balanced_selection(y, 25, 3)
    assert len(np.unique(idx)) == 25
    assert np.array_equal(np.bincount(y[idx]), [3] * 5 + [2] * 5)
    assert np.array_equal(idx, balanced_selection(y, 25, 3))
    assert not np.array_equal(idx, balanced_selection(y, 25, 4))
    with pytest.raises(ValueError, match="n must"):
        balanced_selection(y, 301, 0)


def test_load_calib_set() -> None:
    x, y = datasets.load_calib_set()
    sx, sy = load_subset("calib")
    assert np.array_equal(x, sx) and np.array_equal(y, sy)
    x, y = datasets.load_calib_set(n=100)
    assert x.shape == (100, 28, 28) and np.array_equal(np.bincount(y), [10] * 10)
    rows = {sx[i].tobytes() for i in range(len(sx))}
    assert all(x[i].tobytes() in rows for i in range(100))
    with pytest.raises(ValueError, match="n must"):
        datasets.load_calib_set(n=2000)


@pytest.mark.skipif(not HAVE_PACKAGE, reason="dataset-fashion-mnist not installed")
def test_load_calib_set_seeded_draws() -> None:
    a, ya = datasets.load_calib_set(n=200, seed=1)
    b, yb = datasets.load_calib_set(n=200, seed=2)
    assert np.array_equal(np.bincount(ya), [20] * 10) and np.array_equal(np.bincount(yb), [20] * 10)
    assert not np.array_equal(a, b)
    assert np.array_equal(a, datasets.load_calib_set(n=200, seed=1)[0])


def test_load_calib_set_seeded_needs_package(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        datasets.load_calib_set(seed=0, root=tmp_path)
