"""Reproducibility: seeded CPU calibrations export byte-identical ONNX; compiles give identical programs."""
from __future__ import annotations

import tarfile

import numpy as np
import pytest
import torch
from test_calib_api import SMALL, TinyRes, _data
from test_qft import _cfg, _Tiny
from test_qft import _data as _qft_data

import ioso_tvm
from ioso_tvm.calib import CalibConfig, calibrate, qft
from ioso_tvm.export import export_onnx
from ioso_tvm.testing import random_graph


@pytest.mark.parametrize("method", ["ioso", "qdrop"])
def test_seeded_calibrations_export_identical_bytes(method):
    out = []
    for global_seed in (1, 2):  # the global generator must not matter, only CalibConfig.seed
        torch.manual_seed(3)
        net = TinyRes(c=8).eval()
        torch.manual_seed(global_seed)
        qm = calibrate(net, _data(), method, 2, 4, CalibConfig(**SMALL, granularity=4, seed=7))
        out.append(export_onnx(qm, None, (1, *_data().shape[1:])).SerializeToString())
    assert out[0] == out[1]
    torch.manual_seed(3)
    other = calibrate(TinyRes(c=8).eval(), _data(), method, 2, 4, CalibConfig(**SMALL, granularity=4, seed=8))
    assert export_onnx(other, None, (1, *_data().shape[1:])).SerializeToString() != out[0]  # the seed matters


def test_seeded_qft_exports_identical_bytes():
    out = []
    for _ in range(2):
        torch.manual_seed(0)
        qnet, student = qft.run_qft(_Tiny(), _qft_data(), 4, 8, _cfg("layerwise", epochs=1, images_per_epoch=32))
        qm = qft.to_quant_model(qnet, student, tuple(_qft_data().shape[1:]))
        out.append(export_onnx(qm, None, (1, *_qft_data().shape[1:])).SerializeToString())
    assert out[0] == out[1]


def test_two_compiles_give_identical_programs_and_artifacts(tmp_path):
    b, outs = random_graph(np.random.default_rng(11), max_layers=4)
    model = b.model(outs)
    a, c = ioso_tvm.compile(model), ioso_tvm.compile(model)
    assert a.npu == c.npu and any(a.npu)
    assert [p.to_json() for p in a.streams] == [p.to_json() for p in c.streams]
    members = []
    for cm, name in ((a, "a.tar"), (c, "c.tar")):
        with tarfile.open(cm.export(tmp_path / name)) as tar:
            members.append({m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()})
    assert "host.so" in members[0] and "programs.json" in members[0]
    assert members[0] == members[1]  # no timestamps: byte-identical members, host library included
