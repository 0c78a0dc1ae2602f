"""Per-layer quantization error report: rows, SQNR against bits, losses, plot, JSON, latency mapping, CLI flag."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_calib_helpers import TinyRes

from ioso_tvm import cli as calib_cli
from ioso_tvm import models
from ioso_tvm.calib import CalibConfig, calibrate, format_layer_report, layer_report, plot_layer_report
from ioso_tvm.calib.layer_report import layer_report_json, worst_layer

SMALL = dict(num_samples=32, batch_size=8, iters=12, act_iters=4, progress=False, act_init_samples=32)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _data(n=32, seed=0):
    return torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def ioso_w2():
    torch.manual_seed(0)
    x = _data()
    return calibrate(TinyRes().eval(), x, "ioso", wbits=2, abits=4, config=CalibConfig(**SMALL)), x


def test_rows_cover_every_layer_in_order(ioso_w2):
    qm, x = ioso_w2
    rows = layer_report(qm, x)
    layers = qm.layers()
    assert [r["name"] for r in rows] == [m.name for m in layers]
    assert [r["index"] for r in rows] == list(range(len(layers)))
    assert [r["kind"] for r in rows] == ["conv", "conv", "conv", "dwconv", "linear"]
    for r, m in zip(rows, layers):
        assert sum(r["isg_groups"]) == r["in_channels"] == m.in_channels
        assert len(r["isg_groups"]) == len(r["isg_factors"]) == len(qm.cfg.group_factors)
        assert r["wbits"] == m.wq.bits and r["abits_out"] == m.outq.bits
        assert np.isfinite(r["sqnr_db"]) and np.isfinite(r["sqnr_local_db"])
        assert r["rec_loss_before"] >= 0 and r["rec_loss_after"] >= 0  # the engine recorded both
        assert r["block"] in qm.calib_history
        assert r["cycles"] is None and r["us"] is None
    assert [r["wbits"] for r in rows] == [8, 2, 2, 2, 8]  # first / last at CalibConfig.first_last_bits
    assert sum(r["worst"] for r in rows) == 1
    worst = next(r for r in rows if r["worst"])
    below8 = [r for r in rows if r["wbits"] < 8 or r["abits_out"] < 8]
    assert worst["sqnr_local_db"] == min(r["sqnr_local_db"] for r in below8)
    table = format_layer_report(rows)
    assert len(table.splitlines()) == len(rows) + 2 and table.count("keep at 8 bit") == 1
    assert all(m.name in table for m in layers)


def test_report_is_deterministic_and_leaves_the_model_alone(ioso_w2):
    qm, x = ioso_w2
    before = {k: v.clone() for k, v in qm.state_dict().items()}
    y = qm(x[:8])
    a, b = layer_report(qm, x, samples=16), layer_report(qm, x, samples=16)
    assert a == b
    assert all(torch.equal(before[k], v) for k, v in qm.state_dict().items())
    assert torch.equal(qm(x[:8]), y)
    assert not any(m._forward_hooks for m in qm.modules())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sqnr_rises_with_weight_bits(seed):
    x = _data(seed=seed)
    torch.manual_seed(seed)
    net = TinyRes().eval()
    cfg = CalibConfig(**SMALL)
    r2 = layer_report(calibrate(net, x, "rtn", wbits=2, abits=8, config=cfg), x)
    r8 = layer_report(calibrate(net, x, "rtn", wbits=8, abits=8, config=cfg), x)
    mid = [i for i, r in enumerate(r2) if r["wbits"] == 2]
    assert mid == [1, 2, 3]
    for i in mid:
        assert r8[i]["sqnr_local_db"] > r2[i]["sqnr_local_db"] + 6  # 6 bits more: far more than 6 dB
        assert r8[i]["sqnr_db"] > r2[i]["sqnr_db"]
    assert r2[0]["sqnr_local_db"] == r8[0]["sqnr_local_db"]  # the first layer is 8 bits in both
    assert r2[0]["rec_loss_before"] is None  # rtn reconstructs nothing


def test_plot_is_a_png(ioso_w2, tmp_path):
    qm, x = ioso_w2
    out = plot_layer_report(layer_report(qm, x, samples=8), tmp_path / "layers.png")
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 5000
    with pytest.raises(ValueError, match="no rows"):
        plot_layer_report([], tmp_path / "empty.png")


def test_json_is_strict_and_worst_rule():
    rows = [dict(index=0, wbits=8, abits_out=8, sqnr_local_db=1.0, sqnr_db=math.inf, worst=False),
            dict(index=1, wbits=4, abits_out=4, sqnr_local_db=20.0, sqnr_db=-math.inf, worst=False),
            dict(index=2, wbits=2, abits_out=4, sqnr_local_db=9.0, sqnr_db=3.0, worst=False)]
    assert worst_layer(rows) == 2  # the 8-bit layer is already kept at 8 bits
    assert worst_layer(rows[:1]) == 0 and worst_layer([]) is None
    back = json.loads(layer_report_json(rows))
    assert back[0]["sqnr_db"] is None and back[1]["sqnr_db"] is None and back[2]["sqnr_db"] == 3.0


class _Compiled:
    def __init__(self, rows):
        self.rows = rows

    def report(self):
        return {"layers": self.rows}


def test_latency_from_a_compiled_model(ioso_w2):
    qm, x = ioso_w2
    names = [m.name for m in qm.layers()]
    other = [{"name": "q_in", "kind": "input", "cycles": 0, "us": 0.0},
             {"name": "add0", "kind": "add", "cycles": 7, "us": 0.1}]
    conv = [{"name": f"node{i}", "kind": "conv", "cycles": 100 * (i + 1), "us": 0.25 * (i + 1)}
            for i in range(len(names))]
    by_order = layer_report(qm, x, _Compiled(other[:1] + conv[:3] + other[1:] + conv[3:]), samples=8)
    assert [r["cycles"] for r in by_order] == [100, 200, 300, 400, 500]
    assert [r["us"] for r in by_order] == [0.25, 0.5, 0.75, 1.0, 1.25]
    named = [{**c, "name": n} for c, n in zip(conv, reversed(names))]  # names are not used: the order is
    by_name = layer_report(qm, x, _Compiled(named), samples=8)
    assert [r["cycles"] for r in by_name] == [100, 200, 300, 400, 500]
    with pytest.raises(ValueError, match="has 4 conv/linear layers, the QuantModel 5"):
        layer_report(qm, x, _Compiled(conv[:4]), samples=8)


def test_bad_input(ioso_w2):
    qm, x = ioso_w2
    with pytest.raises(TypeError, match="QuantModel"):
        layer_report(TinyRes(), x)
    with pytest.raises(ValueError, match="expects"):
        layer_report(qm, torch.randn(4, 1, 10, 10))
    with pytest.raises(ValueError, match="samples"):
        layer_report(qm, x, samples=0)


def test_cli_report_flag(tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((8, 1, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    base = ["--model", "resnet20", "--data", str(tmp_path / "x.npz"), "--num-samples", "8", "--method", "brecq",
            "--iters", "1", "--act-iters", "1", "-o", str(tmp_path / "m.onnx")]
    assert calib_cli.main([*base, "--report", str(tmp_path / "r.png")]) == 0
    out = capsys.readouterr().out
    assert "keep at 8 bit" in out and "SQNR dB" in out
    rows = json.loads((tmp_path / "m.layers.json").read_text())
    net = models.build_model("resnet20")
    convs = [n for n, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert sorted(r["name"] for r in rows) == sorted(convs) and sum(r["worst"] for r in rows) == 1
    assert all(sum(r["isg_groups"]) == r["in_channels"] for r in rows)
    assert (tmp_path / "r.png").read_bytes()[:8] == PNG_MAGIC
    assert calib_cli.main([*base, "--report", str(tmp_path / "r.txt")]) == 2
    assert "--report must name a .png file" in capsys.readouterr().err


@pytest.mark.slow
def test_latency_of_a_real_compiled_model(ioso_w2):
    import ioso_tvm

    qm, x = ioso_w2
    cm = ioso_tvm.compile(qm, input_shapes={"input": [1, 1, 12, 12]})
    rows = layer_report(qm, x, cm, samples=8)
    conv = [r for r in cm.report()["layers"] if r["kind"] == "conv"]
    assert [r["cycles"] for r in rows] == [r["cycles"] for r in conv] and all(r["cycles"] > 0 for r in rows)
    assert [r["out_shape"][1] for r in conv] == [r["out_channels"] for r in rows]
