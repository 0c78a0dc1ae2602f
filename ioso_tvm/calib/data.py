"""Calibration data as one float tensor: from a tensor, a numpy array, a list / tuple of tensors, a
``torch.utils.data.DataLoader`` or ``Dataset`` (or any iterable, also an endless one: reading stops at
the sample limit) yielding tensors or ``(x, y)`` tuples, or one ``(inputs, labels)`` pair.

Every refusal is one line that says what to change.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

ACCEPTED = ("a float torch.Tensor or numpy array (N, C, H, W), a list of such tensors, an (inputs, labels) pair, "
            "or a DataLoader / Dataset / iterable yielding tensors or (x, y) tuples")


def _is_labelled_pair(data: Any) -> bool:
    """``(inputs (N, C, H, W), labels (N,) or (N, K))``: one batch with its labels, not two batches."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        return False
    x, y = data
    arrays = (torch.Tensor, np.ndarray)
    return (isinstance(x, arrays) and isinstance(y, arrays) and x.ndim == 4 and y.ndim in (1, 2)
            and len(x) == len(y))


def _as_tensor(item: Any, where: str) -> torch.Tensor:
    """The model input of one batch: a tensor / array, or the first element of an (x, y, ...) tuple."""
    if isinstance(item, (tuple, list)) and item and not isinstance(item[0], (int, float)):
        item = item[0]  # (x, y): the model input comes first
    if isinstance(item, np.ndarray):
        item = torch.from_numpy(item)
    if not isinstance(item, torch.Tensor):
        kind = type(item).__name__ + (" of keys " + str(sorted(map(str, item))) if isinstance(item, dict) else "")
        raise TypeError(f"calib_data {where} is a {kind}; calib_data must be {ACCEPTED}")
    return item


def gather_calib_data(data: Any, limit: int | None = None, seed: int = 0) -> torch.Tensor | np.ndarray:
    """``data`` as one tensor (N, C, H, W); tensors and arrays are returned unchanged.

    Batches of 4-D tensors are concatenated, single 3-D samples stacked; at most ``limit`` samples are
    read. A DataLoader is iterated under a private torch generator seeded with ``seed`` (a shuffled
    loader gives the same samples each run; the global generator is left untouched).
    """
    if _is_labelled_pair(data):
        data = data[0]
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return data
    if not isinstance(data, Iterable) and hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        dataset = data
        data = (dataset[i] for i in range(len(dataset)))  # a map-style Dataset (e.g. TensorDataset) of samples
    if isinstance(data, (str, bytes, dict)) or not isinstance(data, Iterable):
        raise TypeError(f"calib_data must be {ACCEPTED}; got {type(data).__name__}")
    parts: list[torch.Tensor] = []
    count = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i, item in enumerate(data):
            x = _as_tensor(item, f"item {i}")
            if x.dim() == 3:
                x = x.unsqueeze(0)
            if x.dim() != 4:
                raise ValueError(f"calib_data item {i} has shape {tuple(x.shape)}; each item must be a batch "
                                 "(B, C, H, W) or one sample (C, H, W)")
            if parts and x.shape[1:] != parts[0].shape[1:]:
                raise ValueError(f"calib_data item {i} has samples of shape {tuple(x.shape[1:])}, item 0 has "
                                 f"{tuple(parts[0].shape[1:])}; all samples must have one shape")
            if parts and x.dtype != parts[0].dtype:
                raise ValueError(f"calib_data item {i} has dtype {x.dtype}, item 0 has {parts[0].dtype}")
            parts.append(x.detach().cpu())
            count += x.shape[0]
            if limit is not None and count >= limit:
                break
    if not parts:
        raise ValueError(f"calib_data ({type(data).__name__}) holds no samples")
    return torch.cat(parts)[:limit]
