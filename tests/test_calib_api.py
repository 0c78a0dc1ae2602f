"""calibrate(): bad input errors, seeded determinism, hardened state, calibrated nets in deploy == reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_calib_helpers import TinyRes, reference_walk

from ioso_tvm.calib import CalibConfig, calibrate

SMALL = dict(num_samples=32, batch_size=8, iters=30, act_iters=10, progress=False, act_init_samples=32)


def _data(n=32, shape=(1, 12, 12), seed=0):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bad,match", [
    (dict(wbits=1), "wbits"), (dict(abits=9), "abits"), (dict(method="gptq"), "method"),
])
def test_bad_arguments(bad, match):
    kw = dict(method="brecq", wbits=4, abits=4)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        calibrate(TinyRes(), _data(), config=CalibConfig(**SMALL), **kw)


def test_bad_data():
    cfg = CalibConfig(**SMALL)
    x = _data()
    x[3, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        calibrate(TinyRes(), x, "rtn", config=cfg)
    with pytest.raises(ValueError, match="shape"):
        calibrate(TinyRes(), torch.randn(32, 12, 12), "rtn", config=cfg)
    with pytest.raises(ValueError, match="at least"):
        calibrate(TinyRes(), _data(n=4), "rtn", config=cfg)
    with pytest.raises(ValueError, match="Conv2d|shape"):  # 3 channels for a 1-channel net
        calibrate(TinyRes(), _data(shape=(3, 12, 12)), "rtn", config=cfg)


def test_unsupported_layer_is_named():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Sigmoid(), torch.nn.Flatten(), torch.nn.Linear(400, 2))
    with pytest.raises(ValueError, match="'1'.*Sigmoid"):
        calibrate(net, _data(), "rtn", config=CalibConfig(**SMALL))


def test_qft_dispatch_or_clear_error():
    x = _data()
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):  # checked before QFT starts
        calibrate(TinyRes(), x, "qft")
    with pytest.raises(ValueError, match="wbits"):
        calibrate(TinyRes(), _data(), "qft", wbits=9)


def test_seeded_runs_are_bit_identical():
    cfg = CalibConfig(**SMALL, granularity=4)
    torch.manual_seed(3)
    net = TinyRes(c=8).eval()
    a = calibrate(net, _data(), "ioso", 2, 4, cfg)
    torch.manual_seed(4)  # the global generator state must not matter
    b = calibrate(net, _data(), "ioso", 2, 4, cfg)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    x = _data(seed=5)
    assert torch.equal(a.deploy(x), b.deploy(x))


@pytest.mark.parametrize("gran", [1, 4])
def test_ioso_hardened_groups_respect_granularity(gran):
    torch.manual_seed(0)
    net = TinyRes(c=10).eval()
    qm = calibrate(net, _data(), "ioso", 2, 4, CalibConfig(**{**SMALL, "iters": 60}, granularity=gran,
                                                            lr_isg=0.05))
    for layer in qm.layers():
        assert layer.isg.hard and layer.wq.mode == "hard"
        counts = np.bincount(layer.isg.groups.numpy(), minlength=3)
        if layer.depthwise:
            assert counts[0] == layer.in_channels
        off = [c for c in counts if c % gran]
        assert len(off) <= 1 and sum(counts) == layer.in_channels
        if off:
            assert off[0] % gran == layer.in_channels % gran


@pytest.mark.parametrize("method", ["rtn", "adaround", "brecq", "qdrop", "ioso"])
def test_methods_run_and_deploy_matches_reference(method):
    torch.manual_seed(1)
    net = TinyRes(c=8).eval()
    x = _data()
    qm = calibrate(net, x, method, 2, 4, CalibConfig(**SMALL, granularity=2))
    im = qm.integer_model()
    env = im.run(x[:4])
    ref_env = reference_walk(qm, x[:4].numpy())
    assert np.array_equal(env[qm.output].numpy(), ref_env[qm.output].astype(np.int64))
    with torch.no_grad():
        err = (qm(x) - qm.float_forward(x)).pow(2).mean()
    assert torch.isfinite(err)


def test_qft_isg_through_calibrate_learns_groups(monkeypatch):
    """calibrate(method="qft+isg") reaches calibrate_qft with ISG on, not plain QFT."""
    from ioso_tvm.calib import qft

    seen = []
    original = qft.run_qft
    monkeypatch.setattr(qft, "run_qft", lambda m, x, w, a, cfg: (seen.append(cfg.isg), original(m, x, w, a, cfg))[1])
    cfg = qft.QFTConfig(epochs=1, images_per_epoch=16, batch_size=8, calib_batch=16, progress=False)
    torch.manual_seed(0)
    qm = calibrate(TinyRes(c=16).eval(), _data(), "qft+isg", 4, 8, cfg)
    qm2 = calibrate(TinyRes(c=16).eval(), _data(), "qft", 4, 8, cfg)
    assert seen == [True, False]
    x = _data(seed=9)
    assert qm.deploy(x).shape == qm2.deploy(x).shape


def test_calib_config_fields_reach_qft(monkeypatch):
    """A CalibConfig lends QFT seed/progress always, and batch_size / beta / act_init_samples /
    num_samples only when the user changed them (QFT keeps its published defaults otherwise)."""
    from ioso_tvm.calib import qft

    seen = []
    monkeypatch.setattr(qft, "run_qft", lambda m, x, w, a, cfg: (seen.append((cfg, len(x))), (_ for _ in ()).throw(
        RuntimeError("stop")))[1])
    with pytest.raises(RuntimeError, match="stop"):
        calibrate(TinyRes(), _data(n=40), "qft", 4, 8,
                  CalibConfig(seed=7, progress=False, batch_size=4, beta=(10.0, 3.0), act_init_samples=24,
                              num_samples=36))
    with pytest.raises(RuntimeError, match="stop"):
        calibrate(TinyRes(), _data(n=40), "qft", 4, 8, CalibConfig(batch_size=32, progress=False))
    (changed, n1), (default, n2) = seen
    assert (changed.seed, changed.progress, changed.batch_size, changed.isg_beta, changed.calib_batch) == (
        7, False, 4, (10.0, 3.0), 24)
    assert n1 == 36 and n2 == 40
    ref = qft.QFTConfig()
    assert (default.batch_size, default.isg_beta, default.calib_batch) == (
        ref.batch_size, ref.isg_beta, ref.calib_batch)


def test_mobilenet_v2_gets_brecq_regulariser_weight(monkeypatch, caplog):
    """reg_weight=None: 0.1 for a MobileNetV2 (logged), 0.01 otherwise; an explicit value is kept."""
    import logging

    import ioso_tvm.calib as calib
    from ioso_tvm.calib import engine
    from ioso_tvm.calib.methods import default_reg_weight
    from ioso_tvm.models import MobileNetV2

    mbv2 = MobileNetV2(width_mult=0.25, num_classes=10).eval()
    assert default_reg_weight(mbv2) == 0.1 and default_reg_weight(TinyRes()) == 0.01
    real_build = calib.build_qmodel

    def stop(*a, **k):  # the resolved weight is logged before the (slow) MobileNetV2 tracing
        raise RuntimeError("stop")

    monkeypatch.setattr(calib, "build_qmodel", stop)
    with caplog.at_level(logging.INFO, logger="ioso_tvm.calib"), pytest.raises(RuntimeError, match="stop"):
        calibrate(mbv2, _data(n=8, shape=(3, 16, 16)), "brecq", config=CalibConfig(**SMALL))
    assert "0.1 (BRECQ's MobileNetV2 setting)" in caplog.text
    monkeypatch.setattr(calib, "build_qmodel", real_build)
    seen = []
    monkeypatch.setattr(engine.Engine, "run", lambda self, data: seen.append(self.cfg.reg_weight))
    calibrate(TinyRes(), _data(), "brecq", config=CalibConfig(**SMALL))
    calibrate(TinyRes(), _data(), "brecq", config=CalibConfig(**SMALL, reg_weight=0.05))
    assert seen == [0.01, 0.05]
    with pytest.raises(ValueError, match="reg_weight"):
        calibrate(TinyRes(), _data(), "brecq", config=CalibConfig(**SMALL, reg_weight=-1.0))


def test_default_isg_lr_keeps_the_published_travel_and_moves_groups_at_short_schedules():
    from ioso_tvm.calib import default_lr_isg

    assert default_lr_isg(20000) == pytest.approx(1e-3) and default_lr_isg(50000) == pytest.approx(1e-3)
    assert default_lr_isg(500) == pytest.approx(0.04)
    moved = {}
    for lr in (None, 1e-3):
        torch.manual_seed(0)
        cfg = CalibConfig(**{**SMALL, "iters": 60}, granularity=1, lr_isg=lr)
        qm = calibrate(TinyRes(c=10).eval(), _data(), "ioso", 2, 4, cfg)
        moved[lr] = sum(int((ly.isg.groups != 0).sum()) for ly in qm.layers())
    assert moved[1e-3] == 0 < moved[None]  # 1e-3 over 60 iterations cannot leave the unity group


@pytest.mark.parametrize("parts", [("isg",), ("oso",)])
def test_ioso_ablation_learns_only_the_chosen_part(parts):
    torch.manual_seed(0)
    cfg = CalibConfig(**{**SMALL, "iters": 60}, granularity=1, ioso_parts=parts)
    qm = calibrate(TinyRes(c=10).eval(), _data(), "ioso", 2, 4, cfg)
    moved = sum(int((ly.isg.groups != 0).sum()) for ly in qm.layers())
    oso_changed = any(not torch.equal(ly.oso_scale, torch.ones_like(ly.oso_scale))
                      or not torch.equal(ly.oso_offset, torch.zeros_like(ly.oso_offset)) for ly in qm.layers())
    assert (moved > 0) == ("isg" in parts)
    assert oso_changed == ("oso" in parts)


def test_ioso_parts_must_name_isg_or_oso():
    with pytest.raises(ValueError, match="ioso_parts"):
        calibrate(TinyRes(c=8).eval(), _data(), "ioso", 2, 4, CalibConfig(**SMALL, ioso_parts=("isg", "bias")))


def test_oso_after_activation_is_fake_quant_only():
    """CalibConfig(oso_position="after_act"): forward is outq(gamma * act(y) + phi) and the model
    refuses to deploy or export with a reason, instead of silently moving OSO before the ReLU."""
    from ioso_tvm import export_onnx
    from ioso_tvm.calib.qmodules import NotDeployableError

    x = _data()
    qm = calibrate(TinyRes(c=8).eval(), x, "ioso", 4, 4, CalibConfig(**SMALL, oso_position="after_act"))
    relu_layers = [ly for ly in qm.layers() if ly.oso_after_act and ly.outq.act == "relu"]
    assert relu_layers
    ly = relu_layers[0]
    with torch.no_grad():
        ly.oso_offset.copy_(torch.linspace(-0.5, 0.5, ly.oso_offset.numel()))
        ly.oso_scale.copy_(torch.linspace(0.5, 1.5, ly.oso_scale.numel()))
        h = torch.randn(4, ly.in_channels, 6, 6)
        y = ly.pre_act(h)
        want = ly.outq(torch.relu(y) * ly.oso_scale.view(1, -1, 1, 1) + ly.oso_offset.view(1, -1, 1, 1))
        assert torch.equal(ly(h), want)
        before = ly.outq(y * ly.oso_scale.view(1, -1, 1, 1) + ly.oso_offset.view(1, -1, 1, 1))
        assert not torch.equal(ly(h), before)  # the position matters once some offset is > 0
    with pytest.raises(NotDeployableError, match="per-channel clamp"):
        qm.deploy(x[:2])
    with pytest.raises(NotDeployableError, match="per-channel clamp"):
        export_onnx(qm, None, input_shape=(1, 1, 12, 12))
    with pytest.raises(ValueError, match="oso_position"):
        calibrate(TinyRes(c=8).eval(), x, "ioso", 4, 4, CalibConfig(**SMALL, oso_position="middle"))


def test_default_oso_act_lr_keeps_the_published_travel():
    """lr_oso_act=None resolves to 4e-5 x 5000 / act_iters; it moves OSO only, so BRECQ (no OSO) is unchanged."""
    from ioso_tvm.calib import default_lr_act

    assert default_lr_act(5000) == pytest.approx(4e-5) and default_lr_act(9000) == pytest.approx(4e-5)
    assert default_lr_act(100) == pytest.approx(2e-3)
    rule = default_lr_act(SMALL["act_iters"])

    def run(method, lr):
        torch.manual_seed(0)
        qm = calibrate(TinyRes(c=8).eval(), _data(), method, 4, 4, CalibConfig(**SMALL, lr_oso_act=lr))
        return torch.cat([torch.cat([ly.oso_scale.detach(), ly.oso_offset.detach()]) for ly in qm.layers()]
                         + [q.step.detach().reshape(1) for q in qm.quantizers()])

    assert torch.equal(run("ioso", None), run("ioso", rule))  # None resolves to the rule
    assert not torch.equal(run("ioso", None), run("ioso", 4e-5))
    assert torch.equal(run("brecq", None), run("brecq", 4e-5))


def test_progress_is_one_bar_or_a_log_line_per_block(caplog, monkeypatch):
    """Without a terminal (as under pytest) the progress is one log line per block with losses and an ETA;
    the bar's total is every block's weight + activation steps."""
    import logging

    from ioso_tvm.calib import engine

    totals = []
    real = engine.tqdm

    def spy(*a, **k):
        totals.append(k.get("total"))
        return real(*a, **k)

    monkeypatch.setattr(engine, "tqdm", spy)
    with caplog.at_level(logging.INFO, logger="ioso_tvm.calib"):
        qm = calibrate(TinyRes().eval(), _data(), "brecq", config=CalibConfig(**{**SMALL, "progress": True}))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("calibrated block")]
    n_blocks = len(qm.blocks)
    assert len(lines) == n_blocks and all("ETA" in ln and "->" in ln for ln in lines)
    assert lines[-1].endswith("ETA 0 s")
    per_block = SMALL["iters"] + SMALL["act_iters"]  # blocks without a layer (pools) have no weight step
    assert per_block <= totals[-1] <= n_blocks * per_block
