"""Fashion-MNIST: an IDX reader, the model-input transform, and the shipped fixed subsets.

Sources (no downloads): the Debian package ``dataset-fashion-mnist`` (60k train / 10k test,
28x28 uint8, MIT licence) installs the four IDX ``.gz`` files under ``DEFAULT_ROOT``; the
project ships a 1024-image calibration subset and a 2000-image test subset in
``ioso_tvm/data/`` (see ``data/PROVENANCE.md``).
"""
from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
DATA_DIR = Path(__file__).resolve().parent / "data"
INSTALL_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"

# Pixel mean / std of the 60k Fashion-MNIST train images (28x28, scaled to [0, 1]), measured
# with load_fashion_mnist("train"): mean 0.28604, std 0.35302.
MEAN = 0.2860
STD = 0.3530
PAD = 2  # 28 -> 32: zero padding on each side (chosen: 32x32 is the CIFAR-style model input)

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CALIB_SUBSET_SEED = 0  # chosen: fixed seed for a smaller balanced part of the shipped subset
_SUBSETS = {"calib": "fmnist_calib.npz", "test": "fmnist_test.npz"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed, by the ``.gz`` suffix) into an array.

    Format (LeCun's MNIST page): two zero bytes, a dtype code, the number of dims, then one
    big-endian uint32 per dim, then the data in C order. Raises ValueError naming the file on a
    bad magic number or a size mismatch.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file: bad magic number {raw[:4].hex()!r}")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {path} is truncated inside its header")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"IDX file {path}: dims {dims} need {expected} data bytes, file has {len(raw) - header}")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a Fashion-MNIST split from the IDX files under ``root`` (default ``DEFAULT_ROOT``).

    Returns images uint8 (N, 28, 28) and labels int64 (N,), N = 60000 (train) / 10000 (test).
    """
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    root = DEFAULT_ROOT if root is None else Path(root)
    img_path, lbl_path = (root / f for f in _FILES[split])
    missing = [str(p) for p in (img_path, lbl_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST files missing: {missing}. Install them with `{INSTALL_HINT}` "
                                f"or pass root= the folder holding {list(_FILES[split])}")
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"{img_path}: expected uint8 images (N, 28, 28), got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{lbl_path}: {labels.shape[0] if labels.ndim else 0} labels for {images.shape[0]} images")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{lbl_path}: label {int(labels.max())} outside 0..9")
    return images, labels.astype(np.int64)


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, 28, 28) -> float32 (N, 1, 32, 32): zero-pad 2 pixels per side, scale to
    [0, 1], normalise with (x - MEAN) / STD. Also accepts a single image (28, 28)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"images must have shape (N, 28, 28), got {images.shape}")
    padded = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD)))
    x = (padded.astype(np.float32) / np.float32(255.0) - np.float32(MEAN)) / np.float32(STD)
    return x[:, None]


def subset_path(kind: str) -> Path:
    """Path of a shipped subset npz (``kind`` = "calib" or "test")."""
    if kind not in _SUBSETS:
        raise ValueError(f"subset kind must be one of {sorted(_SUBSETS)}, got {kind!r}")
    return DATA_DIR / _SUBSETS[kind]


def load_subset(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Shipped fixed subset: "calib" (1024 train images) or "test" (2000 test images), both
    class balanced. Returns images uint8 (N, 28, 28), labels int64 (N,)."""
    path = subset_path(kind)
    if not path.is_file():
        raise FileNotFoundError(f"shipped subset {path} missing (rebuild with benchmarks/train_fp.py --make-subsets)")
    with np.load(path, allow_pickle=False) as z:
        return z["images"], z["labels"].astype(np.int64)


def load_test_set(root: str | Path | None = None, verbose: bool = True) -> tuple[np.ndarray, np.ndarray, str]:
    """The full 10k test set when the Debian package (or ``root``) has it, else the shipped
    2000-image subset. Returns (images uint8 (N, 28, 28), labels int64 (N,), source) with
    source "full" or "subset"; prints which one when ``verbose``."""
    try:
        images, labels = load_fashion_mnist("test", root)
        source = "full"
    except FileNotFoundError:
        images, labels = load_subset("test")
        source = "subset"
    if verbose:
        print(f"Fashion-MNIST test set: {source} ({len(labels)} images)", file=sys.stderr)
    return images, labels, source


def load_calib_set(n: int = 1024, seed: int | None = None,
                   root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Calibration images: ``seed=None`` gives the shipped 1024-image subset (its first ``n``
    images, n <= 1024); an integer ``seed`` draws ``n`` class-balanced images from the full 60k
    train split (``balanced_selection``), which needs the Debian package or ``root``.
    Returns images uint8 (n, 28, 28), labels int64 (n,)."""
    if seed is None:
        images, labels = load_subset("calib")
        if not 0 < n <= len(labels):
            raise ValueError(f"n must be in 1..{len(labels)} for the shipped calibration subset, got {n}")
        if n < len(labels):  # keep the class balance: take a balanced part of the shipped subset
            idx = balanced_selection(labels, n, CALIB_SUBSET_SEED)
            images, labels = images[idx], labels[idx]
        return images, labels
    images, labels = load_fashion_mnist("train", root)
    idx = balanced_selection(labels, n, seed)
    return images[idx], labels[idx]


def balanced_selection(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of ``n`` class-balanced samples: ``n // k`` per class for k classes, one
    more for each of the first ``n % k`` classes; drawn without replacement, class by class in
    label order, by ``np.random.default_rng(seed)``."""
    classes = np.unique(labels)
    k = len(classes)
    if not 0 < n <= len(labels):
        raise ValueError(f"n must be in 1..{len(labels)}, got {n}")
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(labels == c), n // k + (i < n % k), replace=False)
             for i, c in enumerate(classes)]
    return np.sort(np.concatenate(picks))
