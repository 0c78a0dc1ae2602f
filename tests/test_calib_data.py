"""calibrate() data as torch users hand it over: (x, y) batches in lists, an (inputs, labels) pair, an
endless stream, an IterableDataset; every form gives the tensor's samples, anything else one line."""
from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from ioso_tvm.calib.data import gather_calib_data


def _x(n=40, seed=0):
    return torch.randn(n, 1, 6, 6, generator=torch.Generator().manual_seed(seed))


class _Stream(IterableDataset):
    def __init__(self, x):
        self.x = x

    def __iter__(self):
        return iter(self.x)


def _endless(x):
    return itertools.cycle([(b, torch.zeros(len(b))) for b in x.split(8)])


FORMS = [  # id, builder(x) -> data
    ("list of (x, y) batches", lambda x: [(b, torch.arange(len(b))) for b in x.split(8)]),
    ("list of [x, y] numpy batches", lambda x: [[b.numpy(), np.zeros(len(b))] for b in x.split(16)]),
    ("(inputs, labels) pair", lambda x: (x, torch.zeros(len(x), dtype=torch.long))),
    ("[inputs, one-hot labels] numpy pair", lambda x: [x.numpy(), np.eye(10)[np.zeros(len(x), int)]]),
    ("endless iterator of (x, y)", _endless),
    ("IterableDataset of samples", lambda x: _Stream(x)),
    ("DataLoader over an IterableDataset", lambda x: DataLoader(_Stream(x), batch_size=5)),
    ("tuple of two batches", lambda x: (x[:20], x[20:])),
]


CASES = [(name, make, limit) for name, make in FORMS for limit in (None, 24, 40)
         if not (make is _endless and limit is None)]  # an endless stream is only read with a sample limit


@pytest.mark.parametrize("make, limit", [c[1:] for c in CASES], ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_every_form_gives_the_samples_in_order(make, limit):
    x = _x()
    got = torch.as_tensor(gather_calib_data(make(x), limit))
    want = x if limit is None else x[:limit]
    if got.shape[0] > want.shape[0]:  # tensors and pairs come back whole; calibrate() cuts them
        got = got[:want.shape[0]]
    assert got.dtype == torch.float32 and torch.equal(got, want)


BAD = [  # id, data, exception, pattern
    ("pair with labels of another length", (_x(), torch.zeros(3)), ValueError,
     r"item 1 has shape \(3,\); each item must be a batch"),
    ("dict batches", [{"x": _x(4)}], TypeError, r"item 0 is a dict of keys \['x'\]; calib_data must be"),
    ("an int", 7, TypeError, r"calib_data must be .*; got int"),
    ("list of label ints", [1, 2, 3], TypeError, r"item 0 is a int; calib_data must be"),
]


@pytest.mark.parametrize("data, exc, pattern", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_other_forms_are_one_line_errors(data, exc, pattern):
    with pytest.raises(exc) as info:
        gather_calib_data(data)
    msg = str(info.value)
    assert "\n" not in msg and re.search(pattern, msg), msg
