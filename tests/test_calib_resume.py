"""Calibration interrupted after a block resumes from its checkpoint and gives the same ONNX bytes."""
from __future__ import annotations

import pytest
import torch
from test_calib_api import SMALL, TinyRes, _data

from ioso_tvm.calib import CalibConfig, calibrate
from ioso_tvm.calib.engine import Engine
from ioso_tvm.export import export_onnx


class Interrupt(Exception):
    pass


def _onnx_bytes(qm) -> bytes:
    return export_onnx(qm, None, (1, *_data().shape[1:])).SerializeToString()


@pytest.mark.parametrize("method, stop_after", [("ioso", 1), ("qdrop", 2)])
def test_resume_after_an_interrupt_is_bit_identical(tmp_path, monkeypatch, method, stop_after):
    cfg = CalibConfig(**SMALL, granularity=4, checkpoint_dir=str(tmp_path / "ck"))
    torch.manual_seed(3)
    net = TinyRes(c=8).eval()
    want = _onnx_bytes(calibrate(net, _data(), method, 2, 4, CalibConfig(**SMALL, granularity=4)))

    original, calls = Engine.calibrate_block, []

    def interrupted(self, *a, **k):
        if len(calls) == stop_after:
            raise Interrupt
        calls.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(Engine, "calibrate_block", interrupted)
    with pytest.raises(Interrupt):
        calibrate(net, _data(), method, 2, 4, cfg)
    assert len(list((tmp_path / "ck").glob("block*.pt"))) == stop_after
    monkeypatch.setattr(Engine, "calibrate_block", original)

    done = []
    monkeypatch.setattr(Engine, "calibrate_block", lambda self, *a, **k: (done.append(1), original(self, *a, **k)))
    got = _onnx_bytes(calibrate(net, _data(), method, 2, 4, cfg))
    n_blocks = len(list((tmp_path / "ck").glob("block*.pt")))
    assert len(done) == n_blocks - stop_after > 0  # only the unfinished blocks ran again
    assert got == want


def test_checkpoint_of_another_run_is_refused(tmp_path):
    cfg = CalibConfig(**SMALL, granularity=4, checkpoint_dir=str(tmp_path))
    torch.manual_seed(3)
    net = TinyRes(c=8).eval()
    calibrate(net, _data(), "brecq", 2, 4, cfg)
    with pytest.raises(ValueError, match="another model, data or settings"):
        calibrate(net, _data(), "brecq", 3, 4, cfg)
    (sorted(tmp_path.glob("block*.pt"))[-1]).write_bytes(b"truncated")
    with pytest.raises(ValueError, match="cannot be read"):
        calibrate(net, _data(), "brecq", 2, 4, cfg)


def test_spill_that_cannot_be_written_names_the_budget(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = CalibConfig(**SMALL, memory_budget_mb=1e-4, spill_dir=str(blocker / "sub"))
    torch.manual_seed(3)
    with pytest.raises(MemoryError, match=r"memory_budget_mb / 3 \(0 MiB\) and cannot be spilled to .*sub"):
        calibrate(TinyRes(c=8).eval(), _data(), "brecq", 2, 4, cfg)
